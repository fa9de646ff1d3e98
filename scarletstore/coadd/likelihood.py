"""The likelihood (Kaiser 2001) coadd: a point-source S/N map per band.

For visits v of one band with warped image I_v (coadd flux units), warped
PSF P_v and noise variance sigma_v^2 per grid pixel,

    numerator   N(x) = sum_v sum_k I_v(x + k) P_v(k) / sigma_v^2
    denominator D(x) = sum_v sum_k P_v(k)^2 good_v(x + k) / sigma_v^2
    significance     = N / sqrt(D)

N / D is the maximum-likelihood flux of a point source at x and
1 / sqrt(D) its error, so the significance is the point-source S/N. The
denominator is correlated with each visit's coverage so pixels near a
visit's edge or its masked pixels are not over-counted. sigma_v^2 is the
visit's white-noise variance expressed per grid pixel: its median pixel
variance times (flux scale)^2 times the grid/visit pixel-area ratio. The
per-pixel variance of the warp is smaller (the kernel smooths the noise)
but a point-source filter sees the noise at the scale of the PSF, where
the warp leaves it unchanged.

A multi-band chi^2 detection image (Szalay, Connolly & Szokoly 1999) is
the sum of the squared band significances.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..store.schema import stamp, validate
from .fourier import Convolver


class LikelihoodSums:
    """Running numerator and denominator of one band.

    With ``coverage``, also ``cov`` = sum_v (good_v * P_v) / sigma_v^2: what
    a unit sky contributes to the numerator, so a smooth sky model S fitted
    later comes off it as ``num -= S * cov``.
    """

    def __init__(self, shape, coverage: bool = False):
        self.num = np.zeros(shape)
        self.den = np.zeros(shape)
        self.cov = np.zeros(shape) if coverage else None
        self._conv = None

    def add(self, image, good, psf, sigma2: float):
        """Add one visit: its warp (``image``, usable where ``good``), warped PSF, noise variance.

        A correlation with P is a convolution with P reversed; the coverage
        is transformed once for the denominator and the coverage sum.
        """
        if self._conv is None or self._conv.kernel_size < psf.shape[0]:
            self._conv = Convolver(self.num.shape, max(psf.shape))
        conv = self._conv
        flipped = psf[::-1, ::-1]
        self.num += conv.convolve(conv.image(np.where(good, image, 0.0)), flipped) / sigma2
        cover = conv.image(good)
        self.den += conv.convolve(cover, flipped**2) / sigma2
        if self.cov is not None:
            self.cov += conv.convolve(cover, flipped) / sigma2

    def significance(self):
        den = np.where(self.den > 0, self.den, np.nan)
        return self.num / np.sqrt(den)


def likelihood_dataset(sums: dict, bands, zeropoint: float) -> xr.Dataset:
    """The ``coadds/likelihood`` group from the per-band sums."""
    num = np.stack([sums[b].num for b in bands]).astype(np.float32)
    den = np.stack([sums[b].den for b in bands]).astype(np.float32)
    sig = np.stack([sums[b].significance() for b in bands])
    chi2 = np.nansum(np.where(np.isfinite(sig), sig, 0.0) ** 2, axis=0)
    ds = xr.Dataset(
        {
            "numerator": (("band", "y", "x"), num),
            "denominator": (("band", "y", "x"), den),
            "significance": (("band", "y", "x"), sig.astype(np.float32)),
            "chi2": (("y", "x"), chi2.astype(np.float32)),
        },
        coords={"band": np.array(list(bands), dtype=object)},
        attrs={"zeropoint": float(zeropoint)},
    )
    stamp(ds, "likelihood_coadd", 1)
    return validate(ds)
