"""Rubin's scarlet_lite on the ``foreign`` blends, beside ours (quality; walls as an aside).

Runs in a scratch virtual environment that has ``lsst-scarlet-lite`` and our
package's dependencies (scarlet_lite is GPL: it is only imported, never copied)::

    PYTHONPATH=<worktree> <peer venv>/bin/python benchmarks/peer_scarlet_lite_foreign.py [--quick]

The scenes, truth, blendedness / S/N selections, perfect-deblender floors and
scores are those of ``bench_deblend.py foreign`` (imported from it). Both
deblenders get the same scene, the same true peak positions (the ``known``
positions, rounded to whole pixels for scarlet_lite, which fixes its centres
there), the same PSFs and variance planes. Ours runs as that bench runs it
(``detect(known=...)`` + ``deblend_exposure`` with the defaults).

scarlet_lite is run with the settings of Rubin's science pipelines
(``meas_extensions_scarlet`` ``ScarletDeblendConfig`` defaults), through its
standard initialisation:

* model-frame PSF ``integrated_circular_gaussian(sigma=0.8)`` (modelPsfSigma),
  ``Observation(images, variance, weights = 1 / variance, 0 on bad pixels, psfs)``;
* ``FactorizedInitialization(min_snr=50, bg_thresh=1.0, initial_bg_thresh=1.0,
  monotonicity=Monotonicity((101, 101)))`` with its own default detection image,
  the chi^2 coadd (the pipeline passes a deconvolved coadd made by a separate
  task instead; not reproduced here);
* ``Blend.fit_spectra()``; Adaprox with ``noise_rms = observation.noise_rms / 10``;
  ``fit(max_iter=300, e_rel=1e-3, min_iter=5, resize=3)``;
* the whole scene is one blend (the pipeline deblends per parent footprint,
  with weights zero outside it).

Fluxes: per source, the sum of its model (model frame, unit-sum model PSF:
total flux), the pipeline's model flux; also its flux-conserved
(re-distributed) flux, ``Blend.conserve_flux``, as a second row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_deblend as bd  # noqa: E402
import foreign_sets as fs  # noqa: E402

# the pipeline's ScarletDeblendConfig defaults (meas_extensions_scarlet)
PEER_SETTINGS = {"model_psf_sigma": 0.8, "min_snr": 50, "bg_thresh": 1.0, "initial_bg_thresh": 1.0,
                 "max_iter": 300, "e_rel": 1e-3, "min_iter": 5, "resize": 3}


def _observation(images, var, good, psfs, bands, footprint=None):
    """A scarlet_lite Observation: weights 1 / variance, 0 on bad pixels and (as the
    pipeline does) outside ``footprint``; the variance plane is left as it is."""
    import lsst.scarlet.lite as scl

    weights = np.where(good, 1 / np.where(good, var, 1), 0.0) * (1 if footprint is None else footprint)
    # bad pixels' variance -> the band's median: unused where the weight is 0, but
    # scarlet_lite's noise_rms is the mean of sqrt(variance) over the plane
    med = np.array([np.median(v[g]) if g.any() else 1.0 for v, g in zip(var, good)])
    variance = np.where(good, var, med[:, None, None])
    model_psf = scl.utils.integrated_circular_gaussian(sigma=PEER_SETTINGS["model_psf_sigma"])
    return scl.Observation(np.where(good, images, 0.0), variance, weights, psfs, model_psf[None],
                           bands=tuple(bands))


def _fit(obs, centers, monotonicity):
    """The pipeline's initialisation and fit of one blend; (model, conserved) fluxes
    (n, band) per centre (0 for a source the initialisation drops) and iterations."""
    from functools import partial

    import lsst.scarlet.lite as scl

    init = scl.initialization.FactorizedInitialization(
        obs, centers, min_snr=PEER_SETTINGS["min_snr"], monotonicity=monotonicity,
        bg_thresh=PEER_SETTINGS["bg_thresh"], initial_bg_thresh=PEER_SETTINGS["initial_bg_thresh"])
    blend = scl.Blend(init.sources, obs)
    blend.fit_spectra()
    blend.parameterize(partial(scl.component.default_adaprox_parameterization, noise_rms=obs.noise_rms / 10))
    it, _ = blend.fit(max_iter=PEER_SETTINGS["max_iter"], e_rel=PEER_SETTINGS["e_rel"],
                      min_iter=PEER_SETTINGS["min_iter"], resize=PEER_SETTINGS["resize"])
    model = np.zeros((len(centers), len(obs.bands)))
    for k, src in enumerate(blend.sources):
        if not src.is_null:
            model[k] = src.get_model().data.sum(axis=(1, 2))
    blend.conserve_flux()
    conserved = np.zeros_like(model)
    for k, src in enumerate(blend.sources):
        if not src.is_null and src.flux_weighted_image is not None:
            conserved[k] = src.flux_weighted_image.data.sum(axis=(1, 2))
    return model, conserved, it


def _planes(exposure):
    from scarletstore.ingest.exposure import bad_pixels

    images = np.asarray(exposure["image"].values, np.float64)
    var = np.asarray(exposure["variance"].values, np.float64)
    good = ~bad_pixels(exposure) & np.isfinite(var) & (var > 0) & np.isfinite(images)
    psfs = np.asarray(exposure["psf"].values, np.float64)
    return images, var, good, psfs / psfs.sum(axis=(1, 2), keepdims=True)


def peer_deblend(exposure, known):
    """scarlet_lite on the whole exposure as one blend, sources at ``known`` (y, x)
    rounded to pixels: (model, conserved) fluxes (n, band) and iterations."""
    import lsst.scarlet.lite as scl

    bands = [str(b) for b in exposure.band.values]
    obs = _observation(*_planes(exposure), bands)
    centers = [(int(round(y)), int(round(x))) for y, x in zip(*known)]
    return _fit(obs, centers, scl.operators.Monotonicity((101, 101)))


def peer_deblend_parents(exposure, parents):
    """scarlet_lite per parent footprint of ``parents`` (the pipeline's way: the
    footprint's box, weights zero outside the footprint), with every peak ours
    gets. Returns (model, conserved) fluxes (n_peak, band), the peaks' (y, x)
    and the largest iteration count."""
    import lsst.scarlet.lite as scl

    bands = [str(b) for b in exposure.band.values]
    images, var, good, psfs = _planes(exposure)
    mono = scl.operators.Monotonicity((101, 101))
    v = {k: np.asarray(parents[k].values) for k in ("bbox_y0", "bbox_x0", "bbox_height", "bbox_width",
                                                     "span_count", "span_y", "span_x0", "span_x1",
                                                     "peak_count", "peak_iy", "peak_ix")}
    s_end, p_end = np.cumsum(v["span_count"]), np.cumsum(v["peak_count"])
    n_peak = int(p_end[-1]) if p_end.size else 0
    model, conserved, its = np.zeros((n_peak, len(bands))), np.zeros((n_peak, len(bands))), [0]
    for j in range(len(v["bbox_y0"])):
        y0, x0, h, w = (int(v[k][j]) for k in ("bbox_y0", "bbox_x0", "bbox_height", "bbox_width"))
        foot = np.zeros((h, w), bool)
        for s in range(s_end[j] - v["span_count"][j], s_end[j]):
            foot[v["span_y"][s] - y0, v["span_x0"][s] - x0:v["span_x1"][s] - x0 + 1] = True
        box = np.s_[:, y0:y0 + h, x0:x0 + w]
        obs = _observation(images[box], var[box], good[box], psfs, bands, foot)
        pk = np.arange(p_end[j] - v["peak_count"][j], p_end[j])
        centers = [(int(v["peak_iy"][k]) - y0, int(v["peak_ix"][k]) - x0) for k in pk]
        model[pk], conserved[pk], it = _fit(obs, centers, mono)
        its.append(it)
    return model, conserved, (np.asarray(parents["peak_y"].values), np.asarray(parents["peak_x"].values)), max(its)


def score_fluxes(flux, sy, sx, table, blend, snr, bands):
    """``bench_deblend``'s per-source errors (its ``_score`` selections) of fluxes
    (n, band) at (sy, sx)."""
    return bd._flux_errors(flux, sy, sx, table, blend, snr, bands)[0]


def ours(exposure, known, table, blend, snr, bands):
    """Our deblender as ``bench_deblend._foreign_set`` runs it with true peaks:
    its errors (by ``_score``), CPU and wall."""
    from scarletstore.deblend import DeblendConfig
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.detect.detect import detect
    from scarletstore.measure.compare import source_fluxes

    c0, w0 = time.process_time(), time.perf_counter()
    parents = detect(exposure, known=known)
    run = deblend_exposure(exposure, parents, DeblendConfig())
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        bd._score(run, table, blend, snr, bands, "")
    errors = bd._score.errors
    flux, pos = source_fluxes(run), (run["source_y"].values, run["source_x"].values)
    return errors, cpu, wall, run.sizes["blend"], parents, (flux, pos)


METHODS = ("ours", "scarlet_lite", "scarlet_lite conserved", "scarlet_lite our parents",
           "scarlet_lite our parents conserved")
TIMED = ("ours", "scarlet_lite", "scarlet_lite our parents")


def run_set(scenes):
    """Both deblenders on every scene of a set; pooled errors per method, floors, timings.

    scarlet_lite runs twice: with the true peaks only, the scene as one blend; and
    per parent footprint of our detection with every peak ours gets (the true
    peaks merged into the detected ones, plus detected peaks no truth matched)."""
    pooled, times = {m: {} for m in METHODS}, {m: [] for m in TIMED}
    floors, n, groups = [], 0, {}
    for sc in scenes:
        exposure, bands, table = sc["exposure"], sc["bands"], sc["table"]
        blend, snr = bd._stamp_truth(sc["stamps"], exposure, bands)
        sel = bd._blended_ids(table, blend, snr)
        floors.append(sc["floor"](sel) if "floor" in sc else bd._blended_floor_errors(table, sel))
        known = sc.get("known", (np.asarray(table["y"]), np.asarray(table["x"])))
        errs, cpu, wall, nblend, parents, our_flux = ours(exposure, known, table, blend, snr, bands)
        n_peak = parents.sizes["peak"]
        times["ours"].append((cpu, wall, nblend, n_peak))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c0, w0 = time.process_time(), time.perf_counter()
            model, conserved, it = peer_deblend(exposure, known)
            times["scarlet_lite"].append((time.process_time() - c0, time.perf_counter() - w0, 1, len(known[0])))
            c0, w0 = time.process_time(), time.perf_counter()
            pmodel, pcons, ppos, pit = peer_deblend_parents(exposure, parents)
            times["scarlet_lite our parents"].append((time.process_time() - c0, time.perf_counter() - w0,
                                                      parents.sizes["parent"], n_peak))
        # scarlet_lite's centres are the rounded peaks; scored at the given positions
        got = {"ours": errs,
               "scarlet_lite": score_fluxes(model, known[0], known[1], table, blend, snr, bands),
               "scarlet_lite conserved": score_fluxes(conserved, known[0], known[1], table, blend, snr, bands),
               "scarlet_lite our parents": score_fluxes(pmodel, *ppos, table, blend, snr, bands),
               "scarlet_lite our parents conserved": score_fluxes(pcons, *ppos, table, blend, snr, bands)}
        for name, e in got.items():
            for k, v in e.items():
                pooled[name].setdefault(k, []).append(v)
        if "floor" in sc:  # injected: the donor alone (its truth, the stamp sum, is not our own fit)
            donor = {k: np.asarray(v)[1:] for k, v in table.items()}
            runs = {"ours": our_flux, "scarlet_lite": (model, known), "scarlet_lite our parents": (pmodel, ppos)}
            for name, (flux, pos) in runs.items():
                for k, v in score_fluxes(flux, *pos, donor, blend, snr, bands).items():
                    pooled.setdefault(f"{name} (donors)", {}).setdefault(k, []).append(v)
        print(f"    {sc['label'][:34]:<34} blended r: ours {_med(errs['blended_r'])}, scarlet_lite "
              f"{_med(got['scarlet_lite']['blended_r'])} ({it} it), on our parents "
              f"{_med(got['scarlet_lite our parents']['blended_r'])} ({pit} it max); {len(known[0])} true"
              f" peaks, {n_peak} peaks in {parents.sizes['parent']} parents", flush=True)
        group = sc["label"].split(" draw")[0]  # psf_matched_sim: one group per noise level
        for name in ("ours", "scarlet_lite", "scarlet_lite our parents"):
            for band in "ri":
                groups.setdefault(group, {}).setdefault((name, band), []).append(got[name][f"blended_{band}"])
        n += 1
    if len(groups) < n:  # scenes that come in groups (noise levels)
        for g, e in groups.items():
            print(f"    {g}: blended r / i " + ";  ".join(
                f"{name} {_med(np.concatenate(e[(name, 'r')]))} / {_med(np.concatenate(e[(name, 'i')]))}"
                for name in ("ours", "scarlet_lite", "scarlet_lite our parents")))
    return pooled, floors, times, n


def _med(a):
    return f"{100 * np.median(a):5.1f} %" if len(a) else "  --   "


def report(name, pooled, floors, times, n):
    """One set's (or the pool's) table rows: floor, each method's medians and walls."""
    fl = {k: np.concatenate([f[k] for f in floors]) for k in ("sigma", "error")}
    with contextlib.redirect_stdout(io.StringIO()):
        floor = bd._print_blended_floor(fl, np.random.default_rng(0))
    print(f"  {name} ({n} scenes): floor r {100 * floor['expected'][0]:.1f} %  i {100 * floor['expected'][1]:.1f} %"
          f"  g-i {floor['expected'][2]:.3f} mag")
    out = {"floor": floor["expected"]}
    for method, e in pooled.items():
        e = {k: np.concatenate(v) for k, v in e.items()}
        gi = float(np.median(e["gi_blended"]))
        row = {"r": float(np.median(e["blended_r"])), "i": float(np.median(e["blended_i"])), "gi": gi,
               "gi_ratio": gi / floor["expected"][2], "n": int(e["blended_r"].size),
               "iso_r": float(np.median(e["isolated_r"])) if e["isolated_r"].size else np.nan,
               "n_iso": int(e["isolated_r"].size)}
        out[method] = row
        print(f"    {method:<34} blended r {100 * row['r']:5.1f} %  i {100 * row['i']:5.1f} % (n={row['n']})"
              f"  g-i {gi:.3f} mag = {row['gi_ratio']:.1f} x floor;  isolated r {100 * row['iso_r']:4.1f} %"
              f" (n={row['n_iso']})")
    for method, t in times.items():
        t = np.array(t)
        print(f"    {method:<34} per scene CPU {np.median(t[:, 0]):.2f} s, wall {np.median(t[:, 1]):.2f} s"
              f" (median; {int(np.median(t[:, 3]))} peaks, {int(np.median(t[:, 2]))} blends a scene);"
              f" per blend CPU {t[:, 0].sum() / t[:, 2].sum():.3f} s, wall {t[:, 1].sum() / t[:, 2].sum():.3f} s")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few scenes per set (a smoke run)")
    p.add_argument("--e-rel", type=float, default=PEER_SETTINGS["e_rel"],
                   help="scarlet_lite's convergence (the pipeline's 1e-3; its docs advise 1e-4 for model fluxes)")
    p.add_argument("--sets", default="psf,sersic,real", help="comma-separated subset of psf, sersic, real")
    args = p.parse_args(argv)
    PEER_SETTINGS["e_rel"] = args.e_rel
    import lsst.scarlet.lite as scl

    print(f"scarlet_lite {scl.__version__}; settings {PEER_SETTINGS}")
    q = args.quick
    sets = {"psf": ("psf_matched_sim + noise", lambda: fs.psf_matched_scenes(draws=1 if q else 8)),
            "sersic": ("sersic generator", lambda: fs.sersic_scenes(seeds=(201,) if q else (201, 202, 203, 204))),
            "real": ("real cut-outs + injected", lambda: fs.injected_scenes(per_host=2 if q else 12))}
    sets = [(sets[k][0], sets[k][1]()) for k in args.sets.split(",")]
    every = ({m: {} for m in METHODS}, [], {m: [] for m in TIMED})
    total, results = 0, {}
    for name, scenes in sets:
        print(f"  {name}:", flush=True)
        pooled, floors, times, n = run_set(scenes)
        if not n:
            print(f"  {name}: skipped (no data)")
            continue
        results[name] = report(name, pooled, floors, times, n)
        for method in pooled:
            for k, v in pooled[method].items():
                every[0].setdefault(method, {}).setdefault(k, []).extend(v)
        every[1].extend(floors)
        for method in times:
            every[2][method].extend(times[method])
        total += n
    if total:
        results["pooled"] = report("all sets pooled", *every, total)
    return results


if __name__ == "__main__":
    main()
