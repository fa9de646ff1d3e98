"""Measurements of deblended children from their heavy footprints (numba, no I/O)."""

from __future__ import annotations

import numpy as np
from numba import njit

# columns of measure_children's output, in order
COLUMNS = ("flux_redistributed", "flux_err", "centroid_x", "centroid_y", "ixx", "iyy", "ixy",
           "blendedness", "chi2", "n_pixels", "data_coverage", "flux_coverage")


#: a child's pixels are those where its model exceeds this fraction of its peak: convolved
#: models ring at float32 rounding (1e-7 of the peak) far from the source, and counting those
#: pixels as its own made n_pixels, chi2 and data_coverage follow the rounding (a PSF equal
#: to the stored one to 1e-10 moved a chi2 from 9.26 to 15.47 and n_pixels by 23)
OWN_PIXEL_FLOOR = 1e-5


@njit(cache=True)
def _measure(models, redist, footprint, image, variance, good, y0, x0, has_data, out):
    n, h, w = models.shape
    for i in range(n):
        peak = 0.0
        for y in range(h):
            for x in range(w):
                if footprint[y, x] and models[i, y, x] > peak:
                    peak = models[i, y, x]
        floor = OWN_PIXEL_FLOOR * peak
        s_own2 = 0.0
        s_own_all = 0.0
        s_f = 0.0
        s_fx = 0.0
        s_fy = 0.0
        s_red = 0.0
        s_var = 0.0
        s_chi = 0.0
        s_f_good = 0.0
        n_pix = 0
        n_good = 0
        for y in range(h):
            for x in range(w):
                if not footprint[y, x]:
                    continue
                t = models[i, y, x]
                if t <= floor or t <= 0:
                    continue
                total = 0.0
                for j in range(n):
                    tj = models[j, y, x]
                    if tj > 0:
                        total += tj
                s_own2 += t * t
                s_own_all += t * total
                s_f += t
                s_fx += t * x
                s_fy += t * y
                n_pix += 1
                if has_data and good[y, x]:
                    s_f_good += t
                    frac = t / total
                    s_red += redist[i, y, x]
                    s_var += frac * frac * variance[y, x]
                    # the blend's full model at this pixel, sum over all children
                    full = 0.0
                    for j in range(n):
                        full += models[j, y, x]
                    r = image[y, x] - full
                    s_chi += r * r / variance[y, x]
                    n_good += 1
        cx = s_fx / s_f if s_f > 0 else np.nan
        cy = s_fy / s_f if s_f > 0 else np.nan
        ixx = 0.0
        iyy = 0.0
        ixy = 0.0
        if s_f > 0:
            for y in range(h):
                for x in range(w):
                    t = models[i, y, x]
                    if footprint[y, x] and t > floor and t > 0:
                        ixx += t * (x - cx) ** 2
                        iyy += t * (y - cy) ** 2
                        ixy += t * (x - cx) * (y - cy)
            ixx /= s_f
            iyy /= s_f
            ixy /= s_f
        else:
            ixx = iyy = ixy = np.nan
        out[i, 0] = s_red if has_data else np.nan
        out[i, 1] = np.sqrt(s_var) if has_data else np.nan
        out[i, 2] = cx + x0
        out[i, 3] = cy + y0
        out[i, 4] = ixx
        out[i, 5] = iyy
        out[i, 6] = ixy
        # clipped: in float32 a lone child's ratio is 1 to rounding, and -7e-9 is not a blendedness
        out[i, 7] = max(0.0, 1.0 - s_own2 / s_own_all) if s_own_all > 0 else np.nan
        out[i, 8] = s_chi / n_good if (has_data and n_good > 0) else np.nan
        out[i, 9] = n_pix
        out[i, 10] = n_good / n_pix if (has_data and n_pix > 0) else np.nan
        # the share of the model's light (not of its pixels) that the data saw
        out[i, 11] = s_f_good / s_f if (has_data and s_f > 0) else np.nan


def measure_children(models, footprint, y0, x0, image=None, variance=None, good=None,
                     redistributed=None) -> np.ndarray:
    """(n_children, len(COLUMNS)) measurements of one blend in one band.

    Parameters
    ----------
    models : (n, h, w) observed-frame models of the children (blend box)
    footprint : (h, w) bool parent footprint
    y0, x0 : blend box origin (centroids are returned in exposure pixels)
    image, variance, good : (h, w) observed data of the box (None: no exposure)
    redistributed : (n, h, w) re-apportioned children (needed with data)
    """
    models = np.ascontiguousarray(models, np.float32)
    n, h, w = models.shape
    has_data = image is not None
    if not has_data:
        image = variance = np.zeros((h, w), np.float32)
        good = np.zeros((h, w), np.bool_)
        redistributed = np.zeros_like(models)
    out = np.empty((n, len(COLUMNS)), np.float64)
    _measure(models, np.ascontiguousarray(redistributed, np.float32), np.ascontiguousarray(footprint, np.bool_),
             np.ascontiguousarray(image, np.float32), np.ascontiguousarray(variance, np.float32),
             np.ascontiguousarray(good, np.bool_), int(y0), int(x0), has_data, out)
    return out
