"""The full coadd: warps spilled to disk, PSF-matched clipped stack, background
matching and artifact rejection, then the direct and likelihood coadds
without the artifacts.

Memory holds the running sums and one row block of a band's matched warps,
never every warp: each warp is written to a memory-mapped file in a
temporary folder (removed at the end) between the two passes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import ndimage
from scipy.signal import fftconvolve

from ..errors import InputError
from ..schema import stamp, validate
from . import kernels
from .likelihood import LikelihoodSums, likelihood_dataset
from .match import gaussian_target, matching_kernel
from .psf import warp_psf_affine, warped_psf_size
from .reject import clipped_mean, find_artifacts, smooth_difference
from .sky import fit_sky
from .stack import (COADD_MASK_PLANES, KERNELS, ZEROPOINT, _add_visit, _BandSums, _exposure,
                    _pixel_scale, _warp_visit, psf_fwhm, visits_table)
from .visits import Grid, Visit
from .warp import Warp, local_jacobian

TARGET_FACTOR = 1.1  # default PSF-matched target: 10 % wider than the band's widest visit
KERNEL_FOOTPRINT = 1e-3  # matching-kernel pixels above this fraction of its peak spread a bad pixel


class _Spill:
    """(n, ny, nx) arrays in files of a temporary folder."""

    def __init__(self, folder, n, shape):
        self.folder = Path(folder)
        self.n, self.shape = n, shape

    def array(self, name, dtype):
        return _SpilledArray(self.folder / f"{name}.dat", dtype, (self.n, *self.shape))


class _SpilledArray:
    """An array on disk, mapped only while one item is read or written.

    A memory map kept open for the whole run counts every page it ever
    touched as resident (n visits x the grid x every plane); mapping per
    access bounds what is resident to the slices in use.
    """

    def __init__(self, path, dtype, shape):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        np.memmap(path, dtype=self.dtype, mode="w+", shape=shape).flush()  # zeros

    def __getitem__(self, key):
        m = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
        try:
            return np.array(m[key])
        finally:
            del m

    def __setitem__(self, key, value):
        m = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=self.shape)
        try:
            m[key] = value
            m.flush()
        finally:
            del m


def _plan_psfs(visits, grid, target_fwhm):
    """Warped PSF per visit, PSF size, per-band target PSF and who enters the PSF-matched stack."""
    ny, nx = grid.shape
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    jacs = [local_jacobian(grid.wcs, v.wcs, *centre) for v in visits]
    size = max(warped_psf_size(v.psf.shape, j) for v, j in zip(visits, jacs))
    psfs = [warp_psf_affine(v.psf, j, size) for v, j in zip(visits, jacs)]
    scale = _pixel_scale(grid.wcs)
    fwhm_grid = [psf_fwhm(p, 1.0) for p in psfs]  # grid pixels
    targets, target_px, matched = {}, {}, []
    for b in dict.fromkeys(v.band for v in visits):
        idx = [i for i, v in enumerate(visits) if v.band == b]
        if target_fwhm is None:
            t = TARGET_FACTOR * max(fwhm_grid[i] for i in idx)
        else:
            t = float(target_fwhm) / scale
        target_px[b] = t
        targets[b] = gaussian_target(t, size)
    for i, v in enumerate(visits):
        matched.append(fwhm_grid[i] < target_px[v.band])
    return jacs, size, psfs, targets, target_px, matched


def _matched_warp(warp: Warp, sigma2, psf, target):
    """PSF-matched image, its variance and where it is usable."""
    k = matching_kernel(psf, target)
    good = warp.good
    img = fftconvolve(np.where(good, warp.image, 0.0), k, mode="same")
    footprint = np.abs(k) > KERNEL_FOOTPRINT * np.abs(k).max()
    bad = ndimage.binary_dilation(~good, structure=footprint)
    # White-noise variance per grid pixel, following the warp's spatial variation.
    var_w = np.where(good, warp.variance, 0.0)
    med = np.median(warp.variance[good]) if good.any() else 1.0
    var = fftconvolve(var_w * (sigma2 / med), k**2, mode="same")
    return img, np.maximum(var, 1e-30), ~bad


def coadd(visits: list[Visit], grid: Grid, zeropoint: float = ZEROPOINT, kernel: str = "lanczos3",
          workers: int = 1, reject: bool = True, target_fwhm: float | None = None,
          progress: bool = False, tmpdir=None, sky: bool = True, scheduler: str | None = None) -> dict:
    """Every coadd product of ``visits`` on ``grid`` as ``{group: Dataset}``.

    Groups: ``exposure`` (direct coadd, artifacts rejected when ``reject``),
    ``visits``, ``coadds/likelihood`` and ``coadds/psf_matched``. ``target_fwhm``
    (arcsec) fixes the PSF-matched target; visits whose PSF is not narrower
    are left out of the PSF-matched stack (and of artifact detection).
    ``sky`` fits a smooth sky on each band of the direct coadd (sources
    masked, :mod:`.sky`) and subtracts it from the direct and PSF-matched
    coadds; the per-band fit is in ``exposure.attrs["sky"]``.
    ``workers`` > 1 warps visits as tasks on a local dask.distributed cluster
    of that many single-threaded processes, ``scheduler`` on an existing one;
    the stacks are summed in visit order, so the result does not depend on them.
    """
    if kernel not in KERNELS:
        raise InputError(f"unknown warp kernel {kernel!r} (known: {', '.join(KERNELS)})")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if target_fwhm is not None and not target_fwhm > 0:
        raise InputError(f"--psf-matched-fwhm must be positive, got {target_fwhm:g}")
    if not visits:
        raise InputError("no visits to coadd")
    jacs, size, psfs, targets, target_px, matched = _plan_psfs(visits, grid, target_fwhm)
    bands = list(dict.fromkeys(v.band for v in visits))
    n, shape = len(visits), grid.shape
    with tempfile.TemporaryDirectory(prefix="scarletstore-coadd-", dir=tmpdir) as folder:
        spill = _Spill(folder, n, shape)
        arr = {name: spill.array(name, dt) for name, dt in (
            ("image", np.float32), ("variance", np.float32), ("mask", np.int32), ("status", np.int8),
            ("m_image", np.float32), ("m_variance", np.float32), ("m_good", bool))}
        sigma2 = np.zeros(n)

        tasks = [(visits[i], grid, zeropoint, abs(np.linalg.det(jacs[i])),
                  (psfs[i], targets[visits[i].band]) if reject and matched[i] else None)
                 for i in range(n)]
        for i, (image, variance, mask, status, m, s2) in _run_warps(tasks, workers, scheduler):
            arr["image"][i], arr["variance"][i] = image, variance
            arr["mask"][i], arr["status"][i] = mask, status
            if m is None:
                arr["m_good"][i] = False
            else:
                arr["m_image"][i], arr["m_variance"][i], arr["m_good"][i] = m
            sigma2[i] = s2
        pm = _psf_matched(arr, visits, bands, matched, sigma2, shape)
        # Spilled like the warps: n bytes per pixel would not fit for many large visits.
        rejected = spill.array("rejected", bool)
        background = spill.array("background", np.float32)  # zero unless matched
        references = {}
        if reject:
            for b in bands:
                idx = [i for i, v in enumerate(visits) if v.band == b and matched[i]]
                if len(idx) >= 3:  # "in one visit and none of the others" needs others
                    mean, mvar = pm[b][0], pm[b][1]
                    rejected[idx] = find_artifacts(arr["m_image"][idx], arr["m_variance"][idx],
                                                   arr["m_good"][idx], mean, mvar,
                                                   covered=arr["status"][idx] == kernels.GOOD)
                if len(idx) >= 2:  # after rejection: artifacts would bias the offsets
                    references[b] = visits[_match_backgrounds(arr, background, idx,
                                                              rejected, sigma2)].path.name
        groups = _second_pass(arr, visits, grid, bands, jacs, size, sigma2, rejected, matched,
                              zeropoint, kernel, reject, background)
        groups["exposure"].attrs["background_reference"] = json.dumps(references)
    if sky:
        _subtract_sky(groups["exposure"], pm, bands)
    groups["coadds/psf_matched"] = _psf_matched_dataset(pm, bands, targets, target_px, grid,
                                                         zeropoint, visits, matched)
    return groups


def _subtract_sky(exposure, pm, bands):
    """Fit and subtract each band's remaining smooth sky (in place).

    The same model comes off the PSF-matched stack: its matching kernels
    conserve flux, so a sky smooth on scales far above the PSF is unchanged
    by them. The Kaiser coadd keeps the sky (its numerator would need the
    sky correlated with each visit's PSF and coverage).
    """
    no_data = np.int32(1 << COADD_MASK_PLANES["NO_DATA"])
    fits_ = {}
    image = exposure["image"].values
    for k, b in enumerate(bands):
        usable = (exposure["mask"].values[k] & no_data) == 0
        fwhm = psf_fwhm(exposure["psf"].values[k].astype(np.float64), 1.0)
        model, info = fit_sky(image[k].astype(np.float64), exposure["variance"].values[k], usable, fwhm)
        image[k] = (image[k] - model).astype(image.dtype)
        pm[b] = (pm[b][0] - model, pm[b][1])
        sigma = np.sqrt(np.nanmedian(exposure["variance"].values[k][usable])) if usable.any() else 1.0
        info["rms_sigma"] = float(np.sqrt(np.mean(model[usable] ** 2)) / sigma) if usable.any() else 0.0
        fits_[b] = info
    exposure.attrs["sky"] = json.dumps(fits_)


def warp_task(visit, grid, zeropoint, area_ratio, match):
    """One visit's warp (and PSF-matched warp when ``match`` = (psf, target)): a dask task.

    Returns ``(image, variance, mask, status, matched, sigma2)`` with
    ``matched`` = (image, variance, good) or None.
    """
    warp, s2 = _warp_visit(visit, grid, zeropoint, area_ratio)
    if not warp.good.any():
        raise InputError(f"{visit.path}: visit does not overlap the grid (no usable warped pixel)")
    if not s2 > 0:
        raise InputError(f"{visit.path}: no usable pixel (all masked or zero variance)")
    m = None if match is None else _matched_warp(warp, s2, *match)
    return (warp.image.astype(np.float32), warp.variance.astype(np.float32), warp.mask, warp.status,
            None if m is None else (m[0].astype(np.float32), m[1].astype(np.float32), m[2]), s2)


def _run_warps(tasks, workers, scheduler):
    """Yield ``(i, warp_task(*tasks[i]))``: in process, or as dask.distributed tasks.

    At most two tasks per worker are in flight, so the driver never holds
    more than that many warps before they go to the spill files.
    """
    if scheduler is None and workers <= 1:
        for i, t in enumerate(tasks):
            yield i, warp_task(*t)
        return
    from ..parallel import dask_client

    with dask_client(workers, scheduler) as client:
        from dask.distributed import as_completed

        window = 2 * max(1, len(client.scheduler_info()["workers"]))
        todo = iter(enumerate(tasks))
        pending = as_completed()
        index = {}
        for i, t in todo:
            fut = client.submit(warp_task, *t, pure=False)
            index[fut.key] = i
            pending.add(fut)
            if len(index) >= window:
                break
        for fut in pending:
            i = index.pop(fut.key)
            result = fut.result()
            fut.release()
            nxt = next(todo, None)
            if nxt is not None:
                f2 = client.submit(warp_task, *nxt[1], pure=False)
                index[f2.key] = nxt[0]
                pending.add(f2)
            yield i, result


def _psf_matched(arr, visits, bands, matched, sigma2, shape):
    out = {}
    for b in bands:
        idx = [i for i, v in enumerate(visits) if v.band == b and matched[i]]
        if not idx:
            out[b] = (np.full(shape, np.nan), np.full(shape, np.nan))
            continue
        mean, var, _ = clipped_mean(arr["m_image"][idx], arr["m_variance"][idx], arr["m_good"][idx],
                                    1.0 / sigma2[idx])
        out[b] = (mean, var)
    return out


def _match_backgrounds(arr, background, idx, rejected, sigma2):
    """Each matched visit's background relative to a reference warp; returns the reference.

    The reference is the visit whose PSF-matched warp covers most of the grid.
    The difference of a visit and the reference is free of sources (they
    cancel after PSF matching); its smooth part is the visit's background
    offset relative to the reference, measured where both are usable and
    extrapolated smoothly beyond; subtracted from the direct warp before
    stacking (less the weighted mean offset), every visit carries the same
    smooth background and the coadd does not step where a visit is missing (its edge, its masked pixels). A mean of the visits
    would not do: where a visit is missing the mean itself steps. Rejected
    artifacts are left out of the block medians (a trail biases them).
    """
    cover = [int(np.count_nonzero(arr["m_good"][i])) for i in idx]
    ref = idx[int(np.argmax(cover))]
    ref_img = np.asarray(arr["m_image"][ref], np.float64)
    ref_good = np.asarray(arr["m_good"][ref], bool) & ~rejected[ref]
    for i in idx:
        if i == ref:
            continue
        good = np.asarray(arr["m_good"][i], bool) & ref_good & ~rejected[i]
        if good.sum() < 0.05 * good.size:
            continue  # too little overlap to measure an offset
        diff = np.asarray(arr["m_image"][i], np.float64) - ref_img
        background[i] = smooth_difference(diff, good)
    # Keep the weighted mean of the visits' backgrounds rather than the
    # reference's own: each visit then carries sum_j w_j bg_j / sum_j w_j,
    # smooth and the same everywhere.
    w = 1.0 / sigma2[idx]
    mean_offset = sum(wi * np.asarray(background[i], np.float64) for wi, i in zip(w, idx)) / w.sum()
    for i in idx:
        background[i] = background[i] - mean_offset
    return ref


def _second_pass(arr, visits, grid, bands, jacs, size, sigma2, rejected, matched, zeropoint, kernel,
                 reject, background):
    sums = {b: _BandSums(grid.shape, size) for b in bands}
    like = {b: LikelihoodSums(grid.shape) for b in bands}
    rows = []
    rej_bit = np.int32(1 << COADD_MASK_PLANES["REJECTED"])
    for i, v in enumerate(visits):
        status = np.array(arr["status"][i])
        rej = rejected[i] & (status == kernels.GOOD)
        status[rej] = kernels.BAD_INPUT
        image = np.array(arr["image"][i], np.float64) - background[i]
        warp = Warp(image, np.array(arr["variance"][i], np.float64), np.array(arr["mask"][i]), status)
        s = sums[v.band]
        s.carried[rej] |= rej_bit
        row = _add_visit(s, v, warp, sigma2[i], jacs[i], size, like[v.band])
        row["n_rejected"] = int(rej.sum())
        row["psf_matched"] = bool(matched[i])
        if not matched[i]:
            row["reason"] = "PSF not narrower than the PSF-matched target"
        rows.append(row)
    exposure = _exposure(sums, bands, grid, visits, zeropoint, kernel)
    exposure.attrs["artifact_rejection"] = int(reject)
    return {"exposure": exposure, "visits": visits_table(visits, rows, zeropoint, kernel),
            "coadds/likelihood": likelihood_dataset(like, bands, zeropoint)}


def _psf_matched_dataset(pm, bands, targets, target_px, grid, zeropoint, visits, matched):
    image = np.stack([pm[b][0] for b in bands]).astype(np.float32)
    variance = np.stack([pm[b][1] for b in bands]).astype(np.float32)
    left_out = {b: [v.path.name for v, m in zip(visits, matched) if v.band == b and not m]
                for b in bands}
    scale = _pixel_scale(grid.wcs)
    ds = xr.Dataset(
        {
            "image": (("band", "y", "x"), np.nan_to_num(image)),
            "variance": (("band", "y", "x"), variance),
            "psf": (("band", "psf_y", "psf_x"), np.stack([targets[b] for b in bands]).astype(np.float32)),
            "target_fwhm": ("band", np.array([target_px[b] * scale for b in bands], np.float64)),
        },
        coords={"band": np.array(bands, dtype=object)},
        attrs={"zeropoint": float(zeropoint), "wcs": grid.wcs_text,
               "left_out": json.dumps(left_out)},
    )
    stamp(ds, "psf_matched_coadd", 1)
    return validate(ds)
