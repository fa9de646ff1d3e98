"""Lazy per-band catalogs and heavy footprints rebuilt from a stored run.

``band_catalog`` returns an xarray Dataset with one row per child whose
measured columns are lazy: they are xarray backend arrays that, when indexed,
decode and measure only the blends behind the selected rows (blend by blend,
keeping just the per-row values). Building one band never convolves another
band's models.

The catalog's columns, units and attributes are described first without
xarray (:func:`catalog_spec`): :func:`catalog_table` measures them straight
into numpy arrays, which is what the command line writes, so a FITS catalog
never pays xarray's import (0.5-0.6 s of a one-blend call).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..detect.footprint import counts_to_offsets, mask_to_spans, spans_to_mask
from ..errors import InputError, StoreError
from ..ingest.exposure import DEFAULT_BAD_PLANES, bad_bits
from ..store.runs import SOURCE_FLAGS, RunIndex, RunTables, read_blend
from .measure import COLUMNS, measure_children
from .photometry import PHOT_FLAGS, PhotometryConfig, suite_columns
from .photometry.apcorr import load_apcorr
from .photometry.blend import BlendPhotometry, model_fluxes
from .reconstruct import apportion_weights, band_kernel, heavy_values, source_models

# catalog flag bits (source flags keep their bits; these are added)
CATALOG_FLAGS = dict(SOURCE_FLAGS, zero_flux=1 << 8, not_converged=1 << 9, no_data=1 << 10, **PHOT_FLAGS)
#: a child with less of its model light than this on usable pixels is flagged flux_masked:
#: its flux in the band is the model's extrapolation (a star in a NO_DATA region read
#: 2.4e9 against a truth of 3e5 with no flag)
FLUX_MASKED_COVERAGE = 0.5


@dataclass
class HeavyFootprint:
    """A child's pixels in one band: spans (y, x0, x1 inclusive) and their values."""

    source_id: int
    band: str
    span_y: np.ndarray
    span_x0: np.ndarray
    span_x1: np.ndarray
    values: np.ndarray  # pixel values in span order
    bbox: tuple  # (y0, x0, h, w) of the parent box, exposure pixels

    @property
    def flux(self) -> float:
        return float(self.values.sum(dtype=np.float64))

    def cutout(self) -> np.ndarray:
        """(h, w) image of the heavy footprint over the parent box (zero elsewhere)."""
        y0, x0, h, w = self.bbox
        out = np.zeros((h, w), np.float32)
        k = 0
        for y, a, b in zip(self.span_y, self.span_x0, self.span_x1):
            n = b - a + 1
            out[y - y0, a - x0:b - x0 + 1] = self.values[k:k + n]
            k += n
        return out


class KernelCache:
    """Difference kernels of a run: one per band, or per blend and band when the
    run keeps each blend's own PSF (``psf_source == "blend"``, e.g. imports).

    ``psf_override`` (band index -> PSF image) replaces the stored PSF of a
    band for every blend (reanalysis with a new PSF).
    """

    def __init__(self, tables: RunTables, psf_override=None):
        self.tables = tables
        self.model_psf = tables.col("model_psf")
        self.per_blend = tables.attrs.get("psf_source", "run") == "blend" and tables.has("blend_psf")
        self.override = dict(psf_override or {})
        self._cache = {}

    def key(self, b: int, band: int) -> int:
        """Blend ``b`` when its PSF in ``band`` is its own, else -1 (one PSF for every blend)."""
        return b if self.per_blend and band not in self.override else -1

    def band_psf(self, b: int, band: int):
        """The PSF of blend ``b`` in ``band``: the override, the blend's own, or the run's."""
        if band in self.override:
            return self.override[band]
        if self.per_blend:
            return self.tables.col("blend_psf")[b, band]
        return self.tables.col("psf")[band]

    def get(self, b: int, band: int):
        key = (self.key(b, band), band)
        if key not in self._cache:
            self._cache[key] = band_kernel(self.model_psf, self.band_psf(b, band))
        return self._cache[key]


class _Exposure:
    """Per-blend slices of one band of the exposure, read straight from HDF5."""

    def __init__(self, store):
        opened = store.h5_group("exposure")
        if opened is None:  # an older schema: read (and migrate) it whole
            ds = store.read("exposure")
            self.file, self.arrays = None, {v: ds[v].values for v in ("image", "variance", "mask")}
            self.attrs = dict(ds.attrs)
        else:
            self.file, g = opened
            self.arrays = {v: g[v] for v in ("image", "variance", "mask")}
            self.attrs = store.group_attrs(self.file, "exposure")

    def cutout(self, b, ys, xs):
        return tuple(np.asarray(self.arrays[v][b, ys, xs]) for v in ("image", "variance", "mask"))

    def close(self):
        if self.file is not None:
            self.file.close()


def _parent_spans(store):
    """Parent ids and their spans (without the background planes of the group)."""
    opened = store.h5_group("parents")
    if opened is None:
        p = store.read("parents")
        get = lambda v: p[v].values  # noqa: E731
        f = None
    else:
        f, g = opened
        get = lambda v: g[v][()]  # noqa: E731
    try:
        return {
            "row": {int(v): i for i, v in enumerate(get("parent_id"))},
            "off": counts_to_offsets(get("span_count")),
            "spans": (get("span_y"), get("span_x0"), get("span_x1")),
        }
    finally:
        if f is not None:
            f.close()


class BlendMeasurer:
    """Rebuilds and measures the children of one run in one band, blend by blend."""

    def __init__(self, store, run_name: str, band: str, redistribute: bool = False,
                 image_override=None, psf_override=None, photometry: PhotometryConfig | None = None):
        """``psf_override``: a PSF image for ``band``; ``image_override``: a dict with
        ``image``, ``variance``, ``mask`` (h, w) arrays and ``mask_planes`` for ``band``;
        ``photometry``: settings of the measurement suite (apertures, GAaP size)."""
        self.store = store
        self.run_name = run_name
        self.tables = store.run_tables(run_name)
        self.index = RunIndex(self.tables)
        bands = self.tables.bands
        if band not in bands:
            self.tables.close()
            raise InputError(f"band {band!r} is not in run {run_name} (bands {', '.join(bands)})")
        self.band = band
        self.b = bands.index(band)
        self.redistribute = redistribute
        self.kernels = KernelCache(self.tables, None if psf_override is None else {self.b: psf_override})
        self.exposure = _Exposure(store) if store.has("exposure") else None
        self.image_override = image_override
        self.config = json.loads(self.tables.attrs.get("config", "{}"))
        if redistribute and self.exposure is None and image_override is None:
            self.close()
            raise InputError("redistribution needs an image: the store has no exposure "
                             "(give a reprocessed image)")
        self.parents = _parent_spans(store) if store.has("parents") else None
        # "not converged" is an iterative fit that stopped short of its tolerance;
        # blends that were not iterated (isolated, SDSS, imported) are not that
        self.converged = self.tables.col("blend_converged") | (self.tables.col("blend_iterations") <= 0)
        self.decoded = []  # blend numbers decoded, in order (lets tests count reads)
        self.photometry = BlendPhotometry(self, photometry)
        self._recent = {}  # blend -> products, for heavy_footprint(reuse=True)

    def close(self):
        self.tables.close()
        if self.exposure is not None:
            self.exposure.close()

    def _parent_row(self, parent_id: int):
        if self.parents is None:
            return None
        return self.parents["row"].get(int(parent_id))

    def footprint_mask(self, parent_id: int, bbox) -> np.ndarray:
        y0, x0, h, w = bbox
        i = self._parent_row(parent_id)
        if i is None:
            return np.ones((h, w), np.bool_)  # imported models: the (grown) blend box
        sl = slice(self.parents["off"][i], self.parents["off"][i + 1])
        sy, sx0, sx1 = self.parents["spans"]
        return spans_to_mask(sy[sl], sx0[sl], sx1[sl], bbox)

    def _pixels(self, bbox):
        """(image, variance, mask, mask planes) of the band in ``bbox``, or None without an image."""
        y0, x0, h, w = bbox
        ys, xs = slice(y0, y0 + h), slice(x0, x0 + w)
        if self.image_override is not None:
            image = np.asarray(self.image_override["image"][ys, xs], np.float32)
            variance = np.asarray(self.image_override["variance"][ys, xs], np.float32)
            mask = np.asarray(self.image_override["mask"][ys, xs])
            return image, variance, mask, self.image_override["mask_planes"]
        if self.exposure is not None:
            image, variance, mask = self.exposure.cutout(self.b, ys, xs)
            return image, variance, mask, json.loads(self.exposure.attrs["mask_planes"])
        return None

    def usable(self, bbox, extra_planes=()) -> np.ndarray | None:
        """(h, w) bool: the pixels of ``bbox`` the measurements use in this band (no bad
        plane, nor ``extra_planes``; finite image and variance; positive variance)."""
        pixels = self._pixels(bbox)
        return None if pixels is None else self._good(*pixels, extra_planes)

    def _good(self, image, variance, mask, planes, extra_planes=()):
        bad = [*self.config.get("bad_mask_planes", DEFAULT_BAD_PLANES), *extra_planes]
        return ((mask & bad_bits(planes, bad)) == 0) & np.isfinite(variance) & (variance > 0) \
            & np.isfinite(image)

    def _data(self, bbox):
        pixels = self._pixels(bbox)
        if pixels is None:
            return None
        image, variance = pixels[:2]
        good = self._good(*pixels)
        # every measurement reads these three arrays: an unusable pixel (bad plane, or a
        # non-finite image or variance value) is zero in the image, as forced photometry
        # does, because a zero weight times NaN is still NaN (redistributed shares, sums)
        return (np.where(good, image, 0).astype(np.float32), np.where(good, variance, 1).astype(np.float32),
                good)

    def blend_products(self, b: int):
        """Models, heavy values, footprint and data of blend ``b`` in this band."""
        blend = read_blend(self.index, b)
        self.decoded.append(b)
        kernel = self.kernels.get(b, self.b)
        if self._parent_row(blend.parent_id) is None and self.exposure is None and kernel is not None:
            # no parent footprint and no image grid to respect (imported models):
            # render in the box grown by the kernel so convolved flux is not cut off
            r = max(kernel.shape) // 2
            y0, x0, h, w = blend.bbox
            blend.bbox = (y0 - r, x0 - r, h + 2 * r, w + 2 * r)
        models = source_models(blend.sources, self.b, kernel, blend.bbox)
        fp = self.footprint_mask(blend.parent_id, blend.bbox)
        data = self._data(blend.bbox)
        redist = None
        if data is not None:
            redist = heavy_values(models, fp & data[2], data[0], redistribute_flux=True,
                                  peaks=self._local_peaks(b, blend.bbox))
        return blend, models, fp, data, redist

    def _local_peaks(self, b: int, bbox) -> np.ndarray:
        """(n, 2) peak (y, x) of blend ``b``'s children in its box (they take stray flux)."""
        rows = slice(self.index.source_off[b], self.index.source_off[b + 1])
        return np.stack([self.tables.col("source_y")[rows] - bbox[0],
                         self.tables.col("source_x")[rows] - bbox[1]], axis=1)

    def measure_blend(self, b: int) -> dict:
        """Every lazy column for the rows (children) of blend ``b``."""
        blend, models, fp, data, redist = self.blend_products(b)
        image, variance, good = data if data is not None else (None, None, None)
        m = measure_children(models, fp, blend.bbox[0], blend.bbox[1], image, variance, good, redist)
        flux = model_fluxes(blend.sources, len(self.tables.bands))[:, self.b]
        cols = {name: m[:, k] for k, name in enumerate(COLUMNS)}
        if redist is not None:
            # every pixel of the redistributed footprint counts, stray and negative ones
            # too: the children then sum to the image over the parent footprint
            cols["flux_redistributed"] = redist.sum(axis=(1, 2), dtype=np.float64)
        cols["flux"] = flux
        flags = np.zeros(len(blend.sources), np.int32)
        for k, src in enumerate(blend.sources):
            flags[k] = src.flags
        flags |= np.where(flux <= 0, CATALOG_FLAGS["zero_flux"], 0).astype(np.int32)
        if not bool(self.converged[b]):
            flags |= CATALOG_FLAGS["not_converged"]
        if data is None:
            flags |= CATALOG_FLAGS["no_data"]
        else:
            flags |= np.where(cols["flux_coverage"] < FLUX_MASKED_COVERAGE, CATALOG_FLAGS["flux_masked"],
                              0).astype(np.int32)
        # the measurement suite (PSF, aperture, Kron, GAaP fluxes, adaptive moments);
        # photometry None measures the base columns only (benchmarks compare the two)
        if self.photometry is not None:
            phot, flags_phot = self.photometry.children(b, blend, models, fp, data, redist, m)
            cols.update(phot)
            flags |= flags_phot
        cols["flags"] = flags
        cols["n_pixels"] = cols["n_pixels"].astype(np.int64)
        return cols

    def heavy_footprint(self, source_id: int, reuse: bool = False) -> HeavyFootprint:
        """Heavy footprint of one child; with ``reuse`` the products of the last few
        blends are kept, so the children of one blend share one reconstruction."""
        b = self.index.blend_of_source(source_id)
        if not reuse:
            products = self.blend_products(b)
        else:
            recent = self._recent
            products = recent.pop(b, None) or self.blend_products(b)
            recent[b] = products  # most recent last
            while len(recent) > 8:
                del recent[next(iter(recent))]
        blend, models, fp, data, redist = products
        k = int(np.nonzero(blend.source_ids == source_id)[0][0])
        if self.redistribute:
            values = redist[k]
            share = apportion_weights(models, fp & data[2], self._local_peaks(b, blend.bbox))
            inside = share[k] > 0
        else:
            values = models[k]
            inside = fp & (models[k] != 0)
        y0, x0 = blend.bbox[0], blend.bbox[1]
        sy, sx0, sx1 = mask_to_spans(inside, y0, x0)
        vals = values[inside]  # row-major order == span order
        return HeavyFootprint(int(source_id), self.band, sy, sx0, sx1, vals.astype(np.float32), blend.bbox)


class _RowCache:
    """Per-blend column values, filled on demand (the lazy columns share it)."""

    def __init__(self, measurer: BlendMeasurer):
        self.measurer = measurer
        self.blend_of_row = np.repeat(np.arange(len(measurer.index.parent_ids)),
                                      np.diff(measurer.index.source_off))
        self.blends = np.unique(self.blend_of_row).tolist()  # blends with rows, in row order
        self.values: dict[int, dict] = {}

    def get(self, column: str, rows: np.ndarray, dtype) -> np.ndarray:
        out = np.empty(rows.shape, dtype)
        if rows.size == 0:
            return out
        if rows.size == len(self.blend_of_row) and rows[0] == 0 and np.all(np.diff(rows) == 1):
            # every row in order (a whole column, as compute() asks for 30-odd times):
            # the blends' values end to end, without the sort and gather below
            for b in self.blends:
                if b not in self.values:
                    self.values[b] = self.measurer.measure_blend(b)
            out[...] = np.concatenate([self.values[b][column] for b in self.blends])
            return out
        blends = self.blend_of_row[rows]
        unique, inverse = np.unique(blends, return_inverse=True)
        for b in unique:
            if b not in self.values:
                self.values[int(b)] = self.measurer.measure_blend(int(b))
        # one gather over the concatenated blends, not one masked copy per blend and column
        parts = [self.values[int(b)][column] for b in unique]
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        local = rows - self.measurer.index.source_off[blends]
        out[...] = np.concatenate(parts)[starts[inverse] + local]
        return out


LAZY_DTYPES = dict({c: np.float64 for c in COLUMNS}, flux=np.float64, n_pixels=np.int64, flags=np.int32,
                   flux_corr_neighbour_id=np.int64)


# units of the catalog's own columns ("1": dimensionless); the suite's come with it
UNITS = {"id": "1", "parent": "1", "blend": "1", "x": "pixel", "y": "pixel", "ra": "deg", "dec": "deg",
         "centroid_x": "pixel", "centroid_y": "pixel", "ixx": "pixel^2", "iyy": "pixel^2", "ixy": "pixel^2",
         "blendedness": "1", "chi2": "1", "n_pixels": "pixel", "data_coverage": "1", "flux_coverage": "1",
         "flags": "1", "flux_corr_neighbour": "1", "flux_corr_neighbour_id": "1"}
FLUX_COLUMNS = ("flux", "flux_redistributed", "flux_err", "flux_err_noise", "flux_err_model")


#: the smallest aperture radius (pixels) a catalog takes
MIN_APERTURE_RADIUS = 0.5


def photometry_config(apertures=None, **settings) -> PhotometryConfig:
    """Suite settings with the given aperture radii (pixels); refuses bad radii."""
    if apertures is not None:
        radii = tuple(float(r) for r in apertures)
        if not radii or any(not (np.isfinite(r) and r > 0) for r in radii):
            raise InputError(f"aperture radii must be positive pixels, got {list(apertures)}")
        small = [r for r in radii if r < MIN_APERTURE_RADIUS]
        if small:  # a radius of 0.01 px fell between the boundary samples: 0 +- 0 on most rows
            raise InputError(f"aperture radii must be at least {MIN_APERTURE_RADIUS:g} pixel "
                             f"(half a pixel, under which an aperture measures no pixel), got {small}")
        settings["apertures"] = tuple(sorted(set(radii)))
    return PhotometryConfig(**settings)


def _flux_units(measurer) -> str:
    """Units of the band's pixel values (the exposure's image units; counts if unrecorded)."""
    ex = measurer.exposure
    units = None
    if ex is not None:
        units = getattr(ex.arrays["image"], "attrs", {}).get("units")
    if isinstance(units, bytes):
        units = units.decode()
    return str(units) if units else "counts"


def open_measurer(store, band, run=None, redistribute=False, image_override=None,
                  psf_override=None, apertures=None, apcorr=True) -> "BlendMeasurer":
    """The :class:`BlendMeasurer` of ``run`` (default: newest) in ``band``, with the band's
    stored aperture correction when ``apcorr``; shared by the child and parent catalogs."""
    runs = store.runs()
    if not runs:
        raise StoreError(f"{store.path}: no runs; run 'scarletstore deblend' first")
    run = run or runs[-1]
    if run not in runs:
        raise InputError(f"{store.path}: no run {run!r} (runs: {', '.join(runs)})")
    from ..store.runs import check_run_parents

    check_run_parents(store, run)  # footprints come from the parents
    config = photometry_config(apertures)
    measurer = BlendMeasurer(store, run, band, redistribute, image_override, psf_override, config)
    if apcorr:
        corr = measurer.photometry.apcorr = load_apcorr(store, band)
        if corr is not None and corr.run != run:
            # still applied: the correction belongs to the PSF and the measurement, not the run
            warnings.warn(f"aperture correction apcorr/{band} was fitted on run {corr.run}, "
                          f"applied to run {run}", stacklevel=2)
        skip = uncorrected_columns(corr, config) if corr is not None else []
        if skip:
            # e.g. --apertures 4,8 against a correction fitted with 3,6,12: a user reading
            # "apcorr" in the header would take every flux for corrected
            warnings.warn(f"aperture correction apcorr/{band} has no term for "
                          f"{', '.join(skip)} (fitted for "
                          f"{', '.join(corr.names)}): left uncorrected", stacklevel=2)
    return measurer


def uncorrected_columns(corr, config) -> list[str]:
    """Flux columns of the catalog ``config`` that the correction ``corr`` has no term for
    (its reference aperture apart: it is the scale the others are corrected to)."""
    from .photometry import flux_columns

    return [t for t in flux_columns(config) if t not in corr.names and t != corr.reference]


def apcorr_attrs(measurer, band: str) -> dict:
    """Catalog attributes naming the applied aperture correction (keys fit 8-character FITS cards).

    ``apcorr``: its group ("" when none); ``apc_run``: the run it was fitted
    on; ``apc_ref`` / ``apc_rad``: its reference aperture and radius (px);
    ``apc_note``: says so when the catalog's run is another one; ``apc_skip``:
    the flux columns it has no term for, left uncorrected (comma-separated).
    """
    corr = measurer.photometry.apcorr
    if corr is None:
        return {"apcorr": ""}
    other = corr.run != measurer.run_name
    attrs = {"apcorr": f"apcorr/{band}", "apc_run": corr.run, "apc_ref": corr.reference,
             "apc_rad": corr.reference_radius,
             "apc_note": f"fitted on run {corr.run}, not this run" if other else "",
             "apc_skip": ",".join(uncorrected_columns(corr, measurer.photometry.config))}
    if not np.isfinite(corr.reference_radius):
        del attrs["apc_rad"]  # a product older than the recorded radius (FITS takes no NaN card)
    return attrs


@dataclass
class CatalogSpec:
    """A child catalog before it is measured, built without xarray.

    ``eager``: the columns known from the run tables (name -> array);
    ``lazy``: the measured columns (name -> dtype), in column order, that
    ``cache`` measures blend by blend; ``units``: every column's units;
    ``attrs``: the catalog's attributes, in order.
    """

    measurer: BlendMeasurer
    cache: _RowCache
    eager: dict
    lazy: dict
    units: dict
    attrs: dict

    @property
    def n_rows(self) -> int:
        return len(self.cache.blend_of_row)

    def columns(self, show_progress: bool = False) -> dict:
        """Every column as a numpy array, lazy ones measured in chunks of blends
        (the chunks and row requests of :func:`catalog_columns`, so the values match)."""
        from ..progress import progress

        out = {c: np.empty(self.n_rows, dtype) for c, dtype in self.lazy.items()}
        for a, b in progress(_blend_chunks(self.eager["blend"]), desc="catalog", enabled=show_progress):
            rows = np.arange(a, b)
            for c, dtype in self.lazy.items():
                out[c][a:b] = self.cache.get(c, rows, dtype)
        return dict(self.eager, **out)


def _lazy_columns(measurer, redistribute: bool) -> tuple[list, dict]:
    """Names of the measured columns, in catalog order, and the units of every column."""
    config = measurer.photometry.config
    cols = ["flux", "flux_err", "centroid_x", "centroid_y", "ixx", "iyy", "ixy", "blendedness",
            "chi2", "n_pixels", "data_coverage", "flux_coverage", "flags"]
    if redistribute:
        cols.insert(1, "flux_redistributed")
    flux_units = _flux_units(measurer)
    suite = suite_columns(config, flux_units)
    corrected = measurer.photometry.corrected_columns()
    cols[-1:-1] = list(suite) + corrected + ["flux_err_noise", "flux_err_model",
                                              "flux_corr_neighbour", "flux_corr_neighbour_id"]
    # (flags stay last)
    units = dict(UNITS, **{c: flux_units for c in FLUX_COLUMNS}, **suite)
    units.update({c: flux_units for c in corrected})
    return cols, units


def catalog_spec(store, band: str, run: str | None = None, redistribute: bool = False,
                 image_override=None, psf_override=None, apertures=None, apcorr: bool = True) -> CatalogSpec:
    """The columns, units and attributes of :func:`band_catalog` (same arguments), unmeasured."""
    measurer = open_measurer(store, band, run, redistribute, image_override, psf_override,
                             apertures, apcorr)
    cache = _RowCache(measurer)
    t = measurer.tables
    x, y = t.col("source_x"), t.col("source_y")
    ra, dec = _sky(measurer.exposure, x, y)
    eager = {"id": t.col("source_id"), "parent": t.col("source_parent_id"),
             "blend": cache.blend_of_row.astype(np.int64), "x": x, "y": y, "ra": ra, "dec": dec}
    cols, units = _lazy_columns(measurer, redistribute)
    lazy = {c: np.dtype(LAZY_DTYPES.get(c, np.float64)) for c in cols}
    attrs = {"band": band, "run": measurer.run_name, "redistribute": int(redistribute),
             "flag_bits": json.dumps(CATALOG_FLAGS),
             **apcorr_attrs(measurer, band),
             # why ra / dec are NaN on every row of a store made without a WCS (an npz, a FITS
             # file with no celestial header): not a failed measurement
             "sky_coordinates": "wcs" if _has_wcs(measurer.exposure) else "none: the exposure has no WCS",
             "units": json.dumps({c: units[c] for c in [*eager, *lazy]})}
    return CatalogSpec(measurer, cache, eager, lazy, units, attrs)


def band_catalog(store, band: str, run: str | None = None, redistribute: bool = False,
                 image_override=None, psf_override=None, apertures=None, apcorr: bool = True) -> xr.Dataset:
    """One row per child of ``run`` (default: the newest) in ``band``; measured columns are lazy.

    ``apertures``: radii (pixels) of the circular aperture fluxes (default 3, 6, 12).
    ``apcorr``: apply the band's stored aperture correction (group
    ``apcorr/<band>``) when there is one; the raw values stay as
    ``<flux>_uncorrected`` / ``<flux>_err_uncorrected``.
    Every column carries its units (variable attribute ``units``; all of them in
    the dataset attribute ``units`` as JSON).
    """
    import xarray as xr

    from .lazycolumn import lazy_variable, with_measurer

    spec = catalog_spec(store, band, run, redistribute, image_override, psf_override, apertures, apcorr)
    data = {c: xr.Variable(("row",), v, attrs={"units": spec.units[c]}) for c, v in spec.eager.items()}
    for c, dtype in spec.lazy.items():
        data[c] = lazy_variable(spec.cache, c, dtype, spec.n_rows, attrs={"units": spec.units[c]})
    ds = xr.Dataset(data, attrs=dict(spec.attrs)).set_coords(["id"])
    return with_measurer(ds, spec.measurer)  # attrs["_measurer"], never copied or written


def catalog_table(store, band: str, run: str | None = None, redistribute: bool = False,
                  image_override=None, psf_override=None, apertures=None, apcorr: bool = True,
                  show_progress: bool = False) -> tuple[dict, dict]:
    """:func:`band_catalog` measured at once, without xarray: ``(columns, attrs)``.

    ``columns`` maps each column name to a numpy array (the columns and
    dtypes of ``catalog_columns(band_catalog(...))``, in its order);
    ``attrs`` are the catalog's attributes (units as JSON included).
    """
    spec = catalog_spec(store, band, run, redistribute, image_override, psf_override, apertures, apcorr)
    try:
        return spec.columns(show_progress), dict(spec.attrs)
    finally:
        spec.measurer.close()


def _has_wcs(exposure) -> bool:
    return exposure is not None and bool(exposure.attrs.get("wcs"))


def _sky(exposure, x, y):
    if not _has_wcs(exposure):
        return np.full(x.shape, np.nan), np.full(x.shape, np.nan)
    from .tan_sky import tan_pixel_to_sky

    # the WCS header describes the exposure arrays' own pixel grid (origin_x/y not added)
    sky = tan_pixel_to_sky(exposure.attrs["wcs"], x, y)  # TAN(-SIP): no astropy.wcs import
    if sky is not None:
        return sky
    from astropy.io import fits
    from astropy.wcs import WCS

    w = WCS(fits.Header.fromstring(exposure.attrs["wcs"]))
    ra, dec = w.all_pix2world(x, y, 0)
    return np.asarray(ra, np.float64), np.asarray(dec, np.float64)


def heavy_footprint(store, source_id: int, band: str, run: str | None = None,
                    redistribute: bool = False) -> HeavyFootprint:
    """The heavy footprint of one child in one band.

    The set-up (run tables, blend index, kernels, open exposure, parent spans)
    is kept on ``store`` for the current version of its file, so a loop of
    calls pays it once; a write to the store drops it (see ``Store.cached``).
    """
    runs = store.runs()
    run = run or (runs[-1] if runs else None)
    if run is None or run not in runs:
        raise InputError(f"{store.path}: no run {run!r}")
    measurer = store.cached(("footprint", run, band, bool(redistribute)),
                            lambda: BlendMeasurer(store, run, band, redistribute))
    try:
        return measurer.heavy_footprint(source_id, reuse=True)
    except KeyError as exc:
        raise InputError(str(exc.args[0])) from None


def blend_views(store, parent_id: int, run: str | None = None):
    """Data and per-source models of one blend in every band.

    Returns
    -------
    data : (B, h, w) observed image of the blend box (None without an exposure)
    models : (n_sources, B, h, w) observed-frame models
    bands : list of band names
    blend : the :class:`~scarletstore.store.runs.StoredBlend`
    """
    runs = store.runs()
    run = run or (runs[-1] if runs else None)
    if run is None or run not in runs:
        raise InputError(f"{store.path}: no run {run!r}")
    try:
        blend = store.blend(run, parent_id)
    except StoreError as exc:
        raise InputError(str(exc)) from None
    tables = store.run_tables(run)
    try:
        bands = tables.bands
        if not blend.sources:
            raise InputError(f"blend {parent_id} of run {run} has no models "
                             f"({tables.col('blend_reason')[blend.index]})")
        kernels = KernelCache(tables)
        models = np.stack([source_models(blend.sources, k, kernels.get(blend.index, k), blend.bbox)
                           for k in range(len(bands))], axis=1)
    finally:
        tables.close()
    data = None
    if store.has("exposure"):
        y0, x0, h, w = blend.bbox
        with store.open("exposure") as ex:
            data = np.asarray(ex["image"].isel(y=slice(y0, y0 + h), x=slice(x0, x0 + w)).values)
    return data, models, bands, blend


def export_catalog(cat: xr.Dataset, path, show_progress: bool = False) -> int:
    """Compute ``cat`` blend by blend and write it as .fits, .csv or .h5; return the row count."""
    columns = catalog_columns(cat, show_progress)
    write_columns(columns, {k: v for k, v in cat.attrs.items() if not k.startswith("_")}, path)
    return cat.sizes["row"]


def catalog_columns(cat: xr.Dataset, show_progress: bool = False) -> dict:
    """Every column of ``cat`` as a numpy array, lazy ones computed in chunks of blends."""
    from ..progress import progress

    n = cat.sizes["row"]
    cat = cat.reset_coords()
    lazy = [v for v in cat.data_vars if not isinstance(cat[v].variable._data, np.ndarray)]
    columns = {v: np.asarray(cat[v].values) for v in cat.data_vars if v not in lazy}
    # stream: compute lazy columns chunk by chunk of blends so memory stays flat
    out = {v: np.empty(n, cat[v].dtype) for v in lazy}
    for a, b in progress(_blend_chunks(columns["blend"]), desc="catalog", enabled=show_progress):
        sub = cat[lazy].isel(row=slice(a, b)).compute()
        for v in lazy:
            out[v][a:b] = sub[v].values
    columns.update(out)
    return columns


def _blend_chunks(blend: np.ndarray, chunk: int = 256) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of ``chunk`` blends each (rows are grouped by blend)."""
    n = len(blend)
    if not n:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(blend)) + 1])
    return [(int(starts[k]), int(starts[k + chunk]) if k + chunk < len(starts) else n)
            for k in range(0, len(starts), chunk)]


def write_columns(columns: dict, attrs: dict, path) -> None:
    """Write equal-length columns as a .fits, .csv or .h5 table, atomically (temporary + rename).

    The columns' units (attribute ``units``, JSON) go to each FITS column's
    ``TUNITn`` (dimensionless ones get none) and to each .h5 variable's
    ``units`` attribute; CSV keeps a plain header (readers expect names only).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    units = _column_units(attrs, columns)
    if suffix == ".fits":
        from .fits_table import fits_writable, write_fits_table

        header = {k.upper()[:8]: v for k, v in attrs.items() if k != "flag_bits"}
        header["FLAGBITS"] = attrs.get("flag_bits", "")
        # a key cut to FITS's 8 characters names its attribute in its comment (MISSING_ alone
        # did not say it was missing_patches)
        comments = {k.upper()[:8]: k for k in attrs if len(k) > 8 and k != "flag_bits"}
        tunits = {c: _FITS_UNITS.get(text, text) for c, text in units.items()
                  if text not in ("", "1") and _is_fits_unit(_FITS_UNITS.get(text, text))}
        if fits_writable(columns, header, tunits):  # numeric columns: no astropy import (~0.35 s)
            write_fits_table(columns, header, tmp, tunits, comments)
        else:
            import astropy.units as u
            from astropy.table import Table
            t = Table(columns)
            for c, text in tunits.items():
                t[c].unit = u.Unit(text, format="fits", parse_strict="silent")
            t.meta.update(header)
            t.write(tmp, format="fits", overwrite=True)
    elif suffix == ".csv":
        import pandas as pd
        pd.DataFrame(columns).to_csv(tmp, index=False)
    elif suffix == ".h5":
        import xarray as xr
        variables = {k: ("row", v, {"units": units[k]} if k in units else {}) for k, v in columns.items()}
        ds = xr.Dataset(variables, attrs=attrs)
        ds.to_netcdf(tmp, engine="h5netcdf", encoding={k: {"_FillValue": None} for k in columns})
    else:
        raise InputError(f"{path}: output must end in .fits, .csv or .h5")
    os.replace(tmp, path)


# the catalog's unit names that FITS spells otherwise (FITS 4.0, table 27: "count"
# or "ct"; astropy reads "counts" as an unrecognised unit, with a warning)
_FITS_UNITS = {"counts": "count", "counts^2": "count^2"}


# FITS unit strings (FITS 4.0, 4.3) built from these: anything else, e.g. a coadd's
# "flux at AB zero point 27", gets no TUNITn (astropy warned once per column on
# reading it) and stays in the UNITS card only
_FITS_UNIT_TOKENS = {"count", "ct", "nJy", "uJy", "mJy", "Jy", "pix", "pixel", "deg", "arcsec",
                     "mag", "adu", "electron", "s", "erg", "cm", "Hz", "Angstrom"}


def _is_fits_unit(text: str) -> bool:
    tokens = re.split(r"[\s*/()^.]+|\*\*|[-+]?\d+", text)
    return bool(text.strip()) and all(t in _FITS_UNIT_TOKENS for t in tokens if t)


def _column_units(attrs: dict, columns: dict) -> dict:
    """Column -> units text, from the catalog attribute ``units`` (JSON; absent or bad: none)."""
    try:
        units = json.loads(attrs.get("units") or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(units, dict):
        return {}
    return {c: str(units[c]) for c in columns if units.get(c) is not None}
