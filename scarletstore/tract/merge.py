"""The tract catalog of one band: every patch's band catalog, each source once primary.

The rows are those of :func:`scarletstore.measure.catalog.band_catalog` for every
finished patch: deblended children and isolated parents (parents of blends
are not rows; ``scarletstore catalog --parents`` measures them). A source in
an overlap appears once per patch that measured it; ``is_primary`` is true
for the copy whose centre (model position ``x, y``) lies in its own patch's
inner region. Inner regions tile the grid, so each source is primary once,
except where two patches place one source's centre on opposite sides of
their shared edge (each patch fits it with other neighbours, so the centres
differ by a fraction of a pixel): it would then be primary twice or never.
:func:`resolve_seams` settles those: copies from different patches within
``SEAM_MATCH`` pixels of each other, near an inner edge, are one source, and
the copy of the patch whose inner region holds their mean centre is primary.

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
SEAM_MATCH = 1.5  # pixels: copies of one source from two patches (centres differ by well under this)


def resolve_seams(columns: dict, patches: dict) -> int:
    """Make every source near a shared inner edge primary exactly once; returns how many changed.

    Parameters
    ----------
    columns : dict of arrays
        Tract-catalog columns with ``patch``, ``x``, ``y`` (tract pixels) and
        ``is_primary`` (changed in place).
    patches : dict
        Patch name -> :class:`~scarletstore.tract.patches.Patch`.
    """
    from scipy.spatial import cKDTree

    y, x = np.asarray(columns["y"], float), np.asarray(columns["x"], float)
    names = np.asarray(columns["patch"])
    near = np.zeros(y.size, bool)
    for patch in patches.values():
        b = patch.inner
        own = names == patch.name
        d = np.minimum.reduce([np.abs(y - (b.y0 - 0.5)), np.abs(y - (b.y0 + b.height - 0.5)),
                               np.abs(x - (b.x0 - 0.5)), np.abs(x - (b.x0 + b.width - 0.5))])
        near |= own & (d < SEAM_MATCH)
    rows = np.flatnonzero(near & np.isfinite(y) & np.isfinite(x))
    if rows.size < 2:
        return 0
    tree = cKDTree(np.column_stack([y[rows], x[rows]]))
    # one source = a connected group of copies from different patches
    parent = np.arange(rows.size)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in tree.query_pairs(SEAM_MATCH):
        if names[rows[a]] != names[rows[b]]:
            parent[root(a)] = root(b)
    groups = {}
    for k in range(rows.size):
        groups.setdefault(root(k), []).append(rows[k])
    changed = 0
    primary = columns["is_primary"]
    for members in groups.values():
        members = np.asarray(members)
        if members.size < 2 or np.unique(names[members]).size < members.size:
            continue  # a lone copy, or two sources of one patch: nothing to settle
        cy, cx = y[members].mean(), x[members].mean()
        owner = [m for m in members if patches[names[m]].inner.contains(cy, cx)]
        if not owner:
            continue  # the owning patch did not measure it (failed patch): leave as measured
        want = members == owner[0]
        changed += int((primary[members] != want).sum())
        primary[members] = want
    return changed


def patch_catalog(store, band: str, entry: dict) -> tuple[dict, dict]:
    """Columns (tract pixels, patch keys, ``is_primary``) and attributes of one patch's band catalog."""
    from ..measure.catalog import band_catalog, catalog_columns

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
    from ..store.store import Store

    out_dir = Path(out_dir)
    index = read_index(out_dir)
    if band not in index.get("bands", []):
        raise InputError(f"{out_dir}: the tract has no band {band!r} (bands: {', '.join(index['bands'])})")
    parts, attrs, missing = [], {}, []
    for entry in index["patches"]:
        if entry["status"] != "done":
            missing.append(entry["name"])
            continue
        if entry.get("n_sources") == 0:  # nothing to add
            continue
        with Store(out_dir / entry["store"]) as store:
            cols, attrs = patch_catalog(store, band, entry)
        parts.append(cols)
    if not parts:
        raise InputError(f"{out_dir}: no patch of the tract is done with sources; nothing to merge")
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    seams = resolve_seams(columns, {e["name"]: patch_of(e) for e in index["patches"]})
    attrs = dict(attrs, run=json.dumps({e["name"]: e.get("run") for e in index["patches"]
                                        if e["status"] == "done"}),
                 tract=str(out_dir.absolute()), missing_patches=json.dumps(missing),
                 seam_resolved=int(seams))
    return columns, attrs, missing
