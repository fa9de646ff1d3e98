"""Model-frame PSF, difference kernels and convolution of model-frame scenes.

scarlet fits components in a partially deconvolved "model frame" whose PSF
is a narrow Gaussian G; band b of the observation is reached by convolving
with a difference kernel k_b such that ``G * k_b ~= psf_b``
(Melchior et al. 2018, Sect. 2.2).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .. import pocketfft as sfft  # scipy.fft's transforms without importing scipy.fft
from . import kernels as _k

# Cost model used to pick direct vs FFT convolution, measured on the 2-core
# development machine (median of repeated process_time runs): the numba
# direct loop costs ~1.4 ns per multiply-add (bounds tests included); a
# float32 pocketfft r2c + c2r round trip ~0.45 ns per point per log2(points)
# plus ~10 us of call overhead. Measured examples (5 bands, 58 x 48 blend):
# 3x3 kernel direct 173 us vs FFT 84 us; 9x9 1000 us vs 100 us; so the
# direct sum only wins for tiny kernels on tiny blends.
_DIRECT_NS_PER_MAC = 1.4
_FFT_NS_PER_POINT_LOG = 0.45
_FFT_OVERHEAD_NS = 10_000.0

# Default crop of the difference kernels: drop at most 0.1 % of the kernel's
# absolute sum (was 0.01 %). On the simulated fields' PSFs this crops the
# kernels from 41 to 33 pixels, so the FFT grid (blend + kernel) shrinks by
# ~20 % in area and a blend fits ~10 % faster; the dropped wings lie far
# below the noise (kernel residual <= 3e-4 of the PSF norm) and, with the
# rescale below, cost no flux. Blend fluxes / colours were unchanged within
# their scatter on seeds 7, 3, 11, 5; hsc_cosmos_35 (broad PSF wings) keeps
# its 43-pixel kernels.
KERNEL_TRUNCATE = 1e-3
KERNEL_RENORMALISE = True   # rescale the cropped kernel to the full kernel's sum


def gaussian_psf(sigma: float, size: int | None = None) -> np.ndarray:
    """Pixel-integrated, unit-sum circular Gaussian on an odd grid.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels.
    size : int, optional
        Odd side length; default ``2 * ceil(5 sigma) + 1`` (at least 3).

    Returns
    -------
    (size, size) float64 array centred on its central pixel.
    """
    if size is None:
        size = max(3, 2 * int(math.ceil(5 * sigma)) + 1)
    if size % 2 == 0:
        raise ValueError("PSF size must be odd")
    c = size // 2
    edges = np.arange(size + 1) - c - 0.5
    # integrating over the pixel (rather than sampling the centre) keeps very
    # narrow model PSFs normalised and symmetric. math.erf on the few edges,
    # not scipy.special.erf: importing scipy.special cost ~0.1 s of every
    # deblend; the two agree within 5e-16 relative (tests/test_scarlet.py).
    scale = math.sqrt(2) * sigma
    cdf = 0.5 * (1 + np.array([math.erf(e / scale) for e in edges.tolist()]))
    g1 = np.diff(cdf)
    g = np.outer(g1, g1)
    return g / g.sum()


def _embed(img: np.ndarray, n: int) -> np.ndarray:
    """Centre an odd (h, w) image in an (n, n) zero array."""
    out = np.zeros((n, n))
    h, w = img.shape
    y0 = n // 2 - h // 2
    x0 = n // 2 - w // 2
    out[y0:y0 + h, x0:x0 + w] = img
    return out


def difference_kernels(psfs: np.ndarray, model_psf: np.ndarray, regularization: float = 1e-6,
                       truncate: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Kernels k_b with ``model_psf * k_b ~= psfs[b]``.

    Solved per band in Fourier space as a Tikhonov-regularised deconvolution,
    ``K_b = P_b conj(G) / (|G|^2 + lam max|G|^2)``. Where the observed PSF is
    wider than the model PSF (the intended use) P_b vanishes long before G
    does, so the regularisation only matters where both are negligible; if an
    observed PSF is narrower than the model PSF the problem is ill-posed and
    the regularisation bounds the kernel's amplification by
    ``1 / (2 sqrt(lam))`` (the residual is reported so callers can tell).
    The kernel is then cropped to the smallest odd square holding all but
    ``truncate`` of its absolute sum, which keeps FFT padding small, and
    (``KERNEL_RENORMALISE``) rescaled to the uncropped kernel's sum so the
    crop does not change fluxes.

    Parameters
    ----------
    psfs : (B, py, px) observed PSFs, odd, centred, unit sum.
    model_psf : (m, m) model-frame PSF, odd, centred.
    regularization : float
        lam above, relative to max |G|^2.
    truncate : float, optional
        Fraction of the kernel's absolute sum that may be dropped by cropping
        (default ``KERNEL_TRUNCATE``).

    Returns
    -------
    kernels : (B, k, k) float64
    residual : (B,) relative L2 error ``||G * k_b - psf_b|| / ||psf_b||``.
    """
    if truncate is None:
        truncate = KERNEL_TRUNCATE
    psfs = np.asarray(psfs, dtype=np.float64)
    B, py, px = psfs.shape
    n = max(py, px, model_psf.shape[0], model_psf.shape[1])
    n += 1 - n % 2
    g = _embed(model_psf, n)
    ghat = sfft.fft2(sfft.ifftshift(g))
    g2 = (ghat * ghat.conj()).real
    lam = regularization * g2.max()
    kern = np.empty((B, n, n))
    for b in range(B):
        phat = sfft.fft2(sfft.ifftshift(_embed(psfs[b], n)))
        khat = phat * ghat.conj() / (g2 + lam)
        kern[b] = sfft.fftshift(sfft.ifft2(khat).real)
    # crop: per band, the smallest half-width r_b that keeps 1 - truncate of
    # the absolute sum; pixels outside r_b are zeroed and the stack is cut to
    # the largest r_b. A band's kernel therefore does not depend on which
    # other bands it was computed with (reconstruction recomputes single
    # bands and must get the fit's kernel).
    c = n // 2
    total = np.abs(kern).sum(axis=(1, 2))
    full_sum = kern.sum(axis=(1, 2))
    rb = np.full(B, c)
    for b in range(B):
        for rr in range(1, c + 1):
            inner = np.abs(kern[b, c - rr:c + rr + 1, c - rr:c + rr + 1]).sum()
            if total[b] - inner <= truncate * total[b]:
                rb[b] = rr
                break
    r = int(rb.max()) if B else c
    kern = kern[:, c - r:c + r + 1, c - r:c + r + 1].copy()
    for b in range(B):
        if rb[b] < r:
            d = r - rb[b]
            keep = np.zeros_like(kern[b], dtype=bool)
            keep[d:2 * r + 1 - d, d:2 * r + 1 - d] = True
            kern[b][~keep] = 0.0
    if KERNEL_RENORMALISE:
        # the dropped wings are tiny but of one sign far out; rescale so the
        # cropped kernel keeps the full kernel's sum (fluxes conserved)
        cs = kern.sum(axis=(1, 2))
        ok = cs != 0
        kern[ok] *= (full_sum[ok] / cs[ok])[:, None, None]
    # residual of the cropped kernel against the observed PSF, compared on a
    # common odd grid holding both the full convolution and the PSF
    m = model_psf.shape[0] + kern.shape[1] - 1
    ncmp = max(m, py, px)
    nf = sfft.next_fast_len(ncmp)
    ghat_c = sfft.rfft2(model_psf, (nf, nf))
    resid = np.empty(B)
    for b in range(B):
        full = sfft.irfft2(ghat_c * sfft.rfft2(kern[b], (nf, nf)), (nf, nf))[:m, :m]
        rec = _embed(full, ncmp)
        ref = _embed(psfs[b], ncmp)
        resid[b] = np.linalg.norm(rec - ref) / np.linalg.norm(ref)
    return kern, resid


def _pocketfft_backend():
    """Direct pocketfft entry points, if they behave like scipy.fft here.

    ``scipy.fft.rfft2``/``irfft2`` spend ~25 us per call validating shapes
    and axes, a third of a 5-band round trip on a blend-sized grid; the loop
    calls them twice per iteration, so the compiled functions behind them are
    used directly when they exist and agree with the public API (checked once
    at import), else the public API is used.
    """
    try:
        pf = sfft.compiled  # loaded once, by ..pocketfft, for every user of the transforms
        if pf is None:  # pragma: no cover - scipy.fft's own functions are in use
            return None

        x = np.random.default_rng(1).random((2, 6, 5)).astype(np.float32)
        f = pf.r2c(x, (1, 2), True, 0, None, 1)
        if not np.allclose(f, sfft.rfft2(x), atol=1e-5):
            return None
        back = pf.c2r(f, (1, 2), 5, False, 2, None, 1)
        if not np.allclose(back, x, atol=1e-5):
            return None
        return pf
    except Exception:  # pragma: no cover - depends on the scipy build
        return None


_PF = _pocketfft_backend()


_KHAT_CACHE_SIZE = 256  # grid shapes per kernel set (a few MB at most)

# Per-thread scratch arrays for transforms. Fresh multi-MB arrays are
# page-faulted on every use (half the cost of a least-squares spectrum solve
# on hsc_cosmos_35); convolvers are memoised and shared, so scratch is kept
# per thread (a dask worker may run blends in several threads), one array per
# purpose, grown to the largest request seen.
_SCRATCH = threading.local()


def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A C-contiguous work array of ``shape``, reused by the calling thread (contents undefined)."""
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    n = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
        buf = pool[name] = np.empty(max(n, 1), dtype)
    return buf[:n].reshape(shape)


def memoised(cache: dict, key, make, size: int):
    """``cache[key]``, made by ``make()`` on a miss; at most ``size`` entries (FIFO)."""
    hit = cache.get(key)
    if hit is None:
        hit = make()
        if len(cache) >= size:
            cache.pop(next(iter(cache)))
        cache[key] = hit
    return hit


class Convolver:
    """'same'-size, zero-padded convolution of (B, H, W) scenes with per-band kernels.

    Chooses direct summation or FFT by a cost model (``method='auto'``): the
    FFT costs ~B Fy Fx log2(Fy Fx) on a padded grid of at least H + ky//2 by
    W + kx//2 (half a kernel of padding is enough because the scene is zero
    outside the box and only the box is kept, so wrapped-around flux never
    lands inside it), the direct sum B H W ky kx. For the difference kernels
    of real PSFs (tens of pixels wide) the FFT wins by one to two orders of
    magnitude, and even a 3 x 3 kernel on a 58 x 48 blend is twice as fast
    by FFT; direct wins only for tiny kernels on tiny blends.

    Kernel transforms are computed once, in float32 (complex64): the model
    and data are float32 and single-precision FFT error (~1e-7 relative) is
    far below the noise.

    For the optimisation loop :meth:`padded` gives a zero (B, Fy, Fx) buffer
    whose [:, :H, :W] corner the caller fills; :meth:`convolve_padded` and
    :meth:`adjoint_padded` then transform it without any copy or padding.
    """

    def __init__(self, kernels: np.ndarray, shape: tuple[int, int], method: str = "auto",
                 khat_cache: dict | None = None):
        kernels = np.asarray(kernels, dtype=np.float32)
        B, ky, kx = kernels.shape
        H, W = shape
        self.shape = (int(H), int(W))
        self.kernels = kernels
        # the kernel must also fit in the grid (blends smaller than it)
        self.fshape = (sfft.next_fast_len(max(H + ky // 2, ky), real=True),
                       sfft.next_fast_len(max(W + kx // 2, kx), real=True))
        if method == "auto":
            npts = self.fshape[0] * self.fshape[1]
            t_fft = _FFT_OVERHEAD_NS + _FFT_NS_PER_POINT_LOG * B * npts * math.log2(npts)
            t_dir = _DIRECT_NS_PER_MAC * B * H * W * ky * kx
            method = "direct" if t_dir < t_fft else "fft"
        if method not in ("fft", "direct"):
            raise ValueError(f"unknown convolution method {method!r}")
        self.method = method
        # grid shape -> kernel transforms; may be shared by convolvers of the
        # same kernels (blends of one patch ask for the same local frames)
        self._khat_cache = {} if khat_cache is None else khat_cache
        if method == "fft":
            self.khat = self.kernel_hat(self.fshape)
            # operator norm of band b's convolution (for Lipschitz constants)
            self.norm2 = (np.abs(self.khat) ** 2).max(axis=(1, 2)).astype(np.float64)
            self.khat_conj = np.conj(self.khat)
        else:
            self.fshape = self.shape
            Fy, Fx = sfft.next_fast_len(2 * ky), sfft.next_fast_len(2 * kx)
            kh = sfft.rfft2(kernels.astype(np.float64), (Fy, Fx))
            self.norm2 = (np.abs(kh) ** 2).max(axis=(1, 2))

    def kernel_hat(self, fshape: tuple[int, int]) -> np.ndarray:
        """(B, fy, fx // 2 + 1) complex64 transforms of the kernels on a (fy, fx) grid.

        Kernel centre at the origin, so the 'same' output of a scene placed at
        (0, 0) is the grid's top-left corner. Cached per shape: the blend grid's
        are the loop's, and least-squares spectra ask for small local frames.
        """
        fshape = (int(fshape[0]), int(fshape[1]))
        def make():
            B, ky, kx = self.kernels.shape
            pad = np.zeros((B,) + fshape, np.float32)
            pad[:, :ky, :kx] = self.kernels
            return self.rfft(np.roll(pad, (-(ky // 2), -(kx // 2)), axis=(1, 2)))

        return memoised(self._khat_cache, fshape, make, _KHAT_CACHE_SIZE)

    # -- loop interface -------------------------------------------------------
    def padded(self) -> np.ndarray:
        """Zero (B, Fy, Fx) float32 work buffer (its [:, :H, :W] corner is the scene)."""
        return np.zeros((self.kernels.shape[0],) + self.fshape, np.float32)

    def rfft(self, buf: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Forward real FFT over the last two axes of a (n, Fy, Fx) float32 array."""
        if _PF is not None:
            return _PF.r2c(buf, (1, 2), True, 0, out, 1)
        return sfft.rfft2(buf)

    def irfft(self, f: np.ndarray, fshape: tuple[int, int] | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
        """Inverse of :meth:`rfft` (normalised), back to (n, Fy, Fx) float32.

        ``fshape`` is the real grid when it is not the blend's (local frames).
        """
        fshape = self.fshape if fshape is None else fshape
        if _PF is not None:
            return _PF.c2r(f, (1, 2), fshape[1], False, 2, out, 1)
        res = sfft.irfft2(f, s=fshape)
        if out is None:
            return res
        out[...] = res
        return out

    def _apply_padded(self, buf, out, adjoint):
        if out is None:
            out = np.empty(buf.shape, np.float32)
        if self.method != "fft":
            (_k.correlate_direct if adjoint else _k.convolve_direct)(buf, self.kernels, out)
            return out
        # the loop transforms the same shapes twice per iteration: reuse one
        # spectrum buffer rather than allocate (and page-fault) a new one
        f = self.rfft(buf, scratch("spectrum", buf.shape[:2] + (buf.shape[2] // 2 + 1,), np.complex64))
        f *= self.khat_conj if adjoint else self.khat
        return self.irfft(f, out=out)

    def convolve_padded(self, buf: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Convolve a :meth:`padded` buffer; returns a full (B, Fy, Fx) array (``out`` if given)."""
        return self._apply_padded(buf, out, adjoint=False)

    def adjoint_padded(self, buf: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Adjoint of :meth:`convolve_padded` (correlation with the kernels)."""
        return self._apply_padded(buf, out, adjoint=True)

    # -- convenience ----------------------------------------------------------
    def convolve(self, x: np.ndarray) -> np.ndarray:
        """Return x_b * k_b for every band (x: (B, H, W))."""
        H, W = self.shape
        buf = self.padded()
        buf[:, :H, :W] = x
        return self.convolve_padded(buf)[:, :H, :W]

    def adjoint(self, x: np.ndarray) -> np.ndarray:
        """Adjoint of :meth:`convolve`: correlation with k_b (for gradients)."""
        H, W = self.shape
        buf = self.padded()
        buf[:, :H, :W] = x
        return self.adjoint_padded(buf)[:, :H, :W]


def render(components, diff_kernels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Observed-frame model (B, H, W) of model-frame components.

    Parameters
    ----------
    components : iterable of :class:`~scarletstore.store.components.Component`
        Factorised (2-D morph) or cube (3-D morph) components in blend pixels.
    diff_kernels : (B, k, k) difference kernels from :func:`difference_kernels`.
    shape : (H, W) of the blend box.
    """
    diff_kernels = np.asarray(diff_kernels)
    B = diff_kernels.shape[0]
    H, W = shape
    scene = np.zeros((B, H, W), np.float32)
    for c in components:
        model = c.model()
        h, w = model.shape[1:]
        # clip boxes that stick out of the blend box
        ya, xa = max(c.y0, 0), max(c.x0, 0)
        yb, xb = min(c.y0 + h, H), min(c.x0 + w, W)
        if ya >= yb or xa >= xb:
            continue
        scene[:, ya:yb, xa:xb] += model[:, ya - c.y0:yb - c.y0, xa - c.x0:xb - c.x0]
    return np.ascontiguousarray(Convolver(diff_kernels, (H, W)).convolve(scene), dtype=np.float32)
