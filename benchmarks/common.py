"""Shared set-up for the benchmark scripts (simulated fields, timing helpers)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CACHE = Path(os.environ.get("SCARLETSTORE_BENCH_DIR", Path(tempfile.gettempdir()) / "scarletstore-bench"))


def timed(fn, repeat=5, warmup=1):
    """Median and all wall times (s) of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def simulated_field(size=600, seed=7, bands="ugrizy"):
    """Simulate (once, cached on disk) and return the simulator's output paths."""
    from scarletstore.simulate.field import simulate_field

    out = CACHE / f"sim-{size}-{seed}-{bands}"
    if not (out / "truth_images.npz").exists():
        simulate_field(out, size=size, seed=seed, bands=bands)
    return {"bands": {b: out / f"{b}.fits" for b in bands}, "truth": out / "truth.fits",
            "truth_images": out / "truth_images.npz", "dir": out}


def field_store(size=600, seed=7, bands="ugrizy", runs=("scarlet",)):
    """A store of the simulated field with exposure, parents and the named runs (cached)."""
    from scarletstore.deblend import DeblendConfig
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import read_fits_bands
    from scarletstore.store.store import Store

    sim = simulated_field(size, seed, bands)
    path = CACHE / f"field-{size}-{seed}-{bands}.h5"
    if not path.exists():
        exposure = read_fits_bands(list(sim["bands"].values()))
        Store.create(path, {"exposure": exposure, "parents": detect(exposure)})
    store = Store(path)
    for method in runs:
        if method not in store.runs():
            run = deblend_exposure(store.read("exposure"), store.read("parents"), DeblendConfig(),
                                   method, name=method)
            store.write({f"runs/{method}": run})
    return store, sim
