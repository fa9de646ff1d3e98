"""Coadd benchmark: star photometry and shapes, noise, artifacts, speed vs a peer.

On the visits of ``simulate_visits`` (400 x 400 grid, bands g r i, 6 visits
per band, seed 1, 36 bright stars on a lattice plus the field catalogue):

* star aperture flux (r = 12 px) over truth x the coadd PSF's enclosed
  fraction in the same aperture (median of |ratio - 1| and median ratio);
* star size sqrt(Ixx + Iyy) and ellipticity (e1, e2) from Gaussian-weighted
  moments (sigma_w = 3 px, centred on the true position) vs the same
  moments of the coadd PSF;
* robust scatter of image / sqrt(variance) on blank sky (> 15 px from every
  source, no mask bit set) on visits without backgrounds and artifacts;
* on visits with backgrounds and artifacts, without and with artifact
  rejection: residual background (rms of the median S/N in 25 x 25 px
  blank-sky blocks) and the median S/N on the pixels of each band's
  unflagged satellite trail; whether the variable star and the transient
  were rejected;
* speed: the whole ``coadd`` (direct, PSF-matched and likelihood coadds,
  artifact rejection, background matching, sky fit: what ``scarletstore
  coadd`` runs without the store write; grid and visits read inside the
  timing) on the visits with backgrounds and artifacts, against the peer
  (``reproject_interp`` of every visit's image and variance + per-pixel
  inverse-variance mean, PSF = mean of the unwarped visit PSFs, reading
  included) in a separate virtual environment, A/B alternated: CPU
  (``time.process_time`` of each process; the machine is shared, so wall time
  mostly measures the other work) and wall per pair, peer/ours per pair and
  the median; then the CLI call (store written) in a fresh process, and CPU
  per stage (warp, match, reject, background, stacks, likelihood, sky) from
  a cProfile run with a process_time timer. Also the direct coadd alone.

The peer's quality figures are measured the same way on its output.

Usage: python benchmarks/bench_coadd.py [--runs 5] [--speed] [--peer-python /tmp/peer/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import CACHE  # noqa: E402

from scarletstore.coadd.pipeline import coadd  # noqa: E402
from scarletstore.coadd.stack import direct_coadd  # noqa: E402
from scarletstore.coadd.visits import read_grid, read_visits  # noqa: E402

SIZE, BANDS, NVIS, SEED = 400, "gri", 6, 1
AP_RADIUS, W_SIGMA, ISOLATION = 12.0, 3.0, 25.0

PEER = r'''
import sys, time, json, warnings
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_interp
warnings.simplefilter("ignore")
grid_path, out, *paths = sys.argv[1:]
with fits.open(grid_path) as h:
    gh = h["IMAGE"].header
    shape = h["IMAGE"].data.shape
t0, c0 = time.perf_counter(), time.process_time()
bands, sums, psfs = [], {}, {}
for p in paths:
    with fits.open(p) as h:
        hdr = h["IMAGE"].header
        band = hdr["BAND"]
        s = 10 ** (0.4 * (27.0 - hdr["MAGZERO"]))
        img = h["IMAGE"].data.astype(float) * s
        var = h["VARIANCE"].data.astype(float) * s * s
        bad = h["MASK"].data != 0
        img[bad] = np.nan
        w = WCS(hdr)
        psf = h["PSF"].data.astype(float)
    ri, _ = reproject_interp((img, w), gh, shape_out=shape)
    rv, _ = reproject_interp((var, w), gh, shape_out=shape)
    if band not in sums:
        bands.append(band)
        sums[band] = [np.zeros(shape), np.zeros(shape)]
        psfs[band] = []
    ok = np.isfinite(ri) & np.isfinite(rv) & (rv > 0)
    wt = np.where(ok, 1.0 / np.where(ok, rv, 1.0), 0.0)
    sums[band][0] += np.where(ok, ri, 0.0) * wt
    sums[band][1] += wt
    psfs[band].append(psf)
images = np.array([np.where(sums[b][1] > 0, sums[b][0] / np.maximum(sums[b][1], 1e-300), np.nan) for b in bands])
variance = np.array([np.where(sums[b][1] > 0, 1.0 / np.maximum(sums[b][1], 1e-300), np.nan) for b in bands])
psf = np.array([np.mean(psfs[b], axis=0) for b in bands])
elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
np.savez(out, image=images, variance=variance, psf=psf, bands=np.array(bands))
print(json.dumps({"seconds": elapsed, "cpu": cpu}))
'''


def simulated(kind: str, seed: int = SEED):
    from scarletstore.simulate.visits import simulate_visits

    out = CACHE / f"visits-{SIZE}-{seed}-{BANDS}-{NVIS}-{kind}"
    if not (out / "truth_artifacts.fits").exists():
        clean = kind in ("clean", "noiseless")
        simulate_visits(out, n_visits=NVIS, size=SIZE, seed=seed, bands=BANDS, density=60,
                        n_stars=36, background=not clean, artifacts=not clean,
                        noise=kind != "noiseless")
    return out, sorted(out.glob("visit_*.fits")), out / "grid.fits"


def weighted_moments(img, xc, yc, sigma=W_SIGMA):
    """Gaussian-weighted second moments about (xc, yc): size sqrt(Ixx+Iyy), e1, e2."""
    y, x = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(float)
    dx, dy = x - xc, y - yc
    w = np.exp(-0.5 * (dx**2 + dy**2) / sigma**2) * img
    f = w.sum()
    ixx, iyy, ixy = (w * dx * dx).sum() / f, (w * dy * dy).sum() / f, (w * dx * dy).sum() / f
    t = ixx + iyy
    return np.sqrt(t), (ixx - iyy) / t, 2 * ixy / t


def aperture(img, xc, yc, r=AP_RADIUS):
    y, x = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return float(img[(x - xc) ** 2 + (y - yc) ** 2 <= r * r].sum())


def star_figures(image, variance, psf, truth, band, clean_mask):
    """Per-star flux ratio, size ratio and ellipticity differences vs the PSF."""
    h = 20
    c = psf.shape[0] // 2
    ef = aperture(psf, c, c)
    p_size, p_e1, p_e2 = weighted_moments(psf, c, c)
    rows = []
    sel = truth["is_star"] & (truth["kind"] == "static") & (truth["mag_i"] <= 21.0)
    fluxes = np.asarray(truth[f"flux27_{band}"])
    for row in truth[sel]:
        x, y = float(row["x"]), float(row["y"])
        d2 = (truth["x"] - x) ** 2 + (truth["y"] - y) ** 2
        if np.any((d2 > 0) & (d2 < ISOLATION**2) & (fluxes > 0.002 * row[f"flux27_{band}"])):
            continue  # a neighbour would add its light to the aperture
        ix, iy = int(round(x)), int(round(y))
        if ix - h < 0 or iy - h < 0 or ix + h >= SIZE or iy + h >= SIZE:
            continue
        box = (slice(iy - h, iy + h + 1), slice(ix - h, ix + h + 1))
        cut = image[box]
        if not np.isfinite(cut).all() or not clean_mask[box].all():
            continue
        flux = aperture(cut, x - ix + h, y - iy + h) / (row[f"flux27_{band}"] * ef)
        s, e1, e2 = weighted_moments(cut, x - ix + h, y - iy + h)
        rows.append((flux, s / p_size, e1 - p_e1, e2 - p_e2))
    return np.array(rows)


def blank_sky(truth, radius=15.0):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    far = np.ones((SIZE, SIZE), bool)
    for xs, ys in zip(truth["x"], truth["y"]):
        x0, x1 = int(max(0, xs - radius)), int(min(SIZE, xs + radius + 1))
        y0, y1 = int(max(0, ys - radius)), int(min(SIZE, ys + radius + 1))
        sub = (x[y0:y1, x0:x1] - xs) ** 2 + (y[y0:y1, x0:x1] - ys) ** 2 <= radius**2
        far[y0:y1, x0:x1] &= ~sub
    return far


def robust(z):
    return float(1.4826 * np.median(np.abs(z - np.median(z))))


def quality(name, image, variance, psf, good, truth, bands, noise=True):
    far = blank_sky(truth)
    print(f"  {name}:")
    for k, b in enumerate(bands):
        st = star_figures(image[k], variance[k], psf[k], truth, b, good[k])
        ok = far & good[k] & np.isfinite(variance[k])
        z = image[k][ok] / np.sqrt(variance[k][ok])
        print(f"    {b}: {len(st)} stars; flux/truth median {np.median(st[:, 0]):.4f}, "
              f"median |dflux| {np.median(np.abs(st[:, 0] - 1)) * 100:.2f} %; "
              f"size/PSF median {np.median(st[:, 1]):.4f}; "
              f"median |de| {np.median(np.hypot(st[:, 2], st[:, 3])):.4f}"
              + (f"; noise scatter {robust(z):.3f}" if noise else ""))


def trail_pixels(out, grid, band):
    """Grid pixels on the trail of ``band`` (within 1 px of its centre line)."""
    from astropy.io import fits
    from astropy.table import Table
    from astropy.wcs import WCS

    tv = Table.read(out / "truth_visits.fits")
    row = tv[(tv["band"] == band) & np.isfinite(tv["trail_theta"])][0]
    with fits.open(out / row["file"]) as h:
        w = WCS(h["IMAGE"].header)
        n = h["IMAGE"].data.shape[0]
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float)
    ra, dec = grid.wcs.pixel_to_world_values(x.ravel(), y.ravel())
    u, v = w.world_to_pixel_values(ra, dec)
    c = (n - 1) / 2.0
    d = (u - c) * np.sin(row["trail_theta"]) - (v - c) * np.cos(row["trail_theta"]) - row["trail_offset"]
    return (np.abs(d) < 0.5).reshape(SIZE, SIZE)


def artifact_figures(name, image, variance, good, truth, bands, out, grid):
    far = blank_sky(truth)
    print(f"  {name} (visits with backgrounds and artifacts):")
    for k, b in enumerate(bands):
        snr = image[k] / np.sqrt(variance[k])
        blocks = []
        for y0 in range(0, SIZE - 24, 25):
            for x0 in range(0, SIZE - 24, 25):
                sel = (far & good[k] & np.isfinite(snr))[y0:y0 + 25, x0:x0 + 25]
                if sel.sum() > 200:
                    blocks.append(np.median(snr[y0:y0 + 25, x0:x0 + 25][sel]))
        tr = trail_pixels(out, grid, b) & far & good[k] & np.isfinite(snr)
        print(f"    {b}: residual background {np.sqrt(np.mean(np.square(blocks))):.3f} sigma "
              f"({len(blocks)} blocks); satellite trail median S/N {np.median(snr[tr]):.2f} "
              f"on {tr.sum()} px")


def sky_figures(name, image, variance, good, truth, bands):
    """Blank-sky level in units of the coadd noise on truth-masked blank sky.

    The global median S/N, and the rms of 50 x 50 px block medians with the
    part pure noise gives (1.2533 x scatter / sqrt(n) per block) removed in
    quadrature: 25 px blocks hold too few blank pixels to see 0.05 sigma.
    """
    far = blank_sky(truth)
    out = []
    for k, b in enumerate(bands):
        snr = image[k] / np.sqrt(variance[k])
        ok = far & good[k] & np.isfinite(snr)
        scatter = robust(snr[ok])
        meds, expect = [], []
        for y0 in range(0, SIZE - 49, 50):
            for x0 in range(0, SIZE - 49, 50):
                sel = ok[y0:y0 + 50, x0:x0 + 50]
                if sel.sum() > 400:
                    meds.append(np.median(snr[y0:y0 + 50, x0:x0 + 50][sel]))
                    expect.append((1.2533 * scatter) ** 2 / sel.sum())
        rms = np.sqrt(max(np.mean(np.square(meds)) - np.mean(expect), 0.0))
        out.append((b, float(np.median(snr[ok])), rms, len(meds)))
    print(f"  {name}: blank sky " + "; ".join(
        f"{b} median {m:+.3f} sigma, block rms {r:.3f} sigma ({n} blocks, noise removed)"
        for b, m, r, n in out))
    return out


def galaxy_fluxes(image, truth, bands, r=5.0, mag=(22.5, 24.5)):
    """Median aperture flux of isolated faint galaxies per band (r = 5 px, same cut per band)."""
    sel = ~truth["is_star"] & (truth["mag_i"] > mag[0]) & (truth["mag_i"] < mag[1])
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    res = {}
    for k, b in enumerate(bands):
        f = []
        for row in truth[sel]:
            d2 = (x - row["x"]) ** 2 + (y - row["y"]) ** 2
            if np.any((d2 > 0) & (d2 < 15.0**2)) or not (10 <= row["x"] < SIZE - 10 and 10 <= row["y"] < SIZE - 10):
                continue
            f.append(aperture(image[k], float(row["x"]), float(row["y"]), r))
        res[b] = np.array(f)
    return res


def detection_figures(exposure, truth, radius=1.5, mag_limit=24.0, significance=None,
                      label="the coadd"):
    """Recall of ``scarletstore.detect.detect.detect`` on the coadd against the truth.

    True static sources inside the grid (> 3 px from its edge) are matched to
    the nearest peak within ``radius`` px (1.5 px = 0.25"); recall for
    i < ``mag_limit`` and for point-source S/N > 10 in the best band (flux
    over the PSF-weighted noise sqrt(var / sum psf^2), an upper bound for
    galaxies); unmatched peaks: peaks with no true source of any brightness
    within ``radius``. ``significance`` (the Kaiser coadd's) replaces the
    direct coadd's matched filter, as ``detect --image likelihood`` does.
    """
    from scipy.spatial import cKDTree

    from scarletstore.detect.detect import detect

    parents = detect(exposure, significance=significance)
    peaks = np.column_stack([parents["peak_x"].values, parents["peak_y"].values])
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    tree = cKDTree(peaks)
    dist, _ = tree.query(np.column_stack([tx, ty]))
    matched = dist <= radius
    inside = (tx > 3) & (ty > 3) & (tx < SIZE - 4) & (ty < SIZE - 4) & (np.asarray(truth["kind"]).astype(str) == "static")
    snr = np.zeros(len(truth))
    for k, b in enumerate(exposure["band"].values):
        psf = exposure["psf"].values[k].astype(float)
        sigma = np.sqrt(np.nanmedian(exposure["variance"].values[k]))
        snr = np.maximum(snr, np.asarray(truth[f"flux27_{b}"]) * np.sqrt((psf**2).sum()) / sigma)
    bright = inside & (np.asarray(truth["mag_i"]) < mag_limit)
    loud = inside & (snr > 10)
    dist_p, _ = cKDTree(np.column_stack([tx, ty])).query(peaks)
    missed = truth[bright & ~matched]
    print(f"  detection on {label} ({len(peaks)} peaks): recall i < {mag_limit:g} "
          f"{matched[bright].mean():.3f} ({matched[bright].sum()}/{bright.sum()}), S/N > 10 "
          f"{matched[loud].mean():.3f} ({matched[loud].sum()}/{loud.sum()}); unmatched peaks "
          f"{np.mean(dist_p > radius):.3f} (beyond {2 * radius:g} px: {np.mean(dist_p > 2 * radius):.3f}); missed i < {mag_limit:g}: "
          + ", ".join(f"i={m['mag_i']:.1f} S/N={snr[j]:.0f}"
                      for m, j in zip(missed, np.flatnonzero(bright & ~matched))))
    return matched, bright, loud, snr


MEMORY_CODE = """
import resource, sys, time
from scarletstore.cli import main
t0, c0 = time.perf_counter(), time.process_time()
rc = main(sys.argv[1:])
print(rc, time.perf_counter() - t0, time.process_time() - c0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def memory_figures(sizes, n_visits=10, bands="ugrizy"):
    """Peak RSS, wall and CPU time of ``scarletstore coadd`` (the CLI, store written) in a
    fresh process, per grid size, for all bands and for one band of the same visits.

    The visits are sky, noise, residual backgrounds, cosmic rays, a trail and 9
    bright stars (no galaxy field: rendering 60 fields is slow and does not change
    the memory). Cost per output pixel per visit is the CPU time over grid pixels x visits.
    """
    from scarletstore.simulate.visits import simulate_visits

    for size in sizes:
        out = CACHE / f"memory-{size}-{n_visits}-{bands}"
        if not (out / "truth_artifacts.fits").exists():
            simulate_visits(out, n_visits=n_visits, size=size, seed=5, bands=bands, density=0.0,
                            n_stars=9, artifacts=True)
        paths = [str(p) for p in sorted(out.glob("visit_*.fits"))]
        for which in (bands, bands[-1]):
            wall, cpu, rss, store_mb = run_cli(paths, out / "grid.fits", ["--bands", ",".join(which)])
            nvis = n_visits * len(which)
            print(f"  memory: {size}x{size} grid, {len(which)} band(s) x {n_visits} visits "
                  f"(scarletstore coadd, store {store_mb:.0f} MB): peak RSS {rss:.0f} MB, "
                  f"wall {wall:.0f} s, CPU {cpu:.0f} s = {cpu / (size * size * nvis) * 1e9:.0f} ns "
                  "per output pixel per visit")


def pooled_stars(seeds):
    """Star flux, size and ellipticity with noise pooled over fields ``seeds``: with
    11-13 stars per field a 0.3 % median offset is within the noise of one field."""
    from astropy.table import Table

    pooled = {}
    for seed in seeds:
        d, paths, gp = simulated("clean", seed)
        _, ex, _ = run_ours(paths, gp)
        truth = Table.read(d / "truth.fits")
        for k, b in enumerate(str(b) for b in ex["band"].values):
            st = star_figures(ex["image"].values[k].astype(float), ex["variance"].values[k].astype(float),
                              ex["psf"].values[k].astype(float), truth, b, ex["mask"].values[k] == 0)
            pooled.setdefault(b, []).append(st)
    print(f"stars with noise pooled over {len(seeds)} fields (seeds {seeds[0]}..{seeds[-1]}), "
          "median and its standard error (1.2533 x robust scatter / sqrt(n)):")
    for b, parts in pooled.items():
        st = np.concatenate(parts)
        e = np.hypot(st[:, 2], st[:, 3])
        err = 1.2533 * robust(st[:, 0]) / np.sqrt(len(st))
        print(f"  {b}: {len(st)} stars; flux/truth {np.median(st[:, 0]):.4f} +- {err:.4f}; "
              f"size/PSF {np.median(st[:, 1]):.4f}; median |de| {np.median(e):.4f}; "
              f"mean de1 {np.mean(st[:, 2]):+.4f} +- {np.std(st[:, 2]) / np.sqrt(len(st)):.4f}, "
              f"mean de2 {np.mean(st[:, 3]):+.4f} +- {np.std(st[:, 3]) / np.sqrt(len(st)):.4f}")


def run_ours(paths, grid_path, likelihood=False):
    t0 = time.perf_counter()
    grid = read_grid(grid_path)
    ex, table, lk = direct_coadd(read_visits(paths, grid), grid, likelihood=likelihood)
    return time.perf_counter() - t0, ex, lk


def run_peer(python, paths, grid_path, work):
    """The peer in its own process: ``((wall, cpu) of its reading, warping and stacking, arrays)``."""
    script = Path(work) / "peer_coadd.py"
    script.write_text(PEER)
    out = Path(work) / "peer.npz"
    res = subprocess.run([python, str(script), str(grid_path), str(out), *map(str, paths)],
                         capture_output=True, text=True, check=True)
    with np.load(out) as data:  # read now: the next run overwrites the file
        arrays = {k: data[k] for k in data.files}
    t = json.loads(res.stdout.strip().splitlines()[-1])
    return (t["seconds"], t["cpu"]), arrays


def run_full(paths, grid_path, **kw):
    """The whole ``coadd`` (what ``scarletstore coadd`` runs, without the store write):
    ``((wall, cpu), groups)``, reading the grid and the visits included."""
    t0, c0 = time.perf_counter(), time.process_time()
    grid = read_grid(grid_path)
    groups = coadd(read_visits(paths, grid), grid, **kw)
    return (time.perf_counter() - t0, time.process_time() - c0), groups


# Stages of the whole coadd: label and the (module or class, attribute) of the functions
# whose CPU time, less that of the other stages they call, it is.
def _stages():
    from scarletstore.coadd import likelihood, pipeline, visits

    return (
        ("read", ((sys.modules[__name__], "read_visits"), (visits.Visit, "load"))),
        ("warp", ((pipeline, "_warp_visit"),)),
        ("match", ((pipeline, "_matched_warp"),)),
        ("reject", ((pipeline, "_psf_matched"), (pipeline, "find_artifacts"))),
        ("background", ((pipeline, "_match_backgrounds"),)),
        ("direct stack", ((pipeline, "_second_pass"),)),
        ("likelihood", ((likelihood.LikelihoodSums, "add"), (pipeline, "likelihood_dataset"))),
        ("sky fit", ((pipeline, "_fit_sky"),)),
        ("spill I/O", ((pipeline._SpilledArray, "__getitem__"), (pipeline._SpilledArray, "__setitem__"))),
    )


def stage_times(paths, grid_path):
    """CPU seconds (process_time) per stage of one whole ``coadd``, each stage's
    own time (what it spends in another stage, e.g. the warp's reading of the
    visit, is counted there). Timers wrap the stage functions for one run:
    a profiler's per-call overhead would inflate the Python-heavy stages
    (FITS headers) several times. Returns ``(total, {label: seconds})``."""
    own, stack, saved = {}, [], []

    def timed(label, fn):
        def inner(*args, **kwargs):
            t0 = time.process_time()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.process_time() - t0
                inside = stack.pop()
                own[label] = own.get(label, 0.0) + dt - inside
                if stack:
                    stack[-1] += dt
        return inner

    try:
        for label, targets in _stages():
            for owner, name in targets:
                fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                saved.append((owner, name, fn))
                setattr(owner, name, timed(label, fn))
        c0 = time.process_time()
        run_full(paths, grid_path)
        total = time.process_time() - c0
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
    return total, own


def run_cli(paths, grid_path, extra=()):
    """``scarletstore coadd`` (store written) in a fresh process: (wall, cpu, peak RSS MB,
    store MB), interpreter start and imports excluded from the times."""
    from scarletstore.store.store import store_files

    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        store = Path(work) / "store.h5"
        cmd = [sys.executable, "-c", MEMORY_CODE, "coadd", str(store), *map(str, paths),
               "--grid", str(grid_path), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if res.returncode or not last.startswith("0 "):
            sys.exit(f"scarletstore coadd failed: {res.stderr.strip()[-2000:]}")
        _, wall, cpu, rss = map(float, last.split())
        store_mb = sum(f.stat().st_size for f in store_files(store)) / 2**20
    return wall, cpu, rss, store_mb


def speed_figures(paths, grid_path, runs, peer_python, work):
    """The whole coadd against the peer, A/B alternated; then the CLI call and the stage profile.

    Returns the groups of the last whole coadd (for the quality figures).
    """
    npix = SIZE * SIZE * len(paths)
    run_full(paths[:1], grid_path)  # warm-up: numba kernels from their cache, imports
    ours, peers = [], []
    for _ in range(runs):
        t, groups = run_full(paths, grid_path)
        ours.append(t)
        if peer_python:
            peers.append(run_peer(peer_python, paths, grid_path, work)[0])
    print(f"speed, the whole coadd (direct + PSF-matched + likelihood, rejection, background matching, "
          f"sky fit; {len(paths)} visits with artifacts, A/B alternated with the peer, {runs} pairs):")
    for k, (o, p) in enumerate(zip(ours, peers or [None] * len(ours))):
        line = f"  pair {k + 1}: ours wall {o[0]:.2f} s, CPU {o[1]:.2f} s"
        if p is not None:
            line += (f"; peer wall {p[0]:.2f} s, CPU {p[1]:.2f} s; peer/ours CPU {p[1] / o[1]:.2f}, "
                     f"wall {p[0] / o[0]:.2f}")
        print(line)
    cpu = statistics.median(o[1] for o in ours)
    print(f"  ours median CPU {cpu:.2f} s, wall {statistics.median(o[0] for o in ours):.2f} s "
          f"({cpu / npix * 1e9:.0f} ns CPU per output pixel per visit)")
    if peers:
        print(f"  peer median CPU {statistics.median(p[1] for p in peers):.2f} s, wall "
              f"{statistics.median(p[0] for p in peers):.2f} s; peer/ours median CPU "
              f"{statistics.median(p[1] / o[1] for o, p in zip(ours, peers)):.2f}, wall "
              f"{statistics.median(p[0] / o[0] for o, p in zip(ours, peers)):.2f} (target >= 2)")
    wall, cli_cpu, rss, _ = run_cli(paths, grid_path)
    print(f"  scarletstore coadd (CLI, store written, fresh process, imports excluded): wall {wall:.2f} s, "
          f"CPU {cli_cpu:.2f} s, peak RSS {rss:.0f} MB")
    total, own = stage_times(paths, grid_path)
    print(f"  stages (CPU, one more run, {total:.2f} s in all): "
          + "; ".join(f"{label} {t:.2f} s" for label, t in own.items())
          + f"; other {total - sum(own.values()):.2f} s")
    return groups


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peer-python", default="/tmp/peer/bin/python")
    ap.add_argument("--memory", type=int, nargs="*", metavar="SIZE",
                    help="only the peak-memory figures, at these grid sizes (e.g. 1024 4096)")
    ap.add_argument("--speed", action="store_true",
                    help="only the speed figures (the whole coadd vs the peer, the CLI call, the stages)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="only the star figures with noise, pooled over N simulated fields (seeds 1..N)")
    args = ap.parse_args()
    if args.memory:
        memory_figures(args.memory)
        return
    if args.seeds > 1:
        pooled_stars(list(range(1, args.seeds + 1)))
        return
    from astropy.table import Table

    t0 = time.perf_counter()
    clean_dir, clean_paths, clean_grid = simulated("clean")
    nl_dir, nl_paths, nl_grid = simulated("noiseless")
    full_dir, full_paths, full_grid = simulated("full")
    print(f"visits: {len(clean_paths)} ({NVIS} per band {BANDS}) on a {SIZE}x{SIZE} grid "
          f"(simulated or cached in {time.perf_counter() - t0:.0f} s)")
    truth = Table.read(clean_dir / "truth.fits")
    peer_ok = Path(args.peer_python).exists()

    with tempfile.TemporaryDirectory() as work:
        groups = speed_figures(full_paths, full_grid, args.runs, args.peer_python if peer_ok else None,
                               work)
        if args.speed:
            return
        run_ours(clean_paths[:1], clean_grid)  # warm-up
        dt, ex, _ = run_ours(clean_paths, clean_grid)
        if peer_ok:
            _, peer = run_peer(args.peer_python, clean_paths, clean_grid, work)
        # Star photometry and shapes on noise-free visits (systematic errors only),
        # noise figures on the same field with noise.
        _, exn, _ = run_ours(nl_paths, nl_grid)
        print("stars on noise-free visits (isolated stars, no neighbour > 0.2 % of their flux "
              f"within {ISOLATION:g} px):")
        quality("scarletstore direct coadd", exn["image"].values.astype(float),
                exn["variance"].values.astype(float), exn["psf"].values.astype(float),
                exn["mask"].values == 0, truth, [str(b) for b in exn["band"].values], noise=False)
        if peer_ok:
            _, pn = run_peer(args.peer_python, nl_paths, nl_grid, work)
            quality("peer", pn["image"], pn["variance"], pn["psf"],
                    np.isfinite(pn["image"]) & np.isfinite(pn["variance"]), truth,
                    [str(b) for b in pn["bands"]], noise=False)
        dt_lk, ex, lk = run_ours(clean_paths, clean_grid, likelihood=True)
        print("with noise, without backgrounds and artifacts:")
        good = ex["mask"].values == 0
        bands = [str(b) for b in ex["band"].values]
        quality("scarletstore direct coadd", ex["image"].values.astype(float),
                ex["variance"].values.astype(float), ex["psf"].values.astype(float), good, truth, bands)
        if peer_ok:
            pg = np.isfinite(peer["image"]) & np.isfinite(peer["variance"])
            quality("peer (reproject_interp + inverse-variance mean)", peer["image"], peer["variance"],
                    peer["psf"], pg, truth, [str(b) for b in peer["bands"]])
        far = blank_sky(truth)
        sig = lk["significance"].values
        print("  Kaiser significance noise on blank sky: "
              + ", ".join(f"{b} {robust(sig[k][far & good[k]]):.3f}" for k, b in enumerate(bands)))
        _, exf, _ = run_ours(full_paths, full_grid)
        grid = read_grid(full_grid)
        truth_full = Table.read(full_dir / "truth.fits")
        usable = (exf["mask"].values & ~np.int32(1 << 9)) == 0  # INEXACT_PSF pixels are usable
        artifact_figures("scarletstore direct coadd, no rejection", exf["image"].values.astype(float),
                         exf["variance"].values.astype(float), usable, truth_full,
                         [str(b) for b in exf["band"].values], full_dir, grid)
        exr = groups["exposure"]
        # REJECTED and INEXACT_PSF pixels are usable: the rejected visit is left out there.
        usable = (exr["mask"].values & ~np.int32((1 << 9) | (1 << 10))) == 0
        artifact_figures("scarletstore full coadd with rejection",
                         exr["image"].values.astype(float), exr["variance"].values.astype(float),
                         usable, truth_full, [str(b) for b in exr["band"].values], full_dir, grid)
        bands_f = [str(b) for b in exr["band"].values]
        nosky = coadd(read_visits(full_paths, grid), grid, sky=False)["exposure"]
        sky_figures("full coadd without the final sky fit", nosky["image"].values.astype(float),
                    nosky["variance"].values.astype(float), usable, truth_full, bands_f)
        sky_figures("full coadd with the final sky fit", exr["image"].values.astype(float),
                    exr["variance"].values.astype(float), usable, truth_full, bands_f)
        print(f"    sky fit per band: {exr.attrs['sky']}")
        before = galaxy_fluxes(nosky["image"].values.astype(float), truth_full, bands_f)
        after = galaxy_fluxes(exr["image"].values.astype(float), truth_full, bands_f)
        clean = galaxy_fluxes(ex["image"].values.astype(float), truth, bands)  # no sky at all
        print("    faint galaxies (22.5 < i < 24.5, r = 5 px) median flux ratio, after/before the sky fit: "
              + ", ".join(f"{b} {np.median(after[b] / before[b]):.3f}" for b in bands_f)
              + "; after / visits without any sky: "
              + ", ".join(f"{b} {np.median(after[b] / clean[b]):.3f}" for b in bands_f)
              + f" ({len(after[bands_f[0]])} galaxies)")
        detection_figures(exr, truth_full, label="the direct coadd")
        like = groups["coadds/likelihood"]
        detection_figures(exr, truth_full, label="the likelihood coadd",
                          significance=like["significance"].sel(band=exr["band"].values).values)
        tab = groups["visits"]
        print("    rejected pixels per visit: " + ", ".join(
            f"{f.split('.')[0][6:]} {n}" for f, n in zip(tab["file"].values, tab["n_rejected"].values) if n))
        var = truth_full[truth_full["kind"] == "variable"][0]
        tr = truth_full[truth_full["kind"] == "transient"][0]
        rej = (exr["mask"].values & (1 << 10)) != 0
        y, x = np.mgrid[0:SIZE, 0:SIZE]
        for name, row in (("variable star", var), ("transient", tr)):
            near = (x - row["x"]) ** 2 + (y - row["y"]) ** 2 <= 9
            print(f"    {name}: REJECTED on {rej[:, near].any(axis=1).sum()} of {len(rej)} bands at its centre")
        if peer_ok:
            _, pf = run_peer(args.peer_python, full_paths, full_grid, work)
            artifact_figures("peer", pf["image"], pf["variance"],
                             np.isfinite(pf["image"]) & np.isfinite(pf["variance"]), truth_full,
                             [str(b) for b in pf["bands"]], full_dir, grid)
    npix = SIZE * SIZE * len(clean_paths)
    print(f"direct coadd alone (visits without artifacts, one run): {dt:.2f} s wall "
          f"({dt / npix * 1e9:.0f} ns per output pixel per visit); with the Kaiser coadd {dt_lk:.2f} s")

if __name__ == "__main__":
    main()
