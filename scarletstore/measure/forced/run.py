"""Forced photometry of a stored run on calibrated visits, one visit per task.

Each task reads one visit, takes every blend's models to it
(:mod:`.render`), fits each blend's children jointly (:mod:`.fit`) and
returns that visit's rows; the visit's pixels are dropped before the next
task starts on that worker, so memory holds one visit per worker. Tasks run
in-process or on dask.distributed (as ``deblend`` does); rows are put back in
visit order, so the table is the same for any number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ...errors import InputError
from . import render
from .fit import FLAGS, fit_blend

FIT_LEVEL = 1e-4  # fit pixels: some template above this fraction of its peak (4.3 sigma of a Gaussian)
SKY_MARGIN = 6  # visit pixels of sky kept around the fit region for the pedestal
COLUMNS = ("id", "parent", "visit", "band", "mjd", "flux", "flux_err", "chi2", "n_pix", "flags")


@dataclass
class ForcedModels:
    """What every visit task needs from the store (models, PSFs, grid)."""

    blends: list  # StoredBlend, components in grid pixels
    positions: list  # per blend: (n, 2) grid (y, x) of each source
    bands: list
    model_psf: np.ndarray
    coadd_psf: np.ndarray  # (band, py, px)
    grid_wcs: str
    grid_shape: tuple
    zeropoint: float


def load_models(store, run: str) -> ForcedModels:
    """Read every blend of ``run`` and the grid it was fitted on."""
    from ...store.runs import RunIndex, read_blend

    if not store.has("exposure"):
        raise InputError(f"{store.path}: no exposure group; forced photometry needs the coadd grid")
    ex = store.open("exposure")
    try:
        wcs_text = str(ex.attrs.get("wcs", ""))
        shape = (int(ex.sizes["y"]), int(ex.sizes["x"]))
        zeropoint = float(ex.attrs.get("zeropoint", 27.0))
    finally:
        ex.close()
    if not wcs_text.strip():
        raise InputError(f"{store.path}: the exposure has no WCS; visits cannot be mapped onto it")
    tables = store.run_tables(run)
    try:
        index = RunIndex(tables)
        sy, sx = tables.col("source_y"), tables.col("source_x")
        blends, positions = [], []
        for b in range(len(index.parent_ids)):
            blend = read_blend(index, b)
            if not blend.sources:
                continue  # skipped parents have no children to measure
            for src in blend.sources:  # detach from the file
                for c in src.components:
                    c.morph = np.array(c.morph)
            s0, s1 = index.source_off[b], index.source_off[b + 1]
            blends.append(blend)
            positions.append(np.column_stack([sy[s0:s1], sx[s0:s1]]).astype(np.float64))
        model_psf = np.asarray(tables.col("model_psf"), np.float64)
        psf = np.asarray(tables.col("psf"), np.float64)
        bands = list(tables.bands)
    finally:
        tables.close()
    return ForcedModels(blends, positions, bands, model_psf, psf, wcs_text, shape, zeropoint)


def default_visits(store) -> list[Path]:
    """The coadd's own visit files (the ``visits`` group): where coadd recorded them
    (relative to the store, then absolute), else by name beside the store, in the
    current directory or in a tract's visit folders."""
    if not store.has("visits"):
        raise InputError(f"{store.path}: no visits group (not made by 'scarletstore coadd'); "
                         "name the visit files")
    table = store.read("visits")
    recorded = _recorded_visits(store, table)
    if recorded is not None:
        return recorded
    folders = [Path(store.path).parent, Path(".")] + _tract_visit_folders(store)
    out = []
    for name in (str(f) for f in table["file"].values):
        for folder in folders:
            if (folder / name).is_file():
                out.append(folder / name)
                break
        else:
            raise InputError(f"{name}: visit listed in {store.path} not found beside the store "
                             "or here; name the visit files")
    return out


def _recorded_visits(store, table) -> list[Path] | None:
    """The visit files where the ``visits`` group's ``paths`` attribute recorded them
    (relative to the store first, then absolute), or None when any is not found there
    (or none is recorded). Without it the bare file names were looked for beside the
    store or here only, which failed on visits kept in a folder of their own (the
    demo's ``visits/``)."""
    import json

    try:
        paths = json.loads(table.attrs.get("paths") or "{}")
    except ValueError:
        return None
    folder = Path(store.path).parent
    n = table.sizes["visit"]
    choices = [[folder / p for p in paths.get("relative") or []],
               [Path(p) for p in paths.get("absolute") or []]]
    out = []
    for i in range(n):
        found = next((c[i] for c in choices if len(c) == n and c[i].is_file()), None)
        if found is None:
            return None
        out.append(found)
    return out


def _tract_visit_folders(store) -> list[Path]:
    """The folders of a tract's visits when ``store`` is one of its patch stores
    (``OUT_DIR/patch_i_j/store.h5``; ``OUT_DIR/tract.json`` names the visits by
    absolute path, the patch's ``visits`` group by file name only)."""
    index = Path(store.path).parent.parent / "tract.json"
    if not index.is_file():
        return []
    import json

    try:
        visits = json.loads(index.read_text()).get("visits") or []
    except (OSError, ValueError, AttributeError):
        return []
    return list(dict.fromkeys(Path(v).parent for v in visits if isinstance(v, str)))


def _grid_wcs(text):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(text))


def forced_visit(path, models: ForcedModels, background: bool = True, redistribute: bool = False) -> dict:
    """Rows (dict of columns) of every source of ``models`` in the visit at ``path``."""
    from ...coadd.visits import read_visit

    visit = read_visit(path)
    if visit.band not in models.bands:
        raise InputError(f"{path}: band {visit.band} is not in the run (bands {','.join(models.bands)})")
    b = models.bands.index(visit.band)
    frame = render.visit_frame(visit, _grid_wcs(models.grid_wcs), models.grid_shape,
                               models.model_psf, models.coadd_psf[b])
    image, variance, mask = visit.load()
    if image.shape != tuple(visit.shape):
        raise InputError(f"{path}: IMAGE data {image.shape} disagrees with its header {visit.shape}")
    good = ((mask & visit.bad_bits()) == 0) & np.isfinite(image) & np.isfinite(variance) & (variance > 0)
    scale = visit.flux_scale(models.zeropoint)
    image = np.where(good, image * scale, 0.0)
    ivar = np.where(good, 1.0 / np.where(good, variance, 1.0) / scale**2, 0.0)
    cols = {k: [] for k in COLUMNS}
    for blend, pos in zip(models.blends, models.positions):
        res = _measure_blend(blend, pos, b, frame, image, ivar, good, background, redistribute)
        n = len(blend.sources)
        cols["id"].append(np.asarray(blend.source_ids, np.int64))
        cols["parent"].append(np.full(n, blend.parent_id, np.int64))
        for key, val in (("flux", res.flux), ("flux_err", res.flux_err), ("chi2", res.chi2),
                         ("n_pix", res.npix), ("flags", res.flags)):
            cols[key].append(val)
    n_rows = int(sum(len(a) for a in cols["id"]))
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()
           if k not in ("visit", "band", "mjd")}
    out["visit"] = np.full(n_rows, visit.path.name, dtype=object)
    out["band"] = np.full(n_rows, visit.band, dtype=object)
    out["mjd"] = np.full(n_rows, visit.mjd)
    return out


def _measure_blend(blend, pos, band, frame, image, ivar, good, background, redistribute=False):
    from .fit import PARTIAL_FRACTION, BlendFit

    n = len(blend.sources)
    flags = np.zeros(n, np.int32)
    cu, cv = render.grid_to_visit(frame, pos[:, 1], pos[:, 0])
    iu, iv = np.floor(cu + 0.5).astype(np.int64), np.floor(cv + 0.5).astype(np.int64)
    vy, vx = frame.shape
    inside = (iu >= 0) & (iu < vx) & (iv >= 0) & (iv < vy)
    flags[~inside] |= FLAGS["off_visit"]
    centre_ok = np.zeros(n, bool)
    centre_ok[inside] = good[iv[inside], iu[inside]]
    flags[inside & ~centre_ok] |= FLAGS["bad_center"]
    vbox = None
    if inside.any():
        grid_img, box, mismatch = render.grid_models(blend.sources, band, frame, blend.bbox)
        if mismatch:
            flags |= FLAGS["psf_mismatch"]
        total = grid_img.sum(axis=(1, 2))
        flags[~(total > 0)] |= FLAGS["no_model"]
        vbox = render.visit_box(frame, box)
    if vbox is None:
        flags |= FLAGS["off_visit"]
        return BlendFit(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
                        np.zeros(n, np.int64), flags)
    templates = render.visit_templates(grid_img, box, frame, vbox)
    templates /= np.where(total > 0, total, 1.0)[:, None, None]  # unit flux: amplitude = flux
    ya, xa, h, w = vbox
    sl = np.s_[ya:ya + h, xa:xa + w]
    covered = (templates * good[sl][None]).sum(axis=(1, 2))
    flags[covered < 1 - PARTIAL_FRACTION] |= FLAGS["partial"]
    region = good[sl] & fit_region(templates)
    fit = fit_blend(templates, image[sl], ivar[sl], region, flags, background)
    if redistribute:
        from .fit import redistribute_fluxes

        fit = redistribute_fluxes(fit, templates, image[sl], ivar[sl], region)
    return fit


def fit_region(templates) -> np.ndarray:
    """Pixels where some child's template exceeds FIT_LEVEL x its peak, grown by SKY_MARGIN.

    The rendered box is padded for the convolution and the resampling, so it
    reaches into neighbouring parents; their light there is in no template
    and would go to the pedestal and the fluxes (1.5 % of a source's flux
    with a neighbour 25 pixels away in a 1"-seeing visit). The template
    region alone leaves the pedestal no sky of its own: fitted against the
    templates' wings it moved a simulated star's fluxes by +2.5 %; a margin
    of sky pixels around the region pins it.
    """
    from scipy import ndimage

    peak = templates.max(axis=(1, 2))
    rel = templates / np.where(peak > 0, peak, np.inf)[:, None, None]
    side = 2 * SKY_MARGIN + 1
    return ndimage.binary_dilation(rel.max(axis=0) > FIT_LEVEL, structure=np.ones((side, side), bool))


def _run_tasks(paths, models, background, workers, scheduler, redistribute=False):
    """Yield (visit index, columns) as tasks complete: in-process or on dask.distributed."""
    if scheduler is None and workers <= 1:
        for i, p in enumerate(paths):
            yield i, forced_visit(p, models, background, redistribute)
        return
    from ...parallel import completed, dask_client

    with dask_client(workers, scheduler) as client:
        shared = client.scatter(models, broadcast=True)  # models go to each worker once
        futures = [client.submit(_indexed, i, str(p), shared, background, redistribute, pure=False)
                   for i, p in enumerate(paths)]
        yield from completed(futures)


def _indexed(i, path, models, background, redistribute):
    return i, forced_visit(path, models, background, redistribute)


def forced_photometry(store, run: str, paths, workers: int = 1, scheduler=None,
                      background: bool = True, show_progress: bool = False,
                      redistribute: bool = False) -> xr.Dataset:
    """One row per (source, visit): flux at the store's zero point, error, chi2/dof and flags.

    Visits are checked (headers, bands) before any pixel is read.
    """
    from ...coadd.visits import DistinctVisits
    from ...progress import progress

    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    models = load_models(store, run)
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no visit files given")
    distinct = DistinctVisits()
    for p in paths:
        v = distinct.read(p)
        if v.band not in models.bands:
            raise InputError(f"{p}: band {v.band} is not in run {run} (bands {','.join(models.bands)})")
    parts = [None] * len(paths)
    bar = progress(total=len(paths), desc="forced", enabled=show_progress)
    for i, cols in _run_tasks(paths, models, background, workers, scheduler, redistribute):
        parts[i] = cols
        bar.update(1)
    bar.close()
    data = {k: np.concatenate([p[k] for p in parts]) for k in COLUMNS}
    ds = xr.Dataset({k: ("row", data[k]) for k in COLUMNS},
                    attrs={"run": run, "zeropoint": models.zeropoint, "flag_bits": _flag_text(),
                           "chi2": "chi^2 per degree of freedom over the source's pixels "
                                   "(its template above 1 % of its peak)",
                           "background": "fitted constant per blend" if background else "none",
                           "flux": "redistributed (per-visit heavy footprints)" if redistribute
                           else "joint linear fit of the models"})
    unit = f"flux at AB zero point {models.zeropoint:g}"
    for name in ("flux", "flux_err"):
        if name in ds:
            ds[name].attrs["units"] = unit
    if "mjd" in ds:
        ds["mjd"].attrs["units"] = "d"
    return ds


def _flag_text() -> str:
    import json

    return json.dumps(FLAGS)


def write_table(ds: xr.Dataset, path) -> int:
    """Write the forced table as .fits, .csv or .h5 (atomically); return the row count."""
    import os

    path = Path(path)
    cols = {k: np.asarray(ds[k].values) for k in ds.data_vars}
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    if suffix == ".fits":
        from astropy.table import Table

        t = Table({k: (v.astype(str) if v.dtype == object else v) for k, v in cols.items()})
        t.meta.update({"RUN": ds.attrs["run"], "ZEROPT": ds.attrs["zeropoint"],
                       "FLAGBITS": ds.attrs["flag_bits"],
                       # no FITS unit spells "flux at AB zero point 27": said in a card
                       "FLUXUNIT": ds["flux"].attrs.get("units", "")})
        if "mjd" in t.colnames:
            t["mjd"].unit = "d"
        t.write(tmp, format="fits", overwrite=True)
    elif suffix == ".csv":
        import pandas as pd

        pd.DataFrame(cols).to_csv(tmp, index=False)
    elif suffix == ".h5":
        ds.to_netcdf(tmp, engine="h5netcdf", encoding={k: {"_FillValue": None} for k in cols})
    else:
        raise InputError(f"{path}: output must end in .fits, .csv or .h5")
    os.replace(tmp, path)
    return int(ds.sizes["row"])
