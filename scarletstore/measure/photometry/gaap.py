"""Gaussian-aperture-and-PSF photometry (GAaP; Kuijken et al. 2015, MNRAS 454, 3500).

The GAaP flux is the flux of the *pre-seeing* source ``f`` seen through a
Gaussian aperture of covariance ``A`` with unit peak:
``F = integral f(x) exp(-x^T A^-1 x / 2) dx``. With a Gaussian PSF of
covariance ``P`` the observed image is ``I = f * PSF``, and weighting the
image by

    g(x) = sqrt(det A / det(A - P)) exp(-x^T (A - P)^-1 x / 2)

gives exactly ``F`` (``g`` convolved with the PSF is the aperture): the
aperture deconvolved by the PSF. ``F`` does not depend on the seeing, so
colours from GAaP fluxes agree across bands of different PSFs, and for a
point source ``F`` is the total flux. The band PSF enters through the
covariance of its adaptive moments; an aperture not wider than the PSF
(``A - P`` not comfortably positive definite) cannot be deconvolved and is
flagged instead of measured.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# A - P must keep this fraction of the aperture's variance along every axis:
# near zero the weight's normalisation (and the noise) diverge
MIN_DECONVOLVED = 0.1


def effective_weight(sigma_aperture: float, psf_cov) -> tuple | None:
    """(norm, i_xx, i_yy, i_xy) of the image weight ``g`` for a round aperture, or None.

    None means the PSF is too broad for the aperture.
    """
    a = sigma_aperture ** 2
    c_xx, c_yy, c_xy = a - psf_cov[0], a - psf_cov[1], -psf_cov[2]
    tr, det = c_xx + c_yy, c_xx * c_yy - c_xy * c_xy
    lam_min = 0.5 * tr - np.sqrt(max(0.25 * tr * tr - det, 0.0))
    if not (lam_min > MIN_DECONVOLVED * a):
        return None
    return np.sqrt(a * a / det), c_yy / det, c_xx / det, -c_xy / det


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def gaap_sum(values, var_eff, cx, cy, norm, i_xx, i_yy, i_xy):
    """(sum g v, sum g^2 var_eff) with the Gaussian weight g of inverse covariance i_* about (cx, cy)."""
    h, w = values.shape
    det = i_xx * i_yy - i_xy * i_xy
    # 6 sigma of the weight along each axis (covariance = inverse of i)
    ry, rx = 6.0 * np.sqrt(i_xx / det), 6.0 * np.sqrt(i_yy / det)
    ya, yb = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, h)
    xa, xb = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, w)
    f = 0.0
    v = 0.0
    for y in range(ya, yb):
        dy = y - cy
        for x in range(xa, xb):
            dx = x - cx
            q = i_xx * dx * dx + 2.0 * i_xy * dx * dy + i_yy * dy * dy
            if q > 36.0:
                continue
            g = norm * np.exp(-0.5 * q)
            f += g * values[y, x]
            v += g * g * var_eff[y, x]
    return f, v


def gaap_flux(values, var_eff, cx, cy, weight):
    """(flux, error) with the effective weight from :func:`effective_weight`."""
    f, v = gaap_sum(values, var_eff, float(cx), float(cy), *weight)
    return f, np.sqrt(v)
