"""Running a tract: one task per patch (coadd -> detect -> deblend into its own store).

:func:`plan_tract` checks every input (grid, visits, patches, the output
folder) before anything is written; :func:`run_tract` then runs
:func:`process_patch` for each patch, in this process (one worker) or as
tasks on dask.distributed (:mod:`scarletstore.parallel`), retries a failed
patch once, and rewrites the tract index after every patch that finishes.

:func:`plan_resume` takes an interrupted or partly failed tract up again
from its index: the same grid, visits and patches (checked against what the
index recorded, down to each visit's size and modification time), and jobs
for the patches that are not done.

A patch's task receives the headers of the visits that overlap its outer
box only and reads their pixels itself, so a worker holds one patch (its
visits are streamed through the coadd's spill files). It builds its store
in a temporary folder beside the tract and renames the folder into place:
a patch is either complete or absent, and a retry starts clean. Each task
runs single-threaded in one process and in the same order of operations
whichever worker runs it, so the stores (and the tract catalog) do not
depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import InputError
from .index import FORMAT, INDEX, VERSION, IndexWriter, patch_entry, read_index
from .patches import Patch, cut_patches, parse_patches

MAX_ATTEMPTS = 2  # a failed patch is tried once more before it is recorded as failed


@dataclass
class PatchJob:
    """Everything one patch's task needs (small: headers, not pixels)."""

    patch: Patch
    grid: object  # coadd.visits.Grid of the patch's outer box
    visits: list  # coadd.visits.Visit headers of the visits overlapping the outer box
    out_dir: Path
    threshold: float = 5.0
    overrides: list = field(default_factory=list)  # deblend configuration KEY=VALUE
    attempt: int = 1


@dataclass
class TractPlan:
    """A checked tract request: the grid, the patches and one job per patch."""

    out_dir: Path
    grid: object
    visits: list
    patches: list
    jobs: list
    bands: list
    overlap: int
    shape: tuple  # (nx, ny) patches


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: directory is not empty; make a tract in a new or empty one")
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{out_dir}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{out_dir}: the directory {parent} is not writable")


def plan_tract(out_dir, visit_paths, grid_path, patches: str, overlap: int, bands=None,
               threshold: float = 5.0, overrides=None) -> TractPlan:
    """Check a tract request and cut it into patch jobs; nothing is written.

    Every patch must be overlapped by a visit of every band (else its coadd
    would lack bands that its neighbours have); InputError otherwise.
    """
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir)
    return _plan(out_dir, visit_paths, grid_path, patches, overlap, bands, threshold, overrides)


def _plan(out_dir: Path, visit_paths, grid_path, patches, overlap, bands, threshold, overrides):
    from ..coadd.visits import overlaps, read_grid, read_visits, sub_grid
    from ..deblend.config import DeblendConfig

    nx, ny = parse_patches(patches)
    if not threshold > 0:
        raise InputError(f"--threshold must be positive, got {threshold:g}")
    DeblendConfig().with_overrides(list(overrides or []))  # its one-line messages, before any work
    grid = read_grid(grid_path)
    cut = cut_patches(grid.shape, nx, ny, int(overlap))
    visits = read_visits(visit_paths, grid, bands=bands)
    bands = list(dict.fromkeys(v.band for v in visits))
    jobs = []
    for patch in cut:
        o = patch.outer
        pgrid = sub_grid(grid, o.y0, o.x0, o.height, o.width)
        mine = [v for v in visits if overlaps(v, pgrid)]
        lacking = [b for b in bands if not any(v.band == b for v in mine)]
        if lacking:
            raise InputError(f"{patch.name}: no visit in band {', '.join(lacking)} overlaps it")
        jobs.append(PatchJob(patch, pgrid, mine, out_dir, float(threshold), list(overrides or [])))
    return TractPlan(out_dir, grid, visits, cut, jobs, bands, int(overlap), (nx, ny))


def plan_resume(out_dir) -> tuple[TractPlan, dict]:
    """The plan and index of a tract to take up again: jobs for its patches that
    are not done (failed, or pending after an interrupt); nothing is written.

    The grid, the visits and the patches are the index's. A grid whose shape
    or WCS changed, a visit missing or rewritten (size or modification time),
    or another cut of patches would mix two tracts in one folder: InputError,
    one line, naming what changed.
    """
    out_dir = Path(out_dir).absolute()
    index = read_index(out_dir)
    try:
        grid, stats = index["grid"], index.get("visit_stats") or {}
        nx, ny = index["patches_shape"]
        plan = _plan(out_dir, index["visits"], grid["path"], f"{nx}x{ny}", index["overlap"],
                     index["bands"], index["threshold"], index.get("deblend_overrides"))
    except KeyError as exc:
        raise InputError(f"{out_dir / INDEX}: has no {exc.args[0]!r}; not a tract index this "
                         "scarletstore can resume") from None
    if list(plan.grid.shape) != list(grid["shape"]) or plan.grid.wcs_text != grid["wcs"]:
        raise InputError(f"{grid['path']}: the grid's shape or WCS changed since the tract was made")
    for path, recorded in stats.items():
        if _file_stats(path) != recorded:
            raise InputError(f"{path}: the visit changed since the tract was made "
                             "(size or modification time); make the tract in a new folder")
    entries = {e["name"]: e for e in index["patches"]}
    for job in plan.jobs:
        entry = entries.get(job.patch.name)
        visits = [Path(v.path).name for v in job.visits]
        if entry is None or patch_entry(job.patch)["outer"] != entry["outer"] or \
                visits != entry.get("visits", visits):
            raise InputError(f"{out_dir / INDEX}: {job.patch.name} does not match the index; "
                             "make the tract in a new folder")
    for entry in entries.values():
        _recover_finished(entry, out_dir)
        if entry["status"] == "done" and not (out_dir / entry["store"]).is_file():
            entry["status"] = "pending"  # its store was removed since: run it again
    plan.jobs = [j for j in plan.jobs if entries[j.patch.name]["status"] != "done"]
    return plan, index


def _file_stats(path) -> list:
    """A visit file's size and modification time (ns), to see it unchanged on resume."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


def _build_store(path: Path, job: PatchJob) -> dict:
    """coadd -> detect -> deblend of one patch into a new store at ``path``; stage times and counts."""
    from ..coadd.stack import record_relative_paths
    from ..deblend.config import DeblendConfig
    from ..deblend.run import deblend_exposure
    from ..detect.detect import detect
    from ..store.store import Store

    times = {}
    t = time.process_time()
    groups, dropped = _patch_coadd(job)
    record_relative_paths(groups["visits"], path)  # a tract moved with its visits keeps them
    store = Store.create(path, groups)
    times["coadd"], t = time.process_time() - t, time.process_time()
    exposure = store.read("exposure")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. known positions off the patch: nothing to act on here
        parents = detect(exposure, threshold=job.threshold)
    store.write({"parents": parents})
    times["detect"], t = time.process_time() - t, time.process_time()
    run = deblend_exposure(exposure, parents, DeblendConfig().with_overrides(job.overrides), "scarlet",
                           name="scarlet", first_source_id=1,
                           exposure_checksum=store.checksum("exposure"),
                           parents_checksum=store.checksum("parents"))
    name = store.add_run(run, prefix="scarlet")
    times["deblend"] = time.process_time() - t
    return {"run": name, "n_visits": len(job.visits) - len(dropped), "visits_dropped": dropped,
            "n_parents": int(parents.sizes["parent"]), "n_sources": int(run.sizes["source"]),
            "stage_cpu_seconds": times}


def _patch_coadd(job: PatchJob):
    """The patch's coadd groups and the visits left out of it.

    The planner picks a patch's visits by their footprints on the sky; one
    whose pixels there are all masked or NaN (a chip edge, a masked half)
    has nothing to add to this patch, though it has to others: it is left out
    here (and named in the index) rather than failing the patch -- a
    partly masked visit lost half a tract. A band left without visits still
    fails the patch.
    """
    from ..coadd.pipeline import EmptyWarpError, coadd

    visits, dropped = list(job.visits), []
    while True:
        try:
            return coadd(visits, job.grid), dropped
        except EmptyWarpError as exc:
            gone = [v for v in visits if str(v.path) == exc.path]
            if not gone:
                raise
            band = gone[0].band
            visits = [v for v in visits if str(v.path) != exc.path]
            dropped.append(Path(exc.path).name)
            if not any(v.band == band for v in visits):
                raise InputError(f"{job.patch.name}: no visit in band {band} has usable pixels "
                                 f"on it ({', '.join(dropped)} left out)") from None


def process_patch(job: PatchJob) -> dict:
    """Run one patch into ``OUT_DIR/<patch>/store.h5`` (the task shipped to a worker).

    Returns the index fields of a finished patch: run name, counts, wall and
    CPU seconds, and the worker's peak resident memory (``getrusage``) at the
    start and the end of the task. Where Linux lets a process reset its
    high-water mark (``/proc/self/clear_refs``) it is reset first, so the peak
    is this task's (``peak_rss_scope`` "task"); elsewhere it is the process's
    peak so far ("process").
    """
    wall, cpu = time.perf_counter(), time.process_time()
    scope = "task" if _reset_peak_rss() else "process"
    rss_before = _peak_rss_mb()
    final = job.out_dir / job.patch.name
    tmp = job.out_dir / f".{job.patch.name}.{job.attempt}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = _build_store(tmp / "store.h5", job)
        if final.exists():  # left by an attempt whose result never came back
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.update(seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu,
                  peak_rss_mb=_peak_rss_mb(), peak_rss_before_mb=rss_before, peak_rss_scope=scope,
                  worker=f"{socket.gethostname()}:{os.getpid()}")
    return result


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class _InProcess:
    """Jobs run here, one after another, in submission order."""

    def __init__(self):
        self.queue = deque()

    def submit(self, job):
        self.queue.append(job)

    def results(self):
        while self.queue:
            job = self.queue.popleft()
            try:
                yield job, process_patch(job), None
            except Exception as exc:
                yield job, None, exc


class _OnDask:
    """Jobs as dask.distributed tasks; results in completion order."""

    def __init__(self, client):
        from dask.distributed import as_completed

        self.client, self.pending, self.jobs = client, as_completed(), {}

    def submit(self, job):
        fut = self.client.submit(process_patch, job, pure=False,
                                 key=f"tract-{job.patch.name}-{job.attempt}-{os.getpid()}-{id(job)}")
        self.jobs[fut.key] = job
        self.pending.add(fut)

    def results(self):
        for fut in self.pending:  # a retry added while iterating is waited for too
            job = self.jobs.pop(fut.key)
            if fut.status == "error":
                yield job, None, fut.exception()
            else:
                yield job, fut.result(), None
            fut.release()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def new_index(plan: TractPlan) -> dict:
    """The tract index before any patch has run (every patch pending)."""
    from .. import __version__

    return {"format": FORMAT, "version": VERSION, "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "grid": {"path": str(Path(plan.grid.path).absolute()), "shape": list(plan.grid.shape),
                     "wcs": plan.grid.wcs_text},
            "patches_shape": list(plan.shape), "overlap": plan.overlap, "bands": plan.bands,
            "threshold": plan.jobs[0].threshold, "deblend_overrides": plan.jobs[0].overrides,
            "visits": [str(Path(v.path).absolute()) for v in plan.visits],
            "visit_stats": {str(Path(v.path).absolute()): _file_stats(v.path) for v in plan.visits},
            "patches": [dict(patch_entry(j.patch), visits=[Path(v.path).name for v in j.visits])
                        for j in plan.jobs]}


def run_tract(plan: TractPlan, workers: int = 1, scheduler: str | None = None,
              show_progress: bool = False, index: dict | None = None) -> dict:
    """Run every job of ``plan``; return the final tract index (also in ``OUT_DIR/tract.json``).

    A patch whose task raises (or whose worker dies) is submitted once more;
    a second failure marks it ``failed`` with the error in the index. The
    other patches go on either way. ``index`` is the index of a tract taken
    up again (:func:`plan_resume`): its done patches are kept, the others
    start again as ``pending``, and the time is added to its ``resumed``.
    """
    from ..progress import progress

    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    if index is None:
        index = new_index(plan)
    else:
        _resume_index(index, plan)
    entries = {e["name"]: e for e in index["patches"]}
    writer = IndexWriter(plan.out_dir, index)
    writer.write()
    handling = 0.0  # this process's own time per result: the part of the run that is serial
    bar = progress(total=len(plan.jobs), desc="tract", unit="patch", enabled=show_progress)
    try:
        with bar, _executor(workers, scheduler) as ex:
            for job in plan.jobs:
                ex.submit(job)
            for job, result, exc in ex.results():
                t = time.perf_counter()
                _record(entries[job.patch.name], job, result, exc, ex, bar)
                writer.update()
                handling += time.perf_counter() - t
    finally:  # interrupted or not, the index on disk says where each patch stands
        for entry in entries.values():
            _recover_finished(entry, plan.out_dir)
        index["driver"] = {"handling_seconds": handling, "index_writes": writer.writes + 1,
                           "index_seconds": writer.seconds}
        writer.write()
    return index


def _resume_index(index: dict, plan: TractPlan) -> None:
    """Mark the patches about to run ``pending`` again and clear what killed
    attempts left: their ``.patch_i_j.*.tmp`` folders (a task removes its own
    unless the process dies) and stray index temporaries."""
    todo = {j.patch.name for j in plan.jobs}
    for entry in index["patches"]:
        if entry["name"] in todo:
            entry.update(status="pending", attempts=0, error="")
    for leftover in plan.out_dir.glob(".*.tmp"):
        name = leftover.name[1:].split(".")[0]
        if name in todo and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith(f".{INDEX}.") and leftover.is_file():
            leftover.unlink()
    index.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _recover_finished(entry, out_dir: Path) -> None:
    """A patch still ``pending`` whose folder is in place finished after all: its
    task renamed ``.patch_i_j.*.tmp`` to ``patch_i_j`` (a patch is whole or
    absent) but the result never reached this process (an interrupt). Its index
    entry is rebuilt from the store, so ``merge`` takes it instead of calling it
    not done."""
    from ..store.store import Store

    store_path = Path(out_dir) / entry["name"] / "store.h5"
    if entry.get("status") != "pending" or not store_path.is_file():
        return
    try:
        store = Store(store_path)
        run = store.runs()[-1]
        tables = store.run_tables(run)
        n_sources = len(tables.col("source_id"))
        n_parents = int(store.groups()["parents"]["dims"].get("parent", 0))
        if getattr(tables, "file", None) is not None:
            tables.file.close()
    except Exception:  # not a finished store after all: leave it pending
        return
    entry.update(status="done", error="", run=run, n_parents=n_parents, n_sources=n_sources,
                 recovered=True)


def _record(entry, job, result, exc, ex, bar) -> None:
    """Enter one attempt's outcome in the patch's index entry; a first failure is resubmitted."""
    entry["attempts"] = job.attempt
    if exc is None:
        entry.update(status="done", error="", **result)
    elif job.attempt < MAX_ATTEMPTS:
        entry["error"] = _one_line(exc)
        ex.submit(replace(job, attempt=job.attempt + 1))
        bar.set_postfix(retrying=job.patch.name)
        return
    if exc is not None:
        entry.update(status="failed", error=_one_line(exc))
    bar.update(1)
    bar.set_postfix(last=f"{job.patch.name} {entry['status']}")


@contextlib.contextmanager
def _executor(workers, scheduler):
    """In this process for one local worker, else on a dask client (closed on exit)."""
    if scheduler is None and workers <= 1:
        yield _InProcess()
        return
    from ..parallel import dask_client

    with dask_client(workers, scheduler) as client:
        yield _OnDask(client)


def failed_patches(index: dict) -> list[dict]:
    """Index entries of the patches that are not done."""
    return [e for e in index["patches"] if e["status"] != "done"]
