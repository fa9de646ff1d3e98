"""Blend-level queries over a run: a table per blend and selections on it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import InputError

BLEND_COLUMNS = {
    "blend_parent_id": "parent", "blend_n_peaks": "n_peaks", "blend_n_sources": "n_sources",
    "blend_iterations": "iterations", "blend_log_likelihood": "log_likelihood",
    "blend_chi2": "chi2", "blend_converged": "converged", "blend_runtime": "runtime",
    "blend_flags": "flags", "blend_y0": "y0", "blend_x0": "x0", "blend_height": "height",
    "blend_width": "width", "blend_reason": "reason",
}


def blend_table(store, run: str) -> pd.DataFrame:
    """One row per blend of ``run`` (small columns only; no morphology is read)."""
    with store.open(f"runs/{run}") as r:
        cols = {new: np.asarray(r[old].values) for old, new in BLEND_COLUMNS.items()}
        src_parent = np.asarray(r["source_parent_id"].values)
        src_x, src_y = np.asarray(r["source_x"].values), np.asarray(r["source_y"].values)
    table = pd.DataFrame(cols)
    table["reason"] = table["reason"].astype(str)
    table["converged"] = table["converged"].astype(bool)
    table.attrs["sources"] = pd.DataFrame({"parent": src_parent, "x": src_x, "y": src_y})
    return table


def _wcs(text):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(text))


def select(table: pd.DataFrame, blend=None, region=None, where=None, wcs: str = "") -> pd.DataFrame:
    """Rows of ``table`` matching every given condition.

    Parameters
    ----------
    blend : parent id
    region : (ra, dec, radius_arcsec): blends with a source within the radius
    where : a condition on the columns, e.g. ``"n_sources > 3 and converged"``
    wcs : FITS header text of the exposure WCS (needed for ``region``)
    """
    sources = table.attrs.get("sources")
    if blend is not None:
        table = table[table["parent"] == int(blend)]
        if table.empty:
            raise InputError(f"no blend with parent id {blend}")
    if region is not None:
        ra, dec, radius = (float(v) for v in region)
        if radius <= 0:
            raise InputError("--region radius must be positive")
        if not wcs:
            raise InputError("--region needs a WCS; this store's exposure has none")
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        sra, sdec = _wcs(wcs).all_pix2world(sources["x"].values, sources["y"].values, 0)
        sep = SkyCoord(sra * u.deg, sdec * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
        hit = set(sources["parent"].values[sep.arcsec <= radius].tolist())
        table = table[table["parent"].isin(hit)]
    if where:
        try:
            table = table.query(where, engine="python")
        except Exception as exc:
            raise InputError(f"--where {where!r}: {type(exc).__name__}: {exc}; "
                             f"columns are {', '.join(c for c in table.columns)}") from None
    return table
