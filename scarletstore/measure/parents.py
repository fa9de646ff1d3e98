"""Lazy per-band catalog of parents: each blend measured as a whole.

Parents get their own catalog (one row per deblended parent) rather than rows
mixed into the children's: the children's catalog keeps one row per child, so
selections, joins on ``id`` and row counts mean what they did, and a parent
row has no child columns (blendedness, chi2) to fill. ``parent`` joins the
two. Model mode measures the sum of the children's models; redistribute mode
the observed image inside the footprint (what the re-apportioned children add
up to).
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from .photometry import suite_columns


class _ParentCache:
    """Per-blend parent values, filled on demand (the lazy columns share it)."""

    def __init__(self, measurer, blends: np.ndarray):
        self.measurer = measurer
        self.blends = blends
        self.values: dict[int, dict] = {}

    def _measure(self, b: int) -> dict:
        from .catalog import CATALOG_FLAGS

        blend, models, fp, data, _ = self.measurer.blend_products(b)
        cols, flags = self.measurer.photometry.parent(b, blend, models, fp, data)
        if not bool(self.measurer.converged[b]):
            flags |= CATALOG_FLAGS["not_converged"]
        if data is None:
            flags |= CATALOG_FLAGS["no_data"]
        if not np.any(models > 0):  # as for its children: no model light in the band
            flags |= CATALOG_FLAGS["zero_flux"]
        cols["flags"] = flags
        return {k: v[0] for k, v in cols.items()}

    def get(self, column: str, rows: np.ndarray, dtype) -> np.ndarray:
        out = np.empty(rows.shape, dtype)
        for r in np.unique(rows):
            b = int(self.blends[r])
            if b not in self.values:
                self.values[b] = self._measure(b)
            out[rows == r] = self.values[b][column]
        return out


def parent_catalog(store, band: str, run: str | None = None, redistribute: bool = False,
                   image_override=None, psf_override=None, apertures=None) -> xr.Dataset:
    """One row per deblended parent of ``run`` in ``band``; measured columns are lazy.

    Columns: ``parent`` (id), ``blend``, ``n_children``, ``flux`` (the sum of
    the children's models over the footprint; with ``redistribute``, the image
    over the footprint's good pixels, which the children's
    ``flux_redistributed`` add up to), ``centroid_x``/``centroid_y`` of the summed
    model, every column of the measurement suite, ``flags``.
    """
    from .catalog import CATALOG_FLAGS, UNITS, _flux_units, apcorr_attrs, open_measurer
    from .lazycolumn import lazy_variable, with_measurer

    # parents take the band's aperture correction like its children (same fluxes, same missing light)
    measurer = open_measurer(store, band, run, redistribute, image_override, psf_override,
                             apertures, apcorr=True)
    run, config = measurer.run_name, measurer.photometry.config
    corrected = measurer.photometry.corrected_columns()
    counts = np.diff(measurer.index.source_off)
    blends = np.flatnonzero(counts > 0)
    cache = _ParentCache(measurer, blends)
    n = len(blends)
    flux_units = _flux_units(measurer)
    units = dict(UNITS, n_children="1", flux=flux_units, **suite_columns(config, flux_units),
                 **{c: flux_units for c in corrected})
    data = {"parent": ("row", np.asarray(measurer.index.parent_ids)[blends].astype(np.int64)),
            "blend": ("row", blends.astype(np.int64)),
            "n_children": ("row", counts[blends].astype(np.int64))}
    for c in ["flux", "centroid_x", "centroid_y", *suite_columns(config, flux_units), *corrected, "flags"]:
        dtype = np.int32 if c == "flags" else np.float64
        data[c] = lazy_variable(cache, c, dtype, n)
    ds = xr.Dataset(data, attrs={"band": band, "run": run, "redistribute": int(redistribute),
                                 "row_type": "parent",
                                 **apcorr_attrs(measurer, band), "flag_bits": json.dumps(CATALOG_FLAGS)})
    for c in ds.variables:
        ds[c].attrs["units"] = units[c]
    ds.attrs["units"] = json.dumps({c: units[c] for c in ds.variables})
    return with_measurer(ds.set_coords(["parent"]), measurer)  # attrs["_measurer"], never copied
