"""The coadd's own smooth sky: fitted on source-free pixels and subtracted.

Background matching makes the visits consistent with one another but keeps
their common (weighted mean) residual sky. That remainder is fitted here on
the coadd itself: sources are masked by a PSF-smoothed detection at
``DETECT_SIGMA`` grown by ``GROW_FWHM`` PSF FWHM, the remaining pixels are
3-sigma clipped, their medians over ``CELL`` pixel cells (much larger than
galaxies, so a galaxy cannot pull the model up under itself) are fitted
with a 2-D Legendre polynomial of degree at most ``MAX_DEGREE`` (a smooth
sky: residual backgrounds are planes or gentle curves over a patch), and the
source mask is re-derived from the sky-subtracted image ``ITERATIONS`` times.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre
from scipy import ndimage

CELL = 64  # pixels
MAX_DEGREE = 3
DETECT_SIGMA = 3.0  # PSF-smoothed S/N above which a pixel belongs to a source
CLIP_SIGMA = 3.0  # per-pixel S/N clip of what the detection leaves
GROW_FWHM = 2.0  # source masks grown by this many PSF FWHM (their faint wings)
ITERATIONS = 3
MIN_FILL = 0.2  # a cell needs this fraction of unmasked pixels to enter the fit


def _disk(radius):
    r = int(np.ceil(radius))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= radius * radius


def source_mask(resid, sigma, usable, fwhm):
    """Pixels of sources (detected on the PSF-smoothed image) and their grown wings.

    The threshold is in units of the smoothed image's own robust scatter, not
    of the variance plane: warping correlates the noise, so the variance plane
    underestimates the noise on PSF scales and would mask noise peaks.
    """
    s = max(fwhm / 2.3548, 0.5)
    z = np.where(usable, resid / sigma, 0.0)
    norm = ndimage.gaussian_filter(usable.astype(float), s)
    smooth = ndimage.gaussian_filter(z, s) / np.maximum(norm, 1e-3)
    vals = smooth[usable]
    noise = 1.4826 * np.median(np.abs(vals - np.median(vals)))
    det = usable & (smooth - np.median(vals) > DETECT_SIGMA * max(noise, 1e-12))
    det = ndimage.binary_dilation(det, structure=_disk(GROW_FWHM * fwhm))
    det |= usable & (np.abs(resid) > CLIP_SIGMA * sigma)
    return det


def _cell_medians(image, free, cell):
    ny, nx = image.shape
    ys, xs, meds, counts = [], [], [], []
    for y0 in range(0, ny, cell):
        for x0 in range(0, nx, cell):
            sl = (slice(y0, min(ny, y0 + cell)), slice(x0, min(nx, x0 + cell)))
            f = free[sl]
            if f.sum() < max(MIN_FILL * f.size, 16):
                continue
            yy, xx = np.nonzero(f)
            ys.append(y0 + yy.mean())  # centroid of the pixels used, not the cell centre
            xs.append(x0 + xx.mean())
            meds.append(np.median(image[sl][f]))
            counts.append(f.sum())
    return np.array(ys), np.array(xs), np.array(meds), np.array(counts, float)


def _design(u, v, degree):
    """Legendre terms P_i(u) P_j(v) with i + j <= degree."""
    cols = []
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            ci = np.zeros(i + 1)
            ci[i] = 1
            cj = np.zeros(j + 1)
            cj[j] = 1
            cols.append(legendre.legval(u, ci) * legendre.legval(v, cj))
    return np.stack(cols, axis=-1)


def fit_sky(image, variance, usable, fwhm, cell=CELL, max_degree=MAX_DEGREE):
    """Smooth sky model of one coadd band.

    Parameters
    ----------
    image, variance : (ny, nx) arrays
        The coadd and its per-pixel variance.
    usable : (ny, nx) bool
        Pixels with data (finite, positive variance).
    fwhm : float
        PSF FWHM in pixels (sets the detection filter and mask growth).

    Returns
    -------
    model : (ny, nx) float64
        The sky; zeros when too few cells are free of sources to fit it.
    info : dict
        ``degree``, ``cells`` used and the fraction of pixels masked.
    """
    ny, nx = image.shape
    usable = usable & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    model = np.zeros((ny, nx))
    info = {"degree": -1, "cells": 0, "masked_fraction": 0.0}
    if not usable.any():
        return model, info
    sigma = np.sqrt(np.where(usable, variance, np.median(variance[usable])))
    ncell = max(1, min(int(np.ceil(ny / cell)), int(np.ceil(nx / cell))))
    degree = min(max_degree, ncell - 1)
    yy = 2.0 * np.arange(ny) / max(ny - 1, 1) - 1.0
    xx = 2.0 * np.arange(nx) / max(nx - 1, 1) - 1.0
    for _ in range(ITERATIONS):
        free = usable & ~source_mask(image - model, sigma, usable, fwhm)
        cy, cx, med, cnt = _cell_medians(image - model, free, cell)
        if len(med) == 0:
            break
        d = min(degree, int(np.floor(np.sqrt(len(med)))) - 1)
        if d < 0:
            break
        A = _design(2 * cy / max(ny - 1, 1) - 1, 2 * cx / max(nx - 1, 1) - 1, d)
        w = np.sqrt(cnt)
        coef, *_ = np.linalg.lstsq(A * w[:, None], med * w, rcond=None)
        # Evaluate row by row: a full (ny, nx, terms) design would be large.
        update = np.empty((ny, nx))
        for r0 in range(0, ny, 64):
            rows = slice(r0, min(ny, r0 + 64))
            U, V = np.meshgrid(yy[rows], xx, indexing="ij")
            update[rows] = _design(U, V, d) @ coef
        model += update
        info = {"degree": d, "cells": int(len(med)),
                "masked_fraction": float(1 - free.sum() / usable.sum())}
    return model, info
