"""Detection benchmark: quality on a simulated field, HSC peaks, and speed on a big patch.

Prints
* recall of true sources with i-band SNR > 10, the fraction of peaks that
  match no true source, and the split rate of close pairs, on each field of
  ``FIELDS``: the default ``simulate_field(size=600, seed=7)`` and fields
  built differently (strong-wing Moffat PSFs, bright and saturated stars,
  raw cosmic rays and hot bad columns, mostly sky, crowded, and two fields
  no setting was chosen on), with the missed sources counted by cause
  (:func:`miss_causes`) and the detection's wall and CPU time;
* the floor of each field's recall (:func:`deblended_significance`): the
  fraction of those sources a detector knowing every true profile could
  find at detect's threshold, their neighbours' amplitudes and centres free,
  and the recall among them;
* peaks found on each real HSC cut-out of ``../shared/data``;
* the offsets of the 7 catalogue peaks of ``../shared/data/hsc_cosmos_35.npz``;
* numba compile time, then the median wall time and the peak memory of
  detecting a 4000 x 4000 six-band patch (the size-600 field tiled, so its
  content is realistic).

Matching is one-to-one (closest pairs first) within 2 px. The SNR of a true
source is its optimal (model-weighted) i-band SNR from the noise-free truth
stamp and the variance plane. A pair counts when both members have SNR > 10,
they are more than 1.5 i-band PSF FWHM apart and fall in one parent; it is
split when both members are matched to (distinct) peaks.

Usage: python benchmarks/bench_detect.py [--runs 3] [--skip-big] [--skip-compile] [--work DIR]
                                         [--fields default bright ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scarletstore.detect import footprint as fp  # noqa: E402
from scarletstore.simulate.truth import match_positions  # noqa: E402

HSC = ROOT.parent / "shared" / "data" / "hsc_cosmos_35.npz"
LSST_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
               "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8}


def make_exposure(image, variance, mask, psf, bands, planes=LSST_PLANES):
    """Minimal exposure-v1 Dataset from arrays (band, y, x)."""
    ds = xr.Dataset(
        {"image": (("band", "y", "x"), np.asarray(image, np.float32)),
         "variance": (("band", "y", "x"), np.asarray(variance, np.float32)),
         "mask": (("band", "y", "x"), np.asarray(mask, np.int32)),
         "psf": (("band", "psf_y", "psf_x"), np.asarray(psf, np.float32))},
        coords={"band": list(bands)},
        attrs={"wcs": "", "origin_y": 0, "origin_x": 0, "mask_planes": json.dumps(planes),
               "bad_mask_planes": json.dumps(["BAD", "SAT", "SUSPECT", "NO_DATA", "EDGE"]),
               "sources": "[]", "schema": "exposure", "schema_version": 1})
    return ds


def load_sim(out_dir):
    """(exposure, truth table, optimal i-band SNR per true source) of a simulated field."""
    from astropy.io import fits

    from scarletstore.simulate.field import load_truth

    out_dir = Path(out_dir)
    table, stamps = load_truth(out_dir)
    bands = list(table.meta["BANDS"])
    imgs, vars_, masks, psfs = [], [], [], []
    planes = None
    for b in bands:
        with fits.open(out_dir / f"{b}.fits") as h:
            imgs.append(h["IMAGE"].data.astype(np.float32))
            vars_.append(h["VARIANCE"].data.astype(np.float32))
            masks.append(h["MASK"].data.astype(np.int32))
            p = h["PSF"].data.astype(np.float64)
            psfs.append(p / p.sum())
            planes = planes or {k[3:]: int(v) for k, v in h["MASK"].header.items()
                                if k.startswith("MP_")}
    exp = make_exposure(np.stack(imgs), np.stack(vars_), np.stack(masks), np.stack(psfs), bands,
                        planes or LSST_PLANES)
    ib = bands.index("i")
    var = vars_[ib]
    ny, nx = var.shape
    snr = np.zeros(len(table))
    for k, sid in enumerate(table["id"]):
        (y0, x0, h, w), st = stamps[int(sid)]
        a0, b0 = max(y0, 0), max(x0, 0)
        a1, b1 = min(y0 + h, ny), min(x0 + w, nx)
        m = st[ib, a0 - y0:a1 - y0, b0 - x0:b1 - x0].astype(np.float64)
        snr[k] = np.sqrt(np.sum(m * m / var[a0:a1, b0:b1]))
    return exp, table, snr


#: Differently built fields (simulate_field keyword arguments). "default"
#: is the field the detector was first tuned on; the residual-companion
#: settings were chosen on the fields up to "dense3"; "mixed26" and
#: "narrow45" (other seeds, densities, PSF wings, artefacts) were never
#: looked at while choosing them.
FIELDS = [
    ("default", dict(size=600, seed=7)),
    ("moffat25", dict(size=500, seed=31, psf_beta=2.5, bright_stars=3)),
    ("moffat3", dict(size=500, seed=32, psf_beta=3.0, bright_stars=3)),
    ("bright", dict(size=500, seed=33, bright_stars=12, saturation=3e4)),
    ("flagged", dict(size=500, seed=34, cosmic_rays=25, bad_columns=2)),
    ("sky", dict(size=500, seed=35, density=12.0)),
    ("crowded", dict(size=400, seed=36, density=250.0)),
    ("dense27", dict(size=450, seed=41, density=180.0, psf_beta=2.7, bright_stars=5)),
    ("dense3", dict(size=400, seed=42, density=220.0, psf_beta=3.0)),
    ("mixed26", dict(size=450, seed=57, density=160.0, psf_beta=2.6, bright_stars=6,
                     saturation=5e4, cosmic_rays=8)),
    ("narrow45", dict(size=400, seed=58, density=300.0, psf_beta=4.5, bright_stars=2)),
]
#: Fields never used to choose a setting (reported as such).
UNTUNED = {"mixed26", "narrow45"}

match = match_positions  # one-to-one, closest pairs first; -1 where unmatched


def parent_labels(parents, shape):
    """Label image (0 = none, else parent index + 1) rebuilt from the spans."""
    lab = np.zeros(shape, np.int64)
    off = fp.counts_to_offsets(parents["span_count"].values)
    sy, s0, s1 = (parents[v].values for v in ("span_y", "span_x0", "span_x1"))
    for i in range(parents.sizes["parent"]):
        for k in range(off[i], off[i + 1]):
            lab[sy[k], s0[k]:s1[k] + 1] = i + 1
    return lab


def quality(parents, table, snr, fwhm, snr_min=10.0, radius=2.0):
    """Dict of recall, spurious fraction, pair-split rate and counts."""
    ty, tx = np.asarray(table["y"], float), np.asarray(table["x"], float)
    py, px = parents["peak_y"].values, parents["peak_x"].values
    mt, mp = match(ty, tx, py, px, radius)
    sel = snr > snr_min
    shape = parents["background"].shape[1:]
    lab = parent_labels(parents, shape)
    iy = np.clip(np.round(ty).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(tx).astype(int), 0, shape[1] - 1)
    tl = lab[iy, ix]
    idx = np.flatnonzero(sel)
    n_pairs = n_split = 0
    if idx.size > 1:
        for a, b in cKDTree(np.c_[ty[idx], tx[idx]]).query_pairs(np.inf, output_type="ndarray"):
            a, b = idx[a], idx[b]
            if tl[a] == 0 or tl[a] != tl[b]:
                continue
            if np.hypot(ty[a] - ty[b], tx[a] - tx[b]) <= 1.5 * fwhm:
                continue
            n_pairs += 1
            n_split += int(mt[a] >= 0 and mt[b] >= 0)
    return {"n_true": int(sel.sum()), "n_peaks": int(py.size), "n_parents": int(parents.sizes["parent"]),
            "recall": float((mt[sel] >= 0).mean()) if sel.any() else float("nan"),
            "spurious": float((mp < 0).mean()) if py.size else 0.0,
            "n_pairs": n_pairs, "split_rate": n_split / n_pairs if n_pairs else float("nan")}


#: Why a true source was missed, in the order the causes are tested.
MISS_CAUSES = ("edge", "masked", "no footprint", "shares a peak", "peak 2-4 px off",
               "unresolved", "on a brighter slope", "no peak")


def miss_causes(parents, table, snr, fwhm, bad, snr_min=10.0, radius=2.0):
    """Counts of the missed true sources (SNR > snr_min) by cause.

    The first that applies: ``edge`` (within 1 FWHM of the border),
    ``masked`` (a bad-plane pixel at its position), ``no footprint``,
    ``shares a peak`` (a peak within ``radius`` went to another true source),
    ``peak 2-4 px off`` (an unmatched peak within 4 px: found, badly placed),
    and, with no peak near, ``unresolved`` (a brighter true source within
    0.75 FWHM), ``on a brighter slope`` (one within 3 FWHM) or ``no peak``.
    """
    ty, tx = np.asarray(table["y"], float), np.asarray(table["x"], float)
    py, px = parents["peak_y"].values, parents["peak_x"].values
    mt, mp = match(ty, tx, py, px, radius)
    ny, nx = bad.shape
    lab = parent_labels(parents, (ny, nx))
    flux = np.asarray(table["flux_i"], float)
    counts = dict.fromkeys(MISS_CAUSES, 0)
    for k in np.flatnonzero((snr > snr_min) & (mt < 0)):
        iy = min(max(int(round(ty[k])), 0), ny - 1)
        ix = min(max(int(round(tx[k])), 0), nx - 1)
        d = np.hypot(py - ty[k], px - tx[k])
        dt = np.hypot(ty - ty[k], tx - tx[k]) / fwhm
        brighter = flux > flux[k]
        dn = dt[brighter].min() if brighter.any() else np.inf
        if min(ty[k], tx[k], ny - 1 - ty[k], nx - 1 - tx[k]) < fwhm:
            cause = "edge"
        elif bad[iy, ix]:
            cause = "masked"
        elif lab[iy, ix] == 0:
            cause = "no footprint"
        elif (d < radius).any():
            cause = "shares a peak"
        elif ((d < 4.0) & (mp < 0)).any():
            cause = "peak 2-4 px off"
        elif dn < 0.75:
            cause = "unresolved"
        elif dn < 3.0:
            cause = "on a brighter slope"
        else:
            cause = "no peak"
        counts[cause] += 1
    return counts


def _crop_box(tmpl, wgt, keep=1e-6):
    """Sub-box (in the stamp's pixels) holding all but ``keep`` of the template's
    information sum_b T_b^2 w_b; what is cut changes any correlation coefficient
    between two templates by at most sqrt(keep) (Cauchy-Schwarz)."""
    info = (tmpl * tmpl * wgt).sum(axis=0)
    tot = info.sum()
    if tot <= 0:
        return None
    v = np.sort(info.ravel())
    cut = v[np.searchsorted(np.cumsum(v), keep * tot, side="right") - 1] if v[0] <= keep * tot else -1.0
    ys, xs = np.nonzero(info > cut)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def _shift_derivatives(t, pad=16):
    """d/dy and d/dx of stamps (band, h, w) by the Fourier derivative (exact for a
    band-limited profile; central differences bias a 2 px Gaussian's by ~5 %),
    zero-padded by ``pad`` px so the periodic images do not meet."""
    h, w = t.shape[1:]
    ft = np.fft.rfft2(np.pad(t, ((0, 0), (pad, pad), (pad, pad))))
    ky = 2j * np.pi * np.fft.fftfreq(h + 2 * pad)[:, None]
    kx = 2j * np.pi * np.fft.rfftfreq(w + 2 * pad)[None]
    sl = np.s_[:, pad:pad + h, pad:pad + w]
    return (np.fft.irfft2(ft * ky, s=(h + 2 * pad, w + 2 * pad))[sl],
            np.fft.irfft2(ft * kx, s=(h + 2 * pad, w + 2 * pad))[sl])


def deblended_significance(templates, boxes, variance, good=None, centres=True, keep=1e-6,
                           model_frac=0.0):
    """Significance of each source beyond what its neighbours can absorb.

    Every source's noise-free ``templates[k]`` (band, h, w), placed at
    ``boxes[k] = (y0, x0, h, w)`` in image pixels, is known; free are every
    source's per-band amplitudes and (with ``centres``) its (y, x) shift to first
    order (the template's y and x derivatives times its amplitude, which keeps
    the model linear). With inverse-variance weights (0 where ``good`` is False)
    the Fisher matrix F of all parameters is inverted once; at the truth every
    amplitude is 1 and every shift 0. Per source:

    * ``plain`` / ``plain_band``: its optimal S/N alone (no neighbours), all bands / per band;
    * ``amp_sn``: the S/N of its amplitude with the SED known, all other
      parameters (its own centre too) marginalised: sqrt(1^T C_aa^-1 1), C_aa its
      amplitudes' block of F^-1 (equals ``plain`` for a lone source);
    * ``dchi2``: the likelihood ratio of the model with and without it, the
      neighbours refitted (the expected chi^2 increase when its amplitudes and
      shifts are set to 0): theta^T C_kk^-1 theta over its whole block;
    * ``z`` / ``z_lr``: ``amp_sn^2`` / ``dchi2`` mapped as :func:`detect` maps its
      multi-band chi^2 (positive-flux mixture over the bands with light) to a
      one-sided Gaussian significance, so it compares with detect's threshold;
    * ``nbands``: bands with light in the template.

    ``model_frac`` > 0 adds ``(model_frac * M)^2`` to the variance, M the sum of all
    templates: profiles known only to that fraction per pixel (uncorrelated),
    a crude stand-in for the unknown morphologies a real detector faces.
    """
    from scarletstore.detect.filters import positive_chi2_significance

    var = np.asarray(variance, np.float64)
    nb, ny, nx = var.shape
    if model_frac > 0:
        total = np.zeros_like(var)
        for t, (y0, x0, h, w) in zip(templates, boxes):
            a0, b0, a1, b1 = max(y0, 0), max(x0, 0), min(y0 + h, ny), min(x0 + w, nx)
            if a1 > a0 and b1 > b0:
                total[:, a0:a1, b0:b1] += np.asarray(t, np.float64)[:, a0 - y0:a1 - y0, b0 - x0:b1 - x0]
        var = var + (model_frac * total) ** 2
    with np.errstate(divide="ignore"):
        wgt = np.where(var > 0, 1.0 / var, 0.0)
    if good is not None:
        wgt = wgt * np.asarray(good, bool)
    nd = 3 if centres else 1
    npar = nb + (2 if centres else 0)
    n = len(templates)
    basis, cbox = [], []
    plain_band = np.zeros((n, nb))
    for k, (t, (y0, x0, h, w)) in enumerate(zip(templates, boxes)):
        t = np.asarray(t, np.float64)
        a0, b0, a1, b1 = max(y0, 0), max(x0, 0), min(y0 + h, ny), min(x0 + w, nx)
        sub = t[:, a0 - y0:a1 - y0, b0 - x0:b1 - x0] if a1 > a0 and b1 > b0 else t[:, :0, :0]
        ww = wgt[:, a0:a1, b0:b1]
        plain_band[k] = np.sqrt((sub * sub * ww).sum(axis=(1, 2)))
        cb = _crop_box(sub, ww, keep) if sub.size else None
        if cb is None:
            basis.append(None)
            cbox.append((0, 0, 0, 0))
            continue
        # derivatives on the whole stamp, then cropped (no edge effects inside the crop)
        der = [t] + (list(_shift_derivatives(t)) if centres else [])
        st = np.stack(der, axis=1)[:, :, a0 - y0:a1 - y0, b0 - x0:b1 - x0]
        ya, yb, xa, xb = cb
        basis.append(st[:, :, ya:yb, xa:xb])
        cbox.append((a0 + ya, a0 + yb, b0 + xa, b0 + xb))
    cb = np.array(cbox, np.int64).reshape(-1, 4)
    ov = ((np.maximum(cb[:, None, 0], cb[None, :, 0]) < np.minimum(cb[:, None, 1], cb[None, :, 1]))
          & (np.maximum(cb[:, None, 2], cb[None, :, 2]) < np.minimum(cb[:, None, 3], cb[None, :, 3])))
    F = np.zeros((n * npar, n * npar))
    for i, j in np.argwhere(np.triu(ov)):
        ya, yb = max(cb[i, 0], cb[j, 0]), min(cb[i, 1], cb[j, 1])
        xa, xb = max(cb[i, 2], cb[j, 2]), min(cb[i, 3], cb[j, 3])
        bi = basis[i][:, :, ya - cb[i, 0]:yb - cb[i, 0], xa - cb[i, 2]:xb - cb[i, 2]].reshape(nb, nd, -1)
        bj = basis[j][:, :, ya - cb[j, 0]:yb - cb[j, 0], xa - cb[j, 2]:xb - cb[j, 2]].reshape(nb, nd, -1)
        M = np.einsum("bpn,bqn->bpq", bi, bj * wgt[:, ya:yb, xa:xb].reshape(nb, 1, -1))
        blk = np.zeros((npar, npar))
        blk[np.arange(nb), np.arange(nb)] = M[:, 0, 0]  # amplitudes meet only in their own band
        if centres:
            blk[:nb, nb:] = M[:, 0, 1:]
            blk[nb:, :nb] = M[:, 1:, 0].T
            blk[nb:, nb:] = M[:, 1:, 1:].sum(axis=0)
        F[i * npar:(i + 1) * npar, j * npar:(j + 1) * npar] = blk
        F[j * npar:(j + 1) * npar, i * npar:(i + 1) * npar] = blk.T
    d = np.diag(F).copy()
    amp = (np.arange(n * npar) % npar) < nb
    # a band carrying < 1e-8 of a template's information has no amplitude to fit
    ref = np.repeat(np.maximum((plain_band ** 2).max(axis=1), 1e-300), npar)
    used = np.flatnonzero(d > np.where(amp, 1e-8 * ref, 0.0))
    s = 1.0 / np.sqrt(d[used])
    Fs = F[np.ix_(used, used)] * s[:, None] * s[None]
    C = np.zeros_like(F)
    # Jacobi-scaled; the tiny ridge only matters for exactly coincident templates
    C[np.ix_(used, used)] = np.linalg.inv(Fs + 1e-12 * np.eye(len(used))) * s[:, None] * s[None]
    pos = np.full(n * npar, -1)
    pos[used] = used
    amp_sn, dchi2, nbands = np.zeros(n), np.zeros(n), np.zeros(n, np.int64)
    for k in range(n):
        blk = [p for p in range(k * npar, (k + 1) * npar) if pos[p] >= 0]
        ka = [p for p in blk if amp[p]]
        nbands[k] = len(ka)
        if not ka:
            continue
        Caa = C[np.ix_(ka, ka)]
        one = np.ones(len(ka))
        amp_sn[k] = np.sqrt(max(one @ np.linalg.solve(Caa, one), 0.0))
        theta = amp[blk].astype(float)
        dchi2[k] = max(theta @ np.linalg.solve(C[np.ix_(blk, blk)], theta), 0.0)
    z = np.zeros(n)
    z_lr = np.zeros(n)
    ok = nbands > 0
    if ok.any():
        z[ok] = positive_chi2_significance(amp_sn[ok][None] ** 2, nbands[ok][None])[0]
        z_lr[ok] = positive_chi2_significance(dchi2[ok][None], nbands[ok][None])[0]
    return {"plain": np.sqrt((plain_band ** 2).sum(axis=1)), "plain_band": plain_band,
            "amp_sn": amp_sn, "dchi2": dchi2, "z": z, "z_lr": z_lr, "nbands": nbands}


def field_floor(exp, out_dir, model_frac=0.0):
    """:func:`deblended_significance` of every true source of a simulated field
    (truth stamps as templates, the exposure's variance, bad-plane pixels of
    each band at weight 0), in the truth table's row order."""
    from scarletstore.simulate.field import load_truth

    table, stamps = load_truth(out_dir)
    planes = json.loads(exp.attrs.get("mask_planes", "{}"))
    from scarletstore.ingest.masks import DEFAULT_BAD_PLANES

    bits = sum(1 << int(planes[p]) for p in DEFAULT_BAD_PLANES if p in planes)
    good = (exp["mask"].values & bits) == 0
    ids = [int(i) for i in table["id"]]
    return deblended_significance([stamps[i][1] for i in ids], [stamps[i][0] for i in ids],
                                  exp["variance"].values, good, model_frac=model_frac)


def floor_quality(parents, table, snr, fl, threshold, snr_min=10.0, radius=2.0):
    """Recall against the floor: of the true SNR > ``snr_min`` sources, the fraction
    whose deblended significance (:func:`deblended_significance` ``z_lr``, the
    likelihood ratio; and ``z``, the amplitude alone) exceeds the detection
    ``threshold`` (what a detector knowing every profile could reach), and the
    recall among those sources; and ``z_for_target``, the 3rd percentile of
    their ``z_lr``: a recall of 0.97 needs every source down to it found."""
    ty, tx = np.asarray(table["y"], float), np.asarray(table["x"], float)
    mt, _ = match(ty, tx, parents["peak_y"].values, parents["peak_x"].values, radius)
    sel = snr > snr_min
    found = mt >= 0
    # 0.97 recall needs every source found down to this deblended significance
    out = {"z_for_target": float(np.percentile(fl["z_lr"][sel], 3)) if sel.any() else float("nan")}
    for key in ("z_lr", "z"):
        ok = sel & (fl[key] > threshold)
        out[key] = {"attainable": float(ok.sum() / max(sel.sum(), 1)),
                    "recall_attainable": float(found[ok].mean()) if ok.any() else float("nan"),
                    "n_attainable": int(ok.sum()), "missed_attainable": int((ok & ~found).sum()),
                    "missed_below": int((sel & ~ok & ~found).sum())}
    return out


def bad_pixels(exp):
    """Pixels a default bad plane flags in any band (what detection ignores)."""
    from scarletstore.ingest.masks import DEFAULT_BAD_PLANES

    planes = json.loads(exp.attrs.get("mask_planes", "{}"))
    bits = sum(1 << int(planes[p]) for p in DEFAULT_BAD_PLANES if p in planes)
    return ((exp["mask"].values & bits) != 0).any(axis=0)


def real_cutouts():
    """(name, peaks, catalogue offsets or None) for each real cut-out in ../shared/data."""
    from scarletstore.detect.detect import detect

    out = []
    for name in ("hsc_cosmos_35", "hsc_cosmos", "cut_hsc", "cut_hsc1"):
        path = HSC.parent / f"{name}.npz"
        if not path.is_file():
            continue
        d = np.load(path)
        img = d["images"]
        mask = d["mask"] if "mask" in d.files else np.zeros(img.shape, np.int32)
        var = d["variance"]
        exp = make_exposure(img, var, mask, d["psfs"], [str(b) for b in d["filters"]])
        p = detect(exp)
        off = None
        if "catalog" in d.files:
            off = [float(np.min(np.hypot(p["peak_y"].values - r["y"], p["peak_x"].values - r["x"])))
                   for r in d["catalog"]]
        out.append((name, p, off))
    return out


def hsc_offsets():
    from scarletstore.detect.detect import detect

    d = np.load(HSC)
    exp = make_exposure(d["images"], d["variance"], d["mask"], d["psfs"], [str(b) for b in d["filters"]])
    p = detect(exp)
    off = [float(np.min(np.hypot(p["peak_y"].values - r["y"], p["peak_x"].values - r["x"])))
           for r in d["catalog"]]
    return off, int(p.sizes["peak"])


def big_patch(exp, size=4000):
    """A size x size patch tiled from a smaller field, all six bands."""
    reps = (1, -(-size // exp.sizes["y"]), -(-size // exp.sizes["x"]))
    tile = {v: np.tile(exp[v].values, reps)[:, :size, :size] for v in ("image", "variance", "mask")}
    return make_exposure(tile["image"], tile["variance"], tile["mask"], exp["psf"].values,
                         [str(b) for b in exp["band"].values])


def _tiny_exposure():
    rng = np.random.default_rng(0)
    r = np.arange(-7, 8)
    psf = np.exp(-0.5 * (r[:, None] ** 2 + r[None] ** 2) / 1.5 ** 2)
    tiny = make_exposure(rng.normal(size=(2, 64, 64)), np.ones((2, 64, 64)), np.zeros((2, 64, 64)),
                         np.stack([psf / psf.sum()] * 2), ["g", "r"])
    tiny["image"][:, 30:34, 30:34] += 20
    return tiny


def cold_compile_seconds():
    """Import + first tiny detection in a fresh process with an empty numba cache."""
    import os
    import subprocess

    code = ("import sys, time; sys.path.insert(0, %r); t = time.perf_counter(); "
            "import bench_detect as b; from scarletstore.detect import detect; "
            "detect(b._tiny_exposure(), known=([5.0], [5.0])); print(time.perf_counter() - t)"
            % str(Path(__file__).resolve().parent))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs of the big patch (median)")
    ap.add_argument("--size", type=int, default=4000)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="skip the cold numba compile")
    ap.add_argument("--work", default=None, help="directory for the simulated fields (reused)")
    ap.add_argument("--fields", nargs="*", help="names of the fields to run (default: all)")
    args = ap.parse_args(argv)

    cold = float("nan") if args.skip_compile else cold_compile_seconds()
    t0 = time.perf_counter()
    from scarletstore.detect import detect as det_mod  # noqa: F401  (imports numba kernels)

    t1 = time.perf_counter()
    det_mod.detect(_tiny_exposure(), known=([5.0], [5.0]))
    print(f"numba: cold compile of every kernel {cold:.1f} s (empty cache); with the on-disk "
          f"cache: import {t1 - t0:.2f} s, first tiny detect {time.perf_counter() - t1:.2f} s")

    exp = None
    try:
        import galsim  # noqa: F401
        have_sim = True
    except ImportError:
        have_sim = False
        print("simulated field: skipped (galsim not installed)")
    if have_sim:
        from scarletstore.simulate.field import simulate_field

        work = Path(args.work or tempfile.mkdtemp(prefix="bench_detect_"))
        for name, kw in FIELDS:
            if args.fields and name not in args.fields:
                continue
            fdir = work / name
            if not (fdir / "truth.fits").exists():
                simulate_field(fdir, **kw)
            fexp, table, snr = load_sim(fdir)
            fwhm_i = det_mod.psf_fwhm(fexp["psf"].values[list(fexp["band"].values).index("i")])
            t, c = time.perf_counter(), time.process_time()
            parents = det_mod.detect(fexp)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            q = quality(parents, table, snr, fwhm_i)
            extra = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("size", "seed"))
            print(f"{name:9s} ({kw['size']} px, seed {kw['seed']}{', ' + extra if extra else ''})"
                  f"{' [not tuned on]' if name in UNTUNED else ''}: "
                  f"{q['n_true']} true SNR > 10, {q['n_peaks']} peaks, {q['n_parents']} parents "
                  f"({dt:.2f} s wall, {dc:.2f} s CPU)")
            resid = int(((parents["peak_flags"].values & det_mod.PEAK_RESIDUAL) != 0).sum())
            print(f"  recall {q['recall']:.3f} (>= 0.97)  unmatched peaks {q['spurious']:.3f} (<= 0.03)"
                  f"  pairs {q['n_pairs']} split {q['split_rate']:.3f} (>= 0.90)  residual peaks {resid}")
            causes = miss_causes(parents, table, snr, fwhm_i, bad_pixels(fexp))
            print("  misses: " + (", ".join(f"{v} {k}" for k, v in causes.items() if v) or "none"))
            t = time.perf_counter()
            thr = float(parents.attrs["threshold"])
            fq = floor_quality(parents, table, snr, field_floor(fexp, fdir), thr)
            f10 = floor_quality(parents, table, snr, field_floor(fexp, fdir, 0.1), thr)["z_lr"]
            lr, am = fq["z_lr"], fq["z"]
            print(f"  floor (true profiles known; all amplitudes + centres free; deblended Z > {thr:g}):"
                  f" attainable {lr['attainable']:.3f}, recall of those {lr['recall_attainable']:.3f}"
                  f" (misses {lr['missed_attainable']} attainable, {lr['missed_below']} below); by"
                  f" amplitude S/N alone {am['attainable']:.3f} / {am['recall_attainable']:.3f}; profiles"
                  f" known to 10 % per px {f10['attainable']:.3f} / {f10['recall_attainable']:.3f};"
                  f" 0.97 needs all down to deblended Z {fq['z_for_target']:.1f}"
                  f" ({time.perf_counter() - t:.1f} s)")
            if name == "default":
                exp = fexp

    for name, p, off in real_cutouts():
        flags = p["peak_flags"].values
        line = (f"real {name}: {p.sizes['peak']} peaks in {p.sizes['parent']} parents "
                f"({int(((flags & det_mod.PEAK_RESIDUAL) != 0).sum())} residual companions)")
        if off is not None:
            line += f"; catalogue peaks {len(off)}, found within 1.5 px {sum(o < 1.5 for o in off)}"
        print(line)
    if HSC.is_file():
        off, npk = hsc_offsets()
        print(f"hsc_cosmos_35: {npk} peaks; catalogue peak offsets (px): "
              + " ".join(f"{o:.2f}" for o in off) + f"   max {max(off):.2f} (target <= 1.5)")
    else:
        print(f"hsc_cosmos_35: skipped ({HSC} not found)")

    if args.skip_big or exp is None:
        if exp is None:
            print("big patch: skipped (needs the simulated field)")
        return 0
    big = big_patch(exp, args.size)
    del exp
    gc.collect()
    times = []
    for _ in range(max(1, args.runs)):
        t = time.perf_counter()
        res = det_mod.detect(big)
        times.append(time.perf_counter() - t)
        npar, npk = res.sizes["parent"], res.sizes["peak"]
        del res
        gc.collect()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB -> GiB
    # detect's own allocations (numpy registers its buffers with tracemalloc), one untimed run
    import tracemalloc

    tracemalloc.start()
    res = det_mod.detect(big)
    traced = tracemalloc.get_traced_memory()[1] / 1024 ** 3
    tracemalloc.stop()
    del res
    inp = sum(big[v].nbytes for v in ("image", "variance", "mask", "psf")) / 1024 ** 3
    print(f"{args.size}x{args.size} x {big.sizes['band']} bands: median {np.median(times):.1f} s over "
          f"{len(times)} runs ({', '.join(f'{t:.1f}' for t in times)}); {npar} parents, {npk} peaks")
    print(f"  peak RSS {rss:.2f} GiB (whole process, includes the {inp:.2f} GiB input exposure); "
          f"peak allocated by detect itself (tracemalloc) {traced:.2f} GiB; target < 60 s, < 3 GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
