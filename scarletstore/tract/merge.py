"""The tract catalog of one band: every patch's band catalog, each source once primary.

The rows are those of :func:`scarletstore.catalog.band_catalog` for every
finished patch: deblended children and isolated parents (parents of blends
are not rows; ``scarletstore catalog --parents`` measures them). A source in
an overlap appears once per patch that measured it; ``is_primary`` is true
for the copy whose centre (model position ``x, y``) lies in its own patch's
inner region. Inner regions tile the grid, so each source is primary once,
up to the rare source whose centre the two patches place on opposite sides
of their shared edge.

Kept per row: ``patch`` (name), ``patch_i``/``patch_j``, ``store_id`` (the
source id within that patch's store) and ``parent`` (its parent id there);
``x, y`` and ``centroid_x, centroid_y`` are moved to tract pixels and
``ra, dec`` come from the patch WCS, a sub-WCS of the grid's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from .index import patch_of, read_index

PIXEL_COLUMNS = {"x": "x0", "centroid_x": "x0", "y": "y0", "centroid_y": "y0"}


def patch_catalog(store, band: str, entry: dict) -> tuple[dict, dict]:
    """Columns (tract pixels, patch keys, ``is_primary``) and attributes of one patch's band catalog."""
    from ..catalog import band_catalog, catalog_columns

    cat = band_catalog(store, band, run=entry.get("run"))
    cols = catalog_columns(cat)
    attrs = {k: v for k, v in cat.attrs.items() if not k.startswith("_")}
    patch = patch_of(entry)
    for name, origin in PIXEL_COLUMNS.items():
        if name in cols:
            cols[name] = cols[name] + getattr(patch.outer, origin)
    n = len(cols["id"])
    out = {"patch": np.full(n, patch.name), "patch_i": np.full(n, patch.i, np.int32),
           "patch_j": np.full(n, patch.j, np.int32), "store_id": cols.pop("id").astype(np.int64),
           "is_primary": np.asarray(patch.inner.contains(cols["y"], cols["x"]), bool)}
    out.update(cols)
    return out, attrs


def tract_catalog(out_dir, band: str) -> tuple[dict, dict, list[str]]:
    """Columns and attributes of the tract catalog of ``band``, and the patches left out.

    Patches not done (failed, or never run) are left out and named in the
    third value and in the attribute ``missing_patches``; their inner
    regions have no primary source.
    """
    from ..store import Store

    out_dir = Path(out_dir)
    index = read_index(out_dir)
    if band not in index.get("bands", []):
        raise InputError(f"{out_dir}: the tract has no band {band!r} (bands: {', '.join(index['bands'])})")
    parts, attrs, missing = [], {}, []
    for entry in index["patches"]:
        if entry["status"] != "done":
            missing.append(entry["name"])
            continue
        if entry.get("n_sources") == 0:  # nothing to add (and a run of no blends reads back badly)
            continue
        with Store(out_dir / entry["store"]) as store:
            cols, attrs = patch_catalog(store, band, entry)
        parts.append(cols)
    if not parts:
        raise InputError(f"{out_dir}: no patch of the tract is done with sources; nothing to merge")
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    attrs = dict(attrs, run=json.dumps({e["name"]: e.get("run") for e in index["patches"]
                                        if e["status"] == "done"}),
                 tract=str(out_dir.absolute()), missing_patches=json.dumps(missing))
    return columns, attrs, missing
