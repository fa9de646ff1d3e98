"""Warp of one visit onto the coadd grid through both WCSs.

The coordinate mapping (grid pixel -> sky -> visit pixel) is evaluated with
astropy on a coarse grid of nodes and interpolated per pixel with a bicubic
spline: the mapping of two tangent-plane WCSs is smooth on scales of many
pixels, and one astropy call per pixel would dominate the cost. The
resampling itself is the numba kernel :func:`kernels.warp_lanczos3`.

Flux per pixel is scaled by the ratio of pixel areas |det d(u, v)/d(x, y)|
(the visit's pixel area seen from one grid pixel), so the total flux of a
source is conserved whatever the two pixel scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import interpolate

from . import kernels

NODE_STEP = 16  # pixels between the nodes where the WCS mapping is evaluated exactly


@dataclass
class Warp:
    """One visit resampled onto the grid.

    ``image``/``variance`` are NaN where ``status`` is not GOOD; ``mask`` holds
    the OR of the visit's mask bits (the visit's own bit numbers) of every
    input pixel a kernel touched.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    status: np.ndarray

    @property
    def good(self) -> np.ndarray:
        return self.status == kernels.GOOD


def _map_points(wcs_out, wcs_in, x, y):
    """Visit pixel (u, v) of grid pixels (x, y) (0-indexed, exact astropy transform)."""
    ra, dec = wcs_out.pixel_to_world_values(x, y)
    u, v = wcs_in.world_to_pixel_values(ra, dec)
    return np.asarray(u, np.float64), np.asarray(v, np.float64)


def local_jacobian(wcs_out, wcs_in, x, y, h=0.5):
    """d(u, v)/d(x, y) of the grid -> visit mapping at grid pixel (x, y), 2x2 [[du/dx, du/dy], [dv/dx, dv/dy]]."""
    xs = np.array([x + h, x - h, x, x], np.float64)
    ys = np.array([y, y, y + h, y - h], np.float64)
    u, v = _map_points(wcs_out, wcs_in, xs, ys)
    return np.array([[(u[0] - u[1]) / (2 * h), (u[2] - u[3]) / (2 * h)],
                     [(v[0] - v[1]) / (2 * h), (v[2] - v[3]) / (2 * h)]])


def pixel_mapping(wcs_out, shape_out, wcs_in, step: int = NODE_STEP):
    """Visit positions and pixel-area ratios of every grid pixel.

    Returns
    -------
    u, v : (ny, nx) float64, visit column and row of each grid pixel centre
    area : (ny, nx) float64, |det d(u, v)/d(x, y)|
    """
    ny, nx = shape_out
    # Nodes cover the grid plus one step beyond each edge, so the spline is
    # interpolating (not extrapolating) everywhere on the grid.
    gy = np.arange(-step, ny + 2 * step, step, dtype=np.float64)
    gx = np.arange(-step, nx + 2 * step, step, dtype=np.float64)
    YY, XX = np.meshgrid(gy, gx, indexing="ij")
    h = 0.5
    # The nodes and their four half-pixel neighbours in one transform (one
    # call's overhead instead of five).
    xq = np.concatenate([XX.ravel() + dx for dx in (0.0, h, -h, 0.0, 0.0)])
    yq = np.concatenate([YY.ravel() + dy for dy in (0.0, 0.0, 0.0, h, -h)])
    (u, ux1, ux0, uy1, uy0), (v, vx1, vx0, vy1, vy0) = (
        np.split(a, 5) for a in _map_points(wcs_out, wcs_in, xq, yq))
    det = ((ux1 - ux0) * (vy1 - vy0) - (uy1 - uy0) * (vx1 - vx0)) / (2 * h) ** 2
    ys = np.arange(ny, dtype=np.float64)
    xs = np.arange(nx, dtype=np.float64)
    # The spline's boundary conditions are not exact even for a linear
    # function, so only the (tiny, smooth) departure from the best affine map
    # is interpolated; the affine part is evaluated exactly per pixel.
    design = np.column_stack([np.ones(XX.size), XX.ravel(), YY.ravel()])
    X, Y = xs[None, :], ys[:, None]
    out = []
    for node_values in (u, v, np.abs(det)):
        if not np.all(np.isfinite(node_values)):
            # A WCS that cannot be inverted somewhere (far off its projection):
            # evaluate every pixel exactly instead of interpolating NaN.
            return _exact_mapping(wcs_out, shape_out, wcs_in)
        coef, *_ = np.linalg.lstsq(design, node_values, rcond=None)
        resid = (node_values - design @ coef).reshape(XX.shape)
        # Separable bicubic spline evaluated on the pixel grid (rows x columns).
        smooth = interpolate.RectBivariateSpline(gy, gx, resid, kx=3, ky=3)(ys, xs)
        out.append(coef[0] + coef[1] * X + coef[2] * Y + smooth)
    return out[0], out[1], out[2]


def _exact_mapping(wcs_out, shape_out, wcs_in):
    ny, nx = shape_out
    Y, X = np.mgrid[0:ny, 0:nx].astype(np.float64)
    u, v = _map_points(wcs_out, wcs_in, X.ravel(), Y.ravel())
    ux, vx = _map_points(wcs_out, wcs_in, X.ravel() + 0.5, Y.ravel())
    uy, vy = _map_points(wcs_out, wcs_in, X.ravel(), Y.ravel() + 0.5)
    det = ((ux - u) * (vy - v) - (uy - u) * (vx - v)) / 0.25
    return u.reshape(ny, nx), v.reshape(ny, nx), np.abs(det).reshape(ny, nx)


def warp_arrays(image, variance, mask, bad_bits: int, u, v, scale) -> Warp:
    """Run the Lanczos-3 kernel on plain arrays (see :func:`kernels.warp_lanczos3`)."""
    shape = u.shape
    out_i = np.empty(shape, np.float64)
    out_v = np.empty(shape, np.float64)
    out_m = np.empty(shape, np.int32)
    status = np.empty(shape, np.int8)
    kernels.warp_lanczos3(np.ascontiguousarray(image, np.float64),
                          np.ascontiguousarray(variance, np.float64),
                          np.ascontiguousarray(mask, np.int32), int(bad_bits),
                          np.ascontiguousarray(u), np.ascontiguousarray(v),
                          np.ascontiguousarray(scale, np.float64), out_i, out_v, out_m, status)
    return Warp(out_i, out_v, out_m, status)


def warp_image(image, variance, mask, bad_bits: int, wcs_in, wcs_out, shape_out,
               flux_scale: float = 1.0) -> Warp:
    """Warp one visit's planes onto the grid ``(wcs_out, shape_out)``.

    Parameters
    ----------
    image, variance, mask : the visit's 2-D planes
    bad_bits : OR of the visit's bad mask bits (BAD, CR, NO_DATA, SAT, SUSPECT, EDGE)
    wcs_in, wcs_out : astropy WCS of the visit and of the grid
    flux_scale : photometric factor (e.g. to zero point 27) applied to the image;
        the variance gets its square
    """
    u, v, area = pixel_mapping(wcs_out, shape_out, wcs_in)
    return warp_arrays(image, variance, mask, bad_bits, u, v, area * flux_scale)
