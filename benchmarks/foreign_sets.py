"""Blended scenes with truth that our simulator did not make (bench section ``foreign``).

Each builder yields scenes as dicts: ``label``, ``exposure`` (an exposure
Dataset), ``bands``, ``table`` (columns ``id``, ``y``, ``x``, ``flux_<band>``:
the sources scored), ``stamps`` (id -> (bbox, (band, h, w)) noise-free
templates of every source in the scene, for blendedness, S/N and the perfect
deblender), optionally ``light_peaks`` ((n, 2) peaks of the noise-free light of
the table's sources, a perfect detection's) and ``floor`` (a callable giving the perfect deblender's
sigmas and errors for the selected ids when the stamps are not the truth).

* :func:`psf_matched_scenes` -- scarlet's simulated 7-source blend
  (``psf_matched_sim.npz``: per-source noise-free images), noise drawn at a
  few levels, many draws.
* :func:`sersic_scenes` -- :mod:`scarletstore.simulate.sersic_scenes`, the
  numpy Sersic / clumpy / off-centre bulge generator with per-band
  multi-component PSFs and correlated noise.
* :func:`injected_scenes` -- the real HSC cut-outs with a real source added
  beside one of their galaxies: the cut-out's own PSF image as a star, or a
  galaxy's real pixels from another cut-out.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_CUTOUTS = ("hsc_cosmos_35.npz", "hsc_cosmos.npz", "cut_hsc.npz", "cut_hsc1.npz")


def _centroid(img):
    """Light-weighted (y, x) centre of a non-negative image."""
    w = np.clip(img, 0, None)
    y, x = np.indices(img.shape)
    return float((w * y).sum() / w.sum()), float((w * x).sum() / w.sum())


def light_peaks(stamps, ids):
    """(y, x) of each stamp's brightest pixel of the band sum, refined by a parabola
    per axis: where a perfect detection puts the peak (an off-centre bulge or a
    bright knot, not the profile's centre)."""
    out = []
    for i in ids:
        (y0, x0, _, _), st = stamps[int(i)]
        img = np.asarray(st, np.float64).sum(axis=0)
        iy, ix = np.unravel_index(int(np.argmax(img)), img.shape)
        pos = []
        for line, c in ((img[:, ix], iy), (img[iy], ix)):
            if 0 < c < line.size - 1 and line[c - 1] - 2 * line[c] + line[c + 1] < 0:
                pos.append(c + 0.5 * (line[c - 1] - line[c + 1]) / (line[c - 1] - 2 * line[c] + line[c + 1]))
            else:
                pos.append(float(c))
        out.append((y0 + pos[0], x0 + pos[1]))
    return np.array(out).reshape(-1, 2)


def matched_sim_psfs(cat, bands, star=1, size=41):
    """The truth images' PSF per band: a noise-free star of the catalogue
    (source 1, in the middle of the frame) moved to the centre of a ``size``
    square by a Fourier phase, ringing clipped, unit sum. (The file's ``psfs``
    are a narrow model PSF, not the PSF of its truth images.)"""
    from scarletstore.simulate.sersic_scenes import fourier_shift

    out = []
    for band in bands:
        img = np.asarray(cat[f"intensity_{band}"][star], np.float64)
        cy, cx = _centroid(img)
        iy, ix = int(round(cy)), int(round(cx))
        h = size // 2
        pad = np.zeros((size, size))
        ys = slice(max(iy - h, 0), min(iy + h + 1, img.shape[0]))
        xs = slice(max(ix - h, 0), min(ix + h + 1, img.shape[1]))
        pad[ys.start - (iy - h):ys.stop - (iy - h), xs.start - (ix - h):xs.stop - (ix - h)] = img[ys, xs]
        shifted = fourier_shift(pad, iy - cy, ix - cx)  # the star's centre onto the central pixel
        out.append(shifted / shifted.sum())
    return np.stack(out)


def psf_matched_scenes(sigmas=(1.0, 3.0, 10.0), draws=8, seed=0):
    """``psf_matched_sim.npz`` with white noise of per-pixel sigma ``sigmas`` (the
    blend's peak is ~590 counts summed over bands, so the faintest r S/N is ~8-80),
    ``draws`` independent draws per level; truth = the per-source images and
    the catalogue's centres."""
    from scarletstore.ingest.exposure import make_exposure

    path = DATA / "psf_matched_sim.npz"
    if not path.is_file():
        return
    d = np.load(path)
    cat = d["catalog"]
    bands = [str(b) for b in d["filters"]]
    truth = np.stack([[cat[f"intensity_{b}"][k] for b in bands] for k in range(len(cat))]).astype(np.float64)
    model = truth.sum(axis=0)
    psfs = matched_sim_psfs(cat, bands)
    ny, nx = model.shape[1:]
    # the catalogue's centres, its x moved by -0.5 px: its two stars sit exactly 0.5 px
    # right of their images' centroids in x (0.00 in y), a convention of the file; light
    # centroids of the asymmetric galaxies would be 0.1-0.5 px off their profiles' centres
    pos = np.c_[np.asarray(cat["y"], np.float64), np.asarray(cat["x"], np.float64) - 0.5]
    ids = np.arange(1, len(cat) + 1)
    table = {"id": ids, "y": pos[:, 0], "x": pos[:, 1]}
    table.update({f"flux_{b}": truth[:, k].sum(axis=(1, 2)) for k, b in enumerate(bands)})
    stamps = {int(i): ((0, 0, ny, nx), truth[k]) for k, i in enumerate(ids)}
    peaks = light_peaks(stamps, ids)
    rng = np.random.default_rng(seed)
    for sigma in sigmas:
        for k in range(draws):
            image = model + sigma * rng.standard_normal(model.shape)
            exposure = make_exposure(image, np.full(model.shape, sigma ** 2), None, list(psfs), bands)
            yield {"label": f"psf_matched_sim sigma {sigma:g} draw {k}", "exposure": exposure,
                   "bands": bands, "table": table, "stamps": stamps, "light_peaks": peaks}


def sersic_scenes(seeds=(201, 202, 203, 204), size=300, **options):
    """Scenes of :func:`scarletstore.simulate.sersic_scenes.make_scene` (seeds 1-10
    and 101-104 were looked at while building it, so these are others;
    ``options`` go to ``make_scene``, for ablations)."""
    from scarletstore.ingest.exposure import make_exposure
    from scarletstore.simulate.sersic_scenes import make_scene

    for seed in seeds:
        sc = make_scene(seed, size=size, **options)
        exposure = make_exposure(sc.image, sc.variance, None, list(sc.psfs), list(sc.bands))
        table = {k: v for k, v in sc.truth.items() if k != "kind"}
        yield {"label": f"sersic seed {seed}", "exposure": exposure, "bands": list(sc.bands),
               "table": table, "stamps": sc.stamps, "light_peaks": light_peaks(sc.stamps, table["id"])}


# ------------------------------------------------------------------ real cut-outs + injections
def _alone(exposure):
    """A cut-out deblended alone (detected + catalogue peaks, defaults): per source
    its position, model fluxes, model over the parent box and that box, its r
    S/N and the share of its model on pixels with data, and (:func:`_as_donor`)
    what it would be as a donor."""
    from scarletstore.deblend import DeblendConfig
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import bad_pixels
    from scarletstore.measure.compare import source_fluxes
    from scarletstore.store.store import Store

    parents = detect(exposure)
    image = np.asarray(exposure["image"].values, np.float64)
    var = np.asarray(exposure["variance"].values, np.float64)
    good = ~bad_pixels(exposure) & (var > 0)
    run = deblend_exposure(exposure, parents, DeblendConfig())
    bands = [str(b) for b in exposure.band.values]
    r = bands.index("r")
    flux = source_fluxes(run)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(Path(tmp) / "alone.h5", {"exposure": exposure, "parents": parents})
        store.write({"runs/alone": run})
        for k, sid in enumerate(run["source_id"].values):
            hm = [store.footprint(int(sid), b, run="alone") for b in bands]
            hr = [store.footprint(int(sid), b, run="alone", redistribute=True) for b in bands]
            model = np.stack([h.cutout() for h in hm]).astype(np.float64)
            y0, x0, h, w = (int(v) for v in hm[0].bbox)
            box = np.s_[:, y0:y0 + h, x0:x0 + w]
            src = {"y": float(run["source_y"].values[k]), "x": float(run["source_x"].values[k]),
                   "flux": flux[k], "model": model, "bbox": (y0, x0, h, w),
                   "snr_r": float(np.sqrt((model[r] ** 2 / var[box][r] * good[box][r]).sum())),
                   # the share of its model on pixels with data (a peak on NO_DATA has next to none)
                   "on_data": float((np.abs(model) * good[box]).sum() / max(np.abs(model).sum(), 1e-30))}
            src.update(_as_donor(model, np.stack([h.cutout() for h in hr]).astype(np.float64),
                                 image[box], var[box], (y0, x0)))
            out.append(src)
    return out


def _as_donor(model, pixels, image, var, origin):
    """A source as a donor: its redistributed (real) pixels where its model is above
    2 % of its peak in some band, that model, the variance of those pixels' noise
    (its share squared x the pixel variance) and their box; {} without such pixels.
    ``model``, ``pixels``, ``image`` and ``var`` are (band, h, w) over the parent box."""
    peak = model.reshape(len(model), -1).max(axis=1)
    inside = (model > 0.02 * np.where(peak > 0, peak, np.inf)[:, None, None]).any(axis=0)
    if not inside.any():
        return {}
    ys, xs = np.nonzero(inside)
    box = np.s_[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    share = np.clip(np.where(image != 0, pixels / np.where(image != 0, image, 1), 0), 0, 1)
    return {"donor_pixels": (pixels * inside)[box], "donor_model": (model * inside)[box],
            "donor_var": (share ** 2 * var * inside)[box],
            "donor_bbox": (origin[0] + int(ys.min()), origin[1] + int(xs.min()),
                           int(np.ptp(ys) + 1), int(np.ptp(xs) + 1))}


def _paste(target, stamp, y0, x0):
    """Add (band, h, w) ``stamp`` into ``target`` at (y0, x0), clipped; returns the
    clipped stamp and its box (y0, x0, h, w) in ``target``."""
    _, H, W = target.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + stamp.shape[1], H), min(x0 + stamp.shape[2], W)
    cut = stamp[:, ya - y0:yb - y0, xa - x0:xb - x0]
    target[:, ya:yb, xa:xb] += cut
    return cut, (ya, xa, yb - ya, xb - xa)


def _full(stamp, bbox, shape):
    """A (band, h, w) stamp at ``bbox`` as a full (band, H, W) array."""
    out = np.zeros(shape)
    _paste(out, stamp, bbox[0], bbox[1])
    return out


def injection_floor(host_var, comp_var, stamp_var, templates, host_templates, F_truth, bands):
    """The perfect deblender's error against the truth measured alone, per band r, i, g.

    ``templates`` (K, band, H, W) are the noise-free images of every source of
    the composite (the alone fit's models for the cut-out's sources; the last
    is the donor); the cut-out's noise has variance ``host_var``, the injected
    real stamp its own, ``stamp_var`` (zero for a model star). The perfect
    deblender fits amplitudes by weighted least squares on the composite
    (weights 1 / ``comp_var``); its error for a cut-out source is against the
    same estimate on the cut-out alone (``host_templates``; the two share the
    cut-out's noise), for the donor against its stamp's sum ``F_truth`` (which
    carries the stamp's noise). Both are linear in the two noises, so their
    variances are exact sums over pixels. Returns (K, 3) relative sigmas.
    """
    K = len(templates)
    sig = np.zeros((K, 3))
    for col, band in enumerate("rig"):
        b = bands.index(band)
        X = templates[:, b].reshape(K, -1)
        v1, v2, vs = (np.asarray(a[b], np.float64).ravel() for a in (host_var, comp_var, stamp_var))
        w2 = np.where(np.isfinite(v2) & (v2 > 0), 1 / np.where(v2 > 0, v2, 1), 0)
        w1 = np.where(np.isfinite(v1) & (v1 > 0), 1 / np.where(v1 > 0, v1, 1), 0)
        M2 = (X * w2) @ X.T + 1e-30 * np.eye(K)
        C2 = np.linalg.solve(M2, X * w2)  # amplitude = C2 @ data
        Xh = host_templates[:, b].reshape(len(host_templates), -1)
        C1 = np.linalg.solve((Xh * w1) @ Xh.T + 1e-30 * np.eye(len(Xh)), Xh * w1)
        for k in range(K - 1):
            g_host = C2[k] - C1[k]
            sig[k, col] = np.sqrt((g_host ** 2 * v1).sum() + (C2[k] ** 2 * vs).sum())
        # the donor's truth is its stamp's sum: template sum plus the stamp's noise
        tf = X[-1].sum() / F_truth[b]
        g_stamp = C2[-1] * tf - (vs > 0) / F_truth[b]
        sig[-1, col] = np.sqrt(((C2[-1] * tf) ** 2 * v1).sum() + (g_stamp ** 2 * vs).sum())
    return sig


def _add_star(rng, comp, exp, bands, host, py, px):
    """Add a star beside ``host``: the cut-out's PSF at (py, px), 0.3-3 x the host's r
    flux, stellar colours. Returns its noise-free image (band, H, W) and fluxes."""
    from scarletstore.simulate.sersic_scenes import render_star

    r = bands.index("r")
    scale = 10 ** rng.uniform(-0.5, 0.5)
    sed = np.exp(rng.uniform(-0.3, 0.5) * np.arange(len(bands)))
    flux = host["flux"][r] * scale * sed / sed[r]
    origin, st = render_star(flux, py, px, np.asarray(exp["psf"].values, np.float64))
    cut, bbox = _paste(comp, st, *origin)
    return _full(cut, bbox, comp.shape), cut.sum(axis=(1, 2))


def _add_galaxy(rng, comp, stamp_var, donors, bands, host, py, px):
    """Add a donor galaxy's real pixels with its peak at the whole pixel nearest
    (py, px), scaled to about the host's r flux (0.3-3 x) within 0.3-1.5 (a larger
    scale amplifies the stamp's noise), its noise variance into ``stamp_var``.
    Returns its model (band, H, W), its stamp's fluxes, its position and its cut-out."""
    r = bands.index("r")
    dn, ds = donors[int(rng.integers(len(donors)))]
    scale = float(np.clip(host["flux"][r] * 10 ** rng.uniform(-0.5, 0.5) / ds["flux"][r], 0.3, 1.5))
    dy, dx = int(round(py - ds["y"])), int(round(px - ds["x"]))
    y0, x0 = ds["donor_bbox"][0] + dy, ds["donor_bbox"][1] + dx
    cut, _ = _paste(comp, scale * ds["donor_pixels"], y0, x0)
    _paste(stamp_var, scale ** 2 * ds["donor_var"], y0, x0)
    return (_full(scale * ds["donor_model"], (y0, x0), comp.shape), cut.sum(axis=(1, 2)),
            (ds["y"] + dy, ds["x"] + dx), dn)


def _composite(name, exp, srcs, k, donor_model, F_truth, pos, comp, stamp_var, label):
    """The scene dict of one composite: exposure, the pair's truth, every source's
    template, known positions and the exact floor."""
    from scarletstore.ingest.exposure import make_exposure

    bands = [str(b) for b in exp.band.values]
    var = np.asarray(exp["variance"].values, np.float64)
    comp_var = var + stamp_var
    exposure = make_exposure(comp, comp_var, np.asarray(exp["mask"].values), list(exp["psf"].values),
                             bands, mask_planes=json.loads(exp.attrs["mask_planes"]))
    host_t = np.stack([_full(s["model"], s["bbox"], comp.shape) for s in srcs])
    templates = np.concatenate([host_t, donor_model[None]])
    did = len(templates)
    hs = srcs[k]
    table = {"id": np.array([k + 1, did]), "y": np.array([hs["y"], pos[0]]), "x": np.array([hs["x"], pos[1]])}
    table.update({f"flux_{b}": np.array([hs["flux"][i], F_truth[i]]) for i, b in enumerate(bands)})
    sig = injection_floor(var, comp_var, stamp_var, templates, host_t, F_truth, bands)
    row = {i + 1: sig[i] for i in range(did)}
    return {"label": f"{name} + {label}", "exposure": exposure, "bands": bands, "table": table,
            "stamps": {i + 1: ((0, 0) + comp.shape[1:], templates[i]) for i in range(did)},
            "known": tuple(np.array([s[c] for s in srcs] + [p]) for c, p in zip("yx", pos)),
            "floor": lambda sel: _floor_rows(row, sel)}


def injected_scenes(per_host=12, seed=0):
    """Real cut-outs with a real source added beside one of their galaxies.

    For each cut-out (the host) and injection: one of its fitted sources with r
    S/N > 20 and 90 % of its model on pixels with data (hsc_cosmos has peaks in
    its NO_DATA border) is picked, and a donor is placed 3.5-9 px from it at a
    random angle, alternately a star (:func:`_add_star`) or the redistributed
    pixels of a galaxy of another cut-out (:func:`_add_galaxy`; r S/N > 20
    there, all its model on pixels with data, at most 30 px a side). The
    composite's variance adds the stamp's own noise. Truth: the host source's
    flux as the same pipeline measures it on the cut-out alone, the donor's
    stamp sum. Scored: that pair.
    """
    from scarletstore.ingest.exposure import read_npz

    names = [n for n in REAL_CUTOUTS if (DATA / n).is_file()]
    cutouts = {n: read_npz(DATA / n) for n in names}
    alone = {n: _alone(e) for n, e in cutouts.items()}
    rng = np.random.default_rng(seed)
    for name in names:
        exp = cutouts[name]
        bands = [str(b) for b in exp.band.values]
        image = np.asarray(exp["image"].values, np.float64)
        srcs = alone[name]
        hosts = [k for k, s in enumerate(srcs) if s["snr_r"] > 20 and s["on_data"] > 0.9]
        donors = [(n, s) for n in names if n != name for s in alone[n]
                  if "donor_bbox" in s and s["snr_r"] > 20 and s["on_data"] > 0.99
                  and max(s["donor_bbox"][2:]) <= 30]
        for j in range(per_host):
            k = int(rng.choice(hosts))
            d, a = rng.uniform(3.5, 9.0), rng.uniform(0, 2 * np.pi)
            py = float(np.clip(srcs[k]["y"] + d * np.sin(a), 4, image.shape[1] - 5))
            px = float(np.clip(srcs[k]["x"] + d * np.cos(a), 4, image.shape[2] - 5))
            comp, stamp_var = image.copy(), np.zeros(image.shape)
            if j % 2 == 0:
                model, F_truth = _add_star(rng, comp, exp, bands, srcs[k], py, px)
                pos, label = (py, px), "star"
            else:
                model, F_truth, pos, dn = _add_galaxy(rng, comp, stamp_var, donors, bands, srcs[k], py, px)
                label = f"galaxy of {dn}"
            yield _composite(name, exp, srcs, k, model, F_truth, pos, comp, stamp_var, label)


def _floor_rows(row, sel):
    """``{"sigma", "error"}`` of the selected ids from per-id (r, i, g) relative sigmas
    (g - i in magnitudes; no realised errors: the real truth is not noise-free)."""
    s = np.array([row[i] for i in sel]).reshape(-1, 3)
    sigma = np.c_[s[:, :2], 1.0857 * np.hypot(s[:, 2], s[:, 1])]
    return {"sigma": sigma, "error": np.full_like(sigma, np.nan)}
