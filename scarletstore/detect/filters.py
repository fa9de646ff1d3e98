"""Detection images: PSF-matched and Gaussian filters, hole refilling, the positive chi^2 map.

See :mod:`scarletstore.detect.detect` for how :func:`~scarletstore.detect.detect.detect` uses them.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import special, stats

from ..errors import InputError
from .psf_size import psf_fwhm  # noqa: F401  (detect and its tests take it from here)


# ------------------------------------------------------------------ PSF and filters
def _corr_kernel(psf, keep=0.998):
    # Matched filtering is a correlation with the PSF: convolve with the
    # flipped PSF. The kernel is cut to the smallest centred square holding
    # `keep` of sum(P^2) (the matched filter's S/N weight): the far wings
    # add no S/N but a 41 x 41 kernel costs ~3x the FFT work of a 15 x 15 one.
    p = np.asarray(psf, dtype=np.float64)
    cy, cx = p.shape[0] // 2, p.shape[1] // 2
    p2 = p * p
    total = p2.sum()
    h = 1
    while h < min(cy, cx):
        if p2[cy - h:cy + h + 1, cx - h:cx + h + 1].sum() >= keep * total:
            break
        h += 1
    core = p[cy - h:cy + h + 1, cx - h:cx + h + 1]
    return np.ascontiguousarray(core[::-1, ::-1].astype(np.float32))


class _FFTConvolver:
    """'same'-size linear convolution of many images of one shape with one small kernel.

    Zero-pads to a fast FFT length (>= image + kernel - 1, so there is no
    wrap-around) and keeps the kernel's transform. One full-frame real FFT
    pair in single precision is 3-4x faster than overlap-add or
    :func:`scipy.signal.fftconvolve` (which pads to float64-friendly sizes and
    copies more) on a 4000 x 4000 image with a 15 x 15 kernel.
    """

    def __init__(self, shape, kernel):
        from scipy import fft

        self._fft = fft
        kh, kw = kernel.shape
        self.h, self.w = kh // 2, kw // 2
        self.shape = tuple(shape)
        self.pad = (fft.next_fast_len(shape[0] + kh - 1, real=True),
                    fft.next_fast_len(shape[1] + kw - 1, real=True))
        buf = np.zeros(self.pad, np.float32)
        buf[:kh, :kw] = kernel
        self.kf = fft.rfft2(buf)

    def __call__(self, image):
        ny, nx = self.shape
        buf = np.zeros(self.pad, np.float32)
        buf[:ny, :nx] = image
        f = self._fft.rfft2(buf)
        del buf
        f *= self.kf
        full = self._fft.irfft2(f, s=self.pad)
        del f
        return np.ascontiguousarray(full[self.h:self.h + ny, self.w:self.w + nx], dtype=np.float32)


def matched_filter(image, variance, good, psf, background=None, denominator=None, convolver=None):
    """PSF-matched-filter significance of one band.

    Parameters
    ----------
    image, variance : (ny, nx) arrays
    good : (ny, nx) bool array
        Usable pixels (others get zero weight).
    psf : (py, px) array
        PSF image, unit sum, odd-sized.
    background : (ny, nx) array, optional
        Subtracted from the image first.
    denominator : (ny, nx) float32 array, optional
        ``sqrt((V w) * P^2)`` from an earlier call (it does not depend on the
        background), to save one convolution.
    convolver : object, optional
        The PSF convolver returned by an earlier call on the same band.

    Returns
    -------
    significance : (ny, nx) float32
        Zero where no usable pixel contributes.
    denominator : (ny, nx) float32
        The noise of the filtered image (0 where undefined).
    convolver : object
        Reusable for the same band and image shape.
    """
    kern = _corr_kernel(psf)
    if convolver is None:
        convolver = _FFTConvolver(image.shape, kern)
    if denominator is None:
        v = np.where(good, variance, 0).astype(np.float32, copy=False)
        den = _FFTConvolver(image.shape, kern * kern)(v)
        del v
        # FFT round-off can leave tiny negatives where there is no data.
        tiny = np.float32(1e-7) * max(float(den.max()), 1e-30)
        den[den < tiny] = 0
        np.sqrt(den, out=den)
        denominator = den
    d = image.astype(np.float32, copy=True)
    if background is not None:
        d -= background
    d[~good] = 0
    num = convolver(d)
    del d
    ok = denominator > 0
    np.divide(num, denominator, out=num, where=ok)
    num[~ok] = 0
    return num, denominator, convolver


def _gauss1d(sigma):
    r = max(1, int(np.ceil(4.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_significance(image, variance, good, sigma, background=None, sigma_wide=0.0):
    """Significance of the image smoothed by a small Gaussian (the peak-finding image).

    Same construction as :func:`matched_filter` with a circular Gaussian of
    ``sigma`` pixels instead of the PSF: narrower than the PSF, so maxima of
    close neighbours stay apart, at the cost of more noise per pixel (which
    the normalisation accounts for). With ``sigma_wide > sigma`` the kernel is
    the difference of Gaussians ``G(sigma) - G(sigma_wide)``, a band-pass that
    removes the smooth slope of a bright neighbour so a faint source on it
    still makes a local maximum. Separable (sums of separable terms), so it
    costs far less than an FFT convolution. ``sigma <= 0`` gives the
    unsmoothed ``(I - B) / sqrt(V)``.

    Returns
    -------
    (ny, nx) float32, 0 where no usable pixel contributes.
    """
    from scipy import ndimage

    def sep(a, k):
        out = ndimage.correlate1d(a, k, axis=0, mode="constant")
        ndimage.correlate1d(out, k, axis=1, output=out, mode="constant")
        return out

    d = image.astype(np.float32, copy=True)
    if background is not None:
        d -= background
    d[~good] = 0
    v = np.where(good, variance, 0).astype(np.float32)
    if sigma_wide > sigma > 0:
        kw = _gauss1d(sigma_wide)
        ks = np.zeros_like(kw)
        k0 = _gauss1d(sigma)
        c = (kw.size - k0.size) // 2
        ks[c:c + k0.size] = k0
        num = sep(d, ks)
        num -= sep(d, kw)
        den = sep(v, ks * ks)
        den -= 2 * sep(v, ks * kw)
        den += sep(v, kw * kw)
        d, v = num, den
    elif sigma > 0:
        k = _gauss1d(sigma)
        d = sep(d, k)
        v = sep(v, k * k)
    tiny = np.float32(1e-12) * max(float(v.max()), 1e-30)
    ok = v > tiny
    np.sqrt(v, out=v, where=ok)
    np.divide(d, v, out=d, where=ok)
    d[~ok] = 0
    return d


def _kernel_coverage(good, sigma, outside=0.0):
    """Fraction of the peak kernel's S/N weight (its square) that falls on ``good`` pixels
    (pixels off the image count as ``outside``)."""
    from scipy import ndimage

    k = _gauss1d(sigma) if sigma > 0 else np.ones(1, np.float32)
    k2 = k * k
    w = good.astype(np.float32)
    ndimage.correlate1d(w, k2, axis=0, output=w, mode="constant", cval=outside)
    ndimage.correlate1d(w, k2, axis=1, output=w, mode="constant", cval=outside)
    w /= np.float32(k2.sum() ** 2)
    return w


def refilter_holes(sig, image, variance, good, psf, background=None, min_pixels=9, holes=None):
    """Matched filter with the whole PSF around bad regions of at least ``min_pixels``.

    :func:`matched_filter` cuts the PSF to its S/N-bearing core. Next to a
    bad region wider than a few pixels (a saturated core, a bad column) that
    core sees a changing part of the region as it moves, which leaves bumps
    of several per cent of a bright source in the significance, and inside
    a region wider than the core nothing is in reach (zero): a saturated star
    gets a ring of peaks. Around each such region (padded by the PSF radius)
    the significance is recomputed with the full PSF image, which reaches the
    unsaturated wings smoothly. Small regions (hot pixels, most cosmic rays)
    need no such care and are skipped.

    Parameters
    ----------
    sig : (ny, nx) float32
        Significance from :func:`matched_filter`, modified in place.
    image, variance, good, psf, background
        As for :func:`matched_filter`.
    holes : (ny, nx) bool, optional
        The bad pixels to treat as holes in the data (default ``~good``);
        pixels without data (NO_DATA) are left out by the caller: like the
        image's edge, they are not reached into.

    Returns
    -------
    sig
    """
    from scipy import ndimage, signal

    holes = ~good if holes is None else holes
    if not holes.any():
        return sig
    labels, _ = ndimage.label(holes, structure=np.ones((3, 3), bool))
    p = np.asarray(psf, np.float64)
    ry, rx = p.shape[0] // 2, p.shape[1] // 2
    ny, nx = sig.shape
    kern, kern2 = p[::-1, ::-1], (p * p)[::-1, ::-1]
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        region = labels[sl] == lab
        if region.sum() < min_pixels and not (sig[sl][region] == 0).any():
            continue
        y0, y1 = max(sl[0].start - 2 * ry, 0), min(sl[0].stop + 2 * ry, ny)
        x0, x1 = max(sl[1].start - 2 * rx, 0), min(sl[1].stop + 2 * rx, nx)
        g = good[y0:y1, x0:x1]
        d = image[y0:y1, x0:x1].astype(np.float64)
        if background is not None:
            d = d - background[y0:y1, x0:x1]
        d = np.where(g, d, 0.0)
        v = np.where(g, variance[y0:y1, x0:x1], 0.0).astype(np.float64)
        num = signal.fftconvolve(d, kern, mode="same")
        den = signal.fftconvolve(v, kern2, mode="same")
        ok = den > 1e-7 * max(float(den.max()), 1e-30)
        out = np.zeros(num.shape)
        out[ok] = num[ok] / np.sqrt(den[ok])
        # the outer PSF radius of the cutout misses data beyond its edge: keep the inner part
        iy0, iy1 = (ry if y0 > 0 else 0), (y1 - y0 - ry if y1 < ny else y1 - y0)
        ix0, ix1 = (rx if x0 > 0 else 0), (x1 - x0 - rx if x1 < nx else x1 - x0)
        sig[y0 + iy0:y0 + iy1, x0 + ix0:x0 + ix1] = out[iy0:iy1, ix0:ix1]
    return sig


def fill_unsupported(sharp, sig, good, sigma, min_coverage=0.5, no_data=None):
    """Fill the peak image where bad pixels leave its narrow kernel without support.

    Where less than ``min_coverage`` of the narrow kernel's weight lies on
    usable pixels (a cosmic ray, a bad column, a saturated core), the peak
    image is undefined: left at zero it cuts a source in two or rings a
    saturated star with maxima. There it is replaced by the PSF-matched
    significance ``sig``, the only good-pixel statistic that spans the hole
    (by Cauchy-Schwarz its expectation peaks at the centre of a source even
    when the source's core is masked), scaled by the largest ratio
    ``sharp / sig`` on the bright part of the rim of usable pixels around the
    hole (one ratio per hole, so the fill keeps the shape of ``sig`` and adds
    no maxima of its own, and rises above the rim rather than leaving a
    ring of maxima around it).

    Parameters
    ----------
    sharp, sig : (ny, nx) float32
        Peak image and PSF-matched significance of one band (modified: ``sharp``).
    good : (ny, nx) bool
        Usable pixels.
    sigma : float
        Sigma (pixels) of the peak image's Gaussian.
    no_data : (ny, nx) bool, optional
        Pixels without data (NO_DATA, EDGE), treated like pixels off the
        image: never filled, not counted against a kernel's support and
        not part of a rim, so nothing is extrapolated into a wide border.

    Returns
    -------
    (ny, nx) float32, ``sharp`` filled in place.
    """
    from scipy import ndimage

    if good.all():
        return sharp
    if no_data is None or not no_data.any():
        low = _kernel_coverage(good, sigma) < min_coverage
    else:
        # support relative to the pixels that exist (off the image counts as existing,
        # as without no-data pixels, so the image's corners are treated as before)
        low = _kernel_coverage(good, sigma) < min_coverage * _kernel_coverage(~no_data, sigma, 1.0)
        low &= ~no_data
    if not low.any():
        return sharp
    labels, n = ndimage.label(low, structure=np.ones((3, 3), bool))
    # rim: the usable-kernel pixels touching a hole, each given to the hole it touches
    near = ndimage.grey_dilation(labels, size=(3, 3))
    rim = (labels == 0) & (near > 0)
    if no_data is not None:
        rim &= ~no_data
    lab = near[rim]
    rs, rr = sig[rim].astype(np.float64), sharp[rim].astype(np.float64)
    # The ratio sharp / sig grows towards a source's centre (the narrow image
    # is the more peaked), so the ratio on the rim under-fills the hole and
    # leaves a ring of maxima just outside it. The largest ratio on the
    # bright half of each rim (sig >= half its rim maximum, so sky noise
    # ratios do not count) makes the filled hole rise above its rim.
    top = np.zeros(n + 1)
    np.maximum.at(top, lab, rs)
    use = (rs >= 0.5 * top[lab]) & (rs > 0)
    scale = np.zeros(n + 1)
    np.maximum.at(scale, lab[use], rr[use] / rs[use])
    ok = labels > 0
    sharp[ok] = (scale[labels[ok]] * sig[ok]).astype(np.float32)
    return sharp


# ------------------------------------------------------------------ chi^2 image
def _positive_chi2_table(nbands, tmax=36.0, npts=2048):
    # z(t) with t = sqrt(X), X ~ sum_k C(n,k) 2^-n chi2_k (k=0 is a point mass
    # at 0). Tabulated in t, where z(t) is smooth and close to linear.
    t = np.linspace(0.0, tmax, npts)
    x = t * t
    k = np.arange(1, nbands + 1)
    logw = (special.gammaln(nbands + 1) - special.gammaln(k + 1) - special.gammaln(nbands - k + 1)
            - nbands * np.log(2.0))
    logsf = special.logsumexp(logw[:, None] + stats.chi2.logsf(x[None, :], k[:, None]), axis=0)
    z = -special.ndtri(np.exp(logsf))
    return t, z


_TABLES: dict = {}


def positive_chi2_significance(chi2, nvalid, out=None, chunk=256):
    """Gaussian-equivalent significance of the positive-flux chi^2 statistic.

    Parameters
    ----------
    chi2 : (ny, nx) array
        ``sum_b max(nu_b, 0)^2``.
    nvalid : (ny, nx) int array
        Number of bands that contributed at each pixel.
    out : (ny, nx) float32 array, optional

    Returns
    -------
    (ny, nx) float32 array
        One-sided Gaussian significance with the same upper-tail probability
        under pure noise; 0 where ``nvalid == 0``. Beyond the tabulated range
        (~36 sigma) it continues with unit slope in ``sqrt(chi2)``.
    """
    if out is None:
        out = np.empty(chi2.shape, np.float32)
    # Row chunks: float64 temporaries stay small, and out may be chi2 itself
    # because each chunk is read completely before it is written.
    for y0 in range(0, chi2.shape[0], chunk):
        sl = slice(y0, y0 + chunk)
        nv = nvalid[sl]
        tt = np.sqrt(chi2[sl].astype(np.float64))
        zz = np.zeros(tt.shape)
        for n in np.unique(nv):
            n = int(n)
            if n == 0:
                continue
            if n not in _TABLES:
                _TABLES[n] = _positive_chi2_table(n)
            t, z = _TABLES[n]
            sel = nv == n
            ts = tt[sel]
            zs = np.interp(ts, t, z)
            far = ts > t[-1]
            zs[far] = z[-1] + (ts[far] - t[-1])
            zz[sel] = zs
        out[sl] = zz
    return out


@numba.njit(cache=True)
def _accumulate_positive_square(acc, sig):
    # acc += max(sig, 0)^2 without a full-size temporary.
    ny, nx = sig.shape
    for y in range(ny):
        for x in range(nx):
            v = sig[y, x]
            if v > 0:
                acc[y, x] += v * v


def given_significance(sig, shape):
    """A precomputed significance image as the band loop's ``(sig, den, convolver)``.

    Non-finite pixels (no data) become 0 and count as no data in the
    multi-band image (``den`` is 0 there); there is no convolver to reuse.
    """
    sig = np.asarray(sig, np.float32)
    if sig.shape != tuple(shape):
        raise InputError(f"significance image {sig.shape} does not match the exposure {tuple(shape)}")
    ok = np.isfinite(sig)
    return np.where(ok, sig, np.float32(0.0)), ok.astype(np.float32), None
