"""PSF photometry: the linear least-squares amplitude of the band PSF at a fixed centre.

The PSF image is shifted to the source's sub-pixel centre in Fourier space
(a pure phase ramp, exact for a band-limited PSF) and fitted with inverse
variance weights ``w``: ``F = sum(w P I) / sum(w P^2)``. The estimate is
linear in the pixels, so ``var F = sum((w P)^2 var_eff) / (sum w P^2)^2``;
for an isolated source (``var_eff = var = 1 / w``) this is ``1 / sum(w P^2)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def shifted_psf(psf: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``psf`` (odd-sized, centred on its central pixel) moved by (dy, dx) pixels."""
    psf = np.asarray(psf, np.float64)
    ny, nx = psf.shape
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    ramp = np.exp(-2j * np.pi * (ky * dy + kx * dx))
    return np.fft.irfft2(np.fft.rfft2(psf) * ramp, s=psf.shape)


@njit(cache=True)
def psf_fit(values, weight, var_eff, psf, oy, ox):
    """Amplitude of ``psf`` placed with its pixel (0, 0) at box pixel (oy, ox).

    Returns (flux, variance, sum of w P^2); the last is 0 when no weighted
    pixel overlaps the PSF (the fit failed).
    """
    h, w = values.shape
    ph, pw = psf.shape
    a = 0.0
    b = 0.0
    v = 0.0
    for py in range(ph):
        y = oy + py
        if y < 0 or y >= h:
            continue
        for px in range(pw):
            x = ox + px
            if x < 0 or x >= w:
                continue
            wp = weight[y, x] * psf[py, px]
            a += wp * psf[py, px]
            b += wp * values[y, x]
            v += wp * wp * var_eff[y, x]
    if a <= 0.0:
        return np.nan, np.nan, 0.0
    return b / a, v / (a * a), a


def psf_flux(values, weight, var_eff, psf, cx, cy):
    """(flux, error) of the PSF fitted at (cx, cy) box pixels; NaN when no pixel is usable."""
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    p = shifted_psf(psf, cy - iy, cx - ix)
    f, v, a = psf_fit(values, weight, var_eff, p, iy - psf.shape[0] // 2, ix - psf.shape[1] // 2)
    return f, np.sqrt(v)
