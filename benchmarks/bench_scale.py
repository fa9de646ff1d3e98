"""Time and bytes to add one run to stores of 10 MB, 1 GB and 5 GB (issue: survey scale).

Each store holds synthetic 5-band exposures (noise images and variances,
sparse masks; 4096 x 4096 pixels per GB) written in one ``Store.create``; the
same 300-source run is then added three times and the median time and the
bytes written (new and rewritten files) are printed, for the single-file and
the linked layout (the default) and the single file. Wall and CPU time (the
latter is what a loaded machine does not distort). ``python bench_scale.py
[SIZES_GB] [DIR] [LAYOUTS]``, e.g. ``python bench_scale.py 0.01,1,5 /tmp/bench-scale
linked,single`` (the default).
SIZES_GB is the raw content; linked stores compress variances and masks, so
``0.02,2,9`` gives linked stores of about 10 MB, 1 GB and 5 GB on disk. Check
free disk first: the largest single-file store needs twice its size while a
write runs.

The tract figures of the same issue (patches on dask, duplicate primaries,
agreement with a single-patch run, per-patch cost, scheduling overhead, peak
worker memory and the survey projection) are printed by bench_tract.py.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BANDS = ["g", "r", "i", "z", "y"]


def exposure(ny, nx, seed=0):
    from scarletstore.ingest.exposure import make_exposure

    rng = np.random.default_rng(seed)
    image = rng.normal(0, 1, (5, ny, nx)).astype(np.float32)
    variance = (1 + 0.1 * rng.random((5, ny, nx))).astype(np.float32)
    mask = np.where(rng.random((5, ny, nx)) < 0.02, 32, 0).astype(np.int32)
    y, x = np.mgrid[-12:13, -12:13]
    psf = [np.exp(-(x**2 + y**2) / (2 * 2.0**2)) for _ in BANDS]
    return make_exposure(image, variance, mask, [p / p.sum() for p in psf], BANDS)


def run_dataset(n_sources=300, seed=1):
    """A run of ``n_sources`` single-component sources with 21 x 21 morphologies."""
    from scarletstore.store.components import Component, SourceResult
    from scarletstore.store.runs import BlendRecord, build_run

    rng = np.random.default_rng(seed)
    records = []
    for b in range(n_sources // 3):
        srcs = [SourceResult(k, [Component(rng.random(5).astype(np.float32),
                                           rng.random((21, 21)).astype(np.float32), 30 * b, 10 * k,
                                           (30 * b + 10.0, 10 * k + 10.0))]) for k in range(3)]
        records.append(BlendRecord(index=b, parent_id=b + 1, bbox=(30 * b, 0, 30 * b + 21, 41),
                                   peak_ids=np.arange(3) + 1,
                                   peaks=np.array([[30 * b + 10.0, 10 * k + 10.0] for k in range(3)]),
                                   sources=srcs))
    return build_run(records, BANDS, np.ones((5, 3, 3), np.float32) / 9, np.ones((1, 1), np.float32),
                     name="bench", method="scarlet", config_json="{}", package_version="bench",
                     first_source_id=1)


def files(folder: Path) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}


def measure(folder: Path, size_gb: float, layout: str, run) -> dict:
    from scarletstore.store.store import Store

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    side = int(round(4096 * min(size_gb, 1.0) ** 0.5))
    ex = exposure(side, side)
    copies = max(1, int(round(size_gb)))  # beyond 1 GB: more exposure-sized products
    t0 = time.perf_counter()
    store = Store.create(folder / "s.h5", {"exposure": ex, **{f"exposure{k}": ex for k in range(1, copies)}},
                         layout=layout)
    built = time.perf_counter() - t0
    size = sum(s for _, s in files(folder).values())
    times, cpu, written = [], [], []
    for _ in range(3):
        before = files(folder)
        t0, c0 = time.perf_counter(), time.process_time()
        store.add_run(run)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        after = files(folder)
        written.append(sum(v[1] for p, v in after.items() if before.get(p) != v))
    shutil.rmtree(folder, ignore_errors=True)
    return {"size": size, "built": built, "median": statistics.median(times), "times": times,
            "cpu": statistics.median(cpu), "written": statistics.median(written)}


def main():
    sizes = [float(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0.01,1,5").split(",")]
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/bench-scale")
    layouts = (sys.argv[3] if len(sys.argv) > 3 else "linked,single").split(",")
    run = run_dataset()
    print(f"adding a {run.sizes['source']}-source run ({run.nbytes / 1e6:.1f} MB in memory); median of 3")
    print(f"{'layout':7s} {'store MB':>9s} {'build s':>8s} {'add s':>7s} {'add s (all)':>20s} "
          f"{'add CPU s':>10s} {'written MB':>11s}")
    for layout in layouts:
        for gb in sizes:
            r = measure(root / f"{layout}-{gb}", gb, layout, run)
            print(f"{layout:7s} {r['size'] / 1e6:9.1f} {r['built']:8.1f} {r['median']:7.3f} "
                  f"{' '.join(f'{t:.3f}' for t in r['times']):>20s} {r['cpu']:10.3f} "
                  f"{r['written'] / 1e6:11.2f}", flush=True)


if __name__ == "__main__":
    main()
