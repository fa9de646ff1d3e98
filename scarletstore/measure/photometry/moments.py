"""Adaptive second moments (Bernstein & Jarvis 2002, AJ 123, 583).

The weight is an elliptical Gaussian whose centre and covariance are iterated
to match the object's: with weight covariance ``M`` and an object of
covariance ``S``, the weighted covariance is ``C = (M^-1 + S^-1)^-1``, which
is ``M / 2`` at the fixed point ``M = S``, the weighted centroid then being
the weight's centre. For a Gaussian object the fixed point is exactly its
covariance.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# status codes of adaptive_moments
OK, NOT_CONVERGED, FAILED = 0, 1, 2


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def _weighted_sums(img, cx, cy, m_xx, m_yy, m_xy, out):
    """Weighted sums of ``img`` under the Gaussian weight (centre, covariance M)."""
    h, w = img.shape
    det = m_xx * m_yy - m_xy * m_xy
    i_xx, i_yy, i_xy = m_yy / det, m_xx / det, -m_xy / det
    # 4 sigma of the weight: the product weight x object has half the weight's
    # covariance near the fixed point, so what is cut is below exp(-16)
    ry, rx = 4.0 * np.sqrt(m_yy), 4.0 * np.sqrt(m_xx)
    ya, yb = max(int(np.floor(cy - ry)), 0), min(int(np.ceil(cy + ry)) + 1, h)
    xa, xb = max(int(np.floor(cx - rx)), 0), min(int(np.ceil(cx + rx)) + 1, w)
    s0 = sx = sy = sxx = syy = sxy = 0.0
    for y in range(ya, yb):
        dy = y - cy
        for x in range(xa, xb):
            v = img[y, x]
            if v == 0.0:
                continue
            dx = x - cx
            q = i_xx * dx * dx + 2.0 * i_xy * dx * dy + i_yy * dy * dy
            if q > 16.0:
                continue
            wv = np.exp(-0.5 * q) * v
            s0 += wv
            sx += wv * dx
            sy += wv * dy
            sxx += wv * dx * dx
            syy += wv * dy * dy
            sxy += wv * dx * dy
    out[0], out[1], out[2], out[3], out[4], out[5] = s0, sx, sy, sxx, syy, sxy


@njit(cache=True)
def _inverse(a_xx, a_yy, a_xy):
    det = a_xx * a_yy - a_xy * a_xy
    return a_yy / det, a_xx / det, -a_xy / det, det


@njit(cache=True)
def adaptive_moments(img, cx, cy, sigma0, max_iter, tol):
    """Adaptive moments of ``img`` (h, w) started at (cx, cy) with a round weight ``sigma0``.

    The fixed point is Bernstein & Jarvis's (weighted covariance ``C = M / 2``,
    weighted centroid at the weight's centre). Each step uses the estimate
    exact for a Gaussian object, ``S = (C^-1 - M^-1)^-1`` and centre offset
    ``S C^-1 d`` (d the weighted mean offset), which reaches the fixed point in
    a few iterations instead of halving the error each time; when that
    estimate is not positive definite, or stops making progress (objects far
    from Gaussian, weights cut by the box edge), the steps fall back to
    ``M = 2 C`` and an offset ``d``. Converged: the covariance changes by less
    than ``tol`` of its trace and the centre by less than ``10 tol`` pixels.

    Returns
    -------
    (m_xx, m_yy, m_xy, cx, cy, status) : the object's covariance (pixel^2),
    its centre (box pixels) and OK / NOT_CONVERGED / FAILED. Failure means the
    weighted flux is not positive, the covariance stops being positive definite
    or grows beyond the image, or the centre leaves it.
    """
    h, w = img.shape
    m_xx = m_yy = sigma0 * sigma0
    m_xy = 0.0
    sums = np.zeros(6)
    limit = 4.0 * (h * h + w * w)
    newton = True
    last = np.inf
    for _ in range(max_iter):
        _weighted_sums(img, cx, cy, m_xx, m_yy, m_xy, sums)
        s0 = sums[0]
        if not s0 > 0.0:
            return np.nan, np.nan, np.nan, cx, cy, FAILED
        ddx, ddy = sums[1] / s0, sums[2] / s0
        c_xx = sums[3] / s0 - ddx * ddx
        c_yy = sums[4] / s0 - ddy * ddy
        c_xy = sums[5] / s0 - ddx * ddy
        if not (c_xx > 0.0 and c_yy > 0.0 and c_xx * c_yy - c_xy * c_xy > 0.0):
            return np.nan, np.nan, np.nan, cx, cy, FAILED
        ci_xx, ci_yy, ci_xy, _ = _inverse(c_xx, c_yy, c_xy)
        mi_xx, mi_yy, mi_xy, _ = _inverse(m_xx, m_yy, m_xy)
        d_xx, d_yy, d_xy = ci_xx - mi_xx, ci_yy - mi_yy, ci_xy - mi_xy
        n_xx, n_yy, n_xy = 2.0 * c_xx, 2.0 * c_yy, 2.0 * c_xy
        step_x, step_y = ddx, ddy
        if newton and d_xx > 0.0 and d_xx * d_yy - d_xy * d_xy > 0.0:
            s_xx, s_yy, s_xy, _ = _inverse(d_xx, d_yy, d_xy)
            # accept the Gaussian estimate only as a bounded step (at most 4x in size)
            if 0.25 * (m_xx + m_yy) < s_xx + s_yy < 4.0 * (m_xx + m_yy):
                n_xx, n_yy, n_xy = s_xx, s_yy, s_xy
                # offset of a Gaussian object's centre: S C^-1 d
                gx = ci_xx * ddx + ci_xy * ddy
                gy = ci_xy * ddx + ci_yy * ddy
                step_x, step_y = s_xx * gx + s_xy * gy, s_xy * gx + s_yy * gy
        if not (n_xx > 0.0 and n_yy > 0.0 and n_xx * n_yy - n_xy * n_xy > 0.0) or n_xx + n_yy > limit:
            return np.nan, np.nan, np.nan, cx, cy, FAILED
        cx += step_x
        cy += step_y
        if not (0.0 <= cx < w and 0.0 <= cy < h):
            return np.nan, np.nan, np.nan, cx, cy, FAILED
        change = abs(n_xx - m_xx) + abs(n_yy - m_yy) + 2.0 * abs(n_xy - m_xy)
        m_xx, m_yy, m_xy = n_xx, n_yy, n_xy
        if change < tol * (m_xx + m_yy) and abs(step_x) + abs(step_y) < 10.0 * tol:
            return m_xx, m_yy, m_xy, cx, cy, OK
        if change >= last:
            # no progress (a profile far from Gaussian, or a weight cut by the box
            # edge, makes the Gaussian step cycle): the plain step contracts
            newton = False
        last = change
    return m_xx, m_yy, m_xy, cx, cy, NOT_CONVERGED


def psf_covariance(psf: np.ndarray) -> tuple[float, float, float]:
    """Adaptive-moment covariance (xx, yy, xy) of a PSF image centred on its central pixel.

    Used as the Gaussian approximation of the PSF (GAaP). Falls back to the
    unweighted second moments of the positive pixels if the iteration fails.
    """
    psf = np.ascontiguousarray(psf, np.float64)
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    xx, yy, xy, _, _, status = adaptive_moments(psf, float(cx), float(cy), 2.0, 100, 1e-8)
    if status == FAILED:
        y, x = np.mgrid[:psf.shape[0], :psf.shape[1]]
        p = np.clip(psf, 0, None)
        p = p / p.sum()
        mx, my = (p * x).sum(), (p * y).sum()
        xx, yy, xy = (p * (x - mx) ** 2).sum(), (p * (y - my) ** 2).sum(), (p * (x - mx) * (y - my)).sum()
    return float(xx), float(yy), float(xy)
