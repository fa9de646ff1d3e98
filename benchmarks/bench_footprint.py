"""Per-call cost of ``Store.footprint`` on one Store object (issue: per-call cost).

On the 600x600 six-band simulated field (seed 7, scarlet run): one source per
blend in random order, so every call rebuilds a different blend; median and
90th percentile over all blends, model and redistributed, and the first call
on a fresh Store (validation plus set-up). ``python bench_footprint.py [STORE]``
uses an existing store holding a run named ``scarlet`` instead.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import field_store  # noqa: E402


def main():
    from scarletstore.store.store import Store

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else field_store()[0].path
    store = Store(path)
    run = store.read("runs/scarlet")
    ids, ns = run["source_id"].values, run["blend_n_sources"].values
    first = np.concatenate([[0], np.cumsum(ns)[:-1]])[ns > 0]
    pick = np.random.default_rng(0).permutation(ids[first])
    Store(path).footprint(int(pick[0]), "r")  # numba compile or cache load, on another object
    t0 = time.perf_counter()
    store.footprint(int(pick[0]), "r")
    cold = time.perf_counter() - t0
    for redistribute in (False, True):
        times = []
        for sid in pick[1:]:
            t0 = time.perf_counter()
            store.footprint(int(sid), "r", redistribute=redistribute)
            times.append(time.perf_counter() - t0)
        print(f"footprint redistribute={redistribute}: median {1e3 * statistics.median(times):.2f} ms, "
              f"90th percentile {1e3 * np.percentile(times, 90):.2f} ms over {len(times)} blends")
    print(f"first call on a fresh Store: {1e3 * cold:.1f} ms")


if __name__ == "__main__":
    main()
