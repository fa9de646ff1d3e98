"""Derive the flux-error model's constants (``KAPPA_TABLE``, ``FOOTPRINT_EDGE_SIGMA``, ``FLUX_SIGMA``).

The calibration fields are made for this and differ from the judging scenes
of ``bench_measure.py errors`` (``JUDGING_SETTINGS``: the defaults; density
150 in gri; Moffat beta 2.5; density 200 in izy; beta 4.5 in griz; density
40 with bright stars; 500 px, density 120 with 10 bright stars, four seeds
each) in seed *and* settings: seed 21 (500 px, density 130, grizy), seed 22
(700 px, density 60, ugri), seed 23 (600 px, density 110, griz), seed 24
(550 px, density 75, gri), seed 25 (600 px, Moffat beta 2.8, grizy) and
seed 26 (600 px, density 90, griz, 8 bright stars: without bright stars the
normalisation term had no children above S/N ~3000 to hold it and made the
isolated bright stars' errors 3-5x too large), and, so that the PSF's wings
can be fitted, seed 27 (600 px, density 100, grizy, Moffat beta 2.5), seed 28
(550 px, density 110, rizy, beta 4.5) and seed 29 (500 px, density 180, rizy:
crowded). Children matched to truth with truth S/N > 10
(noise part) are scored in every band of their field. The variance of a
child is linear in the squared constants, ``var_i = noise_i^2 + (lambda
E_i)^2 + (f F_i)^2 + sum_bin kappa_bin^2 V_i,bin`` (``noise``: the
library's noise part, ``E``: the child's light on the footprint edge,
``F`` its flux, ``V`` its contested fluxes squared by the bin of each
template it shares pixels with, times ``W^(2 p)`` with ``W`` the band PSF's
wing ratio over ``KAPPA_WING_REF`` and ``p`` = ``KAPPA_WING_POWER``), so these
ingredients are recorded once per blend while one catalog is computed; the
constants are then fitted to the pull widths of groups of children (see
:func:`groups`, :func:`solve` and, for the power, :func:`solve_power`).

Usage: ``python benchmarks/calibrate_flux_errors.py [--write | --realisations] [--samples FILE]``;
``--write`` puts the constants (and ``KAPPA_WING_POWER``) into ``scarletstore/measure/photometry/deblend_errors.py``
(re-run it after a change to the deblender: its templates set them);
``--realisations`` only splits the errors of two calibration fields into what
the noise moves and what stays with the scene (:func:`realisations`);
``--samples`` keeps the recorded children in an npz file to refit them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_measure import _matched, _truth, _width, field  # noqa: E402

CALIBRATION_FIELDS = [dict(size=500, seed=21, density=130.0, bands="grizy"),
                      dict(size=700, seed=22, density=60.0, bands="ugri"),
                      dict(size=600, seed=23, density=110.0, bands="griz"),
                      dict(size=550, seed=24, density=75.0, bands="gri"),
                      dict(size=600, seed=25, density=90.0, bands="grizy", psf_beta=2.8),
                      dict(size=600, seed=26, density=90.0, bands="griz", bright_stars=8),
                      dict(size=600, seed=27, density=100.0, bands="grizy", psf_beta=2.5),
                      dict(size=550, seed=28, density=110.0, bands="rizy", psf_beta=4.5),
                      dict(size=500, seed=29, density=180.0, bands="rizy")]
MIN_PER_BIN = 15
SNR_BINS = (20.0, 50.0, 100.0)  # S/N bins (noise part) of the children alone in their blend (groups)
ERRORS_MODULE = Path(__file__).resolve().parent.parent / "scarletstore" / "measure" / "photometry" / "deblend_errors.py"


def _recording_catalog(st, band):
    """The band catalog with each blend's error inputs recorded by source id when computed."""
    from scarletstore.measure.catalog import band_catalog

    cat = band_catalog(st, band, apcorr=False)
    ph = cat.attrs["_measurer"].photometry
    seen = {}
    plain = ph.error_inputs

    def error_inputs(blend, models, fp, data, m, shares=None):
        inputs = plain(blend, models, fp, data, m, shares)
        for k, sid in enumerate(np.asarray(blend.source_ids)):
            seen[int(sid)] = (inputs, k)
        return inputs

    ph.error_inputs = error_inputs
    return cat, seen


def _bins(blendedness, snr):
    from scarletstore.measure.photometry.deblend_errors import BLENDEDNESS_EDGES, SNR_EDGES

    b = np.nan_to_num(np.asarray(blendedness, np.float64), nan=0.0)
    r = np.nan_to_num(np.asarray(snr, np.float64), nan=0.0)
    return (np.searchsorted(BLENDEDNESS_EDGES, b, side="right") * (len(SNR_EDGES) + 1)
            + np.searchsorted(SNR_EDGES, r, side="right"))


def _child(inputs, k, n_bins):
    """(noise part, V row, edge light, flux, own bin) of child k from its blend's error inputs."""
    from scarletstore.measure.photometry.deblend_errors import error_model

    c, noise, fisher, edge, own, flux, q, err_share, blendedness = inputs
    zero = np.zeros((1, 1))
    err_noise, _, _, _ = error_model(*inputs, zero, np.zeros(0), np.zeros(0), 0.0, 0.0, 0.0, True)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = own / err_share
    a = -c[k].copy()
    a[k] = c[k, k]  # the child's flux moves by a_j eps_j for template j's log error
    v = np.zeros(n_bins)
    np.add.at(v, _bins(blendedness, snr), a * a)
    return err_noise[k], v, edge[k], flux[k], _bins(blendedness[k:k + 1], snr[k:k + 1])[0]


def _main_neighbours(sim, table, band):
    """Row in ``table`` of each truth source's neighbour of largest overlap ``sum own x theirs`` (-1: none)."""
    from scarletstore.simulate.field import load_truth

    _, stamps = load_truth(sim)
    bands = list(table.meta["BANDS"]) if "BANDS" in table.meta else list("ugrizy")
    b = bands.index(band)
    row = {int(i): k for k, i in enumerate(table["id"])}
    items = [(row[int(sid)], bbox, stamp[b].astype(np.float64)) for sid, (bbox, stamp) in stamps.items()]
    out = np.full(len(table), -1)
    best = np.zeros(len(table))
    for i, (ri, (y0, x0, h, w), si) in enumerate(items):
        for rj, (y1, x1, h1, w1), sj in items[i + 1:]:
            ya, yb, xa, xb = max(y0, y1), min(y0 + h, y1 + h1), max(x0, x1), min(x0 + w, x1 + w1)
            if ya >= yb or xa >= xb:
                continue
            v = (si[ya - y0:yb - y0, xa - x0:xb - x0] * sj[ya - y1:yb - y1, xa - x1:xb - x1]).sum()
            for a, o in ((ri, rj), (rj, ri)):
                if v > best[a]:
                    best[a], out[a] = v, o
    return out


def samples(fields=CALIBRATION_FIELDS):
    """Per matched child (truth S/N > 10): residual, noise part, own bin, V (n, n_bins), edge light, flux.

    Also the field and band (``cell``), the catalog's blendedness and whether the
    child's main truth neighbour (largest overlap) was itself found by the
    catalog (:func:`diagnose`)."""
    from scarletstore.measure.photometry.deblend_errors import BLENDEDNESS_EDGES, SNR_EDGES
    from scarletstore.store.store import Store

    nb, ns = len(BLENDEDNESS_EDGES) + 1, len(SNR_EDGES) + 1
    from scarletstore.measure.photometry.deblend_errors import wing_scale

    out = {k: [] for k in ("d", "noise", "bin", "V", "E", "F", "W", "truth_blendedness", "cell",
                           "model_blendedness", "neighbour_found")}
    for spec in fields:
        store, sim = field(**spec)
        st = Store(store)
        for band in spec.get("bands", "ugrizy"):
            table, tblend = _truth(sim, st, band)
            lazy, seen = _recording_catalog(st, band)
            cat = lazy.compute()
            # the band PSF's wing ratio over KAPPA_WING_REF, held to the calibrated span (the
            # run's PSF: the calibration fields are simulated)
            wing = wing_scale(cat.attrs["_measurer"].photometry.psf(0)[0], power=1.0)
            ma = _matched(cat, table)
            ok = ma >= 0
            t = np.asarray(table[f"flux_{band}"])[ma[ok]]
            f, en = cat["flux"].values[ok], cat["flux_err_noise"].values[ok]
            rows = [_child(*seen[int(sid)], nb * ns) for sid in cat["id"].values[ok]]
            sel = (t / en > 10) & np.isfinite(f) & (en > 0)
            found = np.zeros(len(table), bool)
            found[ma[ok]] = True
            nbr = _main_neighbours(sim, table, band)[ma[ok]]
            cols = {"d": f - t, "noise": np.array([r[0] for r in rows]), "V": np.array([r[1] for r in rows]),
                    "E": np.array([r[2] for r in rows]), "F": np.array([r[3] for r in rows]),
                    "W": np.full(ok.sum(), wing),
                    "bin": np.array([r[4] for r in rows], np.int64), "truth_blendedness": tblend[ma[ok]],
                    "cell": np.full(ok.sum(), f"{spec['seed']}:{band}"),
                    "model_blendedness": cat["blendedness"].values[ok],
                    "neighbour_found": np.where(nbr >= 0, found[np.maximum(nbr, 0)], True)}
            for key, val in cols.items():
                out[key].append(val[sel])
            print(f"  seed {spec['seed']} {band}: {sel.sum()} children", flush=True)
    return {k: np.concatenate(v) for k, v in out.items()}, (nb, ns)


TRUTH_CLASSES = (0.01, 0.1)  # truth blendedness: isolated < 0.01 <= mild < 0.1 <= blended (as judged)


def groups(s, shape):
    """Index arrays of the groups whose pull widths the constants are fitted to.

    Children alone in their blend by S/N bin (these see only the edge and
    normalisation terms), and every other child by its own kappa bin *and*
    its truth blendedness class: the deblended templates overlap less than
    the true profiles, so a bin's truth-blended children have larger errors
    than its truth-isolated ones, and a fit to the bins alone leaves the
    blended children (the ones that matter) too small by 1.3-1.4 on the
    calibration fields themselves. Then, as judged, the isolated and the
    blended children of every field and band (``cell``) apart: pooled
    groups let one field's wide blended children hide behind another's
    narrow ones (with them, 23 of the 27 calibration cells of N >= 20 end
    inside 0.8-1.25 instead of 19, and 22 instead of 20 fitting four fields
    and scoring the fifth). Groups of fewer than ``MIN_PER_BIN`` are left out.
    """
    alone = s["V"].sum(axis=1) == 0
    sb = np.searchsorted(SNR_BINS, np.abs(s["F"]) / s["noise"])
    tc = np.searchsorted(TRUTH_CLASSES, s["truth_blendedness"])
    out = [np.flatnonzero(alone & (sb == j)) for j in range(len(SNR_BINS) + 1)]
    out += [np.flatnonzero(~alone & (s["bin"] == k)) for k in range(shape[0] * shape[1])]
    out += [np.flatnonzero(~alone & (tc == c)) for c in range(len(TRUTH_CLASSES) + 1)]
    for cell in np.unique(s["cell"]):
        out += [np.flatnonzero((s["cell"] == cell) & (tc == c)) for c in (0, len(TRUTH_CLASSES))]
    return [g for g in out if len(g) >= MIN_PER_BIN]


def variance(s, params, power=0.0):
    """Each child's variance for constants ``params = (lambda, f, kappa...)`` and the power of the
    PSF's wing ratio on kappa (``s["W"]``: each child's band PSF's ratio over ``KAPPA_WING_REF``)."""
    lam, f, kappa = params[0], params[1], params[2:]
    v = s["V"] @ np.square(kappa)
    if power:
        v = v * s["W"] ** (2 * power)
    return s["noise"] ** 2 + (lam * s["E"]) ** 2 + (f * s["F"]) ** 2 + v


def _cost(s, groups_, params, power=0.0):
    """Sum over groups of sqrt(n) log(width)^2 for constants ``params = (lambda, f, kappa...)``."""
    p = s["d"] / np.sqrt(variance(s, params, power))
    return sum(np.sqrt(len(g)) * np.log(max(_width(p[g]), 1e-6)) ** 2 for g in groups_)


# starting points (lambda, f, kappa by bin) of the minimisation: the cost is a sum of medians, flat
# in steps and with several minima, so the fit starts from each and keeps the lowest
STARTS = ((0.7, 0.005, (0.5, 0.5, 0.5, 0.5, 0.5, 0.5)),
          (1.5, 0.002, (1.0, 0.5, 0.9, 0.7, 0.7, 0.4)),
          (0.1, 0.002, (1.0, 0.5, 0.9, 0.7, 0.7, 0.4)),
          (1.5, 0.0, (0.3, 0.3, 0.3, 0.3, 0.3, 0.3)))


def solve(s, shape, power=0.0):
    """Edge jitter, normalisation error and kappa table minimising :func:`_cost`.

    Powell's method (no derivatives: the cost is made of medians) from every
    start of ``STARTS``, the lowest end kept; the constants enter squared, so
    their absolute values are fitted. A kappa bin is fitted when at least
    ``MIN_PER_BIN`` children share light with its templates *and* are in it;
    any other keeps the next less blended bin's value (the 9 children of the
    bright most-blended bin of the calibration fields took kappa 2.3 when
    fitted, widening their neighbours' errors). Coordinate sweeps over grids,
    used before, stopped in worse minima: in-sample cost 5.21 against 5.14.
    ``power``: the PSF wing ratio's power on kappa, held (see :func:`solve_power`).
    Returns ``(kappa, lambda, f, counts)``.
    """
    from scipy.optimize import minimize

    nb, ns = shape
    g = groups(s, shape)
    alone = s["V"].sum(axis=1) == 0
    own = np.bincount(s["bin"][~alone], minlength=nb * ns)
    used = np.array([(s["V"][~alone, k] > 0).sum() >= MIN_PER_BIN and own[k] >= MIN_PER_BIN for k in range(nb * ns)])
    free = np.concatenate([[True, True], used])

    def full(x):
        p = np.zeros(len(free))
        p[free] = np.abs(x)
        kappa = p[2:].reshape(nb, ns)
        for i in range(1, nb):  # bins no fit reaches: the next less blended bin's value
            for j in range(ns):
                if not used[i * ns + j]:
                    kappa[i, j] = kappa[i - 1, j]
        return p

    best = None
    for lam, f, kappa in STARTS:
        x0 = np.concatenate([[lam, f], np.resize(kappa, nb * ns)])[free]
        r = minimize(lambda x: _cost(s, g, full(x), power), x0, method="Powell",
                     options=dict(xtol=1e-3, ftol=1e-4, maxfev=4000))
        if best is None or r.fun < best.fun:
            best = r
    params = full(best.x)
    print(f"cost {best.fun:.3f} over {len(g)} groups" + (f" (wing power {power:.3f})" if power else ""))
    solve.last_cost = best.fun
    return params[2:].reshape(nb, ns), params[0], params[1], own.reshape(nb, ns)


POWER_BOUNDS = (-3.0, 1.0)  # search range of the wing ratio's power on kappa


def solve_power(s, shape, bounds=POWER_BOUNDS, xatol=0.05):
    """:func:`solve` with the wing ratio's power on kappa fitted too: a bounded scalar search
    (Brent) of the power, the rest refitted by :func:`solve` at each step (a joint Powell fit of
    the power with the table stopped in the flat minima of the table). Samples without a spread
    of wing ratios (``s["W"]`` all alike) keep power 0. Returns ``(kappa, lambda, f, counts, power)``.
    """
    from scipy.optimize import minimize_scalar

    w = np.asarray(s.get("W", np.ones(1)), np.float64)
    if np.ptp(np.log(w[np.isfinite(w) & (w > 0)])) < 0.05:
        return (*solve(s, shape), 0.0)
    fits = {}

    def cost(p):
        fits[p] = solve(s, shape, p)
        return solve.last_cost

    r = minimize_scalar(cost, bounds=bounds, method="bounded", options=dict(xatol=xatol))
    p = min(fits, key=lambda q: abs(q - r.x))
    return (*fits[p], float(p))


def constants_text(kappa, lam, f, power=0.0) -> dict:
    """Source lines of the four constants, by name."""
    rows = ",\n               ".join("(" + ", ".join(f"{x:.3f}" for x in row) + ")" for row in kappa)
    return {"KAPPA_TABLE": f"KAPPA_TABLE = ({rows})", "FOOTPRINT_EDGE_SIGMA": f"FOOTPRINT_EDGE_SIGMA = {lam:.3f}",
            "FLUX_SIGMA": f"FLUX_SIGMA = {f:.4f}", "KAPPA_WING_POWER": f"KAPPA_WING_POWER = {power:.3f}"}


def write_constants(kappa, lam, f, power=0.0, path=ERRORS_MODULE):
    """Replace the four assignments in ``deblend_errors.py`` (each up to its closing bracket or line end)."""
    import re

    text = path.read_text()
    for name, line in constants_text(kappa, lam, f, power).items():
        pattern = rf"^{name} = \((?:[^()]|\([^()]*\))*\)" if name == "KAPPA_TABLE" else rf"^{name} = .*$"
        text, n = re.subn(pattern, line, text, count=1, flags=re.M)
        if n != 1:
            raise SystemExit(f"{path}: no assignment of {name} to replace")
    path.write_text(text)


def diagnose(s, pulls, edges=(0.02, 0.1, 0.3)):
    """Truth-blended children (truth blendedness > 0.1) by the catalog's blendedness and by whether
    their main truth neighbour was found: count, robust width and median of the pulls.

    What no error model can follow shows here: a child whose neighbour the
    catalog never found carries that neighbour's light (a bias), and the
    catalog's own overlap cannot tell it from an isolated child.
    """
    tb = s["truth_blendedness"] > 0.1
    mb = np.searchsorted(edges, np.nan_to_num(s["model_blendedness"], nan=0.0), side="right")
    labels = [f"< {edges[0]}"] + [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])] + [f">= {edges[-1]}"]
    print("truth-blended children by catalog blendedness (n, width, median pull):")
    for k, label in enumerate(labels):
        cells = []
        for name, sel in (("neighbour found", s["neighbour_found"]), ("neighbour missed", ~s["neighbour_found"])):
            g = tb & (mb == k) & sel
            med = np.median(pulls[g]) if g.any() else np.nan
            cells.append(f"{name} {g.sum():4d} {_width(pulls[g]):5.2f} {med:+6.2f}")
        print(f"  {label:9s} " + " | ".join(cells))


def renoised_field(spec, noise_seed):
    """(store, sim) of ``spec``'s field with the same sources and a new draw of the noise.

    The simulator's image is its truth stamps plus Gaussian noise of the
    variance plane (checked: the residual over sqrt(variance) has unit
    width), so the new image is the stamps plus a new draw; masked pixels
    keep their values. Built once, in the benchmark cache, then made into a
    store like any benchmark field.
    """
    import shutil

    from astropy.io import fits

    from benchmarks.common import CACHE
    from scarletstore.simulate.field import load_truth

    _, sim = field(**spec)
    folder = CACHE / f"renoised-{spec['seed']}-{noise_seed}"
    if not (folder / "sim" / "truth.fits").exists():
        (folder / "sim").mkdir(parents=True, exist_ok=True)
        table, stamps = load_truth(sim)
        rng = np.random.default_rng(noise_seed)
        for b, band in enumerate(table.meta["BANDS"]):
            with fits.open(sim / f"{band}.fits") as hdus:
                total = np.zeros(hdus["IMAGE"].data.shape)
                for (y0, x0, h, w), stamp in stamps.values():
                    total[y0:y0 + h, x0:x0 + w] += stamp[b]
                new = total + rng.normal(size=total.shape) * np.sqrt(hdus["VARIANCE"].data)
                hdus["IMAGE"].data = np.where(hdus["MASK"].data == 0, new, hdus["IMAGE"].data).astype(np.float32)
                hdus.writeto(folder / "sim" / f"{band}.fits")
        for name in ("truth_images.npz", "truth.fits"):  # the truth last: it marks the folder complete
            shutil.copy(sim / name, folder / "sim" / name)
    return field(**spec, folder=folder)


def _realisation_rows(spec, noise_seed):
    """(flux - truth in the field, in its new noise draw, flux_err, noise part, truth and catalog
    blendedness, main neighbour found) of the sources found in both, truth S/N > 10, every band."""
    from scarletstore.measure.catalog import band_catalog
    from scarletstore.store.store import Store

    a, sim = field(**spec)
    stores = Store(a), Store(renoised_field(spec, noise_seed)[0])
    rows = []
    for band in spec["bands"]:
        table, tblend = _truth(sim, stores[0], band)
        cats = [band_catalog(st, band, apcorr=False).compute() for st in stores]
        row = [{t: i for i, t in enumerate(_matched(c, table)) if t >= 0} for c in cats]
        found = np.zeros(len(table), bool)
        found[list(row[0])] = True
        nbr = _main_neighbours(sim, table, band)
        truth = np.asarray(table[f"flux_{band}"])
        for t in sorted(set(row[0]) & set(row[1])):
            i, j = row[0][t], row[1][t]
            en = cats[0]["flux_err_noise"].values[i]
            if truth[t] > 10 * en:
                rows.append((cats[0]["flux"].values[i] - truth[t], cats[1]["flux"].values[j] - truth[t],
                             cats[0]["flux_err"].values[i], en, tblend[t], cats[0]["blendedness"].values[i],
                             found[nbr[t]] if nbr[t] >= 0 else True))
    return rows


def realisations(fields=CALIBRATION_FIELDS[:1] + CALIBRATION_FIELDS[2:3], noise_seed=1):
    """How much of each group's error is the noise's: the same fields with a second noise draw.

    Robust widths of (flux - truth) / err in the field, of the difference of
    the two draws / sqrt(2) (what the noise moves: what refits on resampled
    data would measure) and of their mean (what stays with the scene), with
    ``flux_err`` and with the noise part.
    """
    r = np.array([row for spec in fields for row in _realisation_rows(spec, noise_seed)], np.float64)
    da, db, err, en, tb, mb, found = r.T
    mb, found = np.nan_to_num(mb), found.astype(bool)
    groups = {"truth isolated": tb < 0.01, "truth blended": tb > 0.1,
              "  neighbour found, blendedness 0.02-0.1": (tb > 0.1) & found & (mb >= 0.02) & (mb < 0.1),
              "  neighbour found, blendedness >= 0.1": (tb > 0.1) & found & (mb >= 0.1),
              "  neighbour missed": (tb > 0.1) & ~found}
    print("group (n): widths with flux_err: draw, draw difference, draw mean | with the noise part: draw, difference")
    for name, g in groups.items():
        w = [_width(x[g] / e[g]) for e in (err, en) for x in (da, (da - db) / np.sqrt(2), (da + db) / 2)]
        print(f"  {name:42s} ({g.sum():4d}): {w[0]:.2f} {w[1]:.2f} {w[2]:.2f} | {w[3]:.2f} {w[4]:.2f}")


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the constants into deblend_errors.py")
    ap.add_argument("--realisations", action="store_true",
                    help="only compare two fields with a second noise draw of themselves (realisations)")
    ap.add_argument("--samples", help="npz file of the recorded children: read if it exists (refits only, "
                                       "never across a code change), else written")
    args = ap.parse_args(argv)
    if args.realisations:
        return realisations()
    if args.samples and Path(args.samples).exists():
        with np.load(args.samples) as z:
            s, shape = {k: z[k] for k in z.files if k != "shape"}, tuple(int(x) for x in z["shape"])
    else:
        s, shape = samples()
        if args.samples:
            np.savez(args.samples, shape=np.array(shape), **s)
    kappa, lam, f, counts, power = solve_power(s, shape)
    pulls = s["d"] / np.sqrt(variance(s, np.concatenate([[lam, f], kappa.ravel()]), power))
    print(f"wing ratio power on kappa {power:.3f}")
    print("children per bin (rows blendedness, columns S/N):\n", counts)
    for k in range(kappa.size):
        sel = s["bin"] == k
        if sel.sum():
            print(f"  bin {divmod(k, shape[1])}: n {sel.sum():4d}  width noise "
                  f"{_width(s['d'][sel] / s['noise'][sel]):.2f} -> {_width(pulls[sel]):.2f}")
    alone = s["V"].sum(axis=1) == 0
    tc = np.searchsorted(TRUTH_CLASSES, s["truth_blendedness"])
    for c, label in enumerate(("truth isolated", "truth 0.01-0.1", "truth blended")):
        sel = tc == c
        print(f"  {label}: n {sel.sum()}  width noise {_width(s['d'][sel] / s['noise'][sel]):.2f}"
              f" -> {_width(pulls[sel]):.2f}")
    print(f"  alone in their blend: n {alone.sum()}  width noise {_width(s['d'][alone] / s['noise'][alone]):.2f}"
          f" -> {_width(pulls[alone]):.2f}")
    diagnose(s, pulls)
    for line in constants_text(kappa, lam, f, power).values():
        print(line)
    if args.write:
        write_constants(kappa, lam, f, power)
        print(f"written to {ERRORS_MODULE}")
    return kappa, lam, f, power


if __name__ == "__main__":
    main()
