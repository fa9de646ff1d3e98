"""Large-parent splitting: a crowded cluster core deblended in pieces within a memory budget.

Builds a cluster-core scene with known truth (numpy, no simulator files):
red elliptical galaxies concentrated towards the centre (a Plummer profile)
over a sprinkling of bluer field galaxies and stars, three bands with
different Gaussian PSFs and Gaussian noise, all in one footprint. The parent
is deblended whole and split under a budget; flux errors against truth,
runtime, and the estimated and measured peak memory of each are printed. The
same sources (fluxes, colours, shapes) are also drawn far apart on a lattice
and deblended one small blend each: the flux errors crowding costs, whatever
the split does.

Usage::

    python benchmarks/bench_split.py [--peaks 520] [--size 600] [--budget-mb 120]
    python benchmarks/bench_split.py --calibrate   # estimate vs peak RSS of whole fits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


SPARSE_STEP = 48  # lattice spacing of the sparse scene: every source isolated


def cluster_scene(n_peaks=520, size=600, seed=3, noise=1.0, sparse=False):
    """(images, variance, psfs, peaks, truth) of a crowded cluster core.

    ``truth`` is (n_peaks, 3) total flux per band; ``peaks`` the true centres.
    Every source is an elliptical Gaussian convolved analytically with the
    band's Gaussian PSF, drawn on a stamp of +-6 sigma (flux outside < 1e-7).
    With ``sparse`` the same sources (same seed: same fluxes, colours and
    shapes) sit on a lattice ``SPARSE_STEP`` pixels apart instead.
    """
    rng = np.random.default_rng(seed)
    n_members = int(0.7 * n_peaks)
    # Plummer projected radii for the members, uniform for the field
    a = 0.18 * size
    u = rng.uniform(0.02, 0.9, n_members)
    r = a * np.sqrt(u / (1 - u))
    t = rng.uniform(0, 2 * np.pi, n_members)
    members = np.stack([size / 2 + r * np.sin(t), size / 2 + r * np.cos(t)], 1)
    field = rng.uniform(15, size - 15, (n_peaks - n_members, 2))
    pos = np.concatenate([members, field])
    pos = np.clip(pos, 12, size - 13)
    member = np.arange(n_peaks) < n_members
    flux = 10 ** rng.uniform(2.3, 4.0, n_peaks)
    colour = np.where(member[:, None], [0.35, 0.75, 1.0], [0.9, 0.8, 0.6])
    colour = colour * rng.uniform(0.85, 1.15, (n_peaks, 3))
    truth = flux[:, None] * colour
    sig_major = rng.uniform(1.2, 3.5, n_peaks)
    q = rng.uniform(0.5, 1.0, n_peaks)
    star = rng.uniform(size=n_peaks) < 0.15
    sig_major[star], q[star] = 0.05, 1.0
    theta = rng.uniform(0, np.pi, n_peaks)
    psf_sigma = np.array([1.7, 1.45, 1.3])
    if sparse:
        side = int(np.ceil(np.sqrt(n_peaks)))
        size = side * SPARSE_STEP
        cell = np.stack(np.divmod(np.arange(n_peaks), side), 1)
        pos = (cell + 0.5) * SPARSE_STEP + rng.uniform(-0.5, 0.5, (n_peaks, 2))
    images = np.zeros((3, size, size))
    for i in range(n_peaks):
        c, s = np.cos(theta[i]), np.sin(theta[i])
        rot = np.array([[c, -s], [s, c]])
        cov0 = rot @ np.diag([sig_major[i] ** 2, (q[i] * sig_major[i]) ** 2]) @ rot.T
        for b in range(3):
            cov = cov0 + np.eye(2) * psf_sigma[b] ** 2
            half = int(np.ceil(6 * np.sqrt(cov.diagonal().max())))
            cy, cx = int(round(pos[i, 0])), int(round(pos[i, 1]))
            ya, yb = max(cy - half, 0), min(cy + half + 1, size)
            xa, xb = max(cx - half, 0), min(cx + half + 1, size)
            yy, xx = np.mgrid[ya:yb, xa:xb]
            d = np.stack([yy - pos[i, 0], xx - pos[i, 1]], -1)
            inv = np.linalg.inv(cov)
            e = np.einsum("...i,ij,...j->...", d, inv, d)
            images[b, ya:yb, xa:xb] += truth[i, b] * np.exp(-0.5 * e) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
    images += rng.normal(0, noise, images.shape)
    yy, xx = np.mgrid[-12:13, -12:13]
    psfs = np.exp(-(yy ** 2 + xx ** 2)[None] / (2 * psf_sigma[:, None, None] ** 2))
    psfs /= psfs.sum(axis=(1, 2), keepdims=True)
    variance = np.full(images.shape, noise ** 2)
    return (images.astype(np.float32), variance.astype(np.float32), psfs.astype(np.float32),
            pos, truth)


def _status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak():
    """Reset VmHWM to the current RSS (ru_maxrss would keep the forking parent's peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(n_peaks, size, budget_mb=0.0, seed=3, max_iter=60):
    """Fit the scene in this process; return a dict of figures (run in a subprocess)."""
    from scarletstore.deblend.config import DeblendConfig
    from scarletstore.deblend.run import warm_kernels
    from scarletstore.deblend.scarlet import deblend_scarlet
    from scarletstore.deblend.split import deblend_pieces, fit_memory, piece_budget, plan_pieces

    images, variance, psfs, peaks, truth = cluster_scene(n_peaks, size, seed)
    config = DeblendConfig(max_iter=max_iter)
    warm_kernels("scarlet", config, psfs)
    # the large-blend (block spectrum) path too, on a tiny blend: kernel loading
    # or compiling is not the fit's memory
    w = cluster_scene(12, 120, seed=2)
    deblend_scarlet(w[0], w[1], None, None, w[2], w[3], DeblendConfig(max_iter=5, max_spectrum_cutoff=0))
    del w
    bad = np.zeros(images.shape, bool)
    fp = np.ones((size, size), bool)
    kshape = psfs.shape[1:]
    _reset_peak()
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    if budget_mb > 0:
        budget = piece_budget(budget_mb * 1e6, 3, size, size)  # as make_tasks does
        pieces = plan_pieces(peaks, fp, 3, budget, config.split_margin, kshape)
        res = deblend_pieces(deblend_scarlet, images, variance, bad, fp, psfs, peaks, pieces, config)
        est = max(p.memory for p in pieces)
        n_pieces = len(pieces)
    else:
        res = deblend_scarlet(images, variance, bad, fp, psfs, peaks, config)
        est = fit_memory(3, size, size, n_peaks, kshape)
        n_pieces = 1
    runtime = time.perf_counter() - start
    peak = _status_mb("VmHWM")
    # model flux per band from the model-frame components (the model PSF has unit sum)
    flux = np.array([sum((c.spectrum * c.morph.sum()) for c in s.components) for s in res.sources])
    err = np.abs(flux / truth - 1)
    return {"n_peaks": n_peaks, "size": size, "pieces": n_pieces, "estimate_mb": est / 1e6,
            "peak_rss_increase_mb": peak - base, "runtime_s": runtime,
            "median_flux_error": float(np.median(err)), "flux": flux.tolist(),
            "iterations": res.iterations, "chi2": float(res.chi2)}


def measure_sparse(n_peaks, size, seed=3, max_iter=60):
    """The same sources isolated: each deblended in its own small blend box."""
    from scarletstore.deblend.config import DeblendConfig
    from scarletstore.deblend.scarlet import deblend_scarlet

    images, variance, psfs, peaks, truth = cluster_scene(n_peaks, size, seed, sparse=True)
    config = DeblendConfig(max_iter=max_iter)
    half = SPARSE_STEP // 2
    flux = np.zeros_like(truth)
    start = time.perf_counter()
    for i, (py, px) in enumerate(peaks):
        y0, x0 = int(round(py)) - half, int(round(px)) - half
        box = (slice(None), slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
        res = deblend_scarlet(images[box], variance[box], None, None, psfs,
                              np.array([[py - y0, px - x0]]), config)
        flux[i] = sum(c.spectrum * c.morph.sum() for c in res.sources[0].components)
    err = np.abs(flux / truth - 1)
    return {"n_peaks": n_peaks, "pieces": n_peaks, "runtime_s": time.perf_counter() - start,
            "median_flux_error": float(np.median(err)), "flux": flux.tolist()}


def _child(args):
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    # numpy backs large arrays with transparent huge pages (madvise), which makes
    # RSS depend on what the kernel has free; off, RSS follows the bytes touched
    env = {**os.environ, "PYTHONPATH": ROOT, "NUMPY_MADVISE_HUGEPAGE": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peaks", type=int, default=520)
    ap.add_argument("--size", type=int, default=600)
    ap.add_argument("--budget-mb", type=float, default=120.0)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        kwargs = json.loads(a.child)
        print(json.dumps(measure_sparse(**kwargs) if kwargs.pop("sparse", False) else measure(**kwargs)))
        return
    if a.calibrate:
        for n, size in ((40, 160), (150, 300), (400, 400), (520, 600)):
            r = _child({"n_peaks": n, "size": size, "max_iter": 20})
            print(f"{n:4d} peaks {size}x{size}: estimate {r['estimate_mb']:7.1f} MB, "
                  f"peak RSS increase {r['peak_rss_increase_mb']:7.1f} MB "
                  f"(ratio {r['estimate_mb'] / max(r['peak_rss_increase_mb'], 1e-9):.2f})")
        return
    from scarletstore.deblend.split import parent_bytes
    whole = _child({"n_peaks": a.peaks, "size": a.size})
    split = _child({"n_peaks": a.peaks, "size": a.size, "budget_mb": a.budget_mb})
    sparse = _child({"n_peaks": a.peaks, "size": a.size, "sparse": True})
    truth = cluster_scene(a.peaks, a.size)[4]
    fw, fs = np.array(whole["flux"]), np.array(split["flux"])
    for name, r in (("whole", whole), (f"split ({a.budget_mb:.0f} MB budget)", split)):
        print(f"{name:28s}: {r['pieces']:3d} piece(s), largest estimate {r['estimate_mb']:7.1f} MB, "
              f"peak RSS increase {r['peak_rss_increase_mb']:7.1f} MB, {r['runtime_s']:6.1f} s, "
              f"median |flux/truth - 1| {100 * r['median_flux_error']:.1f} %, chi2/pixel {r['chi2']:.3f}")
    held = parent_bytes(3, a.size, a.size) / 1e6
    print(f"split fit: parent arrays {held:.1f} MB + peak growth {split['peak_rss_increase_mb']:.1f} MB "
          f"= {held + split['peak_rss_increase_mb']:.1f} MB against the {a.budget_mb:.0f} MB budget")
    rel = np.abs(fs / np.where(fw > 0, fw, np.nan) - 1)
    print(f"split vs whole fit: median |flux ratio - 1| {100 * np.nanmedian(rel):.2f} %, "
          f"90th percentile {100 * np.nanpercentile(rel, 90):.2f} %")
    print(f"the same {a.peaks} sources isolated, one small blend each: {sparse['runtime_s']:.1f} s")
    print_flux_errors(truth, {"whole (crowded)": fw, "split (crowded)": fs,
                              "isolated (sparse)": np.array(sparse["flux"])})


def print_flux_errors(truth, fluxes):
    """|flux / truth - 1| per method (all bands), overall and by brightness tercile."""
    total = truth.sum(axis=1)
    edges = np.quantile(total, [0, 1 / 3, 2 / 3, 1])
    tercile = np.clip(np.searchsorted(edges, total, side="right") - 1, 0, 2)
    print(f"{'children vs truth':20s} {'median':>8s} {'p90':>8s} {'faint':>8s} {'middle':>8s} {'bright':>8s}"
          "   (median |flux/truth - 1|, %)")
    for name, flux in fluxes.items():
        err = np.abs(flux / truth - 1)
        by = [np.median(err[tercile == k]) for k in range(3)]
        print(f"{name:20s} {100 * np.median(err):8.1f} {100 * np.percentile(err, 90):8.1f} "
              + " ".join(f"{100 * v:8.1f}" for v in by))


if __name__ == "__main__":
    main()
