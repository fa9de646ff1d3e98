"""Tracts of patches from the simulator's visits (issue: survey scale; see bench_scale.py).

One simulated field (``SIZE`` pixels square, 3 visits in g and r, bright
stars on a lattice) is run as a 1x1 tract (the single-patch reference) and
as 2x2 and 3x3 tracts, each with 1 worker (in this process) and 2 workers
(a dask LocalCluster, reached through ``--scheduler``, so its start-up is
timed apart). Printed per tract:

* duplicate primaries (pairs of primaries closer than 1 pixel; must be 0)
  and the primaries against the 1x1 run: recall (1x1 primaries with a 2x2 /
  3x3 primary within 1 pixel) and median |dflux| / flux and / flux_err (r);
* wall time for 1 and 2 workers; per-patch cost (median wall and CPU of a
  task); scheduling overhead = wall - sum(task wall) / workers; peak worker
  memory (``getrusage`` in the task, returned with its result);
* a paper projection from those figures to a 10,000-patch survey on a
  1,000-worker cluster (formula printed with the number), from the 3x3 tract
  on 2 workers (warm: the 2x2 tract ran on the same workers first).

Columns: ``recall`` / ``rec3px`` match within 1 / 3 pixels; ``ovh s`` the
scheduling overhead; ``peak MB`` the largest worker peak RSS, ``grow MB``
the largest rise of a worker's memory during one task (peak less the memory
at its start; the peak is the task's own where Linux lets it be reset).

``python benchmarks/bench_tract.py [SIZE] [DIR]`` (default 320 and a folder
under the benchmark cache). Wall times depend on the machine's load; the
CPU seconds do not.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE  # noqa: E402

LAYOUTS = (("1x1", 0), ("2x2", 64), ("3x3", 64))
SURVEY_PATCHES, SURVEY_WORKERS = 10_000, 1_000
RUBIN_PATCH = 4200  # pixels on a side of a Rubin patch with its border (4000 + 2 x 100)


def simulated_visits(size, root):
    from scarletstore.simulate.visits import simulate_visits

    out = root / f"visits-{size}"
    if not (out / "truth.fits").exists():
        simulate_visits(out, n_visits=3, size=size, seed=21, bands="gr", density=100,
                        n_stars=max(4, (size // 64) ** 2))
    return sorted(out.glob("visit_*.fits")), out / "grid.fits"


def run_one(root, visits, grid, patches, overlap, workers, scheduler):
    """Plan, run and merge one tract; returns its index, catalog columns and wall seconds."""
    from scarletstore.tract.merge import tract_catalog
    from scarletstore.tract.run import plan_tract, run_tract

    out = root / f"tract-{patches}-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    plan = plan_tract(out, visits, grid, patches, overlap)
    t0 = time.perf_counter()
    index = run_tract(plan, workers=workers, scheduler=scheduler)
    wall = time.perf_counter() - t0
    bad = [e["name"] for e in index["patches"] if e["status"] != "done"]
    if bad:
        raise SystemExit(f"patches failed: {bad}")
    columns, _, _ = tract_catalog(out, "r")
    return index, columns, wall


def duplicate_pairs(cols, radius=1.0) -> int:
    from scipy.spatial import cKDTree

    p = cols["is_primary"]
    return len(cKDTree(np.c_[cols["x"][p], cols["y"][p]]).query_pairs(radius))


def against_single(cols, ref, radius=1.0):
    """Recall of the single-patch primaries and the flux agreement of the matched ones."""
    from scipy.spatial import cKDTree

    a, b = cols["is_primary"], ref["is_primary"]
    d, j = cKDTree(np.c_[cols["x"][a], cols["y"][a]]).query(np.c_[ref["x"][b], ref["y"][b]])
    m = d < radius
    fa, fb, eb = cols["flux"][a][j[m]], ref["flux"][b][m], ref["flux_err"][b][m]
    ok = np.isfinite(eb) & (fb > 0)
    return {"recall": m.mean(), "n_ref": int(b.sum()), "n": int(a.sum()),
            "rel": float(np.median(np.abs(fa - fb)[ok] / fb[ok])),
            "sig": float(np.median(np.abs(fa - fb)[ok] / eb[ok]))}


def costs(index, wall, workers) -> dict:
    p = index["patches"]
    task_wall = [e["seconds"] for e in p]
    return {"wall": wall, "task_wall": statistics.median(task_wall),
            "task_cpu": statistics.median(e["cpu_seconds"] for e in p),
            "overhead": wall - sum(task_wall) / workers,
            "driver": index["driver"]["handling_seconds"] / len(p),
            "rss": max(e["peak_rss_mb"] for e in p),
            "growth": max(e["peak_rss_mb"] - e["peak_rss_before_mb"] for e in p),
            "pixels": statistics.median(e["outer"]["height"] * e["outer"]["width"] for e in p),
            "stages": {k: statistics.median(e["stage_cpu_seconds"][k] for e in p)
                       for k in p[0]["stage_cpu_seconds"]},
            "n": len(p)}


def print_projection(c, start):
    """Survey wall time from one tract's per-patch cost and per-task overheads."""
    n, w = SURVEY_PATCHES, SURVEY_WORKERS
    rounds = math.ceil(n / w)
    o_sched = max(c["overhead"], 0.0) / c["n"]
    print(f"projection to N = {n} patches on W = {w} workers, from the 3x3 tract on 2 workers:")
    print(f"  t_patch = {c['task_cpu']:.2f} s (median task CPU: a worker with its own core; "
          f"{c['task_wall']:.2f} s wall here, cores shared), o_driver = {c['driver'] * 1e3:.1f} ms "
          f"(driver's serial time per result), o_sched = {o_sched:.2f} s (overhead per task: "
          f"(wall - sum task wall / workers) / tasks), t_start = {start:.1f} s (cluster start)")
    low = start + rounds * c["task_cpu"] + n * c["driver"]
    high = start + rounds * c["task_wall"] + n * o_sched
    print(f"  T = t_start + ceil(N/W) t_patch + N o_driver = {start:.1f} + {rounds} x "
          f"{c['task_cpu']:.2f} + {n} x {c['driver']:.4f} = {low:.0f} s")
    print(f"  bound, task wall as measured here and all overhead serial: T = t_start + ceil(N/W) "
          f"t_wall + N o_sched = {start:.1f} + {rounds} x {c['task_wall']:.2f} + {n} x {o_sched:.2f} "
          f"= {high:.0f} s")
    scale = RUBIN_PATCH**2 / c["pixels"]
    print(f"  Rubin-sized patches ({RUBIN_PATCH} px, {scale:.0f}x the pixels; cost and memory "
          f"growth taken proportional to pixels at this depth, visit count and density): "
          f"t_patch {c['task_cpu'] * scale:.0f} s, T = {rounds} x {c['task_cpu'] * scale:.0f} s = "
          f"{rounds * c['task_cpu'] * scale / 3600:.1f} h; memory over the worker's base "
          f"{c['growth']:.0f} MB x {scale:.0f} = {c['growth'] * scale / 1e3:.1f} GB per worker")


def main():
    from scarletstore.parallel import dask_client

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 320
    root = Path(sys.argv[2]) if len(sys.argv) > 2 else CACHE / "tract"
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    visits, grid = simulated_visits(size, root)
    print(f"field {size}x{size} px, {len(visits)} visits (g, r); simulated/cached in "
          f"{time.process_time() - t0:.1f} s CPU")
    results = {}
    for patches, overlap in LAYOUTS:
        results[(patches, 1)] = run_one(root, visits, grid, patches, overlap, 1, None)
    t0 = time.perf_counter()
    with dask_client(2, None) as client:
        address = client.scheduler.address
        start = time.perf_counter() - t0
        for patches, overlap in LAYOUTS[1:]:
            results[(patches, 2)] = run_one(root, visits, grid, patches, overlap, 2, address)
    print(f"LocalCluster of 2 workers started in {start:.1f} s (not in the walls below)")
    ref = results[("1x1", 1)][1]
    print(f"1x1 reference: {int(ref['is_primary'].sum())} primaries")
    head = (f"{'tract':5s} {'workers':>7s} {'patches':>7s} {'outer px':>8s} {'rows':>5s} {'prim':>5s} "
            f"{'dupl':>4s} {'recall':>6s} {'rec3px':>6s} {'|df|/f':>7s} {'|df|/err':>8s} {'wall s':>7s} "
            f"{'task s':>7s} {'task cpu':>8s} {'ovh s':>6s} {'peak MB':>7s} {'grow MB':>7s}")
    print(head)
    for (patches, workers), (index, cols, wall) in results.items():
        c = costs(index, wall, workers)
        a, a3 = against_single(cols, ref), against_single(cols, ref, 3.0)
        print(f"{patches:5s} {workers:7d} {c['n']:7d} {math.sqrt(c['pixels']):8.0f} {len(cols['x']):5d} "
              f"{a['n']:5d} {duplicate_pairs(cols):4d} {a['recall']:6.3f} {a3['recall']:6.3f} {a['rel']:7.4f} "
              f"{a['sig']:8.3f} {wall:7.1f} {c['task_wall']:7.2f} {c['task_cpu']:8.2f} "
              f"{c['overhead']:6.1f} {c['rss']:7.0f} {c['growth']:7.0f}")
    for patches in ("2x2", "3x3"):
        c = costs(results[(patches, 2)][0], results[(patches, 2)][2], 2)
        stages = ", ".join(f"{k} {v:.2f}" for k, v in c["stages"].items())
        print(f"{patches} per-patch CPU by stage (median s, 2 workers): {stages}")
    print_projection(costs(results[("3x3", 2)][0], results[("3x3", 2)][2], 2), start)


if __name__ == "__main__":
    main()
