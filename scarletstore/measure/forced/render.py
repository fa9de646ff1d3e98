"""Stored models taken to one visit's pixel grid and PSF.

Choice of route: every source is rendered **in the coadd frame, convolved to
the visit's PSF as seen on the coadd grid**, and that image is then resampled
onto the visit's pixels through both WCSs. In formulas, with G the
model-frame PSF, P_v the visit PSF warped onto the grid (``coadd.psf.warp_psf``:
the visit PSF through the local Jacobian of the grid -> visit mapping) and
k_v the difference kernel with G * k_v ~= P_v:

    T_i(visit pixel p) = |det d(x, y)/d(u, v)| * L3[(M_i * k_v)](x(p), y(p))

where M_i is the model-frame morphology x spectrum of source i in the visit's
band and L3 is Lanczos-3 interpolation (the warp's normalised weights).
The alternative (warp the narrow model-frame image to the visit, then
convolve with a kernel built in visit pixels) would resample an image whose
PSF is only ``model_psf_sigma`` = 0.8 pixels wide, which Lanczos-3 does not
reproduce to better than a few per cent; the rendered image at the visit's
resolution (FWHM >= 2.5 grid pixels) is well sampled, so the resampling step
is accurate to ~0.1 % in flux (measured in ``tests/test_forced.py``).

Isolated sources stored as pixel cubes (coadd pixels at the coadd PSF: runs
made with ``isolated_model`` off, SDSS runs, and the fallbacks of a failed or
over-budget single fit; by default an isolated parent now has a fitted
one-source model and is rendered like any other) are taken to the visit PSF with a difference
kernel from the coadd band PSF when the visit PSF is the wider one (size
from second moments); a sharper visit cannot be reached from the coadd
without amplifying the cube's noise, so there the cube is used at the coadd
PSF as it is and the rows are flagged ``psf_mismatch``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ...coadd.psf import moments, warp_psf
from ...coadd.warp import pixel_mapping
from ...deblend.psf import difference_kernels
from ..reconstruct import CUBE_DIM, add_clipped, band_kernel, convolve_stack
from .kernels import resample_stack

SUPPORT_LEVEL = 1e-6  # fraction of a child's peak below which its rendered light is not resampled
LANCZOS_HALF = 3  # taps on each side of a Lanczos-3 sample
# Regularisation of the coadd PSF -> visit PSF kernel for isolated pixel
# cubes: a visit sharper than the coadd cannot be reached exactly, and the
# bound keeps the cube's noise from being amplified more than ~16x.
CUBE_REGULARIZATION = 1e-3


@dataclass
class VisitFrame:
    """A visit seen from the coadd grid: pixel mapping, warped PSF and kernels.

    ``u``/``v`` are the grid column/row of every visit pixel centre and
    ``area`` the grid pixels per visit pixel, |det d(x, y)/d(u, v)|.
    """

    shape: tuple
    u: np.ndarray
    v: np.ndarray
    area: np.ndarray
    grid_wcs: object
    visit_wcs: object
    psf_on_grid: np.ndarray
    model_kernel: np.ndarray | None
    cube_kernel: np.ndarray | None  # None: the visit is sharper than the coadd


def visit_frame(visit, grid_wcs, grid_shape, model_psf, coadd_psf) -> VisitFrame:
    """Everything about ``visit`` (a :class:`~scarletstore.coadd.visits.Visit`)
    that the models of every blend share."""
    u, v, area = pixel_mapping(visit.wcs, visit.shape, grid_wcs)
    psf_g = warp_psf(visit.psf, visit.wcs, grid_wcs, grid_shape)
    kmodel = band_kernel(model_psf, psf_g)
    kcube = None
    if _size(psf_g) >= _size(coadd_psf):
        kcube = difference_kernels(psf_g[None], np.asarray(coadd_psf, np.float64),
                                   regularization=CUBE_REGULARIZATION)[0][0]
    return VisitFrame(tuple(visit.shape), u, v, area, grid_wcs, visit.wcs, psf_g, kmodel, kcube)


def _size(psf) -> float:
    """Trace of the second-moment matrix of a PSF image (pixels^2)."""
    _, _, ixx, iyy, _ = moments(np.clip(np.asarray(psf, np.float64), 0, None))
    return ixx + iyy


def grid_to_visit(frame: VisitFrame, x, y):
    """Visit pixel (column, row) of grid positions (exact astropy transform)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra, dec = frame.grid_wcs.pixel_to_world_values(np.asarray(x, float), np.asarray(y, float))
        u, v = frame.visit_wcs.world_to_pixel_values(ra, dec)
    return np.asarray(u, np.float64), np.asarray(v, np.float64)


def _half(kernel) -> int:
    return 0 if kernel is None else max(kernel.shape) // 2


def grid_models(sources, band: int, frame: VisitFrame, bbox) -> tuple[np.ndarray, tuple, bool]:
    """(n, H, W) coadd-frame images of every source at the visit's PSF, and their box.

    The blend box is grown by the kernels' half width plus the Lanczos taps
    so the convolved wings and the resampling support are all inside.
    Returns the stack, the grown box (y0, x0, H, W) in grid pixels and
    whether some cube component stayed at the coadd PSF.
    """
    pad = max(_half(frame.model_kernel), _half(frame.cube_kernel)) + LANCZOS_HALF + 1
    y0, x0, h, w = bbox
    box = (y0 - pad, x0 - pad, h + 2 * pad, w + 2 * pad)
    shape = (len(sources), box[2], box[3])
    model = np.zeros(shape, np.float32)
    cube = np.zeros(shape, np.float32)
    has_model = has_cube = False
    for i, src in enumerate(sources):
        for c in src.components:
            if c.morph.ndim == CUBE_DIM:
                add_clipped(cube[i], np.asarray(c.morph[band], np.float32), c.y0 - box[0], c.x0 - box[1])
                has_cube = True
            else:
                add_clipped(model[i], float(c.spectrum[band]) * np.asarray(c.morph, np.float32),
                            c.y0 - box[0], c.x0 - box[1])
                has_model = True
    out = np.zeros(shape, np.float64)
    if has_model:
        out += model if frame.model_kernel is None else convolve_stack(model, frame.model_kernel)
    if has_cube:
        out += cube if frame.cube_kernel is None else convolve_stack(cube, frame.cube_kernel)
    return out, box, has_cube and frame.cube_kernel is None


def visit_box(frame: VisitFrame, box) -> tuple[int, int, int, int] | None:
    """Visit pixels (y0, x0, h, w) covering a grid box, clipped to the visit; None when off it."""
    gy0, gx0, gh, gw = box
    ys = np.array([gy0, gy0, gy0 + gh - 1, gy0 + gh - 1, gy0 + gh / 2], float)
    xs = np.array([gx0, gx0 + gw - 1, gx0, gx0 + gw - 1, gx0 + gw / 2], float)
    u, v = grid_to_visit(frame, xs, ys)
    vy, vx = frame.shape
    ya, yb = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, vy)
    xa, xb = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, vx)
    if ya >= yb or xa >= xb:
        return None
    return ya, xa, yb - ya, xb - xa


def visit_templates(images: np.ndarray, box, frame: VisitFrame, vbox) -> np.ndarray:
    """(n, h, w) the coadd-frame ``images`` (grid box ``box``) resampled onto visit box ``vbox``.

    Values are per visit pixel: the interpolated grid-pixel density times the
    grid pixels per visit pixel, so each template keeps its flux.
    """
    ya, xa, h, w = vbox
    sl = np.s_[ya:ya + h, xa:xa + w]
    u = np.ascontiguousarray(frame.u[sl] - box[1])
    v = np.ascontiguousarray(frame.v[sl] - box[0])
    area = frame.area[sl]
    out = np.empty((images.shape[0], h, w), np.float64)
    resample_stack(np.ascontiguousarray(images, np.float64), image_support(images), u, v,
                   np.ascontiguousarray(area), out)
    return out


def image_support(images, level: float = SUPPORT_LEVEL) -> np.ndarray:
    """(n, 4) int64 (y0, y1, x0, x1): the box of each image's pixels above ``level`` x its peak.

    FFT convolution leaves ~1e-8 of round-off everywhere; below ``level``
    (1e-6) the light is far under any visit's noise and not worth resampling.
    """
    n, H, W = images.shape
    out = np.zeros((n, 4), np.int64)
    for i in range(n):
        a = np.abs(images[i])
        peak = a.max()
        if not peak > 0:
            continue  # empty support (y0 = y1): nothing to resample
        rows = np.flatnonzero((a > level * peak).any(axis=1))
        cols = np.flatnonzero((a > level * peak).any(axis=0))
        out[i] = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return out
