"""Comparing two runs: per-source flux changes per band and convergence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..store.runs import CUBE


def _cumsum_diff(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of each ragged row (rows may be empty)."""
    cs = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    off = np.concatenate([[0], np.cumsum(counts)])
    return cs[off[1:]] - cs[off[:-1]]


def source_fluxes(run: xr.Dataset) -> np.ndarray:
    """(n_source, n_band) total model flux of every source (observed frame, unit-sum kernels)."""
    morph_sum = _cumsum_diff(np.asarray(run["morph"].values), np.asarray(run["component_n_pixels"].values))
    spec = np.asarray(run["component_spectrum"].values, np.float64)
    cube = np.asarray(run["component_type"].values) == CUBE
    # factorised: spectrum x sum(morph); cube: the spectrum holds the per-band sums
    comp_flux = np.where(cube[:, None], spec, spec * morph_sum[:, None])
    counts = np.asarray(run["source_n_components"].values)
    return np.stack([_cumsum_diff(comp_flux[:, b], counts) for b in range(spec.shape[1])], axis=1)


def source_table(run: xr.Dataset) -> pd.DataFrame:
    bands = [str(b) for b in run.band.values]
    flux = source_fluxes(run)
    blend_of = np.repeat(np.arange(run.sizes["blend"]), run["blend_n_sources"].values)
    t = pd.DataFrame({
        "parent": run["source_parent_id"].values,
        "peak": run["source_peak_id"].values,
        "source_id": run["source_id"].values,
        "converged": run["blend_converged"].values[blend_of],
        "iterations": run["blend_iterations"].values[blend_of],
    })
    for k, b in enumerate(bands):
        t[f"flux_{b}"] = flux[:, k]
    return t


def diff_runs(run_a: xr.Dataset, run_b: xr.Dataset) -> tuple[pd.DataFrame, dict]:
    """Match sources of two runs by (parent id, peak id) and compare them.

    Returns
    -------
    table : one row per matched source with flux per band in A and B, the
        relative change, and convergence / iterations in both.
    summary : counts of matched and unmatched sources, per-band median and
        90th-percentile |relative flux change|, convergence changes.
    """
    a, b = source_table(run_a), source_table(run_b)
    bands = [c[5:] for c in a.columns if c.startswith("flux_") and c in b.columns]
    m = a.merge(b, on=["parent", "peak"], how="outer", suffixes=("_a", "_b"), indicator=True)
    both = m[m["_merge"] == "both"].copy()
    for col in ("source_id_a", "source_id_b", "iterations_a", "iterations_b"):
        # the outer merge made them float (NaN on one side); matched rows have both
        both[col] = both[col].astype(np.int64)
    summary = {
        "matched": len(both),
        "only_a": int((m["_merge"] == "left_only").sum()),
        "only_b": int((m["_merge"] == "right_only").sum()),
        "bands": {},
    }
    for band in bands:
        fa, fb = both[f"flux_{band}_a"].values, both[f"flux_{band}_b"].values
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(np.abs(fa) > 0, (fb - fa) / np.abs(fa), np.nan)
        both[f"dflux_{band}"] = rel
        r = np.abs(rel[np.isfinite(rel)])
        summary["bands"][band] = {
            "median_abs_rel": float(np.median(r)) if r.size else float("nan"),
            "p90_abs_rel": float(np.percentile(r, 90)) if r.size else float("nan"),
        }
    conv_a, conv_b = both["converged_a"].astype(bool), both["converged_b"].astype(bool)
    summary["newly_converged"] = int((~conv_a & conv_b).sum())
    summary["no_longer_converged"] = int((conv_a & ~conv_b).sum())
    summary["median_iterations"] = (float(np.median(both["iterations_a"])) if len(both) else float("nan"),
                                    float(np.median(both["iterations_b"])) if len(both) else float("nan"))
    return both.drop(columns="_merge"), summary
