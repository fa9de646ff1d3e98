"""The direct coadd: inverse-variance weighted mean of the warps at zero point 27.

Visits are streamed: each is read, warped and added to running sums
(sum W I, sum W^2 Var, sum W) and dropped, so memory holds one warp per
worker, never all of them. The weight W of a visit is one number, the
inverse of its white-noise variance per grid pixel at the coadd zero point. A per-pixel
weight 1/Var_warp would vary with the sub-pixel phase of the warp (the
kernel averages differently at each phase), imprinting that phase pattern
on stars; a scalar weight keeps the coadd PSF the weighted sum of the
warped visit PSFs. With scalar weights the coadd variance
sum W^2 Var_warp / (sum W)^2 is the exact per-pixel variance of the stack.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xarray as xr

from ..errors import InputError
from ..ingest.exposure import LSST_MASK_PLANES, make_exposure
from ..store.schema import stamp, validate
from . import kernels
from .likelihood import LikelihoodSums, likelihood_dataset
from .psf import warp_psf_affine, warped_psf_size
from .visits import Grid, Visit
from .warp import local_jacobian, pixel_mapping, warp_arrays

ZEROPOINT = 27.0
KERNELS = ("lanczos3",)
# The coadd's planes: LSST's, plus INEXACT_PSF where some visit of the band is
# missing from a pixel (its PSF there differs from the stored one) and
# REJECTED where a visit's artifact was masked.
COADD_MASK_PLANES = dict(LSST_MASK_PLANES, INEXACT_PSF=9, REJECTED=10)
# Visit planes carried onto the coadd as information (never bad there).
CARRIED_PLANES = ("CR",)


def psf_fwhm(psf, pixel_scale: float, oversample: int = 8) -> float:
    """FWHM (arcsec) of a PSF image from the area above half maximum, 2 sqrt(A / pi).

    The PSF is resampled ``oversample`` times finer (Lanczos-3) so the area
    is not quantised to whole pixels.
    """
    psf = np.asarray(psf, np.float64)
    # The half-maximum contour lies near the centre: resample only a central
    # cut-out (with room for the kernel) instead of the whole PSF image.
    cy, cx = psf.shape[0] // 2, psf.shape[1] // 2
    peak = psf[cy, cx]
    r = 3
    while r < min(cy, cx) and np.any(psf[cy - r:cy + r + 1, cx - r:cx + r + 1][[0, -1]] >= 0.3 * peak):
        r += 2
    r = min(r + 3, cy, cx)
    psf = psf[cy - r:cy + r + 1, cx - r:cx + r + 1]
    ny, nx = psf.shape
    n = oversample
    fy = (np.arange(ny * n) + 0.5) / n - 0.5
    fx = (np.arange(nx * n) + 0.5) / n - 0.5
    V, U = np.meshgrid(fy, fx, indexing="ij")
    fine = np.empty(U.shape)
    kernels.resample_plain(psf, np.ascontiguousarray(U), np.ascontiguousarray(V), fine)
    area = (fine >= 0.5 * fine.max()).sum() / n**2
    return float(2.0 * np.sqrt(area / np.pi) * pixel_scale)


def _pixel_scale(wcs) -> float:
    """Mean pixel side (arcsec) of a celestial WCS."""
    return float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)


def visit_noise(visit_variance, good, flux_scale: float, area_ratio: float) -> float:
    """White-noise variance of a visit per grid pixel at the coadd zero point.

    The median variance of the visit's usable pixels, times the flux scale
    squared, times the number of visit pixels in one grid pixel (a grid pixel
    sums ``area_ratio`` visit pixels of independent noise). NaN when no pixel
    is usable.
    """
    v = visit_variance[good]
    if v.size == 0:
        return float("nan")
    return float(np.median(v) * flux_scale**2 * area_ratio)


class _BandSums:
    """Running sums of one band's stack."""

    def __init__(self, shape, psf_size):
        self.wi = np.zeros(shape)
        self.w2v = np.zeros(shape)
        self.w = np.zeros(shape)
        self.carried = np.zeros(shape, np.int32)
        self.psf = np.zeros((psf_size, psf_size))
        self.psf_w = 0.0
        self.files = []


def _warp_visit(visit: Visit, grid: Grid, zeropoint: float, area_ratio: float):
    """Read one visit and warp it; returns (warp, noise variance per grid pixel)."""
    image, variance, mask = visit.load()
    if image.shape != visit.shape:
        raise InputError(f"{visit.path}: IMAGE data {image.shape} disagrees with its header {visit.shape}")
    bits = visit.bad_bits()
    good = ((mask & bits) == 0) & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    scale = visit.flux_scale(zeropoint)
    sigma2 = visit_noise(variance, good, scale, area_ratio)
    u, v, area = pixel_mapping(grid.wcs, grid.shape, visit.wcs)
    warp = warp_arrays(image, variance, mask, bits, u, v, area * scale)
    return warp, sigma2


def _carried_bits(visit: Visit) -> tuple[int, int]:
    """(visit bits, coadd bits) of the informational planes carried to the coadd."""
    vb = cb = 0
    for name in CARRIED_PLANES:
        if name in visit.mask_planes:
            vb |= 1 << int(visit.mask_planes[name])
            cb |= 1 << COADD_MASK_PLANES[name]
    return vb, cb


def direct_coadd(visits: list[Visit], grid: Grid, zeropoint: float = ZEROPOINT,
                 kernel: str = "lanczos3", workers: int = 1, likelihood: bool = True,
                 progress: bool = False):
    """Stack ``visits`` on ``grid``; returns ``(exposure, visits_table, likelihood)`` Datasets.

    ``likelihood`` (None when not asked for) is the Kaiser coadd
    (:mod:`scarletstore.coadd.likelihood`), built in the same pass.

    The exposure follows the ``exposure`` schema (as ingest makes it) so detect,
    deblend and catalog run on it unchanged; its flux unit is zero point
    ``zeropoint`` (attrs ``zeropoint``).
    """
    if kernel not in KERNELS:
        raise InputError(f"unknown warp kernel {kernel!r} (known: {', '.join(KERNELS)})")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if not visits:
        raise InputError("no visits to coadd")
    ny, nx = grid.shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    jacs = [local_jacobian(grid.wcs, v.wcs, *centre) for v in visits]
    psf_size = max(warped_psf_size(v.psf.shape, j) for v, j in zip(visits, jacs))
    bands = list(dict.fromkeys(v.band for v in visits))
    sums = {b: _BandSums(grid.shape, psf_size) for b in bands}
    like = {b: LikelihoodSums(grid.shape) for b in bands} if likelihood else {}
    rows = []
    bar = None
    if progress:
        import sys

        from tqdm import tqdm
        bar = tqdm(total=len(visits), desc="coadd", unit="visit", disable=not sys.stderr.isatty())
    # At most `workers` warps are alive at once: each is added and dropped in order.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for i, visit in enumerate(visits):
            area = abs(np.linalg.det(jacs[i]))
            pending.append((i, pool.submit(_warp_visit, visit, grid, zeropoint, area)))
            if len(pending) >= workers or i == len(visits) - 1:
                for j, fut in pending:
                    warp, sigma2 = fut.result()
                    rows.append(_add_visit(sums[visits[j].band], visits[j], warp, sigma2, jacs[j],
                                           psf_size, like.get(visits[j].band)))
                    del warp
                    if bar is not None:
                        bar.update(1)
                pending = []
    if bar is not None:
        bar.close()
    exposure = _exposure(sums, bands, grid, visits, zeropoint, kernel)
    table = visits_table(visits, rows, zeropoint, kernel)
    lk = likelihood_dataset(like, bands, zeropoint) if likelihood else None
    return exposure, table, lk


def _add_visit(s: _BandSums, visit: Visit, warp, sigma2, jac, psf_size, like):
    n_good = int(warp.good.sum())
    if n_good == 0:
        raise InputError(f"{visit.path}: visit does not overlap the grid (no usable warped pixel)")
    if not sigma2 > 0:
        raise InputError(f"{visit.path}: no usable pixel (all masked or zero variance)")
    weight = 1.0 / sigma2
    row = {"weight": weight, "n_good": n_good, "used": True, "reason": ""}
    # Only GOOD pixels are read, and those are finite: no NaN-free copies needed.
    kernels.accumulate(s.wi, s.w2v, s.w, warp.image, warp.variance,
                       warp.status, weight)
    vb, cb = _carried_bits(visit)
    if vb:
        s.carried |= np.where((warp.mask & vb) != 0, cb, 0).astype(np.int32)
    psf = warp_psf_affine(visit.psf, jac, psf_size)
    s.psf += weight * psf
    if like is not None:
        like.add(warp.image, warp.good, psf, sigma2)
    s.psf_w += weight
    s.files.append(visit.path.name)
    row["psf_fwhm"] = psf_fwhm(visit.psf, _pixel_scale(visit.wcs))
    return row


def _exposure(sums, bands, grid: Grid, visits, zeropoint, kernel) -> xr.Dataset:
    ny, nx = grid.shape
    image = np.zeros((len(bands), ny, nx), np.float32)
    variance = np.full((len(bands), ny, nx), np.nan, np.float32)
    mask = np.zeros((len(bands), ny, nx), np.int32)
    psfs = []
    for k, b in enumerate(bands):
        s = sums[b]
        have = s.w > 0
        image[k][have] = s.wi[have] / s.w[have]
        variance[k][have] = s.w2v[have] / s.w[have] ** 2
        m = s.carried.copy()
        m[~have] |= 1 << COADD_MASK_PLANES["NO_DATA"]
        # Some visit of the band is missing here (not covering the pixel, or left
        # out of it): the PSF is not the stored weighted sum over all visits.
        m[have & (s.w < s.psf_w * (1 - 1e-9))] |= 1 << COADD_MASK_PLANES["INEXACT_PSF"]
        mask[k] = m
        psfs.append(s.psf / s.psf_w)
    ex = make_exposure(image, variance, mask, psfs, bands, wcs=grid.wcs_text, origin=(0, 0),
                       mask_planes=COADD_MASK_PLANES, sources=[v.path.name for v in visits])
    ex.attrs["zeropoint"] = float(zeropoint)
    ex.attrs["coadd"] = "direct"
    ex.attrs["coadd_kernel"] = kernel
    ex["image"].attrs["units"] = f"flux at AB zero point {zeropoint:g}"
    return ex


def visits_table(visits: list[Visit], rows: list[dict], zeropoint, kernel) -> xr.Dataset:
    """The ``visits`` group: one row per visit."""
    ds = xr.Dataset(
        {
            "file": ("visit", np.array([v.path.name for v in visits], dtype=object)),
            "band": ("visit", np.array([v.band for v in visits], dtype=object)),
            "mjd": ("visit", np.array([v.mjd for v in visits], np.float64)),
            "exptime": ("visit", np.array([v.exptime for v in visits], np.float64)),
            "magzero": ("visit", np.array([v.magzero for v in visits], np.float64)),
            "flux_scale": ("visit", np.array([v.flux_scale(zeropoint) for v in visits], np.float64)),
            "psf_fwhm": ("visit", np.array([r["psf_fwhm"] for r in rows], np.float64)),
            "weight": ("visit", np.array([r["weight"] for r in rows], np.float64)),
            "used": ("visit", np.array([r["used"] for r in rows], bool)),
            "reason": ("visit", np.array([r["reason"] for r in rows], dtype=object)),
            "n_good": ("visit", np.array([r["n_good"] for r in rows], np.int64)),
            "n_rejected": ("visit", np.array([r.get("n_rejected", 0) for r in rows], np.int64)),
            "psf_matched": ("visit", np.array([r.get("psf_matched", False) for r in rows], bool)),
            "wcs": ("visit", np.array([v.wcs_text for v in visits], dtype=object)),
        },
        # the file names alone were looked for beside the store: visits kept in a folder
        # of their own (the demo's visits/) were then not found by forced's default
        attrs={"zeropoint": float(zeropoint), "kernel": kernel,
               "paths": json.dumps({"absolute": [os.path.abspath(v.path) for v in visits]})},
    )
    stamp(ds, "visits", 1)
    return validate(ds)


def record_relative_paths(table: xr.Dataset, store_path) -> None:
    """Add to the visits table's ``paths`` the visit files relative to the folder of the
    store at ``store_path``: a folder holding the store and its visits (the demo's output,
    a tract and its visits) may then be moved whole and forced still finds them."""
    paths = json.loads(table.attrs.get("paths") or "{}")
    folder = os.path.abspath(os.path.dirname(os.path.abspath(store_path)))
    paths["relative"] = [os.path.relpath(p, folder) for p in paths.get("absolute", [])]
    table.attrs["paths"] = json.dumps(paths)
