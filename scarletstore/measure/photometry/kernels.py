"""The measurement suite of one blend in one compiled call.

Each family keeps its own kernel (``psf_flux``, ``aperture``, ``kron``,
``gaap``, ``moments``); this module only strings them together per source so
a blend costs one call from Python instead of a dozen per source, and builds
the noise planes (fit weight, each source's effective variance) in place of
several full-size temporaries.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from . import PHOT_FLAGS
from .aperture import NSUB, aperture_sum
from .gaap import gaap_sum
from .kron import KRON_FACTOR, WINDOW, first_moment_radius
from .moments import FAILED, NOT_CONVERGED, adaptive_moments
from .psf_flux import _shift_odd, psf_fit

# flag bits as module globals (numba reads them as compile-time constants)
PSF_FAILED = PHOT_FLAGS["psf_flux_failed"]
APERTURE_FAILED = PHOT_FLAGS["aperture_failed"]
KRON_FAILED = PHOT_FLAGS["kron_failed"]
GAAP_FAILED = PHOT_FLAGS["gaap_failed"]
GAAP_PSF_TOO_BROAD = PHOT_FLAGS["gaap_psf_too_broad"]
SHAPE_FAILED = PHOT_FLAGS["shape_failed"]
SHAPE_NOT_CONVERGED = PHOT_FLAGS["shape_not_converged"]
APERTURE_MASKED = PHOT_FLAGS["aperture_masked"]
KRON_MASKED = PHOT_FLAGS["kron_masked"]
GAAP_MASKED = PHOT_FLAGS["gaap_masked"]
#: a window with less than this share of its model light on usable pixels is flagged ..._masked
MASKED_COVERAGE = 0.9
#: ... and with less than this (nothing measured), its flux and error are NaN
MIN_COVERAGE = 1e-3
NO_CENTRE = PSF_FAILED | APERTURE_FAILED | KRON_FAILED | GAAP_FAILED | SHAPE_FAILED


@njit(cache=True)
def noise_planes(templates, footprint, variance, good, unit_shares, var_eff, weight):
    """Fill ``weight`` (1 / var on usable footprint pixels, else 0) and ``var_eff``.

    ``var_eff[i] = share_i^2 var`` with ``share_i = T_i+ / sum_j T_j+`` (or 1
    where ``unit_shares``: a parent measured whole); 0 on unusable pixels.
    """
    n, h, w = templates.shape
    for y in range(h):
        for x in range(w):
            if not (footprint[y, x] and good[y, x]):
                weight[y, x] = 0.0
                for i in range(n):
                    var_eff[i, y, x] = 0.0
                continue
            v = variance[y, x]
            weight[y, x] = 1.0 / v
            total = 0.0
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    total += t
            for i in range(n):
                t = templates[i, y, x]
                if unit_shares:
                    share = 1.0
                elif total > 0 and t > 0:
                    share = t / total
                else:
                    share = 0.0
                var_eff[i, y, x] = share * share * v


@njit(cache=True)
def _masked_window(out, flags, i, col, cov, model_values, flag):
    """Apply one window's coverage ``cov`` (its model light on usable pixels over
    all of it) to the (flux, error) at ``out[i, col:col + 2]``.

    A window on unusable pixels measured the model there (model mode) or
    nothing (redistribute mode), with no variance from those pixels: a
    saturated star's 3 px aperture read 6e5 +- 0 (model) or 0 +- 0
    (redistribute). In model mode the flux is the model's amplitude seen
    through the usable part, so its error is that part's over ``cov``; in
    redistribute mode the flux is the usable pixels' and is only flagged.
    """
    if cov < MASKED_COVERAGE:
        flags[i] |= flag
    if not cov >= MIN_COVERAGE:
        out[i, col] = np.nan
        out[i, col + 1] = np.nan
    elif model_values:
        out[i, col + 1] /= cov


@njit(cache=True)
def _coverage(good_sum, all_sum):
    return good_sum / all_sum if all_sum > 0 else 0.0


@njit(cache=True)
def suite_kernel(values, geometry, var_eff, weight, centroids, moments, psf, gaap_w, gaap_ok, radii,
                 kron_min_radius, moments_max_iter, moments_tol, geom_good, masked, model_values,
                 out, flags):
    """Every family for each source; ``out`` columns as :func:`column_names` lists them.

    ``geom_good`` is ``geometry`` on usable pixels only; with ``masked`` (the
    box has unusable footprint pixels) each aperture, Kron and GAaP window
    gets its coverage (:func:`_masked_window`); ``model_values``: ``values``
    are the models (model mode), not re-apportioned data.
    """
    n, h, w = values.shape
    ph, pw = psf.shape
    k = radii.shape[0]
    zeros = np.zeros((h, w) if masked else (1, 1), np.float32)  # variance of the coverage sums
    for i in range(n):
        for c in range(out.shape[1]):
            out[i, c] = np.nan
        cx, cy = centroids[i, 0], centroids[i, 1]
        if not (np.isfinite(cx) and np.isfinite(cy)):
            flags[i] |= NO_CENTRE
            continue
        v = values[i]
        ve = var_eff[i]
        g, gg = geometry[i], geom_good[i]
        # PSF fit: the PSF shifted to the centre, only the rows/columns on the box
        ix = int(np.floor(cx + 0.5))
        iy = int(np.floor(cy + 0.5))
        oy, ox = iy - ph // 2, ix - pw // 2
        ya, yb = min(max(-oy, 0), ph), min(max(h - oy, 0), ph)
        xa, xb = min(max(-ox, 0), pw), min(max(w - ox, 0), pw)
        p = _shift_odd(psf, cy - iy, cx - ix, ya, yb, xa, xb)
        f, var, a = psf_fit(v, weight, ve, p, oy, ox)
        if a > 0:
            out[i, 0], out[i, 1] = f, np.sqrt(var)
        else:
            flags[i] |= PSF_FAILED
        col = 2
        for r in range(k):
            f, var, _ = aperture_sum(v, ve, cx, cy, 1.0, 1.0, 0.0, radii[r], NSUB)
            out[i, col], out[i, col + 1] = f, np.sqrt(var)
            if masked:
                cov = _coverage(aperture_sum(gg, zeros, cx, cy, 1.0, 1.0, 0.0, radii[r], NSUB)[0],
                                aperture_sum(g, zeros, cx, cy, 1.0, 1.0, 0.0, radii[r], NSUB)[0])
                _masked_window(out, flags, i, col, cov, model_values, APERTURE_MASKED)
            col += 2
        # Kron: ellipse of the model's moments, first-moment radius of the model
        m_xx, m_yy, m_xy = moments[i, 0], moments[i, 1], moments[i, 2]
        det = m_xx * m_yy - m_xy * m_xy
        kron_ok = False
        if np.isfinite(det) and det > 0 and m_xx > 0:
            s = np.sqrt(det)
            q_xx, q_yy, q_xy = m_yy / s, m_xx / s, -m_xy / s
            r1 = first_moment_radius(g, cx, cy, q_xx, q_yy, q_xy, WINDOW * det ** 0.25)
            if np.isfinite(r1) and r1 > 0:
                radius = max(KRON_FACTOR * r1, kron_min_radius)
                f, var, _ = aperture_sum(v, ve, cx, cy, q_xx, q_yy, q_xy, radius, NSUB)
                out[i, col], out[i, col + 1] = f, np.sqrt(var)
                out[i, col + 4] = r1
                kron_ok = True
                if masked:
                    cov = _coverage(aperture_sum(gg, zeros, cx, cy, q_xx, q_yy, q_xy, radius, NSUB)[0],
                                    aperture_sum(g, zeros, cx, cy, q_xx, q_yy, q_xy, radius, NSUB)[0])
                    _masked_window(out, flags, i, col, cov, model_values, KRON_MASKED)
        if not kron_ok:
            flags[i] |= KRON_FAILED
        col += 2
        if gaap_ok:
            f, var = gaap_sum(v, ve, cx, cy, gaap_w[0], gaap_w[1], gaap_w[2], gaap_w[3])
            out[i, col], out[i, col + 1] = f, np.sqrt(var)
            if masked:
                cov = _coverage(gaap_sum(gg, zeros, cx, cy, gaap_w[0], gaap_w[1], gaap_w[2], gaap_w[3])[0],
                                gaap_sum(g, zeros, cx, cy, gaap_w[0], gaap_w[1], gaap_w[2], gaap_w[3])[0])
                _masked_window(out, flags, i, col, cov, model_values, GAAP_MASKED)
        else:
            flags[i] |= GAAP_PSF_TOO_BROAD
        col += 3  # past gaap and kron_radius
        size = np.sqrt(0.5 * (m_xx + m_yy))
        sigma0 = size if (np.isfinite(size) and size > 0.5) else 2.0
        xx, yy, xy, _, _, status = adaptive_moments(v, cx, cy, sigma0, moments_max_iter, moments_tol)
        if status == FAILED:
            flags[i] |= SHAPE_FAILED
        else:
            if status == NOT_CONVERGED:
                flags[i] |= SHAPE_NOT_CONVERGED
            out[i, col], out[i, col + 1], out[i, col + 2] = xx, yy, xy
