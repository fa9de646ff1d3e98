"""Sigma-clipped PSF-matched stack and artifact rejection (in the spirit of CompareWarp).

Every warp of a band is convolved to one target PSF, so a source looks the
same in all of them and only what changed between visits - a satellite
trail, an unflagged cosmic ray, a transient, a bad column - differs. The
clipped mean of the matched warps is the PSF-matched coadd; a pixel that
departs from it in exactly one visit is an artifact of that visit. Its
footprint (grown down to a lower threshold and dilated) is masked in that
visit before the direct stack. A source that varies in several visits (a
variable star) is kept.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from . import kernels
from .cells import block_medians

CLIP_SIGMA = 3.0
CLIP_ITERATIONS = 3
DETECT_SIGMA = 5.0
GROW_SIGMA = 2.5
MODEL_FRACTION = 0.05  # tolerated fractional difference on bright sources (PSF-matching error)
DILATE = 2
BRIDGE = 30  # pixels: how far an artifact is carried into untestable pixels (through them)
BLOCK_ROWS = 64
BACKGROUND_BLOCK = 32  # pixels: scale of the smooth background difference between visits


@functools.lru_cache(maxsize=16)
def _interpolation_matrix(n_cells, n, block, order):
    """(len(coords), n_cells) sparse matrix of 1-D spline interpolation (mode "nearest").

    Column j is the interpolant of the j-th unit vector: the 2-D tensor-product
    spline of ``ndimage.map_coordinates`` on a grid of points is separable, so
    it is this matrix applied along each axis.
    """
    from scipy import sparse

    coords = (np.arange(n) + 0.5) / block - 0.5  # pixel centres in cell units
    eye = np.eye(n_cells)
    cols = [ndimage.map_coordinates(eye[j], coords[None], order=order, mode="nearest")
            for j in range(n_cells)]
    return sparse.csr_matrix(np.where(np.abs(m := np.stack(cols, axis=1)) > 1e-15, m, 0.0))


def _nanmean3(a):
    """Mean of the finite values of each 3 x 3 neighbourhood (edges repeated); NaN where none."""
    finite = np.isfinite(a)
    ones = np.ones((3, 3))
    total = ndimage.correlate(np.where(finite, a, 0.0), ones, mode="nearest")
    count = ndimage.correlate(finite.astype(np.float64), ones, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def smooth_difference(diff, good, block=BACKGROUND_BLOCK):
    """Smooth model of a visit-minus-stack difference: block medians, spline-interpolated.

    Visits carry different residual sky backgrounds; their difference is
    smooth, while sources and artifacts are small. Medians over ``block``
    pixel blocks ignore the latter; blocks with too few usable pixels take the
    median of their neighbours.
    """
    ny, nx = diff.shape
    by, bx = max(1, int(np.ceil(ny / block))), max(1, int(np.ceil(nx / block)))
    med, count = block_medians(diff, good, block)
    # A block's size is block^2, less where it is cut by the grid's edge.
    size = (np.minimum(block, ny - block * np.arange(by))[:, None]
            * np.minimum(block, nx - block * np.arange(bx))[None, :])
    med[count <= 0.25 * size] = np.nan
    if np.all(np.isnan(med)):
        return np.zeros_like(diff)
    while np.isnan(med).any():  # fill holes from their neighbours
        med = np.where(np.isnan(med), _nanmean3(med), med)
    order = 1 if min(by, bx) < 4 else 3
    wy = _interpolation_matrix(by, ny, block, order)
    wx = _interpolation_matrix(bx, nx, block, order)
    return np.asarray(wy @ np.asarray(wx @ med.T).T)


def clipped_mean(images, variances, goods, weights, nsigma=CLIP_SIGMA, iterations=CLIP_ITERATIONS):
    """Per-pixel weighted mean of (n, ny, nx) stacks, clipping |x - mean| > nsigma sigma.

    Returns (mean, variance of the mean, kept) with kept (n, ny, nx) bool.
    Rows are processed in blocks so memmapped inputs are read piecewise.
    """
    n, ny, nx = images.shape
    mean = np.full((ny, nx), np.nan)
    var = np.full((ny, nx), np.nan)
    kept_all = np.zeros((n, ny, nx), bool)
    w = np.ascontiguousarray(weights, np.float64)
    for y0 in range(0, ny, BLOCK_ROWS):
        sl = slice(y0, min(ny, y0 + BLOCK_ROWS))
        # The clip itself (median start, weighted-mean passes, the median
        # fallback where it keeps none) is the numba kernel.
        kernels.clipped_mean(np.ascontiguousarray(images[:, sl], np.float64),
                             np.ascontiguousarray(variances[:, sl], np.float64),
                             np.ascontiguousarray(goods[:, sl], bool), w, float(nsigma),
                             int(iterations), mean[sl], var[sl], kept_all[:, sl])
    return mean, var, kept_all


def _others_sums(images, variances, goods, weights):
    """Weighted sums over the usable visits: sum w x, sum w, sum w^2 var."""
    n = images.shape[0]
    swx = swv = sw = 0.0
    for k in range(n):
        g = np.asarray(goods[k], bool)
        w = weights[k] * g
        swx = swx + w * np.where(g, np.asarray(images[k], np.float64), 0.0)
        swv = swv + w * weights[k] * np.where(g, np.asarray(variances[k], np.float64), 0.0)
        sw = sw + w
    return swx, sw, swv


def _persistent_without(k, sums, images, variances, goods, weights, nsigma):
    """Where the mean of the visits other than ``k`` shows a significant source.

    The test of "is it in the other visits too" must leave visit ``k`` out:
    where few visits are usable (the others' bad pixels, spread by their
    matching kernels) the clipped mean keeps visit k's artifact at half or a
    third of its height and would call it a source, which then stops the
    artifact's growth.
    """
    swx, sw, swv = sums
    g = np.asarray(goods[k], bool)
    wk = weights[k] * g
    rest = sw - wk
    with np.errstate(invalid="ignore", divide="ignore"):
        m = (swx - wk * np.where(g, np.asarray(images[k], np.float64), 0.0)) / rest
        v = (swv - wk * weights[k] * np.where(g, np.asarray(variances[k], np.float64), 0.0)) / rest**2
    ok = (rest > 1e-12 * np.max(sw)) & np.isfinite(m) & (v > 0)
    m = np.where(ok, m, 0.0)
    src = m - smooth_difference(m, ok)  # the sky background is not a source
    with np.errstate(invalid="ignore"):
        return ok & (np.abs(src) > nsigma * np.sqrt(np.where(ok, v, np.inf)))


def _across_holes(region, holes, bridge):
    """Hole pixels an artifact ``region`` is carried into: up to ``bridge`` pixels
    from it along a path through the holes (a geodesic dilation).

    A hole the matching kernel spread from a visit's bad pixels is as wide as
    the kernel, and a cluster of them (a saturated star, neighbouring cosmic
    rays) wider still: a trail crossing one must come out whole on the far
    side, and the path through the holes keeps the carried part from leaping
    into tested pixels beside them.
    """
    if not holes.any() or not region.any():
        return np.zeros_like(region)
    structure = ndimage.generate_binary_structure(2, 2)
    grown = ndimage.binary_dilation(region, structure=structure, iterations=bridge,
                                    mask=holes | region)
    return grown & holes


def find_artifacts(images, variances, goods, mean, mean_var, nsigma=DETECT_SIGMA,
                   grow=GROW_SIGMA, fraction=MODEL_FRACTION, dilate=DILATE, covered=None,
                   bridge=BRIDGE, weights=None):
    """Per visit, the pixels of what appears in that matched warp and in no other.

    A seed is a pixel more than ``nsigma`` (plus ``fraction`` of the mean, for
    bright sources) from the clipped mean in this visit and in no other visit,
    where the mean of the other visits (``weights``, default equal) is not a
    significant source; the difference is taken after removing its smooth (background) part;
    its footprint is the connected region above ``grow`` sigma in this visit,
    extended up to ``bridge`` pixels into pixels that are ``covered`` (the
    direct warp has data) but not ``goods`` (the matched warp is unusable),
    and dilated by ``dilate`` pixels. Returns (n, ny, nx) bool.
    """
    n, ny, nx = images.shape
    strong = np.zeros((n, ny, nx), bool)
    weak = np.zeros((n, ny, nx), bool)
    for k in range(n):
        x = np.asarray(images[k], np.float64)
        g = np.asarray(goods[k], bool) & np.isfinite(mean)
        sig = np.sqrt(np.asarray(variances[k], np.float64) + np.nan_to_num(mean_var))
        d = x - np.nan_to_num(mean)
        d = np.abs(d - smooth_difference(d, g))  # background matching
        tol = fraction * np.abs(np.nan_to_num(mean))
        strong[k] = g & (d > nsigma * sig + tol)
        weak[k] = g & (d > grow * sig + tol)
    count = strong.sum(axis=0)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    sums = _others_sums(images, variances, goods, weights)
    out = np.zeros((n, ny, nx), bool)
    structure = ndimage.generate_binary_structure(2, 2)
    for k in range(n):
        # Where the other visits show a source (a variable star, or a star
        # the artifact crosses), it is not this visit's artifact.
        alone = strong[k] & (count == 1)
        if not alone.any():
            continue  # no seed can survive: spare the leave-one-out test
        persistent = _persistent_without(k, sums, images, variances, goods, weights, nsigma)
        seeds = alone & ~persistent
        if not seeds.any():
            continue
        # Growing stops at persistent sources: a trail crossing a bright star
        # must not take the star's core (where PSF-matching residuals are
        # largest) with it.
        labels, _ = ndimage.label(weak[k] & ~persistent, structure=structure)
        hit = np.unique(labels[seeds])
        region = np.isin(labels, hit[hit > 0])
        if covered is not None and bridge:
            # Where the matched warp is unusable (the matching kernel spreads the
            # visit's bad pixels) nothing can be tested, yet the direct warp has
            # data: an artifact running into such a hole is carried across it.
            # Nor where this visit's matched warp is the only usable one (near
            # the grid's edge the others' matched warps stop sooner).
            g_k = np.asarray(goods[k], bool)
            alone = g_k & (sums[1] - weights[k] * g_k <= 1e-12 * np.max(sums[1]))
            holes = np.asarray(covered[k], bool) & (~g_k | alone)
            region |= _across_holes(region, holes, bridge) & ~persistent
        if dilate:
            region = ndimage.binary_dilation(region, structure=structure, iterations=dilate)
        out[k] = region
    return out
