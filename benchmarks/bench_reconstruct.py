"""Speed of rebuilding catalogs and heavy footprints from a store (issue: lazy catalogs).

Figures printed:
* one child's heavy footprint in one band (model and redistributed), per call,
  with an open catalog (warm) and through ``Store.footprint`` (opens the run);
* the whole r-band catalog of the 600x600 simulated field (seed 7), model mode
  and redistributed, median of several runs;
* opening a store with 10,000 blends and reading one blend's models;
* peak Python memory of a band catalog export for stores of 2,000 and 10,000
  blends (it should grow with the output columns, not the morphologies).
Numba compile time is reported apart (first call in this process).
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import field_store, timed  # noqa: E402


def synthetic_store(path, n_blends, bands=("g", "r", "i"), seed=0):
    """A store with an n_blends run of two-source blends (models only), for I/O figures."""
    from scarletstore.deblend.psf import gaussian_psf
    from scarletstore.store.components import Component, SourceResult
    from scarletstore.store.runs import BlendRecord, build_run
    from scarletstore.store.store import Store

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:15, :15] - 7
    records = []
    side = int(np.ceil(np.sqrt(n_blends)))
    for i in range(n_blends):
        y0, x0 = 30 * (i // side), 30 * (i % side)
        sources = []
        for j in range(2):
            s = rng.uniform(1.5, 3.0)
            morph = np.exp(-(xx**2 + yy**2) / (2 * s * s)).astype(np.float32)
            sources.append(SourceResult(j, [Component(rng.uniform(1, 10, len(bands)).astype(np.float32),
                                                      morph, 3 + 5 * j, 3 + 4 * j, (10.0 + 5 * j, 10.0 + 4 * j))]))
        records.append(BlendRecord(index=i, parent_id=i + 1, bbox=(y0, x0, 28, 28),
                                   peak_ids=np.array([2 * i + 1, 2 * i + 2]),
                                   peaks=np.array([[y0 + 10.0, x0 + 10.0], [y0 + 15.0, x0 + 14.0]]),
                                   sources=sources, iterations=10, log_likelihood=-1.0, chi2=1.0,
                                   converged=True))
    psf = np.stack([gaussian_psf(1.5 + 0.1 * k, 15) for k in range(len(bands))])
    run = build_run(records, list(bands), psf, gaussian_psf(0.8), name="big", method="scarlet",
                    config_json="{}", package_version="bench")
    Store.create(path, {"runs/big": run})
    return Store(path)


def main():
    from scarletstore.measure.catalog import BlendMeasurer, export_catalog
    from scarletstore.store.store import Store

    print("== field: simulate --size 600 --seed 7, ugrizy; scarlet run with defaults")
    store, _ = field_store()
    run = store.read("runs/scarlet")
    n_rows = run.sizes["source"]
    print(f"   {run.sizes['blend']} parents, {n_rows} children")

    t0 = time.perf_counter()
    m = BlendMeasurer(store, "scarlet", "r")
    ids = run["source_id"].values
    m.heavy_footprint(int(ids[0]))
    m2 = BlendMeasurer(store, "scarlet", "r", redistribute=True)
    m2.heavy_footprint(int(ids[0]))
    store.catalog("r").isel(row=[0]).compute()
    print(f"first calls incl. numba compile/cache load: {time.perf_counter() - t0:.2f} s")

    rng = np.random.default_rng(1)
    pick = rng.choice(ids, size=min(50, len(ids)), replace=False)
    for label, meas in (("model", m), ("redistributed", m2)):
        def all_fp():
            for sid in pick:
                meas.heavy_footprint(int(sid))
        med, _ = timed(all_fp, repeat=5)
        print(f"one child's footprint, band r, {label}, open catalog: {1e3 * med / len(pick):.2f} ms "
              f"(median of 5 passes over {len(pick)} children)")
    med, _ = timed(lambda: store.footprint(int(pick[0]), "r"), repeat=7)
    print(f"one child's footprint via Store.footprint (opens the run each call): {1e3 * med:.1f} ms")

    out = Path(tempfile.mkdtemp()) / "cat.fits"
    for redis in (False, True):
        med, times = timed(lambda: export_catalog(store.catalog("r", run="scarlet", redistribute=redis), out),
                           repeat=5)
        print(f"whole r-band catalog ({n_rows} rows), {'redistributed' if redis else 'model'} mode: "
              f"{med:.3f} s median of 5 ({', '.join(f'{t:.3f}' for t in times)})")

    print("== synthetic stores (models only, 28x28 blends, 2 sources each)")
    tmp = Path(tempfile.mkdtemp())
    big = synthetic_store(tmp / "big.h5", 10_000)
    print(f"   10,000-blend store: {(tmp / 'big.h5').stat().st_size / 1e6:.1f} MB")

    def open_one():
        blend = Store(tmp / "big.h5").blend("big", 7321)
        assert len(blend.sources) == 2
    med, times = timed(open_one, repeat=7)
    print(f"open store + read one blend's models (10,000 blends): {1e3 * med:.1f} ms median of 7")

    for n in (2_000, 10_000):
        s = big if n == 10_000 else synthetic_store(tmp / f"s{n}.h5", n)
        tracemalloc.start()
        export_catalog(s.catalog("r", run="big"), tmp / f"c{n}.fits")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        run_b = s.read("runs/big")
        print(f"catalog export, {n:>6} blends / {2 * n} rows: peak traced memory {peak / 1e6:.1f} MB "
              f"({peak / (2 * n):.0f} B per row; morphologies in the store {run_b['morph'].nbytes / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
