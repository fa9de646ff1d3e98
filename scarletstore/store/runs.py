"""Run Datasets <-> per-blend models.

A run (schema ``run``) stores every blend's sources and components in CF
contiguous ragged arrays sorted by blend, so one blend is one contiguous slice
of each. :func:`build_run` assembles that Dataset from deblender output;
:class:`RunIndex` and :func:`read_blend` read one blend back without touching
the others (the Dataset may be lazy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from typing import TYPE_CHECKING

import numpy as np

from .components import Component, SourceResult
from .frame import Frame
from .schema import stamp, validate

if TYPE_CHECKING:
    import xarray as xr

# blend flags
BLEND_FLAGS = {
    "too_many_peaks": 1,
    "parent_too_big": 2,
    "masked": 4,
    "isolated": 8,
    "failed": 16,
    "not_converged": 32,
    "footprint_too_thin": 64,
    "diverged": 128, "fallback_no_symmetry": 256, "fallback_best_iterate": 512,
    "split": 1024,  # deblended in pieces (run attr split_pieces: parent id -> pieces)
}
SOURCE_FLAGS = {"psf_init": 1, "point_source": 2, "no_flux": 4, "edge": 8, "isolated": 16,
                "masked_peak": 32, "found_peak": 64, "sharp_peak": 128}
SOURCE_ISOLATED = SOURCE_FLAGS["isolated"]

FACTORIZED, CUBE = 0, 1


@dataclass
class BlendRecord:
    """Everything a run keeps of one parent (fitted, isolated, skipped or failed)."""

    index: int
    parent_id: int
    bbox: tuple  # (y0, x0, height, width) in exposure pixels
    peak_ids: np.ndarray
    peaks: np.ndarray  # (n, 2) exposure pixels
    sources: list = field(default_factory=list)  # SourceResult, blend-local coordinates
    iterations: int = 0
    log_likelihood: float = np.nan
    chi2: float = np.nan
    converged: bool = False
    runtime: float = 0.0
    flags: int = 0
    reason: str = ""
    model_psf: object = None  # model-frame PSF the fit used (not stored per blend)


def _utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_run(records: list[BlendRecord], bands, psf, model_psf, *, name: str, method: str,
              config_json: str, package_version: str, exposure_checksum: str = "",
              parents_checksum: str = "", from_run: str = "", first_source_id: int = 1,
              blend_psf=None, source_ids=None, frame: bool = False) -> xr.Dataset | Frame:
    """Assemble a validated run Dataset from per-blend records (sorted by ``index``).

    With ``frame`` the run is a :class:`~scarletstore.store.frame.Frame` (the
    same variables, for a caller that only writes it: no xarray import).

    ``blend_psf`` (n_blend, band, py, px), when given, holds each blend's own
    observed PSF (models imported from pipelines with a varying PSF); the
    run-level ``psf`` is then only a representative.

    ``source_ids``, when given, is one int64 id per source in record/source
    order (records sorted by ``index``) and replaces the sequential ids that
    would start at ``first_source_id`` (imports keep their own 64-bit ids).
    """
    records = sorted(records, key=lambda r: r.index)
    nb = len(bands)
    cols = _RunColumns(first_source_id)
    if source_ids is not None:
        source_ids = [int(v) for v in source_ids]
        n_src = sum(len(rec.sources) for rec in records)
        if len(source_ids) != n_src:
            raise ValueError(f"source_ids has {len(source_ids)} ids for {n_src} sources")
    for rec in records:
        cols.add_record(rec, nb, source_ids)
    if frame:
        make = Frame
    else:
        import xarray as xr
        make = xr.Dataset
    ds = make(
        {**cols.variables(len(records), nb),
         "model_psf": (("model_psf_y", "model_psf_x"), np.asarray(model_psf, np.float32)),
         "psf": (("band", "psf_y", "psf_x"), np.asarray(psf, np.float32))},
        coords={"band": np.array([str(b) for b in bands], dtype=object)},
        attrs={
            "name": name,
            "method": method,
            "config": config_json,
            "package_version": package_version,
            "created": _utcnow(),
            "exposure_checksum": exposure_checksum,
            "parents_checksum": parents_checksum,
            "from_run": from_run or "",
            "blend_flag_bits": json.dumps(BLEND_FLAGS),
            "source_flag_bits": json.dumps(SOURCE_FLAGS),
            "psf_source": "run" if blend_psf is None else "blend",
        },
    )
    if blend_psf is not None:
        ds["blend_psf"] = (("blend", "band", "blend_psf_y", "blend_psf_x"), np.asarray(blend_psf, np.float32))
    stamp(ds, "run", 2)
    return validate(ds)


class _RunColumns:
    """The ragged blend / source / component columns of a run, filled record by record.

    Python lists while :func:`build_run` walks the records (their lengths
    are not known up front), turned into typed arrays by :meth:`variables`.
    Source ids run on from ``first_source_id`` unless explicit ones are given.
    """

    def __init__(self, first_source_id=1):
        self.b = {k: [] for k in ("parent", "y0", "x0", "h", "w", "npk", "ns", "it", "logl", "chi2",
                                  "conv", "rt", "flags", "reason")}
        self.s = {k: [] for k in ("id", "parent", "peak", "y", "x", "nc", "flags")}
        self.c = {k: [] for k in ("type", "y0", "x0", "h", "w", "py", "px", "spec", "npix")}
        self.pixels = []
        self.next_id = int(first_source_id)
        self.k_src = 0

    def add_record(self, rec, nb, source_ids):
        """Append one blend row, its sources' rows and their components' rows and pixels.

        Source and component positions move from blend-local to exposure
        pixels (plus the blend's bbox origin).
        """
        y0, x0, h, w = (int(v) for v in rec.bbox)
        for key, val in (("parent", rec.parent_id), ("y0", y0), ("x0", x0), ("h", h), ("w", w),
                         ("npk", len(rec.peak_ids)), ("ns", len(rec.sources)), ("it", rec.iterations),
                         ("logl", rec.log_likelihood), ("chi2", rec.chi2), ("conv", rec.converged),
                         ("rt", rec.runtime), ("flags", rec.flags), ("reason", rec.reason)):
            self.b[key].append(val)
        for src in rec.sources:
            py, px = rec.peaks[src.peak_index]
            sid = self.next_id if source_ids is None else source_ids[self.k_src]
            self.k_src += 1
            for key, val in (("id", sid), ("parent", rec.parent_id),
                             ("peak", rec.peak_ids[src.peak_index]), ("y", py), ("x", px),
                             ("nc", len(src.components)), ("flags", src.flags)):
                self.s[key].append(val)
            self.next_id += 1
            for comp in src.components:
                self._add_component(comp, y0, x0, nb)

    def _add_component(self, comp, y0, x0, nb):
        """One component row; its morph (float32) goes onto the pixel list."""
        c = self.c
        morph = np.asarray(comp.morph, np.float32)
        c["type"].append(CUBE if morph.ndim == 3 else FACTORIZED)
        c["y0"].append(comp.y0 + y0)
        c["x0"].append(comp.x0 + x0)
        c["h"].append(morph.shape[-2])
        c["w"].append(morph.shape[-1])
        c["py"].append(comp.peak[0] + y0)
        c["px"].append(comp.peak[1] + x0)
        c["spec"].append(np.asarray(comp.spectrum, np.float32).reshape(nb))
        c["npix"].append(morph.size)
        self.pixels.append(morph.ravel())

    def variables(self, n_blend, nb):
        """The run's blend, source, component and pixel variables (typed, CF ragged)."""
        b, s, c, pixels = self.b, self.s, self.c, self.pixels

        def arr(values, dtype):
            return np.asarray(values, dtype=dtype).reshape(len(values))

        return {
            "blend_parent_id": ("blend", arr(b["parent"], np.int64)),
            "blend_y0": ("blend", arr(b["y0"], np.int32)),
            "blend_x0": ("blend", arr(b["x0"], np.int32)),
            "blend_height": ("blend", arr(b["h"], np.int32)),
            "blend_width": ("blend", arr(b["w"], np.int32)),
            "blend_n_peaks": ("blend", arr(b["npk"], np.int32)),
            "blend_n_sources": ("blend", arr(b["ns"], np.int32), {"sample_dimension": "source"}),
            "blend_iterations": ("blend", arr(b["it"], np.int32)),
            "blend_log_likelihood": ("blend", arr(b["logl"], np.float64)),
            "blend_chi2": ("blend", arr(b["chi2"], np.float64)),
            "blend_converged": ("blend", arr(b["conv"], bool)),
            "blend_runtime": ("blend", arr(b["rt"], np.float64), {"units": "s"}),
            "blend_flags": ("blend", arr(b["flags"], np.int32)),
            "blend_reason": ("blend", np.array(b["reason"], dtype=object).reshape(n_blend)),
            "source_id": ("source", arr(s["id"], np.int64)),
            "source_parent_id": ("source", arr(s["parent"], np.int64)),
            "source_peak_id": ("source", arr(s["peak"], np.int64)),
            "source_y": ("source", arr(s["y"], np.float64)),
            "source_x": ("source", arr(s["x"], np.float64)),
            "source_n_components": ("source", arr(s["nc"], np.int32), {"sample_dimension": "component"}),
            "source_flags": ("source", arr(s["flags"], np.int32)),
            "component_type": ("component", arr(c["type"], np.int8)),
            "component_y0": ("component", arr(c["y0"], np.int32)),
            "component_x0": ("component", arr(c["x0"], np.int32)),
            "component_height": ("component", arr(c["h"], np.int32)),
            "component_width": ("component", arr(c["w"], np.int32)),
            "component_peak_y": ("component", arr(c["py"], np.float64)),
            "component_peak_x": ("component", arr(c["px"], np.float64)),
            "component_spectrum": (("component", "band"),
                                   np.asarray(c["spec"], np.float32).reshape(len(c["spec"]), nb)),
            "component_n_pixels": ("component", arr(c["npix"], np.int64), {"sample_dimension": "pixel"}),
            "morph": ("pixel", np.concatenate(pixels).astype(np.float32) if pixels else np.zeros(0, np.float32)),
        }


def _offsets(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    out = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class RunTables:
    """A run's small columns in memory plus a reader for slices of ``morph``.

    Everything but the morphology pixels is O(number of components), so it is
    read once; the pixels of one blend are then one slice of ``morph``. Built
    from a Dataset (in memory or lazy) or straight from the store's HDF5
    group, which avoids xarray's per-access overhead (milliseconds per
    variable) on hot paths such as catalogs.
    """

    file = None  # an open h5py.File when built from the store

    def __init__(self, column, morph_slice, attrs: dict, bands: list[str]):
        self._column = column
        self._morph_slice = morph_slice
        self._cache: dict[str, np.ndarray] = {}
        self.attrs = attrs
        self.bands = bands

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> "RunTables":
        return cls(lambda name: np.asarray(ds[name].values),
                   lambda a, b: np.asarray(ds["morph"].isel(pixel=slice(a, b)).values),
                   dict(ds.attrs), [str(v) for v in ds.band.values])

    @classmethod
    def from_h5(cls, group, attrs: dict) -> "RunTables":
        """From an open h5py group holding a run at the latest schema version
        (``attrs``: its attributes as plain Python values)."""
        def column(name):
            obj = group[name]
            if obj.dtype.kind == "O":
                return np.asarray(obj.asstr()[()], dtype=object)
            data = obj[()]
            if obj.attrs.get("dtype") in (b"bool", "bool"):  # netCDF stores bool as int8
                data = data.astype(bool)
            return np.asarray(data)

        bands = [b.decode() if isinstance(b, bytes) else str(b) for b in group["band"][()]]
        morph = group["morph"]  # look the dataset up once: h5py lookups cost ~0.3 ms
        return cls(column, lambda a, b: morph[a:b], attrs, bands)

    def col(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._column(name)
        return self._cache[name]

    def has(self, name: str) -> bool:
        try:
            self.col(name)
            return True
        except KeyError:
            return False

    def morph(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self._morph_slice(int(a), int(b)))

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


class RunIndex:
    """Offsets of every blend's sources, components and pixels in a run.

    Built from the count variables only (small), so one blend's slice of the
    large ``morph`` array can then be read without touching the rest.
    ``run`` is a Dataset or a :class:`RunTables`.
    """

    def __init__(self, run):
        self.tables = run if isinstance(run, RunTables) else RunTables.from_dataset(run)
        t = self.tables
        self.parent_ids = t.col("blend_parent_id")
        self.source_off = _offsets(t.col("blend_n_sources"))
        self.comp_off = _offsets(t.col("source_n_components"))
        self.pix_off = _offsets(t.col("component_n_pixels"))
        self._by_parent = {int(p): i for i, p in enumerate(self.parent_ids)}
        self.source_ids = t.col("source_id")
        self._by_source = None

    def blend_of_parent(self, parent_id: int) -> int:
        try:
            return self._by_parent[int(parent_id)]
        except KeyError:
            raise KeyError(f"no blend for parent {parent_id} in this run") from None

    def blend_of_source(self, source_id: int) -> int:
        if self._by_source is None:
            blend_of_row = np.repeat(np.arange(len(self.parent_ids)), np.diff(self.source_off))
            self._by_source = dict(zip(self.source_ids.tolist(), blend_of_row.tolist()))
        try:
            return self._by_source[int(source_id)]
        except KeyError:
            raise KeyError(f"no source {source_id} in this run") from None


@dataclass
class StoredBlend:
    """One blend read back from a run: sources with components in exposure pixels."""

    index: int
    parent_id: int
    bbox: tuple
    source_ids: np.ndarray
    sources: list  # SourceResult with Component y0/x0/peak in exposure pixels


def read_blend(index: RunIndex, b: int) -> StoredBlend:
    """Read blend number ``b`` (reads only that blend's slice of ``morph``)."""
    t = index.tables
    s0, s1 = index.source_off[b], index.source_off[b + 1]
    c0, c1 = index.comp_off[s0], index.comp_off[s1]
    p0, p1 = index.pix_off[c0], index.pix_off[c1]
    pix = t.morph(p0, p1)
    nb = len(t.bands)
    local_pix = index.pix_off[c0:c1 + 1] - p0
    ctype, cy0, cx0 = t.col("component_type"), t.col("component_y0"), t.col("component_x0")
    ch, cw = t.col("component_height"), t.col("component_width")
    cpy, cpx, spec = t.col("component_peak_y"), t.col("component_peak_x"), t.col("component_spectrum")
    comps = []
    for k in range(c0, c1):
        h, w = int(ch[k]), int(cw[k])
        flat = pix[local_pix[k - c0]:local_pix[k - c0 + 1]]
        morph = flat.reshape((nb, h, w) if ctype[k] == CUBE else (h, w))
        comps.append(Component(spectrum=spec[k], morph=morph, y0=int(cy0[k]), x0=int(cx0[k]),
                               peak=(float(cpy[k]), float(cpx[k]))))
    ncomp, sflags = t.col("source_n_components"), t.col("source_flags")
    sources, k = [], 0
    for j in range(s0, s1):
        n = int(ncomp[j])
        sources.append(SourceResult(peak_index=j - s0, components=comps[k:k + n], flags=int(sflags[j])))
        k += n
    bbox = tuple(int(t.col(v)[b]) for v in ("blend_y0", "blend_x0", "blend_height", "blend_width"))
    return StoredBlend(index=b, parent_id=int(index.parent_ids[b]), bbox=bbox,
                       source_ids=np.asarray(index.source_ids[s0:s1]), sources=sources)


def run_parents_checksum(store, run: str) -> str:
    """The parents checksum ``run`` recorded when it was deblended ("" if none:
    imported runs, or runs of stores written before checksums were recorded)."""
    from .store import run_group

    group = run_group(run)
    opened = store.h5_group(group)
    if opened is None:  # an older schema version: read (and migrate) it
        return str(store.read(group).attrs.get("parents_checksum") or "")
    f, g = opened
    try:
        value = g.attrs.get("parents_checksum", "")
    finally:
        f.close()
    return value.decode() if isinstance(value, bytes) else str(value or "")


def check_run_parents(store, run: str) -> None:
    """Refuse to measure ``run`` against parents other than the ones it was
    deblended from.

    ``detect --replace`` swaps the store's parents while earlier runs stay:
    their catalogs were then measured on the new footprints without a word
    (every redistributed flux changed, children of merged parents got 0).
    A run's recorded ``parents_checksum`` against the one stored with the
    parents tells; either missing (imported runs, old stores) is not checked.

    Raises
    ------
    StoreError
        One line naming the run and what to do.
    """
    from ..errors import StoreError

    if not store.has("parents"):
        return
    recorded = run_parents_checksum(store, run)
    current = store.recorded_checksum("parents")
    if recorded and current and recorded != current:
        raise StoreError(f"{store.path}: run {run!r} was deblended from other parents than the "
                         "store's ('detect --replace' has replaced them since); deblend again "
                         "to measure on these parents")


def stale_runs(store) -> list[str]:
    """The runs deblended from parents other than the store's current ones."""
    from ..errors import StoreError

    out = []
    for run in store.runs():
        try:
            check_run_parents(store, run)
        except StoreError:
            out.append(run)
    return out
