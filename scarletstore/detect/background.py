"""Sky background on a coarse mesh.

The image is cut into cells of about ``cell`` x ``cell`` pixels. In each cell
the usable pixels give a sigma-clipped estimate of the sky (the SExtractor
"mode" ``2.5 median - 1.5 mean``, or the median when the cell is crowded);
cells with too few usable pixels take the value of their nearest good
neighbour. The mesh is median-filtered (3 x 3) so one bright star does not
raise a whole cell, then interpolated to every pixel with a bicubic
interpolating spline through the cell centres (linear or constant when the
mesh is too small for cubics).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import interpolate, ndimage

__all__ = ["estimate_background", "mesh_statistics"]


@numba.njit(cache=True)
def _clipped_sky(buf, n, nsigma, max_iter):
    # Iterative clipping about the median with the clipped standard deviation;
    # returns (sky, rms, n_kept). Works in place on buf[:n].
    if n == 0:
        return np.nan, np.nan, 0
    data = buf[:n]
    med = 0.0
    mean = 0.0
    std = 0.0
    for _ in range(max_iter + 1):
        med = np.median(data)
        s = 0.0
        s2 = 0.0
        for v in data:
            s += v
            s2 += v * v
        m = data.shape[0]
        mean = s / m
        var = s2 / m - mean * mean
        std = np.sqrt(var) if var > 0 else 0.0
        if std == 0.0:
            break
        lo = med - nsigma * std
        hi = med + nsigma * std
        k = 0
        for v in data:
            if v >= lo and v <= hi:
                data[k] = v
                k += 1
        if k == m or k < 3:
            break
        data = data[:k]
    m = data.shape[0]
    if std > 0 and (mean - med) / std > 0.3:
        sky = med  # crowded cell: the mode estimator is unreliable
    else:
        sky = 2.5 * med - 1.5 * mean
    return sky, std, m


@numba.njit(cache=True)
def _mesh_kernel(image, bad, edges_y, edges_x, nsigma, max_iter, min_good, max_samples, sky, rms, ok):
    ncy = edges_y.shape[0] - 1
    ncx = edges_x.shape[0] - 1
    maxcell = 0
    for i in range(ncy):
        for j in range(ncx):
            c = (edges_y[i + 1] - edges_y[i]) * (edges_x[j + 1] - edges_x[j])
            if c > maxcell:
                maxcell = c
    buf = np.empty(maxcell, np.float64)
    # A big cell is read on a regular sub-grid of about max_samples pixels:
    # the clipped median of ~4000 sky pixels is already good to ~2% of the
    # pixel noise, and the medians dominate the cost.
    step = 1
    while maxcell // (step * step) > max_samples:
        step += 1
    for i in range(ncy):
        for j in range(ncx):
            n = 0
            total = 0
            for y in range(edges_y[i], edges_y[i + 1], step):
                for x in range(edges_x[j], edges_x[j + 1], step):
                    total += 1
                    v = image[y, x]
                    if not bad[y, x] and np.isfinite(v):
                        buf[n] = v
                        n += 1
            if n < 3 or n < min_good * total:
                ok[i, j] = False
                continue
            s, r, _ = _clipped_sky(buf, n, nsigma, max_iter)
            sky[i, j] = s
            rms[i, j] = r
            ok[i, j] = True


def _edges(n, cell):
    ncell = max(1, int(round(n / float(cell))))
    return np.round(np.linspace(0, n, ncell + 1)).astype(np.int64)


def mesh_statistics(image, bad=None, cell=128, nsigma=3.0, max_iter=5, min_good=0.25,
                    max_samples=8192):
    """Clipped sky and rms per mesh cell.

    Parameters
    ----------
    image : (ny, nx) array
    bad : (ny, nx) bool array, optional
        Pixels to exclude (bad mask planes, detected sources).
    cell : int
        Target cell side in pixels; the image is split into equal cells.
    nsigma, max_iter : float, int
        Clipping limit and maximum clipping iterations.
    min_good : float
        Minimum fraction of usable pixels for a cell to be measured.
    max_samples : int
        Cells with more pixels are read on a regular sub-grid of about this many.

    Returns
    -------
    sky, rms : (ncy, ncx) float64
        Per cell; cells that could not be measured are NaN.
    edges_y, edges_x : int64 arrays
        Cell boundaries.
    """
    image = np.ascontiguousarray(image)
    if bad is None:
        bad = np.zeros(image.shape, np.bool_)
    bad = np.ascontiguousarray(bad, dtype=np.bool_)
    ey, ex = _edges(image.shape[0], cell), _edges(image.shape[1], cell)
    sky = np.full((ey.size - 1, ex.size - 1), np.nan)
    rms = np.full_like(sky, np.nan)
    ok = np.zeros(sky.shape, np.bool_)
    _mesh_kernel(image, bad, ey, ex, float(nsigma), int(max_iter), float(min_good), int(max_samples),
                 sky, rms, ok)
    sky[~ok] = np.nan
    rms[~ok] = np.nan
    return sky, rms, ey, ex


def _fill_missing(values):
    # Unmeasured cells take their nearest measured neighbour (0 if none at all).
    bad = ~np.isfinite(values)
    if not bad.any():
        return values
    if bad.all():
        return np.zeros_like(values)
    idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return values[tuple(idx)]


def _interpolate(values, edges_y, edges_x, shape, dtype=np.float32, chunk=512):
    cy = 0.5 * (edges_y[:-1] + edges_y[1:] - 1)
    cx = 0.5 * (edges_x[:-1] + edges_x[1:] - 1)
    # A single row/column of cells is duplicated at the image edges so the
    # spline degenerates to a constant along that axis.
    if cy.size == 1:
        cy = np.array([0.0, max(shape[0] - 1, 1e-3)])
        values = np.repeat(values, 2, axis=0)
    if cx.size == 1:
        cx = np.array([0.0, max(shape[1] - 1, 1e-3)])
        values = np.repeat(values, 2, axis=1)
    ky, kx = min(3, cy.size - 1), min(3, cx.size - 1)
    spline = interpolate.RectBivariateSpline(cy, cx, values, kx=ky, ky=kx, s=0)
    tx, ty, c = spline.tck  # knots along axis 0 ("x" in fitpack terms), axis 1, coefficients
    # Beyond the outer cell centres the value is held constant: extrapolating
    # a cubic over half a cell is unstable and has no data behind it.
    ys = np.clip(np.arange(shape[0], dtype=np.float64), cy[0], cy[-1])
    xs = np.clip(np.arange(shape[1], dtype=np.float64), cx[0], cx[-1])
    # The tensor-product spline on a pixel grid is B_y @ C @ B_x^T: two thin
    # dense basis matrices and one BLAS product, ~20x faster than fitpack's
    # point-wise evaluation on a 4000 x 4000 grid.
    by = interpolate.BSpline.design_matrix(ys, tx, ky).toarray().astype(np.float32)
    bx = interpolate.BSpline.design_matrix(xs, ty, kx).toarray().astype(np.float32)
    coef = np.asarray(c, np.float32).reshape(len(tx) - ky - 1, len(ty) - kx - 1)
    out = np.empty(shape, dtype)
    left = by @ coef
    for y0 in range(0, shape[0], chunk):
        out[y0:y0 + chunk] = left[y0:y0 + chunk] @ bx.T
    return out


def estimate_background(image, bad=None, cell=128, nsigma=3.0, max_iter=5, min_good=0.25,
                        filter_size=3, dtype=np.float32):
    """Smooth background model of one image.

    Parameters
    ----------
    image : (ny, nx) array
    bad : (ny, nx) bool array, optional
        Pixels excluded from the statistics (unusable or belonging to sources).
    cell : int
        Mesh cell side in pixels (cells are equal-sized, about this big).
    nsigma, max_iter : float, int
        Sigma clipping of each cell.
    min_good : float
        Minimum usable fraction of a cell; emptier cells are filled from neighbours.
    filter_size : int
        Side of the median filter applied to the mesh (1: none).
    dtype : numpy dtype
        Output dtype.

    Returns
    -------
    background : (ny, nx) array of ``dtype``
    """
    sky, _, ey, ex = mesh_statistics(image, bad, cell, nsigma, max_iter, min_good)
    sky = _fill_missing(sky)
    if filter_size > 1 and min(sky.shape) >= filter_size:
        sky = ndimage.median_filter(sky, size=filter_size, mode="nearest")
    return _interpolate(sky, ey, ex, np.shape(image), dtype)
