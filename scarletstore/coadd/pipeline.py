"""The full coadd: warps spilled to disk, PSF-matched clipped stack, background
matching and artifact rejection, then the direct and likelihood coadds
without the artifacts.

Bands are coadded one after the other. Memory holds one band's running sums
and one row block (or one visit) of its matched warps, never every warp:
each warp is written to a file in a temporary folder (removed when the band
is done) between the two passes, and each finished band can go to a scratch
file (``coadd(scratch=...)``), so memory does not grow with the number of
bands.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import InputError
from ..store.schema import stamp, validate
from . import kernels
from .fourier import Convolver
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
    """An (n, ny, nx) array in a file, read and written by item with pread/pwrite.

    Nothing stays mapped (a memory map kept open for the whole run counts
    every page it ever touched as resident: n visits x the grid x every
    plane), and no map is made per access either: ``a[j]``, ``a[list]`` and
    ``a[list, rows]`` read just those items (and rows) into new arrays;
    writes of whole items go straight to the file, partial ones read, modify
    and write the item. The page cache holds the data between accesses; it
    is never flushed to disk on purpose (scratch data).
    """

    def __init__(self, path, dtype, shape):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self._item = int(np.prod(shape[1:]))
        self._row = int(np.prod(shape[2:]))
        with open(path, "wb") as f:  # a sparse file of zeros: nothing is written yet
            f.truncate(self.dtype.itemsize * self.shape[0] * self._item)

    @staticmethod
    def _split(key):
        if isinstance(key, tuple):
            return key[0], key[1:]
        return key, ()

    def _items(self, index):
        if isinstance(index, slice):
            return list(range(*index.indices(self.shape[0]))), True
        if np.ndim(index) == 0:
            return [int(index)], False
        return [int(i) for i in index], True

    def _read(self, fd, j, y0=0, y1=None):
        y1 = self.shape[1] if y1 is None else y1
        out = np.empty((y1 - y0, *self.shape[2:]), self.dtype)
        offset = (j * self._item + y0 * self._row) * self.dtype.itemsize
        if os.preadv(fd, [out], offset) != out.nbytes:
            raise OSError(f"{self.path}: short read")
        return out

    def __getitem__(self, key):
        index, rest = self._split(key)
        items, many = self._items(index)
        rows = rest[0] if rest and isinstance(rest[0], slice) and rest[0].step in (None, 1) else None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if rows is not None:
                y0, y1, _ = rows.indices(self.shape[1])
                parts = [self._read(fd, j, y0, max(y0, y1)) for j in items]
                rest = (slice(None), *rest[1:])
            else:
                parts = [self._read(fd, j) for j in items]
        finally:
            os.close(fd)
        out = np.stack(parts) if many else parts[0]
        if rest:
            out = out[(slice(None), *rest)] if many else out[rest]
        return out

    def __setitem__(self, key, value):
        index, rest = self._split(key)
        items, many = self._items(index)
        value = np.asarray(value)
        fd = os.open(self.path, os.O_RDWR)
        try:
            for n, j in enumerate(items):
                v = value[n] if many and value.ndim == len(self.shape) else value
                if rest:
                    item = self._read(fd, j)
                    item[rest] = v
                else:
                    item = np.ascontiguousarray(np.broadcast_to(v, self.shape[1:]), self.dtype)
                os.pwrite(fd, item, j * self._item * self.dtype.itemsize)
        finally:
            os.close(fd)


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
    conv = Convolver(good.shape, k.shape[0])
    img = conv.convolve(conv.image(np.where(good, warp.image, 0.0)), k)
    footprint = np.abs(k) > KERNEL_FOOTPRINT * np.abs(k).max()
    bad = conv.dilate(conv.image(~good), footprint)
    # White-noise variance per grid pixel, following the warp's spatial variation.
    med = np.median(warp.variance[good]) if good.any() else 1.0
    var = conv.convolve(conv.image(np.where(good, warp.variance, 0.0) * (sigma2 / med)), k**2)
    return img, np.maximum(var, 1e-30), ~bad


@dataclass
class _Plan:
    """What every band's coadd needs: settings and the PSF plan of every visit."""

    grid: Grid
    zeropoint: float
    kernel: str
    reject: bool
    sky: bool
    workers: int
    scheduler: str | None
    jacs: list
    size: int
    psfs: list
    targets: dict
    target_px: dict
    matched: list


class _Rows:
    """Rows ``rows`` of an (n, ny, nx) array (spilled or not), read one slice at a time.

    ``a[k]`` reads row ``rows[k]``; ``a[:, sl]`` reads a block of every row.
    Handing the spill files this way keeps one band's matched warps on disk
    while they are clipped and compared, instead of loading all of them.
    """

    def __init__(self, array, rows, fn=None):
        self.array, self.rows, self.fn = array, list(rows), fn
        self.shape = (len(self.rows), *array.shape[1:])

    def __getitem__(self, key):
        if isinstance(key, tuple) and key and key[0] == slice(None):
            out = self.array[(self.rows, *key[1:])]
        else:
            out = self.array[self.rows[key]]
        return out if self.fn is None else self.fn(out)


def coadd(visits: list[Visit], grid: Grid, zeropoint: float = ZEROPOINT, kernel: str = "lanczos3",
          workers: int = 1, reject: bool = True, target_fwhm: float | None = None,
          progress: bool = False, tmpdir=None, sky: bool = True, scheduler: str | None = None,
          scratch=None) -> dict:
    """Every coadd product of ``visits`` on ``grid`` as ``{group: Dataset}``.

    Groups: ``exposure`` (direct coadd, artifacts rejected when ``reject``),
    ``visits``, ``coadds/likelihood`` and ``coadds/psf_matched``. ``target_fwhm``
    (arcsec) fixes the PSF-matched target; visits whose PSF is not narrower
    are left out of the PSF-matched stack (and of artifact detection).
    ``sky`` fits a smooth sky on each band of the direct coadd (sources
    masked, :mod:`.sky`) and subtracts it from the direct, PSF-matched and
    likelihood coadds; the per-band fit is in ``exposure.attrs["sky"]``.
    ``workers`` > 1 warps visits as tasks on a local dask.distributed cluster
    of that many single-threaded processes, ``scheduler`` on an existing one;
    the stacks are summed in visit order, so the result does not depend on them.

    Bands are coadded one after the other: only one band's warps (on disk,
    in ``tmpdir``) and running sums exist at a time. With ``scratch`` (an
    existing folder that outlives the returned Datasets) each band's
    products are written there as the band completes and the returned
    per-band groups are lazy (dask) arrays over those files, so memory never
    holds more than one band; without it they are in memory.
    """
    if kernel not in KERNELS:
        raise InputError(f"unknown warp kernel {kernel!r} (known: {', '.join(KERNELS)})")
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if target_fwhm is not None and not target_fwhm > 0:
        raise InputError(f"--psf-matched-fwhm must be positive, got {target_fwhm:g}")
    if not visits:
        raise InputError("no visits to coadd")
    plan = _Plan(grid, zeropoint, kernel, reject, sky, workers, scheduler,
                 *_plan_psfs(visits, grid, target_fwhm))
    bands = list(dict.fromkeys(v.band for v in visits))
    rows = [None] * len(visits)
    parts = {name: [] for name in BAND_GROUPS}
    chi2 = np.zeros(grid.shape, np.float32)
    references, skies = {}, {}
    with tempfile.TemporaryDirectory(prefix="scarletstore-coadd-", dir=tmpdir) as folder:
        for k, b in enumerate(bands):
            idx = [i for i, v in enumerate(visits) if v.band == b]
            # One band's spill files at a time: disk, like memory, holds one band.
            with tempfile.TemporaryDirectory(dir=folder) as spill:
                products, band_rows, ref, sky_fit = _coadd_band(plan, visits, idx, spill)
            for i, r in zip(idx, band_rows):
                rows[i] = r
            if ref is not None:
                references[b] = ref
            if sky_fit is not None:
                skies[b] = sky_fit
            sig = products["coadds/likelihood"]["significance"].values[0]
            chi2 += np.where(np.isfinite(sig), sig, 0.0) ** 2
            if scratch is not None:
                # A new name per call: the same scratch folder may serve several coadds.
                products = _to_scratch(products, Path(scratch) / f"coadd-{uuid.uuid4().hex}-{k}.nc")
            for name, ds in products.items():
                parts[name].append(ds)
    return _assemble(parts, chi2, rows, visits, bands, plan, references, skies)


BAND_GROUPS = ("exposure", "coadds/likelihood", "coadds/psf_matched")
SCRATCH_ROWS = 512  # rows per dask chunk of a band read back from the scratch file


def _to_scratch(products: dict, path: Path) -> dict:
    """Write one band's groups to ``path`` and return them read lazily from it.

    Image-sized variables (those with ``y`` and ``x``) go to plain HDF5
    datasets and come back as dask arrays over them (chunks of
    ``SCRATCH_ROWS`` rows); the small ones (PSFs, per-band numbers, coords)
    and the attributes stay in memory. Plain datasets, not netCDF: the
    dimension scales and attribute encoding of a netCDF write and reopen cost
    more CPU than the whole band's stacking at small grids.
    """
    import dask.array as da
    import h5py

    f = h5py.File(path, "w")  # kept open by the dask arrays that read it
    out = {}
    for name, ds in products.items():
        group = f.require_group(name)
        lazy = ds.copy()
        for vname, var in ds.data_vars.items():
            if "y" not in var.dims or "x" not in var.dims or var.dtype.kind not in "fiub":
                continue
            h = group.create_dataset(vname, data=var.values)
            chunks = tuple(SCRATCH_ROWS if d == "y" else n for d, n in zip(var.dims, var.shape))
            lazy[vname] = xr.Variable(var.dims, da.from_array(h, chunks=chunks, lock=True),
                                      attrs=dict(var.attrs))
        lazy.set_close(f.close)
        out[name] = lazy
    f.flush()
    return out


def _assemble(parts, chi2, rows, visits, bands, plan, references, skies) -> dict:
    """The store groups from the per-band parts (concatenated along ``band``)."""
    def joined(name):
        ds = xr.concat(parts[name], dim="band", combine_attrs="override")
        ds.attrs = dict(parts[name][0].attrs)
        return ds

    exposure = joined("exposure")
    for key in ("artifact_rejection", "background_matching"):
        done = {b: bool(ds.attrs.get(key, 0)) for b, ds in zip(bands, parts["exposure"])}
        exposure.attrs[key] = int(all(done.values()))  # 1: done in every band
        exposure.attrs[f"{key}_bands"] = json.dumps(done)
    exposure.attrs["sources"] = json.dumps([v.path.name for v in visits])
    exposure.attrs["background_reference"] = json.dumps(references)
    if plan.sky:
        exposure.attrs["sky"] = json.dumps(skies)
    like = joined("coadds/likelihood")
    like["chi2"] = (("y", "x"), chi2)
    pm = joined("coadds/psf_matched")
    pm.attrs["left_out"] = json.dumps(
        {b: [v.path.name for v, m in zip(visits, plan.matched) if v.band == b and not m] for b in bands})
    table = visits_table(visits, rows, plan.zeropoint, plan.kernel)
    groups = {"exposure": exposure, "visits": table, "coadds/likelihood": like,
              "coadds/psf_matched": pm}
    for ds in groups.values():
        validate(ds)
    return groups


def _coadd_band(plan: _Plan, visits, idx, folder):
    """One band's products (1-band Datasets), its visits' rows, background reference and sky fit.

    Pass 1 warps and PSF-matches the band's visits ``idx`` into spill files
    in ``folder``; then the clipped PSF-matched stack, artifact masks and
    background offsets; pass 2 the direct and Kaiser stacks with artifacts
    masked and backgrounds matched; then the sky fit.
    """
    grid, shape = plan.grid, plan.grid.shape
    band = visits[idx[0]].band
    spill = _Spill(folder, len(idx), shape)
    arr = {name: spill.array(name, dt) for name, dt in (
        ("image", np.float32), ("variance", np.float32), ("mask", np.int32), ("status", np.int8),
        ("m_image", np.float32), ("m_variance", np.float32), ("m_good", bool))}
    sigma2 = np.zeros(len(idx))
    tasks = [(visits[i], grid, plan.zeropoint, abs(np.linalg.det(plan.jacs[i])),
              (plan.psfs[i], plan.targets[band]) if plan.reject and plan.matched[i] else None)
             for i in idx]
    for j, (image, variance, mask, status, m, s2) in _run_warps(tasks, plan.workers, plan.scheduler):
        arr["image"][j], arr["variance"][j] = image, variance
        arr["mask"][j], arr["status"][j] = mask, status
        if m is None:
            arr["m_good"][j] = False
        else:
            arr["m_image"][j], arr["m_variance"][j], arr["m_good"][j] = m
        sigma2[j] = s2
    local = [j for j, i in enumerate(idx) if plan.matched[i]]  # in the PSF-matched stack
    pm = _psf_matched(arr, local, sigma2, shape)
    # Spilled like the warps: n bytes per pixel would not fit for many large visits.
    rejected = spill.array("rejected", bool)
    background = spill.array("background", np.float32)  # zero unless matched
    reference = None
    if plan.reject:
        if len(local) >= 3:  # "in one visit and none of the others" needs others
            rejected[local] = find_artifacts(
                _Rows(arr["m_image"], local), _Rows(arr["m_variance"], local),
                _Rows(arr["m_good"], local), pm[0], pm[1],
                covered=_Rows(arr["status"], local, lambda s: s == kernels.GOOD),
                weights=1.0 / sigma2[local])
        if len(local) >= 2:  # after rejection: artifacts would bias the offsets
            ref = _match_backgrounds(arr, background, local, rejected, sigma2)
            reference = visits[idx[ref]].path.name
    exposure, like, rows = _second_pass(arr, visits, idx, plan, sigma2, rejected, background)
    # what was asked is not always what a band's visits allow: say which ran
    exposure.attrs["artifact_rejection"] = int(plan.reject and len(local) >= 3)
    exposure.attrs["background_matching"] = int(reference is not None)
    sky_fit = None
    if plan.sky:
        model, sky_fit = _fit_sky(exposure)
        exposure["image"].values[0] -= model.astype(np.float32)
        pm = (pm[0] - model, pm[1])
        # The Kaiser numerator holds the sky correlated with each visit's PSF
        # and coverage: for a sky smooth on PSF scales that is the model times
        # sum_v (good_v * P_v) / sigma_v^2.
        like.num -= model * like.cov
    likelihood = likelihood_dataset({band: like}, [band], plan.zeropoint).drop_vars("chi2")
    likelihood.attrs["sky_subtracted"] = int(plan.sky)
    products = {"exposure": exposure, "coadds/likelihood": likelihood,
                "coadds/psf_matched": _psf_matched_dataset(pm, band, plan)}
    return products, rows, reference, sky_fit


def _fit_sky(exposure):
    """The remaining smooth sky of a 1-band direct coadd and the fit's summary.

    The same model comes off the PSF-matched stack (its matching kernels
    conserve flux, so a sky smooth on scales far above the PSF is unchanged
    by them) and, correlated with the PSFs and coverage, off the Kaiser
    numerator.
    """
    no_data = np.int32(1 << COADD_MASK_PLANES["NO_DATA"])
    image = exposure["image"].values[0]
    variance = exposure["variance"].values[0]
    usable = (exposure["mask"].values[0] & no_data) == 0
    fwhm = psf_fwhm(exposure["psf"].values[0].astype(np.float64), 1.0)
    model, info = fit_sky(image.astype(np.float64), variance, usable, fwhm)
    sigma = np.sqrt(np.nanmedian(variance[usable])) if usable.any() else 1.0
    info["rms_sigma"] = float(np.sqrt(np.mean(model[usable] ** 2)) / sigma) if usable.any() else 0.0
    return model, info


class EmptyWarpError(InputError):
    """A visit that reaches the grid on the sky but has no usable pixel on it
    (all masked or non-finite there). ``path``: the visit's file."""

    def __init__(self, path):
        super().__init__(f"{path}: visit does not overlap the grid (no usable warped pixel)")
        self.path = str(path)

    def __reduce__(self):  # raised in dask workers: rebuilt from its path
        return (type(self), (self.path,))


def warp_task(visit, grid, zeropoint, area_ratio, match):
    """One visit's warp (and PSF-matched warp when ``match`` = (psf, target)): a dask task.

    Returns ``(image, variance, mask, status, matched, sigma2)`` with
    ``matched`` = (image, variance, good) or None.
    """
    warp, s2 = _warp_visit(visit, grid, zeropoint, area_ratio)
    if not warp.good.any():
        raise EmptyWarpError(visit.path)
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


def _psf_matched(arr, local, sigma2, shape):
    """Clipped mean and its variance of the matched warps ``local`` (NaN when there are none)."""
    if not local:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    mean, var, _ = clipped_mean(_Rows(arr["m_image"], local), _Rows(arr["m_variance"], local),
                                _Rows(arr["m_good"], local), 1.0 / sigma2[local])
    return mean, var


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


def _second_pass(arr, visits, idx, plan: _Plan, sigma2, rejected, background):
    """The band's direct coadd (1-band exposure), Kaiser sums and visit rows, artifacts masked."""
    band = visits[idx[0]].band
    s = _BandSums(plan.grid.shape, plan.size)
    like = LikelihoodSums(plan.grid.shape, coverage=plan.sky)
    rows = []
    rej_bit = np.int32(1 << COADD_MASK_PLANES["REJECTED"])
    for j, i in enumerate(idx):
        v = visits[i]
        status = np.array(arr["status"][j])
        rej = rejected[j] & (status == kernels.GOOD)
        status[rej] = kernels.BAD_INPUT
        image = np.array(arr["image"][j], np.float64) - background[j]
        warp = Warp(image, np.array(arr["variance"][j], np.float64), np.array(arr["mask"][j]), status)
        s.carried[rej] |= rej_bit
        row = _add_visit(s, v, warp, sigma2[j], plan.jacs[i], plan.size, like)
        del warp, image
        row["n_rejected"] = int(rej.sum())
        row["psf_matched"] = bool(plan.matched[i])
        if not plan.matched[i]:
            row["reason"] = "PSF not narrower than the PSF-matched target"
        rows.append(row)
    exposure = _exposure({band: s}, [band], plan.grid, [visits[i] for i in idx], plan.zeropoint,
                         plan.kernel)
    exposure.attrs["artifact_rejection"] = int(plan.reject)
    return exposure, like, rows


def _psf_matched_dataset(pm, band, plan: _Plan):
    """One band's ``coadds/psf_matched`` group (``left_out`` is filled in for all bands later)."""
    scale = _pixel_scale(plan.grid.wcs)
    ds = xr.Dataset(
        {
            "image": (("band", "y", "x"), np.nan_to_num(pm[0]).astype(np.float32)[None]),
            "variance": (("band", "y", "x"), pm[1].astype(np.float32)[None]),
            "psf": (("band", "psf_y", "psf_x"), plan.targets[band].astype(np.float32)[None]),
            "target_fwhm": ("band", np.array([plan.target_px[band] * scale], np.float64)),
        },
        coords={"band": np.array([band], dtype=object)},
        attrs={"zeropoint": float(plan.zeropoint), "wcs": plan.grid.wcs_text, "left_out": "{}"},
    )
    stamp(ds, "psf_matched_coadd", 1)
    return validate(ds)
