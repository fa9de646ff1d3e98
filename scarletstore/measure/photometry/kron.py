"""Kron (1980) photometry: the first-moment radius and the flux inside 2.5 times it.

The aperture is elliptical, with the axis ratio and orientation of the
source's second moments ``M``: the elliptical radius is
``r_e^2 = d^T M^-1 d sqrt(det M)`` (so ``r_e`` is the ordinary radius for a
round source and the geometric mean of the semi-axes otherwise). The first
moment ``r1 = sum r_e I / sum I`` is taken within ``r_e < 6 det(M)^(1/4)``
(six sigma for a Gaussian, for which ``r1 = sqrt(pi / 2) sigma``); the Kron
flux is the exact-overlap flux inside ``r_e <= max(2.5 r1, min_radius)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .aperture import NSUB, aperture_sum

KRON_FACTOR = 2.5
WINDOW = 6.0


def kron_metric(m_xx, m_yy, m_xy):
    """The aperture metric ``Q = M^-1 sqrt(det M)`` of moments M, or None if M is not positive definite."""
    det = m_xx * m_yy - m_xy * m_xy
    if not (np.isfinite(det) and det > 0 and m_xx > 0):
        return None
    s = np.sqrt(det)
    return m_yy / s, m_xx / s, -m_xy / s


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def first_moment_radius(values, cx, cy, q_xx, q_yy, q_xy, window):
    """``sum r_e v / sum v`` over the positive pixels with ``r_e < window`` (NaN if none)."""
    h, w = values.shape
    det = q_xx * q_yy - q_xy * q_xy
    ex = window * np.sqrt(q_yy / det)
    ey = window * np.sqrt(q_xx / det)
    ya, yb = max(int(np.floor(cy - ey)), 0), min(int(np.ceil(cy + ey)) + 1, h)
    xa, xb = max(int(np.floor(cx - ex)), 0), min(int(np.ceil(cx + ex)) + 1, w)
    s = 0.0
    sr = 0.0
    for y in range(ya, yb):
        dy = y - cy
        for x in range(xa, xb):
            v = values[y, x]
            if v <= 0.0:
                continue
            dx = x - cx
            r = np.sqrt(q_xx * dx * dx + 2.0 * q_xy * dx * dy + q_yy * dy * dy)
            if r < window:
                s += v
                sr += v * r
    if s <= 0.0:
        return np.nan
    return sr / s


def kron_radius(geometry, cx, cy, moments):
    """First-moment radius (pixels) of ``geometry`` about (cx, cy) with the ellipse of ``moments``.

    Returns (r1, metric) ; r1 is NaN and metric None when the moments are not
    usable or the image has no positive pixel in the window.
    """
    q = kron_metric(*moments)
    if q is None or not (np.isfinite(cx) and np.isfinite(cy)):
        return np.nan, None
    size = (moments[0] * moments[1] - moments[2] ** 2) ** 0.25
    r1 = first_moment_radius(geometry, float(cx), float(cy), *q, WINDOW * size)
    if not (np.isfinite(r1) and r1 > 0):
        return np.nan, None
    return r1, q


def kron_flux(values, var_eff, cx, cy, r1, metric, min_radius):
    """(flux, error) inside the Kron ellipse ``r_e <= max(2.5 r1, min_radius)``."""
    radius = max(KRON_FACTOR * r1, min_radius)
    f, v, _ = aperture_sum(values, var_eff, float(cx), float(cy), *metric, float(radius), NSUB)
    return f, np.sqrt(v)
