"""The coadd's own smooth sky: fitted on source-free pixels and subtracted.

Background matching makes the visits consistent with one another but keeps
their common (weighted mean) residual sky. That remainder is fitted here on
the coadd itself: sources are masked by a PSF-smoothed detection at
``DETECT_SIGMA`` grown by ``GROW_FWHM`` PSF FWHM, the remaining pixels are
3-sigma clipped, their medians over ``CELL`` pixel cells (much larger than
galaxies, so a galaxy cannot pull the model up under itself) are fitted
with a 2-D Legendre polynomial of degree at most ``MAX_DEGREE`` (a smooth
sky: residual backgrounds are planes or gentle curves over a patch; the
degree with the lowest BIC, so a flat sky gets a constant), and the
source mask is re-derived from the sky-subtracted image ``ITERATIONS`` times.
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import legendre
from scipy import ndimage

from .cells import block_medians, cell_sums, per_pixel

CELL = 64  # pixels; smaller grids use cells of a sixth of their side (at least MIN_CELL)
MIN_CELL = 24
MAX_DEGREE = 3
DETECT_SIGMA = 3.0  # PSF-smoothed S/N above which a pixel belongs to a source
CLIP_SIGMA = 3.0  # per-pixel S/N clip of what the detection leaves
GROW_FWHM = 2.0  # source masks grown by this many PSF FWHM (their faint wings)
ITERATIONS = 3
MIN_FILL = 0.2  # a cell needs this fraction of unmasked pixels to enter the fit


def _dilate_disk(mask, radius):
    """``mask`` dilated by the disk of pixel offsets x^2 + y^2 <= radius^2 (as
    ``binary_dilation`` with that structure), from the exact Euclidean distance
    to the nearest set pixel: its cost does not grow with the disk's area."""
    if not mask.any():
        return mask.copy()
    d2 = ndimage.distance_transform_edt(~mask) ** 2  # squared distances are integers
    return d2 <= radius * radius + 1e-6


def source_mask(resid, sigma, usable, fwhm, norm=None):
    """Pixels of sources (detected on the PSF-smoothed image) and their grown wings.

    The threshold is in units of the smoothed image's own robust scatter, not
    of the variance plane: warping correlates the noise, so the variance plane
    underestimates the noise on PSF scales and would mask noise peaks.
    ``norm`` (the smoothed ``usable``, the same at every iteration of the
    fit) may be passed in.
    """
    s = max(fwhm / 2.3548, 0.5)
    z = np.where(usable, resid / sigma, 0.0)
    if norm is None:
        norm = ndimage.gaussian_filter(usable.astype(float), s)
    smooth = ndimage.gaussian_filter(z, s) / np.maximum(norm, 1e-3)
    vals = smooth[usable]
    centre = np.median(vals)
    noise = 1.4826 * np.median(np.abs(vals - centre))
    det = usable & (smooth - centre > DETECT_SIGMA * max(noise, 1e-12))
    det = _dilate_disk(det, GROW_FWHM * fwhm)
    det |= usable & (np.abs(resid) > CLIP_SIGMA * sigma)
    return det


def _cell_medians(image, sigma, free, cell):
    """Centroid, median and the median's standard error of the free pixels of each cell.

    The error is 1.2533 x the scatter / sqrt(n), the scatter being the
    pixels' robust scatter or their noise (variance plane) if larger: on
    noise-free images the scatter is that of faint wings and would give a
    few cells all the weight. Cells (row by row) with fewer than
    ``MIN_FILL`` of their pixels free (and 16) are left out.
    """
    ny, nx = image.shape
    med, n = block_medians(image, free, cell)
    mad, _ = block_medians(np.abs(image - per_pixel(med, (ny, nx), cell)), free, cell)
    noise, _ = block_medians(sigma, free, cell)
    size = (np.minimum(cell, ny - cell * np.arange(n.shape[0]))[:, None]
            * np.minimum(cell, nx - cell * np.arange(n.shape[1]))[None, :])
    use = n >= np.maximum(MIN_FILL * size, 16)
    ys = np.arange(ny, dtype=np.float64)[:, None] * np.ones((1, nx))
    xs = np.ones((ny, 1)) * np.arange(nx, dtype=np.float64)[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = cell_sums(ys, free, cell) / n  # centroid of the pixels used, not the cell centre
        cx = cell_sums(xs, free, cell) / n
    scatter = np.maximum(1.4826 * mad, noise)
    err = 1.2533 * scatter / np.sqrt(np.maximum(n, 1))
    return cy[use], cx[use], med[use], err[use]


def _best_polynomial(u, v, med, err, max_degree):
    """Coefficients and degree of the Legendre fit to the cell medians with the lowest BIC.

    chi^2 + k ln(n): a curved sky needs its curvature terms (without them the
    chi^2 is huge), while on a flat sky the extra terms only add noise at
    the edges of the patch. Degrees whose terms the cells do not
    over-determine (two spare) are not tried.
    """
    best = None
    for d in range(max_degree + 1):
        k = (d + 1) * (d + 2) // 2
        if k > len(med) - 2 and d > 0:
            break
        A = _design(u, v, d) / err[:, None]
        coef, *_ = np.linalg.lstsq(A, med / err, rcond=None)
        chi2 = float(np.sum((A @ coef - med / err) ** 2))
        bic = chi2 + k * np.log(len(med))
        if best is None or bic < best[0]:
            best = (bic, d, coef)
    return best[2], best[1]


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
    cell = int(min(cell, max(MIN_CELL, min(ny, nx) // 6)))
    yy = 2.0 * np.arange(ny) / max(ny - 1, 1) - 1.0
    xx = 2.0 * np.arange(nx) / max(nx - 1, 1) - 1.0
    norm = ndimage.gaussian_filter(usable.astype(float), max(fwhm / 2.3548, 0.5))
    for _ in range(ITERATIONS):
        free = usable & ~source_mask(image - model, sigma, usable, fwhm, norm)
        cy, cx, med, err = _cell_medians(image, sigma, free, cell)
        if len(med) == 0:
            break
        coef, d = _best_polynomial(2 * cy / max(ny - 1, 1) - 1, 2 * cx / max(nx - 1, 1) - 1, med, err,
                                   max_degree)
        # Evaluate by row blocks: a full (ny, nx, terms) design would be large.
        for r0 in range(0, ny, 64):
            rows = slice(r0, min(ny, r0 + 64))
            U, V = np.meshgrid(yy[rows], xx, indexing="ij")
            model[rows] = _design(U, V, d) @ coef
        info = {"degree": d, "cells": int(len(med)),
                "masked_fraction": float(1 - free.sum() / usable.sum())}
    return model, info
