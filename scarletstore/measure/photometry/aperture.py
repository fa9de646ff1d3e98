"""Aperture photometry with exact pixel overlap (circular and elliptical).

An aperture is ``{d : d^T Q d <= R^2}`` about a sub-pixel centre, with ``Q``
the identity for circles. Each pixel enters with the fraction of its area
inside: pixels whose whole square is inside (or outside) count 1 (or 0);
on pixels the boundary crosses, the aperture's chord is solved exactly in y
on ``nsub`` columns (midpoint in x), which gives the area and its first
moments. The flux is linear in the pixels, so its variance is the weighted
sum of the pixel variances.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NSUB = 16  # columns per boundary pixel: area within 5e-4 of pi R^2 at R = 3, 6e-5 at R = 12


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def aperture_sum(values, var_eff, cx, cy, q_xx, q_yy, q_xy, radius, nsub):
    """Sum of ``values`` over one aperture, and its variance.

    Boundary pixels are not taken as uniform: inside each, the intensity is
    the pixel's value plus its central-difference gradient times the offset
    from the pixel centre (a model whose pixel mean is the pixel value), so
    the part inside gets the light it holds on a steep profile (a uniform
    pixel under-counts a Gaussian by 2.6 % at R = 1.5 sigma). The flux stays
    linear in the pixels: each pixel's total coefficient is accumulated and
    the variance is ``sum c^2 var_eff``.

    Parameters
    ----------
    values, var_eff : (h, w) pixel values and their (effective) variance
    cx, cy : centre in box pixels
    q_xx, q_yy, q_xy : the aperture metric Q (1, 1, 0 for a circle)
    radius : R in the metric of Q
    nsub : columns per boundary pixel

    Returns
    -------
    (flux, variance, area) ; area is the aperture's area inside the box
    (pixels), the geometric area when the aperture is wholly inside.
    """
    h, w = values.shape
    det = q_xx * q_yy - q_xy * q_xy
    # half extents of the ellipse d^T Q d = R^2 along x and y
    ex = radius * np.sqrt(q_yy / det)
    ey = radius * np.sqrt(q_xx / det)
    # a corner is at most sqrt(0.5) pixel from the centre; in the Q metric that is
    # at most sqrt(0.5 * largest eigenvalue of Q)
    lam = 0.5 * (q_xx + q_yy) + np.sqrt(0.25 * (q_xx - q_yy) ** 2 + q_xy * q_xy)
    margin = np.sqrt(0.5 * lam)
    r_in = radius - margin
    r_out = radius + margin
    ya, yb = max(int(np.floor(cy - ey)) - 1, 0), min(int(np.ceil(cy + ey)) + 2, h)
    xa, xb = max(int(np.floor(cx - ex)) - 1, 0), min(int(np.ceil(cx + ex)) + 2, w)
    if ya >= yb or xa >= xb:
        return 0.0, 0.0, 0.0
    # coefficients of the pixels (one pixel of border for the gradients)
    coef = np.zeros((yb - ya + 2, xb - xa + 2))
    area = 0.0
    r2 = radius * radius
    step = 1.0 / nsub
    for y in range(ya, yb):
        dy = y - cy
        for x in range(xa, xb):
            dx = x - cx
            r = np.sqrt(q_xx * dx * dx + 2.0 * q_xy * dx * dy + q_yy * dy * dy)
            if r >= r_out:
                continue
            cyy, cxx = y - ya + 1, x - xa + 1
            if r <= r_in:
                coef[cyy, cxx] += 1.0
                area += 1.0
                continue
            # the inside part of the pixel, column by column: exact in y (the aperture's
            # chord at this x), midpoint in x
            frac = 0.0
            mx = 0.0
            my = 0.0
            for sx in range(nsub):
                ox = -0.5 + (sx + 0.5) * step
                px = dx + ox
                # q_yy py^2 + 2 q_xy px py + q_xx px^2 - R^2 <= 0
                bq = q_xy * px
                disc = bq * bq - q_yy * (q_xx * px * px - r2)
                if disc <= 0.0:
                    continue
                root = np.sqrt(disc)
                lo = max((-bq - root) / q_yy, dy - 0.5)
                hi = min((-bq + root) / q_yy, dy + 0.5)
                if hi <= lo:
                    continue
                length = hi - lo
                frac += length
                mx += ox * length
                my += 0.5 * (hi * hi - lo * lo) - dy * length
            if frac == 0.0:
                continue
            frac *= step
            coef[cyy, cxx] += frac
            area += frac
            mx *= step
            my *= step
            # gradient by central differences; none across the box edge
            if 0 < x < w - 1:
                coef[cyy, cxx + 1] += 0.5 * mx
                coef[cyy, cxx - 1] -= 0.5 * mx
            if 0 < y < h - 1:
                coef[cyy + 1, cxx] += 0.5 * my
                coef[cyy - 1, cxx] -= 0.5 * my
    flux = 0.0
    var = 0.0
    for j in range(coef.shape[0]):
        y = ya + j - 1
        if y < 0 or y >= h:
            continue
        for i in range(coef.shape[1]):
            x = xa + i - 1
            c = coef[j, i]
            if c == 0.0 or x < 0 or x >= w:
                continue
            flux += c * values[y, x]
            var += c * c * var_eff[y, x]
    return flux, var, area


def circular_flux(values, var_eff, cx, cy, radius):
    """(flux, error, area) in a circle of ``radius`` pixels about (cx, cy)."""
    f, v, a = aperture_sum(values, var_eff, float(cx), float(cy), 1.0, 1.0, 0.0, float(radius), NSUB)
    return f, np.sqrt(v), a
