"""Detection: background, detection images, footprints, peaks and their association.

:func:`detect` turns an exposure Dataset into the ``parents`` Dataset:

1. **Background** per band on a mesh (:mod:`scarletstore.background`), in two
   passes: the second excludes pixels detected with the first.
2. **Detection images.** Per band the PSF-matched-filter significance
   ``nu_b = ((I - B) w) * P / sqrt((V w) * P^2)`` (``*`` = correlation, ``w`` =
   0 on unusable pixels), which has unit noise wherever data exist. Across
   bands the likelihood-ratio statistic of a point source with an unknown,
   non-negative SED, ``X = sum_b max(nu_b, 0)^2`` (the chi^2 image of Szalay,
   Connolly & Szokoly 1999 restricted to positive fluxes as in Kaiser 2001),
   whose null distribution is the mixture ``sum_k C(n,k) 2^-n chi2_k``; it is
   mapped through that distribution to a one-sided Gaussian-equivalent
   significance ``Z`` so one threshold (in sigma) applies to every image.
3. **Footprints.** In every detection image the connected regions (8-
   connected) above ``threshold`` with at least ``min_area`` pixels; their union
   is grown by ``grow_fwhm`` PSF FWHM and relabelled, so footprints seen in
   different images that overlap become one parent.
4. **Peaks.** Each detection image has a companion *peak image*: the same
   construction with a narrow Gaussian (``peak_sigma``, 0.2 FWHM) instead of
   the PSF, per band and as the unit-noise sum over bands. The PSF-matched
   images are too smooth to show two maxima for neighbours ~1.5 FWHM apart;
   the narrow ones do. Maxima are found by a descending flood (union-find)
   over the footprint that records where each maximum's region meets a
   higher one: a maximum is a peak when it rises at least ``min_prominence``
   sigma above that saddle (splits close pairs, rejects noise bumps) and the
   detection significance at its pixel is at least ``peak_floor``. Sub-pixel
   positions come from a parabola through the 3 x 3 neighbourhood. On a
   bright neighbour's wing the significance is above threshold everywhere,
   so a peak must also stand out of that wing by itself: its height above
   the lower of the saddle level and the neighbour's 180-degree mirror value
   must reach ``peak_own_floor`` (4) sigma of the pixel noise and of a
   ``peak_contrast`` (5 %) uncertainty of the wing, added in quadrature.
   4 sigma is where the prominence of pure-noise maxima of the peak image
   becomes rare (measured on 10^6 noise pixels: 1e-2 per pixel reach 1.5
   sigma, 6e-4 reach 3, 2e-5 reach 4); 5 % is the scale of PSF-model and
   saturation-edge structure in a bright profile. A peak that meets no
   higher one (alone in its footprint island, as on the far wing of a
   bright star where the wing lifts the significance over the threshold in
   patches) is judged above the median of the ring 1.5-2.5 FWHM about it.
5. **Association.** Peaks from different images closer than
   ``association_radius`` become one peak carrying the OR of the images that
   saw it (bit i = band i, bit 30 = the multi-band image). A peak only single
   bands saw needs ``band_only_floor`` sigma (single-band images are noisier).
6. **Companions.** Around every bright peak the symmetric residual
   ``L(p) - L(2c - p)`` of the multi-band peak image (the SDSS deblender's
   template idea) reveals faint neighbours on a bright source's slope that
   make no local maximum; its maxima that rise ``residual_prominence``
   (0.5 sigma) above the saddle to a higher one (the same flood: ripples on
   the flank of a detected neighbour's residual do not count; more than
   0.5 sigma also drops faint members of blends of extended sources) and
   pass the residual thresholds become peaks flagged RESIDUAL. A seed is searched as far as
   its light can hide a companion (its height along the point-source
   profile of the peak image, 3-8 FWHM), so a saturated star's wings do not
   hide sources beyond a fixed radius.
7. **Known positions** (``known`` argument and the exposure's
   ``known_y/known_x``) become peaks flagged EXTERNAL: merged (one-to-one,
   closest first) into a detected peak within the association radius, else
   added inside the parent they fall in, else given a new parent (a disk one
   growth radius wide).

Bad pixels (mask planes ``bad_mask_planes``, by default those of Rubin's
deblender: BAD, CR, NO_DATA, SAT, SUSPECT, EDGE) have zero weight in every
image, so they never seed, grow or peak a detection by their own values; a
footprint may still cover them when it grows from good neighbours. Around
bad regions of 9 pixels or more the significance is recomputed with the
whole PSF (:func:`refilter_holes`), and where bad pixels leave the narrow
peak kernel without support the peak image is filled from it
(:func:`fill_unsupported`): a saturated star is detected from its
unsaturated wings with one peak at its centre, and a cosmic ray or bad
column does not cut a source in two.

Speed: PSF convolutions are full-frame single-precision FFTs with the kernel
cut to its S/N-bearing core, the peak images separable Gaussian filters, one
band at a time, so a 4000 x 4000 x 6 patch needs only a few
full-size temporaries. Labelling is :func:`scipy.ndimage.label` (compiled, and
faster than a numba version would be); span building, growth and the peak
flood are numba kernels (see :mod:`scarletstore.footprint` and below).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numba
import numpy as np
import xarray as xr
from scipy import special, stats
from scipy.spatial import cKDTree

from . import footprint as fp
from .background import estimate_background
from .errors import InputError
from .schema import stamp, validate

__all__ = [
    "detect",
    "read_peaks_table",
    "psf_fwhm",
    "matched_filter",
    "positive_chi2_significance",
    "find_peaks",
    "DEFAULTS",
    "PEAK_EXTERNAL",
    "PEAK_RESIDUAL",
    "PEAK_NO_FOOTPRINT",
    "PARENT_EDGE",
    "PARENT_HAS_EXTERNAL",
    "PARENT_EXTERNAL_ONLY",
    "CHI2_BIT",
]

#: peak_flags bit 0: the peak comes from a known (external) position.
PEAK_EXTERNAL = 1
#: peak_flags bit 1: found in the symmetric residual of a brighter peak (a companion).
PEAK_RESIDUAL = 2
#: peak_flags bit 2: a known position on no detected footprint (it got a PSF-sized one).
PEAK_NO_FOOTPRINT = 4
#: parent_flags bits.
PARENT_EDGE = 1 << 0            # footprint touches the image border
PARENT_HAS_EXTERNAL = 1 << 1    # at least one peak is external
PARENT_EXTERNAL_ONLY = 1 << 2   # created for a known position, nothing detected
#: peak_bands bit of the multi-band (chi^2) detection image.
CHI2_BIT = 30

#: Mask planes whose pixels never enter detection: the default bad mask of
#: Rubin's deblender (its ``badMask`` setting), so detect and deblend agree.
from .masks import DEFAULT_BAD_PLANES  # noqa: E402  (one definition for every stage)

#: Default configuration; ``None`` entries are derived from the PSF (see :func:`detect`).
DEFAULTS = {
    "threshold": 5.0,
    "min_area": None,            # -> max(5, 0.5 * pi * (FWHM / 2)^2)
    "grow_fwhm": 1.0,            # footprint growth, in FWHM
    "peak_floor": None,          # -> threshold
    "min_prominence": 1.5,       # sigma above the saddle to a higher peak
    "peak_contrast": 0.05,       # fractional model uncertainty of a brighter neighbour's light
    "peak_own_floor": 4.0,       # sigma above the brighter neighbour's wing (see _own_significance)
    "peak_ring": 1.5,            # FWHM: a peak meeting no higher one is judged above its ring r..r+1
    "peak_sigma": None,          # -> Gaussian sigma (px) of the peak-finding image
    "peak_sigma_wide": 0.0,      # > peak_sigma: difference-of-Gaussians peak image
    "peak_combine": "sum",       # multi-band peak image: "sum" (linear) or "chi2"
    "peak_level": 0.0,           # the peak flood ignores pixels below this
    "min_separation": None,      # -> max(2, 0.5 FWHM) pixels
    "association_radius": None,  # -> max(2, 1.0 FWHM) pixels
    "per_band": True,            # detect in each band as well as in the multi-band image
    "band_only_floor": 10.0,     # min significance of a peak no multi-band image saw
    "residual_peaks": True,      # search companions in symmetric residuals
    "residual_seed_min": 20.0,   # peaks at least this bright (peak image) are searched around
    "residual_radius": None,     # -> 3 FWHM, least search window radius
    "residual_radius_max": None, # -> 8 FWHM, search radius of the brightest seeds (see _residual_radii)
    "residual_exclusion": None,  # -> 0.6 FWHM, no companion closer to a peak than this
    "residual_min": 7.0,         # residual (units of the peak image noise) of a companion
    "residual_frac": 0.2,        # ... and at least this fraction of the local peak image
    "residual_prominence": 0.5,  # ... and this far above the saddle to a higher residual maximum
    "refine_isolated": True,     # isolated peaks: position from the PSF-matched image
    "bkg_cell": 128,
    "bkg_nsigma": 3.0,
    "bkg_passes": 2,
    "bkg_mask_threshold": 3.0,   # pass-2 background excludes nu > this (grown)
    "bad_mask_planes": None,     # -> DEFAULT_BAD_PLANES + the exposure's bad_mask_planes attr
}


# ------------------------------------------------------------------ PSF and filters
def psf_fwhm(psf, oversample=4):
    """FWHM (pixels) of a PSF image from the area above half maximum.

    The PSF is oversampled (cubic spline) so the half-maximum area of a 2-4 pixel
    FWHM core is measured to a few per cent; ``FWHM = 2 sqrt(area / pi)``.
    """
    from scipy import ndimage

    psf = np.asarray(psf, dtype=np.float64)
    cy, cx = np.unravel_index(np.argmax(psf), psf.shape)
    half = psf[cy, cx] / 2.0
    # Only the core matters: a window of +-8 px around the maximum (wider if needed).
    r = 8
    while True:
        y0, y1 = max(cy - r, 0), min(cy + r + 1, psf.shape[0])
        x0, x1 = max(cx - r, 0), min(cx + r + 1, psf.shape[1])
        core = psf[y0:y1, x0:x1]
        edge = np.concatenate([core[0], core[-1], core[:, 0], core[:, -1]])
        if edge.max() < half or (y0 == 0 and x0 == 0 and y1 == psf.shape[0] and x1 == psf.shape[1]):
            break
        r *= 2
    n = oversample
    yy = (np.arange(core.shape[0] * n) + 0.5) / n - 0.5
    xx = (np.arange(core.shape[1] * n) + 0.5) / n - 0.5
    gy, gx = np.meshgrid(yy, xx, indexing="ij")
    fine = ndimage.map_coordinates(core, [gy.ravel(), gx.ravel()], order=3, mode="nearest")
    area = np.count_nonzero(fine >= half) / float(n * n)
    return float(2.0 * np.sqrt(area / np.pi))


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


def _kernel_coverage(good, sigma):
    """Fraction of the peak kernel's S/N weight (its square) that falls on usable pixels."""
    from scipy import ndimage

    k = _gauss1d(sigma) if sigma > 0 else np.ones(1, np.float32)
    k2 = k * k
    w = good.astype(np.float32)
    ndimage.correlate1d(w, k2, axis=0, output=w, mode="constant")
    ndimage.correlate1d(w, k2, axis=1, output=w, mode="constant")
    w /= np.float32(k2.sum() ** 2)
    return w


def refilter_holes(sig, image, variance, good, psf, background=None, min_pixels=9):
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

    Returns
    -------
    sig
    """
    from scipy import ndimage, signal

    if good.all():
        return sig
    labels, _ = ndimage.label(~good, structure=np.ones((3, 3), bool))
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


def fill_unsupported(sharp, sig, good, sigma, min_coverage=0.5):
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

    Returns
    -------
    (ny, nx) float32, ``sharp`` filled in place.
    """
    from scipy import ndimage

    if good.all():
        return sharp
    low = _kernel_coverage(good, sigma) < min_coverage
    if not low.any():
        return sharp
    labels, n = ndimage.label(low, structure=np.ones((3, 3), bool))
    # rim: the usable-kernel pixels touching a hole, each given to the hole it touches
    near = ndimage.grey_dilation(labels, size=(3, 3))
    rim = (labels == 0) & (near > 0)
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


@numba.njit(cache=True)
def _keep_large(labels, n, min_area):
    # Mask of the labelled regions with at least min_area pixels: two passes
    # over the label image instead of bincount + a fancy-indexed gather.
    area = np.zeros(n + 1, np.int64)
    ny, nx = labels.shape
    for y in range(ny):
        for x in range(nx):
            area[labels[y, x]] += 1
    out = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            v = labels[y, x]
            if v != 0 and area[v] >= min_area:
                out[y, x] = True
    return out


# ------------------------------------------------------------------ peaks
@numba.njit(cache=True)
def _find(uf, i):
    root = i
    while uf[root] != root:
        root = uf[root]
    while uf[i] != root:  # path compression
        nxt = uf[i]
        uf[i] = root
        i = nxt
    return root


@numba.njit(cache=True)
def _flood_peaks(img, mask, level, min_prominence):
    # Topographic prominence by a descending flood with union-find: pixels
    # >= level are visited from the highest; a pixel with no visited
    # neighbour starts a region (a local maximum). When regions meet at a
    # pixel, all but the highest end there: their maximum's prominence is its
    # height minus this saddle. Roots are always the highest pixel of their
    # region because a region's first pixel is its maximum and merges keep
    # the older (higher) root. A numba kernel: the loop is sequential and
    # data-dependent, nothing in scipy does it.
    ny, nx = img.shape
    n = 0
    for y in range(ny):
        for x in range(nx):
            if mask[y, x] and img[y, x] >= level:
                n += 1
    flat = np.empty(n, np.int64)
    vals = np.empty(n, np.float32)
    k = 0
    for y in range(ny):
        for x in range(nx):
            v = img[y, x]
            if mask[y, x] and v >= level:
                flat[k] = y * nx + x
                vals[k] = -v
                k += 1
    order = np.argsort(vals, kind="mergesort")  # stable: ties resolved in raster order
    rank = np.full(ny * nx, -1, np.int32)
    for r in range(n):
        rank[flat[order[r]]] = r
    uf = np.arange(n).astype(np.int32)
    prom = np.full(n, -1.0, np.float32)  # -1: not (yet) a peak; inf: never merged
    saddle_at = np.full(n, -1, np.int64)  # flat pixel where a peak's region met a higher one
    higher_at = np.full(n, -1, np.int64)  # flat pixel of that higher region's maximum
    roots = np.empty(8, np.int32)
    for r in range(n):
        p = flat[order[r]]
        y = p // nx
        x = p - y * nx
        v = -vals[order[r]]
        nroots = 0
        for dy in range(-1, 2):
            yy = y + dy
            if yy < 0 or yy >= ny:
                continue
            for dx in range(-1, 2):
                xx = x + dx
                if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                    continue
                q = rank[yy * nx + xx]
                if q < 0 or q >= r:
                    continue
                root = _find(uf, q)
                dup = False
                for j in range(nroots):
                    if roots[j] == root:
                        dup = True
                        break
                if not dup:
                    roots[nroots] = root
                    nroots += 1
        if nroots == 0:
            prom[r] = np.inf
            continue
        best = roots[0]
        for j in range(1, nroots):
            if roots[j] < best:
                best = roots[j]
        for j in range(nroots):
            o = roots[j]
            if o != best:
                height = -vals[order[o]]
                prom[o] = height - v
                saddle_at[o] = p
                higher_at[o] = flat[order[best]]
                uf[o] = best
        uf[r] = best
    # Surviving maxima; a region that never met a higher one keeps inf.
    count = 0
    for r in range(n):
        if prom[r] >= min_prominence:
            count += 1
    py = np.empty(count, np.int32)
    px = np.empty(count, np.int32)
    pp = np.empty(count, np.float32)
    ps = np.empty(count, np.int64)
    ph = np.empty(count, np.int64)
    k = 0
    for r in range(n):
        if prom[r] >= min_prominence:
            p = flat[order[r]]
            py[k] = p // nx
            px[k] = p - (p // nx) * nx
            pp[k] = prom[r]
            ps[k] = saddle_at[r]
            ph[k] = higher_at[r]
            k += 1
    return py, px, pp, ps, ph


@numba.njit(cache=True)
def _subpixel(img, py, px):
    # Vertex of the parabola through the peak and its two neighbours, per axis.
    ny, nx = img.shape
    n = py.shape[0]
    oy = np.zeros(n)
    ox = np.zeros(n)
    for k in range(n):
        y = py[k]
        x = px[k]
        c = img[y, x]
        if 0 < y < ny - 1:
            a = img[y - 1, x]
            b = img[y + 1, x]
            d = a - 2.0 * c + b
            if d < 0:
                oy[k] = min(max(0.5 * (a - b) / d, -0.5), 0.5)
        if 0 < x < nx - 1:
            a = img[y, x - 1]
            b = img[y, x + 1]
            d = a - 2.0 * c + b
            if d < 0:
                ox[k] = min(max(0.5 * (a - b) / d, -0.5), 0.5)
    return py + oy, px + ox


def _suppress_close(y, x, sig, radius):
    # Greedy: keep peaks in descending significance, dropping any closer than
    # radius to one already kept. Only the (few) close pairs are visited.
    order = np.argsort(-sig, kind="stable")
    if radius <= 0 or y.size < 2:
        return order
    pairs = cKDTree(np.column_stack([y, x])).query_pairs(radius, output_type="ndarray")
    if pairs.size == 0:
        return order
    rank = np.empty(y.size, np.int64)
    rank[order] = np.arange(y.size)
    # orient each pair (stronger, weaker) and visit by the stronger one's rank
    a, b = pairs[:, 0], pairs[:, 1]
    swap = rank[a] > rank[b]
    hi, lo = np.where(swap, b, a), np.where(swap, a, b)
    srt = np.argsort(rank[hi], kind="stable")
    alive = np.ones(y.size, bool)
    for h, l in zip(hi[srt], lo[srt]):
        if alive[h]:
            alive[l] = False
    return order[alive[order]]


def _ring_median(img, py, px, r0, r1):
    """Median of ``img`` over the annulus ``r0 <= r <= r1`` about each pixel (inside the image)."""
    ny, nx = img.shape
    h = int(np.ceil(r1))
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
    rr = np.hypot(dy, dx)
    sel = (rr >= r0) & (rr <= r1)
    yy = np.asarray(py, np.int64)[:, None] + dy[sel][None]
    xx = np.asarray(px, np.int64)[:, None] + dx[sel][None]
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    vals = np.where(ok, img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)], np.nan)
    out = np.zeros(len(vals))
    some = ok.any(axis=1)
    if some.any():
        out[some] = np.nanmedian(vals[some], axis=1)
    return out


def _own_significance(img, py, px, s_at, h_at, contrast=0.0, ring=None):
    """Significance of each peak above the light of the brighter neighbour it merges into.

    A peak on the wing of a brighter source (whose maximum is the flat pixel
    ``h_at``, met at the saddle pixel ``s_at`` of the peak image ``img``) is a
    detection only if it stands out of that wing by itself. Two estimates of
    the wing's light ``B`` at the peak ``q`` fail in different ways: the
    saddle level (a monotonic neighbour is at least that bright at the
    saddle, which lies between them, so it over-estimates ``B``) and the
    neighbour's 180-degree mirror ``L(2c - q)`` (brightest of its 3 x 3
    pixels, as ``c`` is a whole pixel; a point-symmetric
    neighbour's light is the same there; the template of the SDSS
    deblender, spoilt when the mirror lands on a third source). The lower of
    the two is taken. The excess ``L(q) - B`` is compared with the pixel
    noise (1 in the unit-noise peak image) and a model uncertainty
    ``contrast * B`` of the wing added in quadrature: at hundreds of sigma, a
    few per cent of structure in a bright profile (PSF mismatch, the edge of
    a saturated core) is not a source. A peak that met no higher one keeps
    its height, or with ``ring = (r0, r1)`` its height above the median of
    the annulus ``r0 <= r <= r1`` about it: inside its own footprint island
    on the far wing of a bright star (where that wing lifts the PSF-matched
    significance over the threshold in patches) a noise maximum meets no
    higher one, yet the wing lifts the peak image too.

    Returns
    -------
    (n,) float64, ``(L(q) - B) / sqrt(1 + (contrast B)^2)``.
    """
    ny, nx = img.shape
    own = img[py, px].astype(np.float64)
    has = s_at >= 0
    if ring is not None and not has.all():
        lone = np.flatnonzero(~has)
        b = np.maximum(_ring_median(img, py[lone], px[lone], ring[0], ring[1]), 0.0)
        own[lone] = (own[lone] - b) / np.sqrt(1.0 + (contrast * b) ** 2)
    if not has.any():
        return own
    qy, qx = py[has].astype(np.int64), px[has].astype(np.int64)
    sy, sx = s_at[has] // nx, s_at[has] % nx
    cy, cx = h_at[has] // nx, h_at[has] % nx
    wing = img[sy, sx].astype(np.float64)
    # The neighbour's centre is only known to a pixel: the brightest of the
    # 3 x 3 pixels about the mirror point bounds its light there.
    my, mx = 2 * cy - qy, 2 * cx - qx
    mirror = np.full(wing.shape, -np.inf)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = my + dy, mx + dx
            ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            mirror[ok] = np.maximum(mirror[ok], img[yy[ok], xx[ok]])
    mirror[~np.isfinite(mirror)] = np.inf  # mirror off the image: the saddle alone
    b = np.maximum(np.minimum(wing, mirror), 0.0)
    own[has] = (own[has] - b) / np.sqrt(1.0 + (contrast * b) ** 2)
    return own


def find_peaks(peak_image, footprint_mask, min_prominence, level=0.0, significance=None,
               floor=0.0, min_separation=0.0, contrast=0.0, return_own=False, ring=None):
    """Peaks of one detection image inside a footprint mask.

    Parameters
    ----------
    peak_image : (ny, nx) float32
        Image whose local maxima are the peaks, in units of its noise.
    footprint_mask : (ny, nx) bool
        Only pixels inside take part in the flood.
    min_prominence : float
        Minimum height of a peak above the saddle joining it to a higher peak.
    level : float
        Pixels below it are ignored; a maximum that meets no higher one above
        ``level`` has prominence ``height - level``.
    significance : (ny, nx) float32, optional
        Detection significance (default ``peak_image``); a peak needs
        ``significance >= floor`` at its pixel, and that value is returned.
    floor : float
        Minimum significance of a peak.
    min_separation : float
        Of two peaks closer than this (pixels) only the more significant is kept.
    contrast : float
        Fractional uncertainty of the brighter neighbour's light, for the
        significance returned with ``return_own``.
    return_own : bool
        Also return each peak's significance above the light of the
        brighter neighbour it merges into (see :func:`_own_significance`).
    ring : (float, float), optional
        Annulus (pixels) whose median is the light under a peak that meets no
        higher one, for that significance.

    Returns
    -------
    y, x : float64 sub-pixel positions (parabola through the peak image)
    iy, ix : int32 integer pixels
    value : float32 significance at the integer pixel
    """
    img = np.ascontiguousarray(peak_image, dtype=np.float32)
    mask = np.ascontiguousarray(footprint_mask, dtype=np.bool_)
    py, px, prom, s_at, h_at = _flood_peaks(img, mask, np.float32(level), np.float32(min_prominence))
    sig = img if significance is None else significance
    own = _own_significance(img, py, px, s_at, h_at, contrast, ring)
    val = sig[py, px]
    sel = val >= floor
    py, px, val, own = py[sel], px[sel], val[sel], own[sel]
    keep = _suppress_close(py.astype(float), px.astype(float), val, min_separation)
    py, px, val, own = py[keep], px[keep], val[keep], own[keep]
    y, x = _subpixel(img, py, px)
    if return_own:
        return y, x, py, px, val, own.astype(np.float32)
    return y, x, py, px, val


@numba.njit(cache=True)
def _bilinear(img, y, x):
    ny, nx = img.shape
    y0 = int(np.floor(y))
    x0 = int(np.floor(x))
    if y0 < 0 or x0 < 0 or y0 + 1 >= ny or x0 + 1 >= nx:
        return np.nan
    fy = y - y0
    fx = x - x0
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
            + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


@numba.njit(cache=True)
def _residual_peaks(img, mask, cy, cx, radii, exclusion, r_min, frac, min_prominence):
    # Companion search on the symmetric residual (Lupton's SDSS template
    # idea applied to detection): about each peak c, r(p) = L(p) - L(2c - p)
    # is ~0 for a point-symmetric source and positive where a neighbour adds
    # light, even where that neighbour makes no local maximum of L (a faint
    # source on a bright one's slope). Candidates are the maxima of r inside
    # the footprint mask and the window of radius radii[k] that rise at least
    # min_prominence above the saddle to a higher maximum of r (the flood of
    # _flood_peaks, so a noise bump on the flank of a neighbour's residual
    # does not count), at least `exclusion` from c, with r >= r_min and
    # r >= frac * L(p) (so centring errors on bright cores, which leave a
    # dipole ~ gradient, do not qualify). A numba kernel: a small window
    # per peak.
    ny, nx = img.shape
    out_y = []
    out_x = []
    out_r = []
    for k in range(cy.shape[0]):
        yc = cy[k]
        xc = cx[k]
        radius = radii[k]
        iy = int(np.round(yc))
        ix = int(np.round(xc))
        h = int(np.ceil(radius))
        w = 2 * h + 1
        buf = np.zeros((w, w), np.float32)
        inside = np.zeros((w, w), np.bool_)
        unknown = np.zeros((w, w), np.bool_)  # in the footprint, but the mirror is off the image
        for a in range(w):
            for b in range(w):
                y = iy - h + a
                x = ix - h + b
                if y < 0 or y >= ny or x < 0 or x >= nx or not mask[y, x]:
                    continue
                m = _bilinear(img, 2 * yc - y, 2 * xc - x)
                if np.isnan(m):
                    unknown[a, b] = True
                    continue
                buf[a, b] = img[y, x] - m
                inside[a, b] = True
        fy, fx, _, _, _ = _flood_peaks(buf, inside, np.float32(r_min), np.float32(min_prominence))
        for j in range(fy.shape[0]):
            a = fy[j]
            b = fx[j]
            if a == 0 or b == 0 or a == w - 1 or b == w - 1:
                continue  # on the window's edge: not known to be a maximum
            # Next to pixels whose mirror leaves the image the residual is
            # cut off, not falling: a rising slope (a third source's light)
            # would end there in a false maximum.
            edge = False
            for da in range(-1, 2):
                for db in range(-1, 2):
                    if unknown[a + da, b + db]:
                        edge = True
            if edge:
                continue
            v = buf[a, b]
            y = iy - h + a
            x = ix - h + b
            d2 = (y - yc) ** 2 + (x - xc) ** 2
            if d2 < exclusion * exclusion or d2 > radius * radius:
                continue
            if v < frac * img[y, x]:
                continue
            # sub-pixel: parabola through the residual, where both neighbours are defined
            oy = 0.0
            ox = 0.0
            if inside[a - 1, b] and inside[a + 1, b]:
                p0 = buf[a - 1, b]
                p1 = buf[a + 1, b]
                dd = p0 - 2.0 * v + p1
                if dd < 0:
                    oy = min(max(0.5 * (p0 - p1) / dd, -0.5), 0.5)
            if inside[a, b - 1] and inside[a, b + 1]:
                p0 = buf[a, b - 1]
                p1 = buf[a, b + 1]
                dd = p0 - 2.0 * v + p1
                if dd < 0:
                    ox = min(max(0.5 * (p0 - p1) / dd, -0.5), 0.5)
            out_y.append(y + oy)
            out_x.append(x + ox)
            out_r.append(v)
    return np.array(out_y), np.array(out_x), np.array(out_r)


def _point_profile(psfs, sigma):
    """Relative radial profile of a point source in the peak image, widest over bands.

    The peak image of band b sees a point source as ``P_b * G(sigma)``; its
    maximum over each 1-pixel annulus, divided by the centre value, is the
    fraction of a source's central peak-image height that reaches radius r.

    Returns
    -------
    (n,) float64, index = radius in pixels.
    """
    from scipy import ndimage

    k = _gauss1d(sigma) if sigma > 0 else np.ones(1, np.float32)
    prof = None
    for p in psfs:
        q = np.asarray(p, np.float64)
        q = ndimage.correlate1d(ndimage.correlate1d(q, k, axis=0), k, axis=1)
        cy, cx = q.shape[0] // 2, q.shape[1] // 2
        yy, xx = np.indices(q.shape)
        ring = np.rint(np.hypot(yy - cy, xx - cx)).astype(np.int64).ravel()
        top = np.zeros(min(cy, cx) + 1)
        use = ring < top.size
        np.maximum.at(top, ring[use], q.ravel()[use])
        top /= max(q[cy, cx], 1e-300)
        prof = top if prof is None else np.maximum(prof, top)
    return prof


def _residual_radii(height, profile, r_min, base, cap):
    """Companion search radius per seed: as far as its own light can hide one.

    A companion of residual ``r_min`` on a seed's wing makes no maximum of
    its own only where the seed's light is comparable, i.e. out to the radius
    where the seed's peak-image height times its point-source profile falls
    below ``r_min``. A saturated star's Moffat wings hide companions well
    beyond a fixed few FWHM; a faint seed keeps the ``base`` radius (which also
    covers extended seeds, wider than a point source). At most ``cap``.
    """
    height = np.asarray(height, np.float64)
    radii = np.full(height.size, float(base))
    for k, hgt in enumerate(height):
        below = np.flatnonzero(hgt * profile < r_min)
        reach = float(below[0]) if below.size else float(profile.size)
        radii[k] = min(max(base, reach), cap)
    return radii


@numba.njit(cache=True)
def _climb(img, y, x, steps):
    # Steepest ascent over the 8 neighbours, at most `steps` moves; reports
    # whether it stopped at a local maximum.
    ny, nx = img.shape
    for _ in range(steps + 1):
        by, bx = y, x
        best = img[y, x]
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                yy, xx = y + dy, x + dx
                if 0 <= yy < ny and 0 <= xx < nx and img[yy, xx] > best:
                    best = img[yy, xx]
                    by, bx = yy, xx
        if by == y and bx == x:
            return y, x, True
        y, x = by, bx
    return y, x, False


def _refine_isolated(zsig, py, px, flags, keep, isolation, max_shift):
    """Move isolated peaks to the maximum of the multi-band PSF-matched image.

    The narrow peak image splits neighbours but, being noisier, places a
    faint source's maximum a pixel or two off; for a point source alone the
    maximum of the matched-filter (likelihood) image is the best position
    estimate (Kaiser 2001). Peaks with no other kept peak within
    ``isolation`` pixels climb ``zsig`` from their pixel (sub-pixel by a
    parabola) and move there if that is a local maximum within
    ``max_shift`` pixels (on a neighbour's wing the climb finds none); peaks
    near others keep the narrow image's position, where a neighbour's slope
    would pull the smooth image's maximum. Residual companions are left alone.
    """
    py, px = py.copy(), px.copy()
    sel = np.flatnonzero(keep & ((flags & PEAK_RESIDUAL) == 0))
    if sel.size == 0:
        return py, px
    pts = np.column_stack([py[keep], px[keep]])
    d, _ = cKDTree(pts).query(np.column_stack([py[sel], px[sel]]), k=2)
    alone = sel[d[:, 1] > isolation] if pts.shape[0] > 1 else sel
    img = np.ascontiguousarray(zsig, dtype=np.float32)
    steps = int(np.ceil(max_shift)) + 1
    for k in alone:
        iy = min(max(int(round(py[k])), 0), img.shape[0] - 1)
        ix = min(max(int(round(px[k])), 0), img.shape[1] - 1)
        cy, cx, top = _climb(img, iy, ix, steps)
        if not top:  # on a slope (a neighbour's wing): no maximum of its own nearby
            continue
        y, x = _subpixel(img, np.array([cy], np.int32), np.array([cx], np.int32))
        if np.hypot(y[0] - py[k], x[0] - px[k]) <= max_shift:
            py[k], px[k] = y[0], x[0]
    return py, px


# ------------------------------------------------------------------ known positions
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")


def _column(table, *names):
    lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def read_peaks_table(path, wcs_header_text=""):
    """Read known source positions from a FITS or CSV table.

    Parameters
    ----------
    path : str or path-like
        FITS binary table (first table HDU) or CSV with a header line. Columns
        (case-insensitive) ``x``, ``y`` (0-indexed pixels of the exposure
        arrays) or ``ra``, ``dec`` (degrees, or with angle units); x/y win when
        both are present.
    wcs_header_text : str
        FITS header text of the exposure's WCS, needed for ra/dec.

    Returns
    -------
    y, x : float64 arrays
        Pixel positions.

    Raises
    ------
    InputError
        One line naming the file, on any problem.
    """
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such peaks table")
    name = path.name.lower()
    fmt = "fits" if name.endswith(_FITS_SUFFIXES) else "ascii.csv"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = Table.read(path, format=fmt)
    except Exception as exc:  # astropy raises many types for bad files
        kind = "FITS" if fmt == "fits" else "CSV"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable {kind} table ({reason})") from None
    cx, cy = _column(table, "x"), _column(table, "y")
    cra, cdec = _column(table, "ra"), _column(table, "dec")
    try:
        if cx is not None and cy is not None:
            x = np.asarray(table[cx], dtype=np.float64)
            y = np.asarray(table[cy], dtype=np.float64)
        elif cra is not None and cdec is not None:
            if not wcs_header_text or not wcs_header_text.strip():
                raise InputError(f"{path}: table gives ra/dec but the exposure has no WCS")
            ra, dec = _degrees(table[cra]), _degrees(table[cdec])
            x, y = _world_to_pixel(wcs_header_text, ra, dec, path)
        else:
            raise InputError(f"{path}: needs columns x and y, or ra and dec; has "
                             f"{', '.join(table.colnames) or 'none'}")
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(f"{path}: position columns are not numeric") from None
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError(f"{path}: non-finite positions")
    return y, x


def _degrees(col):
    unit = getattr(col, "unit", None)
    values = np.asarray(col, dtype=np.float64)
    if unit is not None:
        import astropy.units as u

        try:
            return (values * unit).to_value(u.deg)
        except u.UnitConversionError:
            raise ValueError("not an angle") from None
    return values


def _world_to_pixel(wcs_text, ra, dec, path):
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(fits.Header.fromstring(wcs_text))
            x, y = wcs.all_world2pix(ra, dec, 0)
    except Exception:
        raise InputError(f"{path}: cannot convert ra/dec with the exposure's WCS") from None
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


# ------------------------------------------------------------------ association
def _associate(ys, xs, sigs, images, radius):
    """Group peaks of different detection images closer than ``radius``.

    Peaks are taken as seeds in order (chi^2-image peaks first, then by
    significance); each seed gathers, from every other image, the nearest
    unassigned peak within the radius. Two peaks of one image never merge:
    that image already judged them separate.

    Returns
    -------
    group : int64 array, the group index of each input peak
    seeds : int64 array, the input index of each group's seed
    """
    n = ys.size
    group = np.full(n, -1, np.int64)
    if n == 0:
        return group, np.zeros(0, np.int64)
    chi_first = (images != CHI2_BIT).astype(np.int8)
    order = np.lexsort((-sigs, chi_first))
    tree = cKDTree(np.column_stack([ys, xs]))
    seeds = []
    for i in order:
        if group[i] >= 0:
            continue
        g = len(seeds)
        seeds.append(i)
        group[i] = g
        cand = tree.query_ball_point([ys[i], xs[i]], radius)
        if len(cand) <= 1:
            continue
        cand = np.asarray(cand)
        cand = cand[(group[cand] < 0) & (images[cand] != images[i])]
        if cand.size == 0:
            continue
        d2 = (ys[cand] - ys[i]) ** 2 + (xs[cand] - xs[i]) ** 2
        cand = cand[np.argsort(d2, kind="stable")]
        taken = {int(images[i])}
        for j in cand:
            if int(images[j]) not in taken:
                taken.add(int(images[j]))
                group[j] = g
    return group, np.asarray(seeds, dtype=np.int64)


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


# ------------------------------------------------------------------ main entry
def _bad_bits(exposure, planes):
    mask_planes = json.loads(exposure.attrs.get("mask_planes", "{}") or "{}")
    bits = 0
    for name in planes:
        if name in mask_planes:
            bits |= 1 << int(mask_planes[name])
    return bits


def _bad_planes(exposure, planes):
    """The mask planes detection ignores.

    ``None`` gives :data:`DEFAULT_BAD_PLANES` plus any further planes the
    exposure records as bad (``bad_mask_planes`` attr, written at ingest);
    an explicit list (or comma-separated string) is used as given, and every
    name in it must be a plane of the exposure's mask.
    """
    if planes is None:
        recorded = json.loads(exposure.attrs.get("bad_mask_planes", "null") or "null") or []
        return list(DEFAULT_BAD_PLANES) + [p for p in recorded if p not in DEFAULT_BAD_PLANES]
    if isinstance(planes, str):
        planes = [p.strip() for p in planes.split(",") if p.strip()]
    try:
        planes = [str(p) for p in planes]
    except TypeError:
        raise InputError(f"bad mask planes must be a list of plane names, got {planes!r}") from None
    defined = json.loads(exposure.attrs.get("mask_planes", "{}") or "{}")
    unknown = [p for p in planes if p not in defined]
    if unknown:
        raise InputError(f"unknown mask plane(s) {', '.join(unknown)}; the exposure's mask has "
                         f"{', '.join(sorted(defined)) or 'none'}")
    return planes


def _resolve_config(exposure, threshold, min_area, overrides, fwhm):
    cfg = dict(DEFAULTS)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise InputError(f"unknown detection setting(s): {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, got {threshold!r}") from None
    if not np.isfinite(threshold) or threshold <= 0:
        raise InputError(f"threshold must be positive, got {threshold:g}")
    cfg["threshold"] = threshold
    if min_area is None:
        min_area = max(5, int(round(0.5 * np.pi * (fwhm / 2.0) ** 2)))
    try:
        min_area = int(min_area)
    except (TypeError, ValueError):
        raise InputError(f"min-area must be an integer, got {min_area!r}") from None
    if min_area < 1:
        raise InputError(f"min-area must be at least 1, got {min_area}")
    cfg["min_area"] = min_area
    if cfg["peak_floor"] is None:
        cfg["peak_floor"] = threshold
    if cfg["peak_sigma"] is None:
        cfg["peak_sigma"] = 0.2 * fwhm
    if cfg["residual_radius"] is None:
        cfg["residual_radius"] = 3.0 * fwhm
    if cfg["residual_radius_max"] is None:
        cfg["residual_radius_max"] = 8.0 * fwhm
    if cfg["residual_exclusion"] is None:
        cfg["residual_exclusion"] = 0.6 * fwhm
    if cfg["min_separation"] is None:
        cfg["min_separation"] = max(2.0, 0.5 * fwhm)
    if cfg["association_radius"] is None:
        cfg["association_radius"] = max(2.0, 1.0 * fwhm)
    cfg["bad_mask_planes"] = _bad_planes(exposure, cfg["bad_mask_planes"])
    cfg["fwhm"] = float(fwhm)
    cfg["grow_radius"] = float(cfg["grow_fwhm"] * fwhm)
    return cfg


def _known_positions(exposure, known):
    ys, xs = [], []
    if "known_y" in exposure.variables and "known_x" in exposure.variables:
        ys.append(np.asarray(exposure["known_y"].values, np.float64).ravel())
        xs.append(np.asarray(exposure["known_x"].values, np.float64).ravel())
    if known is not None:
        ky, kx = known
        ys.append(np.asarray(ky, np.float64).ravel())
        xs.append(np.asarray(kx, np.float64).ravel())
    if not ys:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(ys), np.concatenate(xs)


def detect(exposure: xr.Dataset, threshold=5.0, min_area=None, known=None, bands=None,
           progress=False, significance=None, **config) -> xr.Dataset:
    """Detect parent footprints and peaks in a multi-band exposure.

    Parameters
    ----------
    exposure : xarray.Dataset
        Schema ``exposure`` v1.
    threshold : float
        Detection threshold in sigma of each detection image (> 0).
    min_area : int, optional
        Minimum pixels above threshold of a footprint in one detection image
        (default ``max(5, 0.5 pi (FWHM/2)^2)``, half the PSF core).
    known : tuple of arrays (y, x), optional
        Extra known positions (pixels of the exposure arrays), e.g. from
        :func:`read_peaks_table`; the exposure's ``known_y/known_x`` are always used.
    bands : list of str, optional
        Bands used for detection (default all). Bits of ``peak_bands`` still
        index the exposure's full band coordinate.
    progress : bool
        Show a progress bar over bands.
    significance : (band, y, x) array, optional
        Precomputed per-band point-source significance (unit noise, sky
        removed, NaN where there are no data), aligned with the exposure's
        bands, e.g. the Kaiser coadd's (``coadds/likelihood``); it replaces
        the PSF-matched filter of the exposure (:func:`given_significance`).
        Background and peak images still come from the exposure.
    **config
        Overrides of :data:`DEFAULTS` (``grow_fwhm``, ``min_prominence``,
        ``association_radius``, ``bkg_cell``, ...).

    Returns
    -------
    xarray.Dataset
        Schema ``parents`` v1 (see ``schemas/parents/v1.json``).

    Raises
    ------
    InputError
        Non-positive threshold, unknown band, bad settings.
    """
    from .progress import progress as _progress

    for var in ("image", "variance", "mask", "psf"):
        if var not in exposure.variables:
            raise InputError(f"exposure has no {var!r} variable")
    all_bands = [str(b) for b in np.asarray(exposure["band"].values)]
    if bands is None:
        det_bands = list(all_bands)
    else:
        det_bands = [str(b) for b in ([bands] if isinstance(bands, str) else bands)]
        missing = [b for b in det_bands if b not in all_bands]
        if missing:
            raise InputError(f"unknown band(s) {', '.join(missing)}; the exposure has "
                             f"{', '.join(all_bands)}")
        if not det_bands:
            raise InputError("no detection bands given")
    if len(all_bands) > CHI2_BIT:
        raise InputError(f"at most {CHI2_BIT} bands are supported (peak_bands bit {CHI2_BIT} "
                         "is the multi-band image)")
    band_index = [all_bands.index(b) for b in det_bands]
    psfs = np.asarray(exposure["psf"].values)
    fwhms = {b: psf_fwhm(psfs[i]) for b, i in zip(det_bands, band_index)}
    fwhm = max(fwhms.values())  # the widest PSF sets growth and association scales
    cfg = _resolve_config(exposure, threshold, min_area, config, fwhm)
    threshold = cfg["threshold"]
    bits = _bad_bits(exposure, cfg["bad_mask_planes"])

    image_all = exposure["image"].values
    var_all = exposure["variance"].values
    mask_all = exposure["mask"].values
    nb, ny, nx = image_all.shape
    background = np.zeros((nb, ny, nx), np.float32)
    chi2 = np.zeros((ny, nx), np.float32)
    chi2_sharp = np.zeros((ny, nx), np.float32)
    nvalid = np.zeros((ny, nx), np.uint8)
    union = np.zeros((ny, nx), bool)
    peak_sets = []  # (y, x, iy, ix, value, image bit)

    def footprints_of(sig):
        labels, n = fp.label_mask(sig > threshold)
        return _keep_large(labels, n, cfg["min_area"])

    def detect_in(sig, peak_img, bit):
        kept = footprints_of(sig)
        union[...] |= kept
        y, x, iy, ix, val, own = find_peaks(peak_img, kept, cfg["min_prominence"],
                                            level=cfg["peak_level"], significance=sig,
                                            floor=cfg["peak_floor"],
                                            min_separation=cfg["min_separation"],
                                            contrast=cfg["peak_contrast"], return_own=True,
                                            ring=(cfg["peak_ring"] * fwhm, (cfg["peak_ring"] + 1) * fwhm)
                                            if cfg["peak_ring"] > 0 else None)
        peak_sets.append((y, x, iy, ix, val, np.full(y.size, bit, np.int64), own))
        return kept

    peak_sigma = cfg["peak_sigma"]
    for b, i in _progress(list(zip(det_bands, band_index)), desc="detect", enabled=progress):
        img = image_all[i]
        var = var_all[i]
        good = ((mask_all[i] & bits) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
        bkg = estimate_background(img, ~good, cell=cfg["bkg_cell"], nsigma=cfg["bkg_nsigma"])
        if significance is None:
            sig, den, conv = matched_filter(img, var, good, psfs[i], bkg)
        else:
            sig, den, conv = given_significance(significance[i], (ny, nx))
        for _ in range(int(cfg["bkg_passes"]) - 1):
            # Re-estimate with sources (grown by the growth radius) excluded.
            src = fp.grow_mask(sig > cfg["bkg_mask_threshold"], cfg["grow_radius"])
            src |= ~good
            bkg = estimate_background(img, src, cell=cfg["bkg_cell"], nsigma=cfg["bkg_nsigma"])
            del src
            if significance is None:
                sig, den, _ = matched_filter(img, var, good, psfs[i], bkg, denominator=den,
                                             convolver=conv)
        del conv
        if significance is None:
            refilter_holes(sig, img, var, good, psfs[i], bkg)
        background[i] = bkg
        nvalid += den > 0
        del den
        sharp = gaussian_significance(img, var, good, peak_sigma, bkg, cfg["peak_sigma_wide"])
        fill_unsupported(sharp, sig, good, peak_sigma)
        del bkg, good
        _accumulate_positive_square(chi2, sig)
        if cfg["peak_combine"] == "sum":
            chi2_sharp += sharp
        else:
            _accumulate_positive_square(chi2_sharp, sharp)
        if cfg["per_band"]:
            detect_in(sig, sharp, i)
        del sig, sharp
    # bands not used for detection still get a background (for the store)
    for i in range(nb):
        if i not in band_index:
            good = ((mask_all[i] & bits) == 0) & np.isfinite(image_all[i]) & (var_all[i] > 0)
            background[i] = estimate_background(image_all[i], ~good, cell=cfg["bkg_cell"],
                                                nsigma=cfg["bkg_nsigma"])

    zsig = positive_chi2_significance(chi2, nvalid, out=chi2)  # in place: saves 64 MB at 4k
    if cfg["peak_combine"] == "sum":
        # Unit-noise sum of the band significances (a flat-SED detection
        # image); keeps the sign, which a band-pass image needs.
        zsharp = chi2_sharp
        np.divide(zsharp, np.sqrt(np.maximum(nvalid, 1)).astype(np.float32), out=zsharp)
    else:
        zsharp = positive_chi2_significance(chi2_sharp, nvalid, out=chi2_sharp)
    del nvalid
    kept_chi = detect_in(zsig, zsharp, CHI2_BIT)

    # ---- association of peaks across detection images
    ys = np.concatenate([p[0] for p in peak_sets])
    xs = np.concatenate([p[1] for p in peak_sets])
    iys = np.concatenate([p[2] for p in peak_sets]).astype(np.int32)
    ixs = np.concatenate([p[3] for p in peak_sets]).astype(np.int32)
    sigs = np.concatenate([p[4] for p in peak_sets]).astype(np.float32)
    imgs = np.concatenate([p[5] for p in peak_sets])
    owns = np.concatenate([p[6] for p in peak_sets]).astype(np.float32)
    group, seeds = _associate(ys, xs, sigs, imgs, cfg["association_radius"])
    band_bits = np.zeros(seeds.size, np.int64)
    np.bitwise_or.at(band_bits, group, np.left_shift(np.int64(1), imgs))
    best_sig = np.full(seeds.size, -np.inf, np.float32)
    np.maximum.at(best_sig, group, sigs)
    # A peak seen by single bands only is much more often a noise bump on a
    # bright neighbour (each band image is noisier than the combination), so
    # it must be brighter to stand on its own.
    keep = ((band_bits >> CHI2_BIT) & 1).astype(bool) | (best_sig >= cfg["band_only_floor"])
    # A peak on a brighter neighbour's wing must stand out of that wing by
    # itself in at least one detection image (see _own_significance).
    best_own = np.full(seeds.size, -np.inf, np.float32)
    np.maximum.at(best_own, group, owns)
    keep &= best_own >= cfg["peak_own_floor"]
    p_y, p_x = ys[seeds], xs[seeds]
    p_iy, p_ix = iys[seeds], ixs[seeds]
    p_sig, p_bands = best_sig, band_bits
    p_flags = np.zeros(seeds.size, np.int64)

    # ---- companions in the symmetric residual of the peaks found so far
    if cfg["residual_peaks"] and p_y.size:
        seed = (zsharp[p_iy, p_ix] >= cfg["residual_seed_min"]) & keep
        radii = _residual_radii(zsharp[p_iy[seed], p_ix[seed]],
                                _point_profile(psfs[band_index], peak_sigma), cfg["residual_min"],
                                cfg["residual_radius"], cfg["residual_radius_max"])
        ry, rx, rr = _residual_peaks(zsharp, kept_chi, p_y[seed], p_x[seed], radii,
                                     float(cfg["residual_exclusion"]), float(cfg["residual_min"]),
                                     float(cfg["residual_frac"]), float(cfg["residual_prominence"]))
        if ry.size:
            # strongest first; drop any near an existing peak or a stronger candidate
            o = np.argsort(-rr, kind="stable")
            ry, rx, rr = ry[o], rx[o], rr[o]
            ok = np.ones(ry.size, bool)
            sep = cfg["residual_exclusion"]
            if p_y.size:
                d, _ = cKDTree(np.column_stack([p_y[keep], p_x[keep]])).query(np.column_stack([ry, rx]))
                ok &= d >= sep
            tree = cKDTree(np.column_stack([ry, rx]))
            for j in range(ry.size):
                if ok[j]:
                    for q in tree.query_ball_point([ry[j], rx[j]], sep):
                        if q > j:
                            ok[q] = False
            ry, rx, rr = ry[ok], rx[ok], rr[ok].astype(np.float32)
            n_new = ry.size
            p_y = np.concatenate([p_y, ry])
            p_x = np.concatenate([p_x, rx])
            p_iy = np.concatenate([p_iy, np.round(ry).astype(np.int32)])
            p_ix = np.concatenate([p_ix, np.round(rx).astype(np.int32)])
            p_sig = np.concatenate([p_sig, rr])
            p_bands = np.concatenate([p_bands, np.full(n_new, 1 << CHI2_BIT, np.int64)])
            p_flags = np.concatenate([p_flags, np.full(n_new, PEAK_RESIDUAL, np.int64)])
            keep = np.concatenate([keep, np.ones(n_new, bool)])
    del zsharp, kept_chi

    # ---- positions of isolated peaks from the likelihood image
    if cfg["refine_isolated"] and p_y.size:
        p_y, p_x = _refine_isolated(zsig, p_y, p_x, p_flags, keep, 2.0 * fwhm, 0.5 * fwhm)

    # ---- known (external) positions
    ky, kx = _known_positions(exposure, known)
    inside = (ky > -0.5) & (ky < ny - 0.5) & (kx > -0.5) & (kx < nx - 0.5)
    n_known, n_outside = int(ky.size), int((~inside).sum())
    if n_outside:
        warnings.warn(f"{n_outside} of {n_known} known position(s) outside the image ignored",
                      stacklevel=2)
    ky, kx = ky[inside], kx[inside]
    grow_r = cfg["grow_radius"]
    final = fp.grow_mask(union, grow_r)
    del union
    new_y = []
    if ky.size:
        kiy = np.clip(np.round(ky).astype(np.int64), 0, ny - 1)
        kix = np.clip(np.round(kx).astype(np.int64), 0, nx - 1)
        # One-to-one, closest pairs first: a known object that was also
        # detected becomes one peak, flagged external, at the known
        # (catalogue) position; the rest are new peaks.
        matched = np.zeros(ky.size, bool)
        if p_y.size:
            sdm = cKDTree(np.column_stack([ky, kx])).sparse_distance_matrix(
                cKDTree(np.column_stack([p_y, p_x])), cfg["association_radius"],
                output_type="ndarray")
            taken = np.zeros(p_y.size, bool)
            for m in np.argsort(sdm["v"], kind="stable"):
                j, k = sdm["i"][m], sdm["j"][m]
                if not matched[j] and not taken[k]:
                    matched[j] = taken[k] = True
                    p_flags[k] |= PEAK_EXTERNAL
                    p_y[k], p_x[k] = ky[j], kx[j]
        new_y = list(np.flatnonzero(~matched))
        if new_y:
            sel = np.asarray(new_y)
            outside = ~final[kiy[sel], kix[sel]]
            # Known positions outside every footprint get a disk of their own.
            new_flags = np.where(outside, PEAK_EXTERNAL | PEAK_NO_FOOTPRINT, PEAK_EXTERNAL)
            if outside.any():
                disk = np.zeros((ny, nx), bool)
                disk[kiy[sel][outside], kix[sel][outside]] = True
                final |= fp.grow_mask(disk, max(grow_r, 1.0))
                del disk
            ext_sig = zsig[kiy[sel], kix[sel]].astype(np.float32)
            p_y = np.concatenate([p_y, ky[sel]])
            p_x = np.concatenate([p_x, kx[sel]])
            p_iy = np.concatenate([p_iy, kiy[sel].astype(np.int32)])
            p_ix = np.concatenate([p_ix, kix[sel].astype(np.int32)])
            p_sig = np.concatenate([p_sig, ext_sig])
            p_bands = np.concatenate([p_bands, np.zeros(sel.size, np.int64)])
            p_flags = np.concatenate([p_flags, new_flags.astype(np.int64)])
    # integer pixel of externals moved to the known position
    p_iy = np.clip(np.round(p_y), 0, ny - 1).astype(np.int32)
    p_ix = np.clip(np.round(p_x), 0, nx - 1).astype(np.int32)
    # A peak moved to a known position (or rounded) just outside the grown
    # footprints gets a disk so that every peak lies inside a parent.
    out = ~final[p_iy, p_ix]
    if out.any():
        disk = np.zeros((ny, nx), bool)
        disk[p_iy[out], p_ix[out]] = True
        final |= fp.grow_mask(disk, max(grow_r, 1.0))
        del disk

    # ---- parents
    labels, nparent = fp.label_mask(final)
    del final
    counts, span_y, span_x0, span_x1 = fp.labels_to_spans(labels, nparent)
    p_parent = labels[p_iy, p_ix].astype(np.int64)
    del labels
    # Drop weak single-band-only peaks, except the best one of a parent that
    # would otherwise have no peak at all.
    keep = np.concatenate([keep, np.ones(p_parent.size - keep.size, bool)])
    # A known position is never dropped, even when it was merged into a weak
    # peak that would be on its own.
    keep |= (p_flags & PEAK_EXTERNAL) != 0
    has = np.zeros(nparent + 1, bool)
    has[p_parent[keep]] = True
    rescue = np.flatnonzero(~keep & ~has[p_parent])
    if rescue.size:
        rescue = rescue[np.argsort(-p_sig[rescue], kind="stable")]
        _, first = np.unique(p_parent[rescue], return_index=True)
        keep[rescue[first]] = True
    p_y, p_x, p_iy, p_ix = p_y[keep], p_x[keep], p_iy[keep], p_ix[keep]
    p_sig, p_bands, p_flags, p_parent = p_sig[keep], p_bands[keep], p_flags[keep], p_parent[keep]
    # Invariants: every peak is in a parent (ensured above) and every parent
    # has a peak (each kept footprint holds its maximum, disks their position).
    assert not (p_parent == 0).any(), "a peak lies outside every footprint"
    assert np.bincount(p_parent, minlength=nparent + 1)[1:].all(), "a footprint without peaks"

    # bbox and area per parent from the spans (vectorised over the ragged layout)
    parent_of_span = np.repeat(np.arange(nparent), counts)
    y0 = np.full(nparent, np.iinfo(np.int32).max, np.int64)
    y1 = np.full(nparent, -1, np.int64)
    x0 = np.full(nparent, np.iinfo(np.int32).max, np.int64)
    x1 = np.full(nparent, -1, np.int64)
    np.minimum.at(y0, parent_of_span, span_y)
    np.maximum.at(y1, parent_of_span, span_y)
    np.minimum.at(x0, parent_of_span, span_x0)
    np.maximum.at(x1, parent_of_span, span_x1)
    area = np.bincount(parent_of_span, weights=(span_x1 - span_x0 + 1).astype(np.float64),
                       minlength=nparent).astype(np.int64)
    pflags = np.zeros(nparent, np.int64)
    pflags[(y0 == 0) | (x0 == 0) | (y1 == ny - 1) | (x1 == nx - 1)] |= PARENT_EDGE
    ext = (p_flags & PEAK_EXTERNAL) != 0
    has_ext = np.zeros(nparent, bool)
    has_ext[p_parent[ext] - 1] = True
    has_det = np.zeros(nparent, bool)
    has_det[p_parent[p_bands != 0] - 1] = True
    pflags[has_ext] |= PARENT_HAS_EXTERNAL
    pflags[~has_det] |= PARENT_EXTERNAL_ONLY

    # peaks sorted by parent, then descending significance
    order = np.lexsort((-p_sig.astype(np.float64), p_parent))
    peak_count = np.bincount(p_parent, minlength=nparent + 1)[1:].astype(np.int64)

    ds = xr.Dataset(
        {
            "parent_id": ("parent", np.arange(1, nparent + 1, dtype=np.int64)),
            "bbox_y0": ("parent", y0.astype(np.int32)),
            "bbox_x0": ("parent", x0.astype(np.int32)),
            "bbox_height": ("parent", (y1 - y0 + 1).astype(np.int32)),
            "bbox_width": ("parent", (x1 - x0 + 1).astype(np.int32)),
            "area": ("parent", area),
            "parent_flags": ("parent", pflags.astype(np.int32)),
            "span_count": ("parent", counts.astype(np.int64), {"sample_dimension": "span"}),
            "peak_count": ("parent", peak_count, {"sample_dimension": "peak"}),
            "span_y": ("span", span_y.astype(np.int32)),
            "span_x0": ("span", span_x0.astype(np.int32)),
            "span_x1": ("span", span_x1.astype(np.int32)),
            "peak_id": ("peak", np.arange(1, order.size + 1, dtype=np.int64)),
            "peak_parent": ("peak", p_parent[order]),
            "peak_y": ("peak", p_y[order].astype(np.float64)),
            "peak_x": ("peak", p_x[order].astype(np.float64)),
            "peak_iy": ("peak", p_iy[order]),
            "peak_ix": ("peak", p_ix[order]),
            "peak_significance": ("peak", p_sig[order].astype(np.float32)),
            "peak_bands": ("peak", p_bands[order].astype(np.int32)),
            "peak_flags": ("peak", p_flags[order].astype(np.int32)),
            "background": (("band", "y", "x"), background),
        },
        coords={"band": ("band", np.asarray(all_bands))},
    )
    cfg_json = {k: v for k, v in cfg.items()}
    cfg_json["fwhm_per_band"] = fwhms
    cfg_json["significance"] = "matched_filter" if significance is None else "given"
    ds.attrs.update({
        "threshold": float(threshold),
        "min_area": int(cfg["min_area"]),
        "association_radius": float(cfg["association_radius"]),
        "grow_radius": float(cfg["grow_radius"]),
        "psf_fwhm": float(fwhm),
        "detection_bands": json.dumps(det_bands),
        "config": json.dumps(cfg_json, sort_keys=True),
        "origin_y": int(exposure.attrs.get("origin_y", 0)),
        "origin_x": int(exposure.attrs.get("origin_x", 0)),
    })
    stamp(ds, "parents", 1)
    return validate(ds)
