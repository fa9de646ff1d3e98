"""A visit's PSF image warped onto the coadd grid.

The PSF is a function of the offset from the source; seen from the grid
it is the visit PSF through the local affine part of the grid -> visit
mapping at the grid centre, A = d(u, v)/d(x, y): P_grid(d) = |det A| P_visit(A d).
Rotation, rescaling and shear between the two pixel frames are all in A.
Sampling uses the same Lanczos-3 interpolation as the image warp, so a star
warped with the image and the warped PSF go through the same resampling.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .warp import local_jacobian


def warped_psf_size(psf_shape, jac) -> int:
    """Odd side of a grid PSF image that holds the whole warped visit PSF."""
    half = (max(psf_shape) - 1) / 2.0
    # A visit offset of `half` pixels is at most |A^-1| half grid pixels away.
    stretch = np.linalg.norm(np.linalg.inv(jac), 2)
    return int(2 * np.ceil(half * stretch) + 1)


def warp_psf_affine(psf, jac, size: int) -> np.ndarray:
    """Resample ``psf`` (centred on its central pixel) through the affine map ``jac``.

    Parameters
    ----------
    psf : (py, px) array, odd-sized, centred on its central pixel
    jac : 2x2 [[du/dx, du/dy], [dv/dx, dv/dy]], grid offset -> visit offset
    size : odd side of the output image

    Returns
    -------
    (size, size) float64 with unit sum.
    """
    psf = np.asarray(psf, np.float64)
    cy, cx = (psf.shape[0] - 1) / 2.0, (psf.shape[1] - 1) / 2.0
    c = (size - 1) / 2.0
    dy, dx = np.mgrid[0:size, 0:size].astype(np.float64) - c
    u = cx + jac[0, 0] * dx + jac[0, 1] * dy
    v = cy + jac[1, 0] * dx + jac[1, 1] * dy
    out = np.empty((size, size), np.float64)
    kernels.resample_plain(psf, np.ascontiguousarray(u), np.ascontiguousarray(v), out)
    total = out.sum()
    return out / total if total > 0 else out


def warp_psf(psf, wcs_in, wcs_out, shape_out, size: int | None = None) -> np.ndarray:
    """The visit PSF as seen on the grid at the grid centre (unit sum, odd size)."""
    ny, nx = shape_out
    jac = local_jacobian(wcs_out, wcs_in, (nx - 1) / 2.0, (ny - 1) / 2.0)
    if size is None:
        size = warped_psf_size(np.shape(psf), jac)
    return warp_psf_affine(psf, jac, size)


def moments(img) -> tuple[float, float, float, float, float]:
    """Unweighted centroid and second moments (xc, yc, Ixx, Iyy, Ixy) of an image."""
    img = np.asarray(img, np.float64)
    y, x = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float64)
    f = img.sum()
    xc, yc = (img * x).sum() / f, (img * y).sum() / f
    ixx = (img * (x - xc) ** 2).sum() / f
    iyy = (img * (y - yc) ** 2).sum() / f
    ixy = (img * (x - xc) * (y - yc)).sum() / f
    return xc, yc, ixx, iyy, ixy
