"""Derive ``KAPPA_TABLE`` and ``FOOTPRINT_EDGE_SIGMA`` (the flux-error model) from calibration fields.

The fields are made for this and differ from the judging fields of
``bench_measure.py errors`` (seeds 3, 7, 11 at the default density, size and
bands) in seed *and* settings: seed 21 (500 px, density 130, grizy),
seed 22 (700 px, density 60, ugri), seed 23 (600 px, density 110, griz)
and seed 24 (550 px, density 75, gri). Children matched to truth with truth
S/N > 10 are put in the bin of their own measured blendedness and S/N; the
model variance of a child is linear in the squared kappas of the bins of the
templates it shares pixels with, ``var_i = noise_i^2 + (lambda E_i)^2 +
sum_bin kappa_bin^2 V_i,bin`` (``E``: the child's light on the footprint
edge, ``lambda`` the edge jitter), so ``V`` and ``E`` are recorded once per
blend while one catalog is computed, and the constants are solved by sweeps:
``lambda`` so that children alone in their blend have pull width 1, then
each bin's kappa so its children's pulls have width 1, the others held.
Bins with fewer than ``MIN_PER_BIN`` children take their S/N column's value
from the next less blended bin. Prints the table to paste into
``scarletstore/photometry/deblend_errors.py``.

Usage: ``python benchmarks/calibrate_flux_errors.py``.
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
                      dict(size=550, seed=24, density=75.0, bands="gri")]
MIN_PER_BIN = 15


def _recording_catalog(st, band):
    """The band catalog with each blend's error ingredients recorded by source id when computed."""
    from scarletstore.catalog import band_catalog
    from scarletstore.photometry.deblend_errors import share_products

    cat = band_catalog(st, band, apcorr=False)
    ph = cat.attrs["_measurer"].photometry
    seen = {}
    plain = ph.flux_errors

    def flux_errors(blend, models, fp, data, m):
        c, _, edge, own = share_products(np.ascontiguousarray(models, np.float32), np.ascontiguousarray(fp),
                                         np.zeros(fp.shape, np.float32), np.zeros(fp.shape, bool), False)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = own / m[:, 1]
        for k, sid in enumerate(np.asarray(blend.source_ids)):
            seen[int(sid)] = (c, edge[k], m[:, 7], snr, k)
        return plain(blend, models, fp, data, m)

    ph.flux_errors = flux_errors
    return cat, seen


def samples(fields=CALIBRATION_FIELDS):
    """Per matched child (truth S/N > 10): residual, noise error, own bin, V (n, n_bins) and edge light."""
    from scarletstore.photometry.deblend_errors import BLENDEDNESS_EDGES, SNR_EDGES
    from scarletstore.store import Store

    nb, ns = len(BLENDEDNESS_EDGES) + 1, len(SNR_EDGES) + 1

    def bins(b, snr):
        b = np.nan_to_num(np.asarray(b, np.float64), nan=0.0)
        r = np.nan_to_num(np.asarray(snr, np.float64), nan=0.0)
        return np.searchsorted(BLENDEDNESS_EDGES, b, side="right") * ns + np.searchsorted(SNR_EDGES, r, side="right")

    out = {"d": [], "noise": [], "bin": [], "V": [], "E": []}
    for spec in fields:
        store, sim = field(**spec)
        st = Store(store)
        for band in spec["bands"]:
            table, _ = _truth(sim, st, band)
            lazy, seen = _recording_catalog(st, band)
            cat = lazy.compute()
            ma = _matched(cat, table)
            ok = ma >= 0
            t = np.asarray(table[f"flux_{band}"])[ma[ok]]
            f, en = cat["flux"].values[ok], cat["flux_err_noise"].values[ok]
            ids = cat["id"].values[ok]
            v = np.zeros((len(ids), nb * ns))
            e = np.zeros(len(ids))
            own = np.zeros(len(ids), np.int64)
            for r, sid in enumerate(ids):
                c, edge, blendedness, snr, k = seen[int(sid)]
                a = -c[k].copy()
                a[k] = c[k, k]  # the child's flux moves by a_j eps_j for template j's log error
                np.add.at(v[r], bins(blendedness, snr), a * a)
                e[r] = edge
                own[r] = bins(blendedness[k:k + 1], snr[k:k + 1])[0]
            sel = (t / en > 10) & np.isfinite(f) & (en > 0)
            for key, val in (("d", (f - t)), ("noise", en), ("bin", own), ("V", v), ("E", e)):
                out[key].append(val[sel])
            print(f"  seed {spec['seed']} {band}: {sel.sum()} children", flush=True)
    return {k: np.concatenate(v) for k, v in out.items()}, (nb, ns)


def _root(widths_of, grid):
    w = np.array([widths_of(g) for g in grid])
    return grid[int(np.argmin(np.abs(w - 1.0)))]


def solve(s, shape, sweeps=6):
    """Sweeps: the edge jitter from children alone in their blend, then each populated bin's kappa."""
    nb, ns = shape
    k2 = np.full(nb * ns, 0.25)
    lam = 0.0
    counts = np.bincount(s["bin"], minlength=nb * ns)
    grid = np.concatenate([[0.0], np.geomspace(1e-3, 10, 300)])
    alone = s["V"].sum(axis=1) == 0
    d, en, v, e = s["d"], s["noise"], s["V"], s["E"]
    for _ in range(sweeps):
        lam = _root(lambda g: _width(d[alone] / np.sqrt(en[alone] ** 2 + (g * e[alone]) ** 2)), grid)
        for k in range(nb * ns):
            sel = (s["bin"] == k) & ~alone
            if sel.sum() < MIN_PER_BIN:
                continue
            rest = en[sel] ** 2 + (lam * e[sel]) ** 2 + v[sel] @ k2 - v[sel, k] * k2[k]
            k2[k] = _root(lambda g: _width(d[sel] / np.sqrt(rest + g ** 2 * v[sel, k])), grid) ** 2
    kappa = np.sqrt(k2).reshape(nb, ns)
    counts = np.bincount(s["bin"][~alone], minlength=nb * ns).reshape(nb, ns)
    for i in range(1, nb):  # sparse bins: the next less blended bin's value
        for j in range(ns):
            if counts[i, j] < MIN_PER_BIN:
                kappa[i, j] = kappa[i - 1, j]
    return kappa, lam, counts


def main():
    s, shape = samples()
    kappa, lam, counts = solve(s, shape)
    var = s["noise"] ** 2 + (lam * s["E"]) ** 2 + s["V"] @ np.square(kappa.ravel())
    pulls = s["d"] / np.sqrt(var)
    print("children per bin (rows blendedness, columns S/N):\n", counts)
    for k in range(kappa.size):
        sel = s["bin"] == k
        if sel.sum():
            print(f"  bin {divmod(k, shape[1])}: n {sel.sum():4d}  width noise "
                  f"{_width(s['d'][sel] / s['noise'][sel]):.2f} -> {_width(pulls[sel]):.2f}")
    alone = s["V"].sum(axis=1) == 0
    print(f"  alone in their blend: n {alone.sum()}  width noise {_width(s['d'][alone] / s['noise'][alone]):.2f}"
          f" -> {_width(pulls[alone]):.2f}")
    print(f"FOOTPRINT_EDGE_SIGMA = {lam:.3f}")
    print("KAPPA_TABLE = (" + ",\n               ".join(
        "(" + ", ".join(f"{x:.3f}" for x in row) + ")" for row in kappa) + ")")
    return kappa, lam


if __name__ == "__main__":
    main()
