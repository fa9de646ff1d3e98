"""Run a deblender over every parent of an exposure and assemble a run Dataset.

Parents become independent :class:`BlendTask` objects (the blend's cut-outs,
footprint and peaks). Size and mask limits are applied here, before any work
is shipped; the fits run in this process or as tasks on dask.distributed, and
this process alone collects the results (in any order) and builds the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from ..detect.footprint import counts_to_offsets, spans_to_mask
from ..errors import InputError
from ..ingest.exposure import bad_bits
from ..progress import progress
from ..store.components import SOURCE_MASKED_PEAK, Component, SourceResult
from ..store.runs import BLEND_FLAGS, SOURCE_ISOLATED, BlendRecord, build_run
from .config import DeblendConfig
from .result import BlendResult
from .sharp import flag_sharp_peaks

if TYPE_CHECKING:  # annotations only: the inputs may be Datasets or store Frames
    import xarray as xr

METHODS = ("scarlet", "sdss")


@dataclass
class BlendTask:
    """The inputs of one blend, small enough to ship to a worker."""

    index: int
    parent_id: int
    bbox: tuple  # (y0, x0, height, width)
    images: np.ndarray  # (band, h, w) float32
    variance: np.ndarray
    bad: np.ndarray  # (band, h, w) bool
    footprint: np.ndarray  # (h, w) bool
    psfs: np.ndarray
    peaks: np.ndarray  # (n, 2) blend-local (y, x)
    peak_ids: np.ndarray
    init: BlendResult | None = None
    pieces: list | None = None  # split.Piece list: fitted in pieces (parent over the budget)
    isolated: bool = False  # a single-peak parent fitted only for its model (see make_tasks)


def _parent_tables(parents: xr.Dataset):
    span_off = counts_to_offsets(parents["span_count"].values)
    peak_off = counts_to_offsets(parents["peak_count"].values)
    return span_off, peak_off


def skip_reason(config: DeblendConfig, n_peaks: int, area: int, height: int, width: int,
                masked_fraction: dict) -> tuple[str, int]:
    """Why a parent is not fitted ('' and 0 when it is), with its flag bit.

    With ``split_large_parents`` the size limits skip nothing: the memory
    budget decides, in :func:`make_tasks`, whether a parent is split.
    """
    limits = not config.split_large_parents
    if limits and n_peaks > config.max_number_of_peaks:
        return "too_many_peaks", BLEND_FLAGS["too_many_peaks"]
    if limits and (area > config.max_footprint_area or area * n_peaks > config.max_area_times_peaks
            or (config.max_footprint_size > 0 and max(height, width) > config.max_footprint_size)):
        return "parent_too_big", BLEND_FLAGS["parent_too_big"]
    if config.min_footprint_axis_ratio > 0 and min(height, width) < config.min_footprint_axis_ratio * max(height, width):
        return "footprint_too_thin", BLEND_FLAGS["footprint_too_thin"]
    for plane, limit in config.mask_limits.items():
        if masked_fraction.get(plane, 0.0) > float(limit):
            return "masked", BLEND_FLAGS["masked"]
    if n_peaks == 1 and not config.process_singles:
        return "isolated", BLEND_FLAGS["isolated"]
    return "", 0


def make_tasks(exposure: xr.Dataset, parents: xr.Dataset, config: DeblendConfig,
               blend_ids=None, fit_isolated=False):
    """Split an exposure into blend tasks and records of parents that are not fitted.

    With ``fit_isolated`` a single-peak parent (``process_singles`` off)
    becomes a task flagged ``isolated`` instead of a record: it is fitted for
    its model alone and recorded as isolated (see :func:`process_blend`).

    Returns
    -------
    tasks : list of BlendTask
        Parents to fit.
    done : list of BlendRecord
        Parents skipped (with reason and flag) or kept as isolated sources.
    """
    planes = json.loads(exposure.attrs["mask_planes"])
    # an undefined bad plane flags nothing (inputs name different plane sets),
    # but a mask limit on an undefined plane is a mistake worth reporting
    unknown = [p for p in config.mask_limits if p not in planes]
    if unknown:
        raise InputError(f"mask plane(s) {', '.join(unknown)} are not defined by the exposure "
                         f"(it has {', '.join(sorted(planes))})")
    bits = bad_bits(planes, config.bad_mask_planes)
    image = np.asarray(exposure["image"].values)
    variance = np.asarray(exposure["variance"].values)
    mask = np.asarray(exposure["mask"].values)
    psfs = np.asarray(exposure["psf"].values)
    span_off, peak_off = _parent_tables(parents)
    pid = parents["parent_id"].values
    wanted = None
    if blend_ids is not None:
        wanted = {int(b) for b in blend_ids}
        missing = wanted - {int(p) for p in pid}
        if missing:
            raise InputError(f"no parent(s) with id {', '.join(str(m) for m in sorted(missing))}")
    sy, sx0, sx1 = (parents[v].values for v in ("span_y", "span_x0", "span_x1"))
    peak_y, peak_x, peak_ids = (parents[v].values for v in ("peak_y", "peak_x", "peak_id"))
    tasks, done = [], []
    # plain arrays once: an xarray variable access per parent costs more than the cut-out
    bboxes = np.stack([np.asarray(parents[v].values, np.int64)
                       for v in ("bbox_y0", "bbox_x0", "bbox_height", "bbox_width")], axis=1)
    for i, parent_id in enumerate(pid):
        if wanted is not None and int(parent_id) not in wanted:
            continue
        y0, x0, h, w = (int(v) for v in bboxes[i])
        sl = slice(span_off[i], span_off[i + 1])
        fp = spans_to_mask(sy[sl], sx0[sl], sx1[sl], (y0, x0, h, w))
        pk = slice(peak_off[i], peak_off[i + 1])
        peaks = np.stack([peak_y[pk], peak_x[pk]], axis=1).astype(np.float64)
        ids = np.asarray(peak_ids[pk], np.int64)
        box = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
        m = mask[box]
        area = int(fp.sum())
        fractions = {}
        for plane in config.mask_limits:
            hit = ((m & (1 << int(planes[plane]))) != 0).any(axis=0) & fp
            fractions[plane] = hit.sum() / max(area, 1)
        reason, flag = skip_reason(config, len(ids), area, h, w, fractions)
        bad = ((m & bits) != 0) | ~np.isfinite(variance[box]) | (variance[box] <= 0)
        if reason == "isolated" and fit_isolated and _pieces(config, fp, peaks - [y0, x0], image.shape[0],
                                                             psfs.shape[1:]) is None:
            tasks.append(BlendTask(index=i, parent_id=int(parent_id), bbox=(y0, x0, h, w),
                                   images=np.ascontiguousarray(image[box], np.float32),
                                   variance=np.ascontiguousarray(variance[box], np.float32),
                                   bad=np.ascontiguousarray(bad), footprint=fp, psfs=psfs,
                                   peaks=peaks - [y0, x0], peak_ids=ids, isolated=True))
        elif reason == "isolated":
            # the parents' peaks are already exposure pixels
            done.append(_isolated_record(i, int(parent_id), (y0, x0, h, w), image[box], variance[box],
                                         bad, psfs, fp, peaks, ids, flag))
        elif reason:
            done.append(BlendRecord(index=i, parent_id=int(parent_id), bbox=(y0, x0, h, w),
                                    peak_ids=ids, peaks=peaks, flags=flag, reason=reason))
        else:
            pieces = _pieces(config, fp, peaks - [y0, x0], image.shape[0], psfs.shape[1:])
            if isinstance(pieces, str):
                done.append(BlendRecord(index=i, parent_id=int(parent_id), bbox=(y0, x0, h, w),
                                        peak_ids=ids, peaks=peaks, flags=BLEND_FLAGS["parent_too_big"],
                                        reason="parent_too_big"))
                continue
            tasks.append(BlendTask(index=i, parent_id=int(parent_id), bbox=(y0, x0, h, w),
                                   images=np.ascontiguousarray(image[box], np.float32),
                                   variance=np.ascontiguousarray(variance[box], np.float32),
                                   bad=np.ascontiguousarray(bad), footprint=fp, psfs=psfs,
                                   peaks=peaks - [y0, x0], peak_ids=ids, pieces=pieces))
    return tasks, done


def _pieces(config, footprint, peaks, n_bands, kernel_shape):
    """The pieces of a parent over the memory budget (None: fit it whole; a
    message: even single-peak pieces are over the budget)."""
    if not config.split_large_parents:
        return None
    from .split import CannotSplit, fit_memory, piece_budget, plan_pieces
    h, w = footprint.shape
    if fit_memory(n_bands, h, w, len(peaks), kernel_shape) <= config.memory_budget:
        return None  # the common case: no planning cost
    budget = piece_budget(config.memory_budget, n_bands, h, w)
    try:
        if budget <= 0:
            raise CannotSplit("the parent's own arrays exceed the memory budget")
        return plan_pieces(peaks, footprint, n_bands, budget, config.split_margin, kernel_shape)
    except CannotSplit as exc:
        return str(exc)


def flag_masked_peaks(sources, peaks, bad):
    """Add SOURCE_MASKED_PEAK to every source whose peak pixel is bad in every band.

    Such a peak (a saturated core, a hole, a NO_DATA border detection put a
    peak in) has no data of its own: the model's flux there is extrapolated
    from its neighbourhood, or from nothing. ``peaks`` (n, 2) and ``bad``
    (band, h, w) are in the blend's pixels.
    """
    h, w = bad.shape[1:]
    for src in sources:
        y, x = np.rint(peaks[src.peak_index]).astype(int)
        if bad[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)].all():
            src.flags |= SOURCE_MASKED_PEAK
    return sources


def _flag_peaks(sources, peaks, images, variance, bad, psfs):
    """Both peak-pixel flags: masked (no data) and sharp (sharper than the PSF allows)."""
    return flag_sharp_peaks(flag_masked_peaks(sources, peaks, bad), peaks, images, variance, bad, psfs)


def _isolated_record(index, parent_id, bbox, image, variance, bad, psfs, footprint, peaks, ids, flag):
    """A single-peak parent kept as its footprint's pixels (a cube component).

    ``peaks`` are exposure pixels; the component's peak is blend-local, as
    every component of a record is.
    """
    cube = np.where(footprint[None] & ~bad, image, 0).astype(np.float32)
    y, x = peaks[0] - [bbox[0], bbox[1]]
    comp = Component(spectrum=cube.sum(axis=(1, 2)), morph=cube, y0=0, x0=0, peak=(y, x))
    # nothing is fitted: no iterations, no convergence and no fit statistics
    return BlendRecord(index=index, parent_id=parent_id, bbox=bbox, peak_ids=ids, peaks=peaks,
                       sources=_flag_peaks([SourceResult(peak_index=0, components=[comp],
                                                         flags=SOURCE_ISOLATED)],
                                           peaks - [bbox[0], bbox[1]], image, variance, bad, psfs),
                       iterations=0, converged=False, log_likelihood=np.nan, chi2=np.nan,
                       flags=flag, reason="isolated")


def _deblender(method: str):
    if method == "scarlet":
        from .scarlet import deblend_scarlet
        return deblend_scarlet
    if method == "sdss":
        from .sdss import deblend_sdss
        return lambda *a, init=None: deblend_sdss(*a)
    raise InputError(f"unknown method {method!r}; choose scarlet or sdss")


def _dispatchers(method: str):
    """The cached numba kernels a method's fits run."""
    from numba.core.registry import CPUDispatcher

    from . import kernels, psf
    modules = [kernels, psf]
    if method == "scarlet":
        from . import scarlet
        modules.append(scarlet)
    else:
        from . import sdss
        modules.append(sdss)
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, CPUDispatcher) and getattr(obj, "_cache", None) is not None:
                yield obj


def kernels_cold(method: str, dispatchers=None) -> bool:
    """Whether a fit would compile its kernels rather than load them from numba's cache.

    Kernels a configuration never calls have no cache, so a missing index alone
    does not say cold: the cache is cold when no kernel has an index (a fresh
    checkout) or some index is older than its source file (numba then
    recompiles that module's kernels). ``dispatchers`` defaults to the
    method's kernels.
    """
    indexed = False
    for disp in _dispatchers(method) if dispatchers is None else dispatchers:
        if disp.signatures:
            indexed = True  # compiled or loaded in this process already
            continue
        try:
            index = disp._cache._cache_file._index_path
            source = disp.py_func.__code__.co_filename
            if os.path.exists(index):
                indexed = True
                if os.path.getmtime(index) < os.path.getmtime(source):
                    return True
        except (AttributeError, OSError):
            return True
    return not indexed


_WARM: set = set()


def _dummy_task(psfs: np.ndarray) -> BlendTask:
    """A small synthetic blend with the run's PSFs that takes the paths real ones do:
    a star (the PSF itself), a galaxy and a faint galaxy at sub-pixel peaks."""
    n_bands, ph, pw = psfs.shape
    size = max(31, ph + 6, pw + 6) | 1
    c = size // 2
    y, x = np.mgrid[:size, :size]
    peaks = np.array([[c, c], [c - 5.7, c + 4.2], [c + 6.3, c - 5.1]], np.float64)
    scene = sum(a * np.exp(-((y - py) ** 2 + (x - px) ** 2) / (2 * 2.5 ** 2))
                for a, (py, px) in zip((100.0, 4.0), peaks[1:]))
    images = np.repeat(scene[None], n_bands, axis=0)
    oy, ox = c - ph // 2, c - pw // 2
    images[:, oy:oy + ph, ox:ox + pw] += 500.0 * psfs
    images += np.random.default_rng(0).normal(0, 1, images.shape)
    shape = (n_bands, size, size)
    return BlendTask(index=-1, parent_id=-1, bbox=(0, 0, size, size), images=images.astype(np.float32),
                     variance=np.ones(shape, np.float32), bad=np.zeros(shape, bool),
                     footprint=np.ones((size, size), bool), psfs=psfs, peaks=peaks,
                     peak_ids=np.arange(1, 4))


def warm_kernels(method: str, config: DeblendConfig, psfs: np.ndarray) -> float:
    """Run the fit once on a small synthetic blend so that numba compilation (or
    loading its cache) is not charged to the first real blend's runtime.

    Once per method and process; returns the seconds it took (0 when warm).
    """
    if method in _WARM:
        return 0.0
    start = time.perf_counter()
    task = _dummy_task(np.asarray(psfs, np.float32))
    # a few iterations reach every kernel the full fit does (box resizes and
    # convergence checks included: the same 22 kernels are loaded); the 78 the
    # dummy takes to converge cost ~27 ms more of every deblend call
    short = dataclasses.replace(config, max_iter=min(config.max_iter, 2 * max(config.min_iter,
                                                                               config.resize_every) + 1))
    try:
        _deblender(method)(task.images, task.variance, task.bad, task.footprint, task.psfs,
                           task.peaks, short, init=None)
    except Exception:  # noqa: BLE001 - a warm-up only; the real blends report their own errors
        pass
    _WARM.add(method)
    return time.perf_counter() - start


def process_blend(task: BlendTask, method: str, config: DeblendConfig) -> BlendRecord:
    """Fit one blend; a failure is recorded (with its error text) when catch_failures.

    The recorded runtime is the fit's alone: kernels are warmed first (once per
    process, see :func:`warm_kernels`).
    """
    warm_kernels(method, config, task.psfs)
    y0, x0 = task.bbox[0], task.bbox[1]
    rec = BlendRecord(index=task.index, parent_id=task.parent_id, bbox=task.bbox,
                      peak_ids=task.peak_ids, peaks=task.peaks + [y0, x0])
    start = time.perf_counter()
    if config.residual_sources and (task.isolated or task.pieces):
        # an isolated parent stays one source; pieces share sources at their seams
        config = dataclasses.replace(config, residual_sources=False)
    try:
        fit = _deblender(method)
        if task.pieces:
            from .split import deblend_pieces
            rec.flags |= BLEND_FLAGS["split"]
            result = deblend_pieces(fit, task.images, task.variance, task.bad, task.footprint,
                                    task.psfs, task.peaks, task.pieces, config)
        else:
            result = fit(task.images, task.variance, task.bad, task.footprint, task.psfs,
                         task.peaks, config, init=task.init)
    except Exception as exc:
        if not config.catch_failures:
            raise
        if task.isolated:  # nothing is lost: its image inside the footprint is a complete record
            return _isolated_record(task.index, task.parent_id, task.bbox, task.images, task.variance,
                                    task.bad, task.psfs, task.footprint, rec.peaks, task.peak_ids,
                                    BLEND_FLAGS["isolated"])
        rec.flags |= BLEND_FLAGS["failed"]
        rec.reason = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        rec.runtime = time.perf_counter() - start
        return rec
    rec.runtime = time.perf_counter() - start
    peaks = task.peaks
    found = np.asarray(result.extra.get("found_peaks", np.zeros((0, 2))), np.float64).reshape(-1, 2)
    if len(found):
        # peaks the deblender found: id -1 until deblend_exposure numbers them
        peaks = np.vstack([task.peaks, found])
        rec.peaks = peaks + [y0, x0]
        rec.peak_ids = np.concatenate([task.peak_ids, np.full(len(found), -1, np.int64)])
    rec.sources = _flag_peaks(result.sources, peaks, task.images, task.variance, task.bad, task.psfs)
    if "gradient_sums" in result.extra and not task.pieces:
        rec.gradient_sums = result.extra["gradient_sums"]  # see _shared_gradient
    rec.iterations = int(result.iterations)
    rec.log_likelihood = float(result.log_likelihood)
    rec.chi2 = float(result.chi2)
    rec.converged = bool(result.converged)
    rec.flags |= int(result.flags) | (0 if result.converged else BLEND_FLAGS["not_converged"])
    rec.model_psf = result.model_psf
    if task.isolated:
        # still an isolated parent (reason, flags), with the fit's model and statistics
        rec.reason = "isolated"
        rec.flags |= BLEND_FLAGS["isolated"]
        for src in rec.sources:
            src.flags |= SOURCE_ISOLATED
    return rec


def _run_tasks(tasks, method, config, workers, scheduler, show):
    """Yield records as they complete: in-process, or on dask.distributed."""
    if scheduler is None and workers <= 1:
        for task in tasks:
            yield process_blend(task, method, config)
        return
    from ..parallel import completed, dask_client

    with dask_client(workers, scheduler) as client:
        futures = client.map(process_blend, tasks, method=method, config=config, pure=False)
        yield from completed(futures)


def init_from_run(run: xr.Dataset):
    """``init(parent_id, bbox, peak_ids) -> BlendResult | None`` from a stored run's models.

    Components are moved to the new blend's local pixels; each stored source
    is matched to the new blend's peaks by peak id, and a blend whose peaks
    changed, or that the stored run did not fit, starts cold.
    """
    from ..store.runs import RunIndex, read_blend

    index = RunIndex(run)
    frame = "model" if run.attrs.get("method") != "sdss" else "observed"
    peak_of_source = np.asarray(run["source_peak_id"].values)
    # the stored fit's configuration: a warm start with the same one refines it
    config = run.attrs.get("config", "")
    model_psf = np.asarray(run["model_psf"].values)

    def init(parent_id, bbox, peak_ids):
        try:
            b = index.blend_of_parent(parent_id)
        except KeyError:
            return None
        reason = run["blend_reason"].values[b]
        # an isolated parent restarts from its stored fit (isolated_model), not from its image
        fitted_isolated = reason == "isolated" and int(run["blend_iterations"].values[b]) > 0
        if (reason != "" and not fitted_isolated) or frame != "model":
            return None
        stored = read_blend(index, b)
        rows = range(index.source_off[b], index.source_off[b + 1])
        stored_peaks = [int(peak_of_source[r]) for r in rows]
        if sorted(stored_peaks) != sorted(int(p) for p in peak_ids):
            return None
        where = {int(p): k for k, p in enumerate(peak_ids)}
        y0, x0 = bbox[0], bbox[1]
        sources = []
        for src, pid in zip(stored.sources, stored_peaks):
            comps = [Component(spectrum=np.array(c.spectrum, np.float32), morph=np.array(c.morph, np.float32),
                               y0=c.y0 - y0, x0=c.x0 - x0, peak=(c.peak[0] - y0, c.peak[1] - x0))
                     for c in src.components]
            sources.append(SourceResult(peak_index=where[pid], components=comps, flags=src.flags))
        return BlendResult(sources=sources, iterations=int(run["blend_iterations"].values[b]),
                           log_likelihood=float(run["blend_log_likelihood"].values[b]),
                           converged=bool(run["blend_converged"].values[b]),
                           chi2=float(run["blend_chi2"].values[b]), model_psf=model_psf,
                           flags=int(run["blend_flags"].values[b]), extra={"config": config})
    return init


def _shared_gradient(tasks, records, config):
    """The field's colour gradient (``DeblendConfig.shared_gradient``): one
    alpha per band, the weighted least squares over every fitted blend's
    one-component sources (each blend's sums from the fit), then those
    blends' spectra re-solved with it (docs/design.md, "Colours of faint
    sources"). Returns (alpha, its S/N z per band), None when no blend had
    such sources."""
    from .gradient import GRADIENT_MAX, GRADIENT_Z, shared_gradient_spectra

    fitted = [r for r in records if getattr(r, "gradient_sums", None) is not None]
    if not fitted:
        return None
    sums = np.sum([r.gradient_sums for r in fitted], axis=0)
    alpha = np.clip(np.where(sums[1] > 0, sums[0] / np.where(sums[1] > 0, sums[1], 1.0), 0.0),
                    -GRADIENT_MAX, GRADIENT_MAX)
    # z: alpha over its standard error (the weights are inverse variances);
    # a gradient the field's data do not resolve is shrunk towards none
    z = np.where(sums[1] > 0, sums[0] / np.sqrt(np.where(sums[1] > 0, sums[1], 1.0)), 0.0)
    alpha = alpha * np.clip(1 - GRADIENT_Z ** 2 / np.maximum(z ** 2, 1e-30), 0, None)
    by_index = {t.index: t for t in tasks}
    for rec in fitted:
        t = by_index[rec.index]
        peaks = np.asarray(rec.peaks, np.float64) - [t.bbox[0], t.bbox[1]]
        rec.sources, dloss = shared_gradient_spectra(t.images, t.variance, t.bad, t.footprint, t.psfs,
                                                     peaks, rec.sources, alpha, config)
        loss = -rec.log_likelihood
        if loss > 0:
            rec.chi2 *= (loss + dloss) / loss
        rec.log_likelihood -= dloss
        del rec.gradient_sums
    return alpha, z


def _number_found_peaks(records, parents):
    """Give the peaks the deblender found (id -1) ids after the parents' largest,
    in record order (so a run's ids do not depend on the order blends finished)."""
    ids = parents["peak_id"].values
    nxt = int(ids.max()) + 1 if ids.size else 1
    for rec in sorted(records, key=lambda r: r.index):
        new = np.flatnonzero(np.asarray(rec.peak_ids) < 0)
        if new.size:
            rec.peak_ids = np.asarray(rec.peak_ids, np.int64).copy()
            rec.peak_ids[new] = np.arange(nxt, nxt + new.size)
            nxt += new.size


def _on_terminal() -> bool:
    return sys.stderr.isatty()


MODEL_PSF_MAX_RATIO = 0.75  # model-frame PSF sigma at most this fraction of the narrowest band's


def model_psf_for(config: DeblendConfig, psfs) -> DeblendConfig:
    """``config`` with a model-frame PSF narrower than every band's PSF.

    The model frame is partially deconvolved: each band's PSF is the model
    PSF convolved with a difference kernel, which does not exist when the band
    PSF is the narrower (undersampled or space-like data). With the default
    0.8 px model PSF a 0.6 px band PSF left a galaxy at 12 % of its flux, the
    fit "converged", nothing flagged. The model PSF's sigma is lowered to
    ``MODEL_PSF_MAX_RATIO`` times the narrowest band PSF's Gaussian-equivalent
    sigma (FWHM / 2.355) when it exceeds that, with one warning line; the run's
    config records the sigma used. PSFs of the simulator and of HSC (sigma
    1.2-1.9 px) are untouched.
    """
    from ..detect.psf_size import psf_fwhm_linear

    sigmas = [psf_fwhm_linear(np.asarray(p, np.float64)) / 2.3548 for p in psfs]
    narrowest = min((s for s in sigmas if np.isfinite(s) and s > 0), default=None)
    if narrowest is None or config.model_psf_sigma <= MODEL_PSF_MAX_RATIO * narrowest:
        return config
    sigma = round(MODEL_PSF_MAX_RATIO * narrowest, 3)
    sys.stderr.write(f"scarletstore: warning: the narrowest band PSF (sigma {narrowest:.2f} px) is "
                     f"narrower than the model PSF allows; model_psf_sigma {config.model_psf_sigma:g}"
                     f" -> {sigma:g} px\n")
    return dataclasses.replace(config, model_psf_sigma=sigma)


def deblend_exposure(exposure: xr.Dataset, parents: xr.Dataset, config: DeblendConfig | None = None,
                     method: str = "scarlet", *, blend_ids=None, workers: int = 1,
                     scheduler: str | None = None, name: str = "run", show_progress: bool = False,
                     first_source_id: int = 1, exposure_checksum: str = "", parents_checksum: str = "",
                     init=None, from_run: str = "", as_frame: bool = False) -> xr.Dataset:
    """Deblend every parent and return the run Dataset (schema ``run``).

    ``exposure`` and ``parents`` may be Datasets or the store's Frames
    (:mod:`scarletstore.store.frame`); with ``as_frame`` the run is a Frame
    too (the command line writes it without importing xarray).

    Parameters
    ----------
    init : callable, optional
        ``init(parent_id, bbox, peak_ids) -> BlendResult | None``: stored models to
        warm-start from (see :func:`init_from_run`).
    """
    config = config or DeblendConfig()
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose scarlet or sdss")
    if method == "scarlet":
        config = model_psf_for(config, np.asarray(exposure["psf"].values))
    if workers < 1:
        raise InputError("--workers must be at least 1")
    tasks, records = make_tasks(exposure, parents, config, blend_ids,
                                fit_isolated=method == "scarlet" and config.isolated_model)
    if init is not None:
        for task in tasks:
            # a split parent starts cold: its pieces have no stored fit of their own
            task.init = None if task.pieces else init(task.parent_id, task.bbox, task.peak_ids)
    warmup = 0.0
    if tasks:
        if show_progress and _on_terminal() and kernels_cold(method):
            # a notice like the progress bars: on a terminal only, quiet when piped
            print("compiling kernels (first run only)...", file=sys.stderr, flush=True)
        # in this process too with workers: it fills the on-disk cache they load
        warmup = warm_kernels(method, config, tasks[0].psfs)
    model_psf = None
    bar = progress(total=len(tasks), desc=f"deblend ({method})", enabled=show_progress, unit="blend")
    with bar:
        for rec in _run_tasks(tasks, method, config, workers, scheduler, show_progress):
            if model_psf is None and getattr(rec, "model_psf", None) is not None:
                model_psf = rec.model_psf
            records.append(rec)
            bar.update(1)
    _number_found_peaks(records, parents)
    gradient = _shared_gradient(tasks, records, config) if method == "scarlet" and config.shared_gradient else None
    if model_psf is None:
        if method == "scarlet":
            from .psf import gaussian_psf
            model_psf = gaussian_psf(config.model_psf_sigma)
        else:
            model_psf = np.ones((1, 1), np.float32)  # observed-frame models: identity
    from .. import __version__  # looked up only when a run is built (importlib.metadata)

    run = build_run(records, list(exposure.band.values), exposure["psf"].values, model_psf,
                    name=name, method=method, config_json=config.to_json(),
                    package_version=__version__, exposure_checksum=exposure_checksum,
                    parents_checksum=parents_checksum, from_run=from_run,
                    first_source_id=first_source_id, frame=as_frame)
    # kept out of every blend's runtime; compile (cold cache) or cache loading
    run.attrs["kernel_warmup_seconds"] = float(warmup)
    if gradient is not None:
        # the field's colour gradient per band and its S/N (DeblendConfig.shared_gradient)
        run.attrs["shared_gradient"] = json.dumps([float(a) for a in gradient[0]])
        run.attrs["shared_gradient_z"] = json.dumps([round(float(a), 2) for a in gradient[1]])
    # which parents were deblended in pieces, and in how many (flag "split" marks them too)
    run.attrs["split_pieces"] = json.dumps({str(t.parent_id): len(t.pieces) for t in tasks if t.pieces})
    return run
