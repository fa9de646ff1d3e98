"""Forced photometry benchmark: cost per (source, visit).

``python benchmarks/bench_forced.py [N_SOURCES] [N_VISITS]`` builds a store
of N_SOURCES (default 60) elliptical Gaussian sources on a 256 x 256 grid,
in overlapping pairs on a jittered lattice (the layout of ``tests/test_forced.py``), and
N_VISITS (default 4) analytic visits with their own rotation, pixel scale,
PSF and zero point; it times :func:`forced_photometry` (after one warm-up
visit, so numba compilation is not counted) and prints the wall time per
(source, visit) and the split between the per-visit set-up (WCS mapping,
PSF warp, kernels, reading) and the per-blend work, plus the flux accuracy
against the injected values (noise-free, so it is the method's own error).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.test_forced as tf  # noqa: E402  (the analytic visit writer)
from scarletstore.measure.forced import render  # noqa: E402
from scarletstore.measure.forced.run import _grid_wcs, forced_photometry, load_models  # noqa: E402


def main(n_sources=60, n_visits=4):
    rng = np.random.default_rng(1)
    tf.N = 256
    sources, blends = [], []
    side = int(np.ceil(np.sqrt(n_sources / 2)))
    step = (tf.N - 60) / side
    for k in range(n_sources // 2):
        # pairs on a jittered lattice: parents ~40 px apart, as detection separates them
        x = 30 + (k % side + 0.5 + rng.uniform(-0.1, 0.1)) * step
        y = 30 + (k // side + 0.5 + rng.uniform(-0.1, 0.1)) * step
        a = len(sources)
        sources.append((x, y, [[2.0, 0.5], [0.5, 1.5]], float(rng.uniform(100, 1000))))
        sources.append((x + 4.0, y + 1.5, [[1.2, 0.0], [0.0, 1.2]], float(rng.uniform(100, 1000))))
        blends.append([a, a + 1])
    factors = tuple(1.0 for _ in sources)
    tf.VISITS = [(r, d, s, p, z, factors) for r, d, s, p, z, _ in
                 (tf.VISITS * (n_visits // len(tf.VISITS) + 1))[:n_visits]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tf.make_store(tmp / "s.h5", sources, blends)
        paths = []
        for k in range(n_visits):
            p = tmp / f"v{k}.fits"
            tf.write_visit(p, k, sources=sources, size=int(tf.N * 1.25))
            paths.append(p)
        forced_photometry(store, "t", paths[:1])  # warm-up: compile / load the kernels
        t0 = time.perf_counter()
        ds = forced_photometry(store, "t", paths)
        wall = time.perf_counter() - t0
        models = load_models(store, "t")
        from scarletstore.coadd.visits import read_visit

        t0 = time.perf_counter()
        for p in paths:
            v = read_visit(p)
            render.visit_frame(v, _grid_wcs(models.grid_wcs), models.grid_shape, models.model_psf,
                               models.coadd_psf[0])
            v.load()
        setup = time.perf_counter() - t0
    n = n_sources * n_visits
    truth = np.array([s[3] for s in sources])
    rel = ds["flux"].values.reshape(n_visits, -1) / truth - 1
    print(f"forced: {n_sources} sources x {n_visits} visits ({tf.N}x{tf.N} grid, "
          f"{int(tf.N * 1.25)}^2-pixel visits): {wall:.2f} s, "
          f"{1e3 * wall / n:.2f} ms per (source, visit); per-visit set-up {1e3 * setup / n_visits:.0f} ms "
          f"({100 * setup / wall:.0f} %), blends {1e3 * (wall - setup) / n:.2f} ms per (source, visit)")
    print(f"flux error (noise-free): median |rel| {np.median(np.abs(rel)):.2e}, max {np.abs(rel).max():.2e}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
