"""The model store: one HDF5 file (netCDF4 flavour), one group per product.

Layout::

    /                 attrs: format="scarletstore", format_version
    /exposure         exposure Dataset
    /parents          parents Dataset
    /runs/<name>      one run Dataset per deblend run (append-only)

Every group is written in the layout xarray's h5netcdf engine writes (by that
engine, or for a Frame by h5netcdf alone, see ``h5write``), so plain
``xarray.open_dataset(store.product_path(g), group=g, engine="h5netcdf")``
reads it (``product_path`` is the store file itself in the single-file layout).

Two layouts (docs/store.md): *linked* (format 2, the default for new stores)
makes the store file a small index of HDF5 external links to one immutable
file per product in ``<store>.d/``, so a write costs what it adds: new product
files, then a new index renamed over the old one under the writer lock. A
linked store is the index *and* its folder: copy, move and delete it with
:func:`copy_store`, :func:`move_store` and :func:`remove_store`.
*single* (format 1; ``SCARLETSTORE_LAYOUT=single``) keeps every group in the
one file and is written as described below; it stays readable and writable.

Single-file writes are atomic: the new state is built in a temporary file next to the
store (a copy of the old one plus the new groups), flushed to disk and then
renamed over the store. A process killed at any moment leaves either the old
or the new store, both complete. Readers never block: they hold the inode of
the version they opened. Concurrent writers are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError, SchemaError, StoreError
from . import schema as _schema
from .frame import Frame
from .lazydask import install as _defer_dask_probe

# xarray would import dask.array (~0.4 s) on the first Variable it builds; no
# store read or write needs it (see lazydask). xarray itself is imported only
# where a Dataset is made (0.5-0.6 s: see frame.py)
_defer_dask_probe()

FORMAT = "scarletstore"
FORMAT_VERSION = 2  # the newest store format this package reads and writes
SINGLE_VERSION = 1  # one HDF5 file holding every product
LINKED_VERSION = 2  # a small index of external links to one immutable file per product
RUNS = "runs"
LAYOUT_ENV = "SCARLETSTORE_LAYOUT"  # "single" makes new stores one file; default "linked"
LAYOUTS = ("single", "linked")
# A replaced product's file is deleted by the first write at least this long
# after the index stopped naming it: a reader that opened the older index just
# before that write still finds the file (see docs/store.md).
GC_GRACE_SECONDS = 600.0


# Run names become HDF5 path components and file names of exports: one plain word.
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_run_name(name) -> str:
    """Return ``name`` if it is a valid run name (``[A-Za-z0-9._-]+``, not ``.``
    or ``..``), else raise StoreError (one line, the name shown escaped)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise StoreError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def run_group(name: str) -> str:
    return f"{RUNS}/{name}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _encoding(ds: xr.Dataset) -> dict:
    # No fill values: the data must round-trip bit for bit and NaN is data here.
    enc = {name: {"_FillValue": None} for name in ds.variables}
    for name, var in ds.variables.items():
        # xarray infers an empty object array as float64; say it holds strings
        # (a run of zero blends keeps its string columns strings)
        if var.dtype == object and var.size == 0:
            enc[name]["dtype"] = str
    return enc


# HDF5 attribute -> Python value: one decoder for the schema checks and the store
_plain = _schema._attr_value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_stamp(f) -> tuple:
    """Identity of the file version ``f`` (an open h5py.File) holds: a write
    renames a new inode over the store, an in-place edit changes mtime/size."""
    st = os.fstat(f.id.get_vfd_handle())
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _path_stamp(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _is_folder(f, name: str) -> bool:
    """A folder group (``coadds/``, ``apcorr/``) holds product groups and no variables
    (a product group that lost its ``schema`` attribute still holds variables).
    External links (linked stores) are products; they are not followed here, so an
    index whose product files are missing still lists its groups."""
    if isinstance(f.get(name, getlink=True), h5py.ExternalLink):
        return False
    obj = f[name]
    if not isinstance(obj, h5py.Group) or "schema" in obj.attrs or len(obj) == 0:
        return False
    return all(isinstance(obj.get(k, getlink=True), h5py.ExternalLink) or isinstance(obj[k], h5py.Group)
               for k in obj)


def _group_names(f) -> list[str]:
    names = []
    for n in f.keys():
        if n == RUNS:
            continue
        names += [f"{n}/{c}" for c in f[n].keys()] if _is_folder(f, n) else [n]
    if RUNS in f and isinstance(f[RUNS], h5py.Group):
        names += [run_group(n) for n in f[RUNS].keys()]
    return names


def _newer_groups(f) -> list[str]:
    """Problems of groups whose schema version is newer than this package knows."""
    out = []
    for name in _group_names(f):
        try:
            _schema.header_of(f[name])
        except _schema.NewerSchemaError as exc:
            out.append(f"group {name!r}: {exc}")
        except (SchemaError, KeyError, OSError):
            pass  # damage (or a missing product file) is reported by the reads that meet it
    return out



def _checksum(g, raw: dict | None = None) -> str:
    """SHA-256 over the raw bytes of every dataset of h5py group ``g`` (names sorted).

    ``raw`` holds arrays already read from ``g`` (``dataset[()]``, by name),
    used instead of reading those datasets again.
    """
    h = hashlib.sha256()
    for key in sorted(g.keys()):
        obj = g[key]
        if not isinstance(obj, h5py.Dataset):
            continue
        h.update(key.encode())
        data = raw.get(key) if raw else None
        if data is None:
            data = obj[()]
        if data.dtype.kind == "O":
            h.update("\x00".join(str(v) for v in np.ravel(data)).encode())
        else:
            h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


# Groups whose checksum a run records (the deblend's inputs). Each is stored
# beside the group when it is written (attribute ``CHECKSUM_ATTR``, hidden
# from reads), so a deblend of a few blends reads only their boxes and need
# not hash the whole exposure; a group written before this (no attribute) is
# read and hashed in full as before.
RECORDED_CHECKSUMS = ("exposure", "parents")
CHECKSUM_ATTR = "content_sha256"


def _record_checksums(path: Path, names) -> None:
    """Store the content checksum of each of ``names`` (RECORDED_CHECKSUMS only) in
    file ``path``, computed from the bytes just written (read back from the
    file, so it is the digest :func:`_checksum` gives for the group)."""
    names = [n for n in names if n in RECORDED_CHECKSUMS]
    if not names:
        return
    with h5py.File(path, "r+") as f:
        for name in names:
            f[name].attrs[CHECKSUM_ATTR] = _checksum(f[name])

class Store:
    """A scarletstore HDF5 file.

    Parameters
    ----------
    path : str or Path
        The store file. Opening checks it exists, is a scarletstore file and
        holds no group of a schema version newer than this package knows
        (SchemaError then: reading or writing it could lose what the newer
        version stored).

    Notes
    -----
    Every read validates the groups it touches (attributes, variables, dtypes,
    dims and ragged counts; no scan of the large arrays) once per version of
    the file: results, and the set-up of heavy-footprint reads, are cached on
    the object and dropped when the file changes (inode, mtime or size).
    """

    def __init__(self, path):
        self.path = _store_path(path)
        self._stamp = None
        self._valid: set[str] = set()
        self._cache: dict = {}
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store")
        try:
            with self._h5() as f:
                fmt = f.attrs.get("format")
                version = f.attrs.get("format_version")
                foreign = _foreign_products(self.path, f)
                newer = _newer_groups(f)
        except OSError:
            raise StoreError(f"{self.path}: not an HDF5 file") from None
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            raise StoreError(f"{self.path}: not a scarletstore store")
        if version is not None and int(version) > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {int(version)} is newer than this "
                f"scarletstore supports ({FORMAT_VERSION}); upgrade scarletstore")
        if foreign:
            raise StoreError(foreign)
        if newer:
            raise SchemaError(f"{self.path}: {newer[0]}")

    def close(self) -> None:
        """Drop the cached set-ups (and the file handles they hold); the Store stays usable."""
        self._sync(None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ reading
    def _h5(self):
        return h5py.File(self.path, "r")

    def _sync(self, stamp) -> None:
        """Drop every cached result when the file is not the version they came from."""
        if stamp != self._stamp:
            for value in self._cache.values():
                close = getattr(value, "close", None)
                if close is not None:
                    close()
            self._cache.clear()
            self._valid.clear()
            self._stamp = stamp

    def _check(self, f, group: str) -> None:
        """Validate ``group`` of the open file ``f`` (cheap; cached per file version)."""
        self._sync(_file_stamp(f))
        if group in self._valid:
            return
        _validate_group(self.path, f, group)
        self._valid.add(group)

    def validate(self, group: str) -> None:
        """Raise SchemaError (one line) unless ``group`` follows its schema (cheap checks)."""
        with self._h5() as f:
            self._check(f, group)

    def check(self, deep: bool = True) -> list[str]:
        """Every problem of the store, one line each (empty when it is sound).

        The cheap checks of every group; with ``deep`` also every array read
        through xarray (unreadable data) and source ids unique across runs.
        """
        problems, bad = [], set()
        with self._h5() as f:
            names = _group_names(f)
            for name in names:
                try:
                    self._check(f, name)
                except (SchemaError, StoreError) as exc:
                    problems.append(str(exc))
                    bad.add(name)
        if not deep:
            return problems
        seen: dict[int, str] = {}
        for name in names:
            if name in bad:
                continue
            try:
                ds = self.read(name, upgrade=False)
            except (SchemaError, StoreError) as exc:
                problems.append(str(exc))
                continue
            if ds.attrs.get("schema") == "run":
                problems += self._id_problems(name, ds["source_id"].values, seen)
            recorded = self.recorded_checksum(name) if name in RECORDED_CHECKSUMS else None
            if recorded is not None and recorded != self.checksum(name):
                problems.append(f"{self.path}: group {name!r}: its content does not match the "
                                "checksum recorded when it was written (changed or damaged)")
        return problems

    def _id_problems(self, name: str, ids, seen: dict) -> list[str]:
        """Source ids repeated within run ``name`` or shared with a run in ``seen`` (updated)."""
        uniq, counts = np.unique(ids, return_counts=True)
        out = []
        if (counts > 1).any():
            out.append(f"{self.path}: group {name!r}: source id {int(uniq[counts > 1][0])} "
                       "appears more than once")
        shared = [sid for sid in uniq.tolist() if sid in seen]
        if shared:
            out.append(f"{self.path}: source id {shared[0]} is in both {seen[shared[0]]!r} and {name!r}")
        seen.update((sid, name) for sid in uniq.tolist())
        return out

    def group_attrs(self, f, name: str) -> dict:
        """Attributes of group ``name`` of the open file ``f`` as plain Python values."""
        return {k: _plain(v) for k, v in f[name].attrs.items()}

    def _snapshot(self) -> dict:
        """Group names and run order of the current file version (cached)."""
        stamp = _path_stamp(self.path)
        if stamp is not None and stamp == self._stamp and "snapshot" in self._cache:
            return self._cache["snapshot"]
        with self._h5() as f:
            self._sync(_file_stamp(f))
            names = _group_names(f)
            runs = []
            if RUNS in f and isinstance(f[RUNS], h5py.Group):
                items = [(_created(self.path, f, n), n) for n in f[RUNS].keys()]
                runs = [n for _, n in sorted(items)]
        snap = {"groups": set(names), "runs": runs}
        self._cache["snapshot"] = snap
        return snap

    def groups(self) -> dict[str, dict]:
        """Every product group: ``{name: {"schema", "schema_version", "dims", "attrs"}}``
        (as stored; not validated, see :meth:`check`)."""
        out = {}
        with self._h5() as f:
            for name in _group_names(f):
                try:
                    group = f[name]
                except (KeyError, OSError):  # a linked store's link that leads nowhere
                    _missing_product(self.path, f, name)
                    raise
                attrs = self.group_attrs(f, name)
                dims = {}
                for key, obj in group.items():
                    if isinstance(obj, h5py.Dataset) and obj.attrs.get("CLASS") == b"DIMENSION_SCALE":
                        dims[key] = obj.shape[0]
                out[name] = {
                    "schema": attrs.get("schema"),
                    "schema_version": attrs.get("schema_version"),
                    "dims": dims,
                    "attrs": attrs,
                    "nbytes": sum(o.size * o.dtype.itemsize for o in group.values()
                                  if isinstance(o, h5py.Dataset) and o.dtype.kind not in "OSU"),
                }
        return out

    def has(self, group: str) -> bool:
        return group in self._snapshot()["groups"]

    def runs(self) -> list[str]:
        """Names of the stored runs, oldest first."""
        return list(self._snapshot()["runs"])

    def max_source_id(self) -> int:
        """Largest source id of any stored run (0 when there is none); every run is validated."""
        with self._h5() as f:
            return _max_source_id(f, lambda group: self._check(f, group))

    def open(self, group: str, validate: bool = True, upgrade: bool = True) -> xr.Dataset:
        """Open ``group`` lazily (values are read when accessed). Close it when done.

        With ``upgrade`` (the default) an older schema version is migrated in
        memory to the latest, so code only ever sees current layouts; the file
        is not changed (``scarletstore migrate`` does that). The group is
        checked against its schema first (cheap checks, cached per file
        version) unless ``validate`` is False.
        """
        if validate or upgrade:
            self.validate(group)
        elif not self.has(group):
            raise StoreError(f"{self.path}: no {group!r} group")
        import xarray as xr

        try:
            ds = xr.open_dataset(self.product_path(group), group=group, engine="h5netcdf",
                                 mask_and_scale=False, decode_times=False, cache=False)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise SchemaError(f"{self.path}: group {group!r} is unreadable: "
                              f"{type(exc).__name__}: {_one_line(exc)}") from None
        return self._current(ds, group, validate, upgrade)

    def _current(self, ds: xr.Dataset, group: str, validate: bool, upgrade: bool,
                 frame: bool = False) -> xr.Dataset:
        """``ds`` migrated to its schema's latest version (``upgrade``) or checked (``validate``).

        A Frame comes back as a Dataset unless ``frame`` (and then still as a
        Dataset when it had to be migrated: migrations are written for Datasets).
        """
        if isinstance(ds, Frame) and not (frame and _at_latest(ds)):
            ds = ds.to_dataset()
        ds.attrs.pop(CHECKSUM_ATTR, None)  # the store's bookkeeping, not the product's
        try:
            if upgrade:
                from .migrate import upgrade as _upgrade
                ds = _upgrade(ds)
            elif validate:
                _schema.validate(ds)
        except SchemaError as exc:
            ds.close()
            raise SchemaError(f"{self.path}: group {group!r}: {_one_line(exc)}") from None
        return ds

    def read(self, group: str, validate: bool = True, upgrade: bool = True,
             frame: bool = False) -> xr.Dataset:
        """Read ``group`` fully into memory and close the file.

        The group is read straight from HDF5 (:mod:`scarletstore.store.h5read`, the
        Dataset xarray would build, several times faster); a group holding
        something only xarray decodes is read through :meth:`open`. With
        ``frame`` a group at its latest schema version comes back as a
        :class:`~scarletstore.store.frame.Frame` (no xarray import; anything
        else still as a Dataset, which has the same reading interface).
        """
        ds = self._read_h5(group, validate or upgrade)
        if ds is not None:
            return self._current(ds, group, validate, upgrade, frame)
        with self.open(group, validate=validate, upgrade=upgrade) as ds:
            try:
                return ds.load()
            except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
                raise SchemaError(f"{self.path}: group {group!r} is unreadable: "
                                  f"{type(exc).__name__}: {_one_line(exc)}") from None

    def _read_h5(self, group: str, check: bool, checksum: bool = False):
        """``group`` read by :func:`~scarletstore.store.h5read.read_frame` (after the cheap
        schema checks when ``check``), or None for :meth:`open` to read it.

        With ``checksum``, ``(frame, digest)``: the group's :meth:`checksum`
        computed from the arrays just read (digest None with a None frame).
        """
        from .h5read import read_frame

        with self._h5() as f:
            if check:
                self._check(f, group)
            elif not self.has(group):
                raise StoreError(f"{self.path}: no {group!r} group")
            try:
                g = f[group]
            except (KeyError, OSError):
                g = None  # a missing product file: open() says which
            raw = {} if checksum else None
            ds = read_frame(g, raw) if isinstance(g, h5py.Group) else None
            if not checksum:
                return ds
            return ds, (_checksum(g, raw) if ds is not None else None)

    def h5_group(self, group: str):
        """``(h5py.File, group)`` opened read-only when ``group`` is at its latest schema
        version, else None (callers then use :meth:`read`, which migrates).

        The group is validated first (cheap checks, cached per file version).
        The raw HDF5 path skips xarray's per-variable overhead on hot loops.
        """
        f = h5py.File(self.path, "r")
        try:
            self._check(f, group)
            attrs = self.group_attrs(f, group)
            if int(attrs["schema_version"]) != _schema.latest_version(attrs["schema"]):
                f.close()
                return None
            return f, f[group]
        except BaseException:
            if f.id.valid:
                f.close()
            raise

    def run_tables(self, run: str):
        """:class:`~scarletstore.store.runs.RunTables` of a stored run (fast path when current)."""
        from .runs import RunTables

        group = run_group(run)
        opened = self.h5_group(group)
        if opened is None:
            return RunTables.from_dataset(self.read(group))
        f, g = opened
        tables = RunTables.from_h5(g, self.group_attrs(f, group))
        tables.file = f  # keeps the file open for morph slices; closed with the tables
        return tables

    def blend(self, run: str, parent_id: int):
        """One blend's stored models (:class:`~scarletstore.store.runs.StoredBlend`)."""
        from .runs import RunIndex, read_blend

        if run not in self.runs():
            raise StoreError(f"{self.path}: no run {run!r}")
        tables = self.run_tables(run)
        try:
            index = RunIndex(tables)
            try:
                b = index.blend_of_parent(parent_id)
            except KeyError as exc:
                raise StoreError(f"{self.path}: {exc.args[0]} {run}") from None
            blend = read_blend(index, b)
            for src in blend.sources:  # detach from the file before closing it
                for c in src.components:
                    c.morph = np.array(c.morph)
            return blend
        finally:
            tables.close()

    def catalog(self, band: str, run: str | None = None, redistribute: bool = False, **kwargs) -> xr.Dataset:
        """Lazy per-band catalog of ``run`` (default: newest); see :func:`scarletstore.measure.catalog.band_catalog`."""
        from ..measure.catalog import band_catalog
        return band_catalog(self, band, run=run, redistribute=redistribute, **kwargs)

    def footprint(self, source_id: int, band: str, run: str | None = None, redistribute: bool = False):
        """Heavy footprint of one child; see :func:`scarletstore.measure.catalog.heavy_footprint`."""
        from ..measure.catalog import heavy_footprint
        return heavy_footprint(self, source_id, band, run=run, redistribute=redistribute)

    def cached(self, key, build):
        """``build()`` memoised on this object for the current file version.

        Values with a ``close()`` method are closed when the file changes.
        """
        stamp = _path_stamp(self.path)
        self._sync(stamp)
        if key not in self._cache:
            value = build()
            # a write during the build may have mixed two versions into it:
            # use it once, but cache only what was built from one version
            if _path_stamp(self.path) != stamp or self._stamp != stamp:
                return value
            self._cache[key] = value
        return self._cache[key]

    @property
    def layout(self) -> str:
        """``"single"`` (one HDF5 file) or ``"linked"`` (an index of per-product files)."""
        with self._h5() as f:
            return _layout_of(f)

    def disk_bytes(self) -> int:
        """Bytes on disk of the current version: the file, or the index plus the files it names."""
        with self._h5() as f:
            if _layout_of(f) != "linked":
                return os.fstat(f.id.get_vfd_handle()).st_size
            files = set(_index_entries(f).values())
        folder = _folder_of(self.path)
        total = self.path.stat().st_size
        for rel in files:
            with contextlib.suppress(FileNotFoundError):
                total += (folder / rel).stat().st_size
        return total

    def product_path(self, group: str) -> Path:
        """The HDF5 file that holds ``group``: the store itself for a single-file
        store, the group's own file for a linked one. Either way
        ``xarray.open_dataset(store.product_path(g), group=g, engine="h5netcdf")``
        reads the product."""
        with self._h5() as f:
            if _layout_of(f) != "linked":
                return self.path
            link = f.get(group, getlink=True)
        if not isinstance(link, h5py.ExternalLink):
            raise StoreError(f"{self.path}: no {group!r} group")
        return _folder_of(self.path) / link.filename

    def checksum(self, group: str) -> str:
        """SHA-256 over the raw bytes of every variable of ``group`` (names sorted)."""
        with self._h5() as f:
            self._check(f, group)
            return _checksum(f[group])

    def read_with_checksum(self, group: str, validate: bool = True,
                           upgrade: bool = True, frame: bool = False) -> tuple[xr.Dataset, str]:
        """``(read(group), checksum(group))`` from one read of the group's arrays.

        A deblend records the checksums of the exposure and parents it read;
        reading the (compressed) exposure twice cost ~0.06 s of a one-blend call.
        ``frame`` as in :meth:`read`.
        """
        ds, digest = self._read_h5(group, validate or upgrade, checksum=True)
        if ds is None:
            return self.read(group, validate, upgrade), self.checksum(group)
        return self._current(ds, group, validate, upgrade, frame), digest

    def recorded_checksum(self, group: str) -> str | None:
        """The checksum stored with ``group`` when it was written (None: none stored).

        Equal to :meth:`checksum` for every group this package wrote; only
        RECORDED_CHECKSUMS groups carry one (``check`` compares the two).
        """
        with self._h5() as f:
            self._check(f, group)
            value = self.group_attrs(f, group).get(CHECKSUM_ATTR)
        return value if isinstance(value, str) and len(value) == 64 else None

    def read_boxes(self, group: str, boxes, frame: bool = False) -> tuple[xr.Dataset, str] | None:
        """``group`` with its ``(..., y, x)`` planes read only inside ``boxes``, and its
        recorded checksum; None when that cannot stand for a full read.

        ``boxes`` lists ``(y0, x0, height, width)``; pixels outside every box are
        zero. The digest is the one stored when the group was written
        (:meth:`recorded_checksum`), so the rest of the planes is never read nor
        hashed: a one-blend deblend reads a few chunks of the exposure. None
        (read it in full instead) when the group has no recorded checksum, is
        not at its schema's latest version, or holds what only xarray decodes.
        ``frame`` as in :meth:`read`.
        """
        from .h5read import read_frame

        with self._h5() as f:
            self._check(f, group)
            attrs = self.group_attrs(f, group)
            digest = attrs.get(CHECKSUM_ATTR)
            if not (isinstance(digest, str) and len(digest) == 64):
                return None
            if int(attrs["schema_version"]) != _schema.latest_version(attrs["schema"]):
                return None
            try:
                g = f[group]
            except (KeyError, OSError):
                return None  # a missing product file: the full read says which
            ds = read_frame(g, boxes=[tuple(int(v) for v in b) for b in boxes]) \
                if isinstance(g, h5py.Group) else None
        if ds is None:
            return None
        return self._current(ds, group, True, True, frame), digest

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, path, datasets: dict[str, xr.Dataset] | None = None,
               layout: str | None = None) -> "Store":
        """Create a store holding ``datasets`` in one atomic step and return it.

        Either the complete store appears at ``path`` or nothing does.
        ``layout`` is ``"single"`` or ``"linked"`` (see docs/store.md); the
        default is the ``SCARLETSTORE_LAYOUT`` environment variable, else linked.
        """
        path = _store_path(path)
        layout = default_layout() if layout is None else check_layout(layout)
        _check_datasets({} if datasets is None else datasets)
        with _locked(path):
            _remove_stale_temps(path)
            if path.exists():
                raise StoreError(f"{path}: already exists")
            if layout == "linked":
                with _LinkedTransaction(path, new=True) as tx:
                    tx.put(datasets or {})
            else:
                with _transaction(path, new=True) as tmp:
                    _write_groups(tmp, datasets or {})
                    _record_checksums(tmp, datasets or {})
        return cls(path)

    def write(self, datasets: dict[str, xr.Dataset], replace: bool = False) -> None:
        """Add (or with ``replace`` overwrite) groups in one atomic transaction.

        Every Dataset is validated against its own schema attributes first;
        nothing is written unless all are valid. A group of a newer schema
        version than this package knows is never replaced, and nothing is
        written to a store holding one.
        """
        _check_datasets(datasets)
        with self._commit() as tx:
            for name in datasets:
                if tx.has(name) and not replace:
                    raise StoreError(f"{self.path}: group {name!r} already exists")
            runs = [name for name in datasets if name.startswith(RUNS + "/")]
            if runs:
                datasets = dict(datasets)
                with h5py.File(tx.path, "r") as f:
                    check = _checker(self, f)
                    # the runs written here replace their namesakes: their ids are not "in use"
                    others = {name[len(RUNS) + 1:] for name in runs}
                    taken = np.zeros(0, np.int64)
                    for name in runs:
                        ids = np.asarray(datasets[name]["source_id"].values, np.int64)
                        # the write keeps the run's own ids: a second run written this way
                        # reused ids and left a store 'info --check' refused
                        _refuse_stored_ids(self.path, f, ids, check, InputError,
                                           "; add runs with Store.add_run, which numbers "
                                           "their sources", skip=others, extra=taken)
                        taken = np.union1d(taken, ids)
                        if not ({"exposure", "parents"} & set(datasets)):
                            datasets[name] = _with_input_checksums(self.path, f, check,
                                                                   datasets[name])
            tx.put(datasets)

    def add_run(self, run: xr.Dataset, name: str | None = None, prefix: str = "scarlet",
                keep_ids: bool = False) -> str:
        """Add ``run`` as a new run and return its name; name and ids are chosen at commit.

        Both are decided inside the writer lock against the store as it is
        then, so runs fitted at the same time by different processes never
        share a name or a source id.

        Parameters
        ----------
        run : xr.Dataset
            A run Dataset (schema ``run``).
        name : str, optional
            The run's name (refused if taken or invalid). Default: the first
            free ``<prefix>-<k>``, k = 1, 2, ...
        prefix : str
            Prefix of the default name.
        keep_ids : bool
            Keep the run's own source ids (imports carry survey ids); they must
            not collide with any stored id. Otherwise the run's sources are
            renumbered in row order from the largest stored id + 1.
        """
        if not _is_dataset(run):
            raise InputError(f"expected a run Dataset, got a {type(run).__name__}")
        _schema.validate(run)
        if name is not None:
            check_run_name(name)
        check_run_name(prefix)
        with self._commit() as tx:
            with h5py.File(tx.path, "r") as f:
                taken = set(f[RUNS].keys()) if RUNS in f else set()
                if name is None:
                    final = next(f"{prefix}-{k}" for k in range(1, len(taken) + 2)
                                 if f"{prefix}-{k}" not in taken)
                elif name in taken:
                    raise StoreError(f"{self.path}: run {name!r} already exists "
                                     "(runs are never overwritten)")
                else:
                    final = name
                ids = run["source_id"].values
                check = _checker(self, f)
                run = _with_input_checksums(self.path, f, check, run)
                if keep_ids:
                    _refuse_stored_ids(self.path, f, ids, check, StoreError)
                else:
                    first = _max_source_id(f, check) + 1
                    run = run.assign(source_id=("source", np.arange(first, first + ids.size,
                                                                    dtype=np.int64)))
            run = run.copy()
            run.attrs["name"] = final
            tx.put({run_group(final): run})
        return final

    @contextlib.contextmanager
    def _commit(self, layout: str | None = None):
        """Writer lock + transaction, checked: leftovers of dead writers are
        removed and a store holding a newer-version group is refused.

        Yields a transaction (``path`` to read the store as it is under the
        lock, ``has(group)``, ``put(datasets)`` replacing groups of the same
        name) committed atomically on exit. ``layout`` converts the store to
        that layout in the same commit (every group rewritten once).
        """
        with _locked(self.path):
            _remove_stale_temps(self.path)
            with h5py.File(self.path, "r") as f:
                newer = _newer_groups(f)
                current = _layout_of(f)
            if newer:
                raise SchemaError(f"{self.path}: {newer[0]}; refusing to write")
            layout = current if layout is None else check_layout(layout)
            if layout == "linked":
                with _LinkedTransaction(self.path, new=False, convert=current != "linked") as tx:
                    yield tx
            elif current == "linked":
                raise StoreError(f"{self.path}: a linked store cannot be converted back to a single file")
            else:
                with _transaction(self.path, new=False) as tmp:
                    yield _SingleTransaction(tmp)

    def copy_to(self, dest) -> "Store":
        """Copy the store's current version to ``dest`` (see :func:`copy_store`)."""
        return copy_store(self.path, dest)

    def convert(self, layout: str, datasets: dict[str, xr.Dataset] | None = None) -> None:
        """Rewrite the store in ``layout`` in one atomic commit, replacing the
        groups named in ``datasets`` (migrated products) on the way."""
        datasets = {} if datasets is None else datasets
        _check_datasets(datasets)
        with self._commit(layout=layout) as tx:
            tx.put(datasets)


def _at_latest(ds) -> bool:
    """Whether ``ds`` is at its schema's latest version (False when it names none)."""
    try:
        return int(ds.attrs["schema_version"]) == _schema.latest_version(ds.attrs["schema"])
    except (KeyError, TypeError, ValueError, SchemaError):
        return False


def _is_dataset(ds) -> bool:
    if isinstance(ds, Frame):
        return True
    xr = sys.modules.get("xarray")  # not imported: ds cannot be an xarray Dataset
    return xr is not None and isinstance(ds, xr.Dataset)


def _check_datasets(datasets) -> None:
    """InputError unless ``datasets`` maps group names to Datasets; then the names
    and every Dataset's schema are checked (nothing is written unless all pass)."""
    if not isinstance(datasets, Mapping):
        raise InputError("expected a mapping of group name -> Dataset, "
                         f"got a {type(datasets).__name__}")
    for name, ds in datasets.items():
        if not (isinstance(name, str) and _is_dataset(ds)):
            raise InputError("expected a mapping of group name -> Dataset, "
                             f"got {name!r}: {type(ds).__name__}")
    for name, ds in datasets.items():
        _check_group_name(name)
        _schema.validate(ds)
        _check_group_schema(name, ds)
        if ds.attrs.get("schema") == "exposure":
            _check_exposure_values(name, ds)


# The schema each product group name holds ("<prefix>/" names: any suffix). Every
# reader finds a product by its name: an exposure written as "parents" passed the
# schema check and then failed in every command that reads parents.
GROUP_SCHEMAS = {"exposure": "exposure", "parents": "parents", "visits": "visits",
                 "coadds/likelihood": "likelihood_coadd", "coadds/psf_matched": "psf_matched_coadd",
                 RUNS + "/": "run", "apcorr/": "apcorr"}


def _check_group_name(name: str) -> None:
    if name.startswith(RUNS + "/"):
        check_run_name(name[len(RUNS) + 1:])


def _check_group_schema(name: str, ds) -> None:
    """InputError when ``name`` is a product group name (:data:`GROUP_SCHEMAS`) and
    ``ds`` is not of its schema; other names are the user's own groups."""
    want = GROUP_SCHEMAS.get(name) or next(
        (v for k, v in GROUP_SCHEMAS.items() if k.endswith("/") and name.startswith(k)
         and len(name) > len(k)), None)
    if want is None:  # a group of the user's own: any schema
        return
    got = ds.attrs.get("schema")
    if got != want:
        raise InputError(f"group {name!r} holds {want} products, not {got}")


def _check_exposure_values(name: str, ds) -> None:
    """The pixel checks ``ingest`` makes, for exposures written through the API: on
    every pixel outside the exposure's bad planes the image is finite and the
    variance finite and non-negative (a negative-variance store made detect
    find nothing, silently)."""
    planes = json.loads(ds.attrs.get("mask_planes") or "{}")
    bad = json.loads(ds.attrs.get("bad_mask_planes") or "[]")
    bits = 0
    for plane in bad:
        if plane in planes:
            bits |= 1 << int(planes[plane])
    image, variance = np.asarray(ds["image"].values), np.asarray(ds["variance"].values)
    good = (np.asarray(ds["mask"].values).astype(np.int64) & bits) == 0
    for what, ok in (("non-finite image values", np.isfinite(image)),
                     ("non-finite or negative variance", np.isfinite(variance) & (variance >= 0))):
        if not ok[good].all():
            raise InputError(f"group {name!r}: {what} on pixels outside the bad planes "
                             f"({', '.join(bad) or 'none'})")


def _max_source_id(f, check) -> int:
    """Largest source id in the runs of the open file ``f``; ``check(group)`` validates each."""
    best = 0
    for name in f[RUNS].keys() if RUNS in f else []:
        group = run_group(name)
        check(group)
        ids = f[group]["source_id"]
        if ids.shape[0]:
            best = max(best, int(np.max(ids[()])))
    return best


def _validate_group(path: Path, f, group: str) -> None:
    """Raise StoreError / SchemaError (one line) unless ``group`` of the open file
    ``f`` (of store ``path``) exists and follows its schema (cheap checks)."""
    try:
        found = group in f and isinstance(f[group], h5py.Group)
    except (OSError, KeyError, ValueError):
        found = False
    if not found:
        _missing_product(path, f, group)
        raise StoreError(f"{path}: no {group!r} group")
    try:
        _schema.validate_h5(f[group])
    except SchemaError as exc:
        raise SchemaError(f"{path}: group {group!r}: {_one_line(exc)}") from None
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        # h5py raises these on structurally broken objects (dangling dimension
        # references, unreadable attributes)
        raise SchemaError(f"{path}: group {group!r} is unreadable: "
                          f"{type(exc).__name__}: {_one_line(exc)}") from None


def _checker(store: Store, f):
    """Uncached validation of the groups of ``f``, a transaction's copy of ``store``."""
    return lambda group: _validate_group(store.path, f, group)


def _stored_ids_in(f, ids, check, skip=()) -> int | None:
    """The first of ``ids`` already used by a run of the open file ``f`` (runs named
    in ``skip`` aside), else None."""
    ids = np.asarray(ids, np.int64)
    for name in f[RUNS].keys() if RUNS in f else []:
        if name in skip:
            continue
        group = run_group(name)
        check(group)
        hit = np.intersect1d(ids, f[group]["source_id"][()])
        if hit.size:
            return int(hit[0])
    return None


def _refuse_stored_ids(path: Path, f, ids, check, error=StoreError, hint: str = "",
                       skip=(), extra=()) -> None:
    """Raise ``error`` (one line, ending in ``hint``) when a new run's ``ids`` use a
    source id of a run of the open file ``f`` (runs in ``skip`` aside) or of ``extra``
    (ids of other runs of the same write)."""
    clash = _stored_ids_in(f, ids, check, skip)
    if clash is None:
        both = np.intersect1d(np.asarray(ids, np.int64), np.asarray(extra, np.int64))
        clash = int(both[0]) if both.size else None
    if clash is not None:
        raise error(f"{path}: source id {clash} of the new run is already in the store{hint}")


# Runs the store's own deblenders made; imported runs (method "lsst") refer to the
# survey's parents and are never checked against the store's (runs.check_run_parents).
_FITTED_METHODS = ("scarlet", "sdss")


def _with_input_checksums(path: Path, f, check, run):
    """``run`` with the checksums of the exposure and parents of the open file ``f``
    filled in where it records none.

    A run made through the Python API (``deblend_exposure`` without checksums) is
    being added to the store whose parents it was fitted on; without the record,
    after ``detect --replace`` its catalog was measured on the new parents without
    a word. Its parent ids must then all be among the store's parents (InputError
    otherwise: it was fitted on other ones).
    """
    wanted = [g for g in RECORDED_CHECKSUMS
              if not run.attrs.get(f"{g}_checksum") and g in f]
    if run.attrs.get("method") not in _FITTED_METHODS or "parents" not in wanted:
        return run
    check("parents")
    ids = np.unique(np.asarray(run["blend_parent_id"].values, np.int64))
    missing = np.setdiff1d(ids, f["parents"]["parent_id"][()])
    if missing.size:
        raise InputError(f"{path}: parent {int(missing[0])} of the new run is not among the "
                         "store's parents; add a run to the store it was deblended from")
    run = run.copy()
    for group in wanted:
        check(group)
        digest = f[group].attrs.get(CHECKSUM_ATTR)
        digest = digest.decode() if isinstance(digest, bytes) else digest
        # the digest recorded at write time (what a CLI deblend records); else hash it
        run.attrs[f"{group}_checksum"] = (digest if isinstance(digest, str) and len(digest) == 64
                                          else _checksum(f[group]))
    return run


def _write_groups(tmp: Path, datasets: dict[str, xr.Dataset], encoding=_encoding,
                  mode: str = "a") -> None:
    """Write each Dataset as group ``name`` of ``tmp`` with xarray's netCDF4 encoder.

    The same steps as ``Dataset.to_netcdf(tmp, mode="a", group=name,
    engine="h5netcdf")`` (checks of names and attributes, CF encoding, the
    h5netcdf store), so the groups are byte for byte what to_netcdf writes,
    minus its scheduler probes: to pick the write lock and the close policy
    for dask arrays it imports dask.distributed (about 0.2-0.6 s) whenever
    dask is installed. Store groups hold no dask arrays (their values are in
    memory) and are written by one thread under the writer lock, so the
    process-wide HDF5 lock is the only one needed. A Dataset that does hold
    dask arrays, or an xarray without the checks used here, goes through
    to_netcdf as before. The file is opened once for all the groups, in
    ``mode`` ("a", or "w" for a new product file); ``encoding(ds)`` gives the
    storage of each variable.

    Frames (``store/frame.py``) that :func:`~scarletstore.store.h5write.writable`
    accepts are written the same way by h5netcdf alone, without importing
    xarray (a one-blend deblend's run); any other Frame is made a Dataset first.
    """
    from .frame import as_dataset
    from .h5write import writable, write_frame

    encodings = {name: encoding(ds) for name, ds in datasets.items()}
    if datasets and all(writable(ds, encodings[name]) for name, ds in datasets.items()):
        import h5netcdf

        with h5netcdf.File(os.path.abspath(tmp), mode=mode, invalid_netcdf=None,
                           decode_vlen_strings=True, driver=None, format="NETCDF4") as root:
            for name, ds in datasets.items():
                write_frame(root, name, ds, encodings[name])
        return

    from xarray.backends import H5NetCDFStore
    from xarray.backends import writers as _writers
    from xarray.backends.locks import HDF5_LOCK

    datasets = {name: as_dataset(ds) for name, ds in datasets.items()}

    checks = [getattr(_writers, f, None) for f in
              ("_validate_dataset_names", "_validate_attrs", "_sanitize_unlimited_dims")]
    chunked = any(v.chunks is not None for ds in datasets.values() for v in ds.variables.values())
    if chunked or None in checks:
        for name, ds in datasets.items():
            ds.to_netcdf(tmp, mode=mode, group=name, engine="h5netcdf", encoding=encoding(ds))
            mode = "a"
        return
    check_names, check_attrs, unlimited_dims = checks
    root = H5NetCDFStore.open(os.path.abspath(tmp), mode=mode, lock=HDF5_LOCK)
    try:
        for name, ds in datasets.items():
            check_names(ds)
            check_attrs(ds, "h5netcdf")
            ds.dump_to_store(root.get_child_store(name), encoding=encoding(ds),
                             unlimited_dims=unlimited_dims(ds, None))
    finally:
        root.close()


@contextlib.contextmanager
def _locked(*paths: Path):
    """Serialise writers of the stores in the folders of ``paths`` (readers never lock).

    The lock is on the folder, not on the store file: a write replaces the
    store's inode, so a lock held on the old file would not exclude the next
    writer, and a separate lock file would litter the folder. Several folders
    (a move) are locked once each, in inode order, so two movers cannot deadlock;
    one folder is never locked twice (flock on a second descriptor of the same
    folder would wait for ourselves).
    """
    fds, seen = [], {}
    for path in paths:
        try:
            fd = os.open(_folder_of(Path(path)), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            for fd in seen.values():
                os.close(fd)
            raise StoreError(f"{path}: no such directory {_folder_of(Path(path))}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in seen:
            os.close(fd)
        else:
            seen[st.st_dev, st.st_ino] = fd
    try:
        for key in sorted(seen):
            try:
                fcntl.flock(seen[key], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # another writer holds it: say why the command waits (on a
                # terminal, like progress), then wait as before
                if sys.stderr.isatty():
                    sys.stderr.write(f"waiting for another writer of {_folder_of(Path(paths[0]))} "
                                     "to finish...\n")
                    sys.stderr.flush()
                fcntl.flock(seen[key], fcntl.LOCK_EX)
            fds.append(seen[key])
        yield
    finally:
        for fd in seen.values():
            if fd in fds:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _temp_prefix(path: Path) -> str:
    """``.<store>.<pid>-<host>.``: who wrote a temporary copy is in its name."""
    return f".{path.name}.{os.getpid()}-{_HOST}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary copies that killed writers left beside ``path``.

    Call with the writer lock held. Every writer makes and removes its copy
    while holding that lock, so a copy seen now belongs to a writer that is
    gone, unless its name says it was made by a process of this host that is
    still alive (a reused pid; left alone) or by another host (cannot be
    told; left alone). Copies named before writers put their pid in the name
    were also made under the lock, so they are removed too.
    """
    folder = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:(\d+)-([A-Za-z0-9_-]+)\.)?[A-Za-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid, host = m.group(1), m.group(2)
        if pid is not None and (host != _HOST or (int(pid) != os.getpid() and _pid_alive(int(pid)))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def _transaction(path: Path, new: bool, source=None):
    """Yield a temporary copy of the store (or of the open binary file ``source``,
    a copy's origin); rename it over the store on success."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if source is not None:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
            os.chmod(tmp, os.fstat(source.fileno()).st_mode & 0o777)
        elif new or not path.exists():
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = SINGLE_VERSION
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a store is an ordinary file
        else:
            shutil.copyfile(path, tmp)
            shutil.copymode(path, tmp)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


# ------------------------------------------------------------------ layouts
def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise StoreError(f"unknown store layout {layout!r}: use {' or '.join(LAYOUTS)}")
    return layout


def default_layout() -> str:
    """Layout of new stores: ``$SCARLETSTORE_LAYOUT`` if set, else ``"linked"``."""
    value = os.environ.get(LAYOUT_ENV, "").strip() or "linked"
    if value not in LAYOUTS:
        raise StoreError(f"{LAYOUT_ENV}={value!r}: use {' or '.join(LAYOUTS)}")
    return value


def _layout_of(f) -> str:
    version = f.attrs.get("format_version")
    return "linked" if version is not None and int(version) >= LINKED_VERSION else "single"


def _store_path(path) -> Path:
    """``path`` as a Path, a symlink replaced by its target (InputError if not a path).

    A symlinked index works like its target: HDF5 resolves the links beside the
    file it opens and the folder is ``<name>.d`` beside it, so through the link's
    own name a write would replace the link and put products in the wrong folder.
    A plain path is kept as given (messages show what the user typed).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"a store path must be a str or os.PathLike, not {type(path).__name__}")
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _folder_of(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def products_dir(path) -> Path:
    """Folder of a linked store's product files: ``<store>.d`` beside the index."""
    path = Path(path)
    return path.with_name(path.name + ".d")


class _SingleTransaction:
    """A write to a single-file store: groups go into the temporary copy ``path``."""

    def __init__(self, tmp: Path):
        self.path = tmp

    def has(self, name: str) -> bool:
        with h5py.File(self.path, "r") as f:
            return name in f

    def put(self, datasets: dict[str, xr.Dataset]) -> None:
        with h5py.File(self.path, "a") as f:
            for name in datasets:
                if name in f:
                    del f[name]
        _write_groups(self.path, datasets)
        _record_checksums(self.path, datasets)


def _created(path: Path, f, name: str) -> str:
    """The ``created`` stamp of run ``name`` (what orders the runs)."""
    try:
        return str(_plain(f[RUNS][name].attrs.get("created", "")))
    except (KeyError, OSError):
        _missing_product(path, f, run_group(name))
        raise


def _foreign_products(path: Path, f) -> str | None:
    """Why the linked index ``f`` of ``path`` is not a store of its own, else None.

    Its links must point into ``<its name>.d``: an index copied or renamed by
    hand (``cp s.h5 t.h5``) still names ``s.h5.d``, and writing through it would
    let one store's clean-up delete the other's files.
    """
    if _layout_of(f) != "linked":
        return None
    own = products_dir(path).name
    how = (f"a linked store is {path.name} and {own} together: copy, move and remove it "
           "with scarletstore.copy_store, move_store, remove_store")
    beside = _folder_of(path)
    for group, rel in _index_entries(f).items():
        folder = Path(rel).parent.name
        if folder != own:
            return f"{path}: its products are in {folder}, not {own} (copied or renamed by hand? {how})"
        # HDF5 looks for a link's file beside the index and then, failing that, in
        # the working directory: an index copied without its folder, opened from the
        # original's directory, would read (and a write split) the original's files
        if not os.path.exists(beside / rel) and os.path.exists(rel):
            return (f"{path}: its product file {rel} is not beside it but in the working "
                    f"directory, another store's (copied by hand? {how})")
    return None


def _missing_product(path: Path, f, group: str) -> None:
    """Raise StoreError if ``group`` is a link of a linked index that leads nowhere:
    its file is gone, is not HDF5, or does not hold the group."""
    try:
        link = f.get(group, getlink=True)
    except (KeyError, OSError, ValueError):
        return
    if not isinstance(link, h5py.ExternalLink):
        return
    if not (_folder_of(path) / link.filename).is_file():
        raise StoreError(f"{path}: group {group!r}: its file {link.filename} is missing "
                         f"(a linked store is {path.name} and {path.name}.d together)")
    raise StoreError(f"{path}: group {group!r}: its file {link.filename} is damaged "
                     f"(not HDF5, or without the group {link.path})")


def _index_entries(f) -> dict[str, str]:
    """``{group: product file name relative to the store's folder}`` of an open index."""
    out = {}

    def walk(group, prefix):
        # products sit at any depth (runs/<name>, coadds/likelihood, apcorr/<band>):
        # the index's own groups are plain HDF5 groups holding the links
        for key in group.keys():
            link = group.get(key, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                out[prefix + key] = link.filename
            elif isinstance(link, h5py.HardLink) and isinstance(group.get(key), h5py.Group):
                walk(group[key], prefix + key + "/")

    walk(f, "")
    return out


def _retired_of(f) -> list[tuple[str, float]]:
    import json
    raw = _plain(f.attrs.get("retired", "[]"))
    return [(str(name), float(when)) for name, when in json.loads(raw or "[]")]


# Storage per variable, chosen by measuring ratio (raw / stored) on a simulated
# 512 x 512 field and real HSC cut-outs (docs/store.md): integer arrays (masks,
# spans, counts, ids, the pixel dimension) shrink 30-500x under shuffle +
# gzip; smooth float planes (variance, background) 1.8-2.8x with shuffle at
# level 1; noisy images only 1.07-1.13x and morphologies 1.26-1.46x, while
# gzip makes a blend's morph slice 3-11x slower to read: those stay raw.
_GZIP_INT = {"zlib": True, "complevel": 4, "shuffle": True}
_GZIP_FLOAT = {"zlib": True, "complevel": 1, "shuffle": True}
_COMPRESSED_FLOATS = {"variance", "background"}
_TILE = 256  # pixel planes: one band, 256 x 256 pixels (256 kB of float32) per chunk
_RUN = 65536  # 1-D compressed columns: 64 k values per chunk


def _product_encoding(ds: xr.Dataset) -> dict:
    """Per-variable HDF5 storage of a product file (see the table above)."""
    enc = _encoding(ds)
    for name, var in ds.variables.items():
        if var.ndim == 0 or var.dtype.kind in "OSU" or var.size < 4096:
            continue
        if var.dtype.kind in "iub":
            enc[name].update(_GZIP_INT)
        elif name in _COMPRESSED_FLOATS:
            enc[name].update(_GZIP_FLOAT)
        elif var.ndim < 3:
            continue  # raw and contiguous: read whole or in slices (morph)
        enc[name]["chunksizes"] = _chunks(var.shape)
    return enc


def _chunks(shape) -> tuple:
    """One band by a 256 x 256 tile for (band, y, x) planes; 64 k values along a 1-D column."""
    if len(shape) >= 3:
        return (1,) * (len(shape) - 2) + (min(_TILE, shape[-2]), min(_TILE, shape[-1]))
    if len(shape) == 2:
        return (min(_TILE, shape[0]), min(_TILE, shape[1]))
    return (min(_RUN, shape[0]),)


def _product_name(group: str) -> str:
    import uuid
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", group.replace("/", "-"))
    return f"{safe}-{uuid.uuid4().hex}.h5"


# Names of the shape _product_name makes (``<group>-<32 hex digits of a uuid4>.h5``):
# the only files the clean-up may ever delete from a products folder. Anything else
# there (``data-20240101.h5`` too) is the user's, whatever its age.
_PRODUCT_FILE = re.compile(r"[A-Za-z0-9._-]+-[0-9a-f]{32}\.h5")


def _product_files(folder: Path) -> list[os.DirEntry]:
    """The regular files of ``folder`` named like product files (none if it is absent)."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    return [e for e in entries
            if _PRODUCT_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False)]


def _write_product(file: Path, group: str, ds: xr.Dataset) -> int:
    """Write ``ds`` as the one group of a new product file and flush it to disk;
    returns the file's size in bytes."""
    if not isinstance(ds, Frame):  # a Frame carries no storage of its own
        ds = ds.copy()
        for var in ds.variables.values():
            var.encoding = {}  # storage read from another file must not override ours
    _write_groups(file, {group: ds}, encoding=_product_encoding, mode="w")
    _record_checksums(file, [group])
    with open(file, "rb+") as fh:
        os.fsync(fh.fileno())
        return os.fstat(fh.fileno()).st_size


class _LinkedTransaction:
    """A write to a linked store (call with the writer lock held).

    ``put`` writes each new product to its own new file in ``<store>.d``
    (fsynced); the commit then writes a new index naming the current file of
    every group, fsyncs it and renames it over the store. Nothing a reader can
    reach is ever modified: a kill at any moment leaves the old index and its
    files, and at worst unreferenced files that the next writer removes.
    """

    def __init__(self, path: Path, new: bool, convert: bool = False):
        self.path = Path(path)
        self.new, self.convert = new, convert
        self.folder = _folder_of(self.path)
        self.dir = products_dir(self.path)
        self.entries: dict[str, str] = {}
        self.retired: list[tuple[str, float]] = []
        self.written: dict[str, str] = {}
        self.bytes_written = 0
        if not new and not convert:
            with h5py.File(self.path, "r") as f:
                foreign = _foreign_products(self.path, f)
                if foreign:
                    raise StoreError(foreign + "; refusing to write")
                self.entries = _index_entries(f)
                self.retired = _retired_of(f)
        else:  # no index names a file of self.dir yet
            _check_unclaimed(self.path, self.dir)
        if convert:
            with h5py.File(self.path, "r") as f:
                self._old_groups = _group_names(f)

    def __enter__(self):
        self._made_dir = not self.dir.is_dir()
        with _writable(self.path, self.folder):
            self.dir.mkdir(exist_ok=True)
        return self

    def has(self, name: str) -> bool:
        if self.convert:
            return name in self._old_groups or name in self.written
        return name in self.entries or name in self.written

    def put(self, datasets: dict[str, xr.Dataset]) -> None:
        for name, ds in datasets.items():
            file = _product_name(name)
            self.written[name] = f"{self.dir.name}/{file}"  # first: a failed write is removed too
            with _writable(self.path, self.dir):
                self.bytes_written += _write_product(self.dir / file, name, ds)

    def put_file(self, name: str, source, link: bool = False) -> None:
        """Add group ``name`` as a copy of a product file (an open binary file),
        or with ``link`` as a hard link to it (a move within one file system;
        OSError if the file systems differ)."""
        file = Path(source.name).name
        target = self.dir / file
        self.written[name] = f"{self.dir.name}/{file}"  # first: a failed copy is removed too
        if link:
            os.link(source.name, target)
        else:
            with _writable(self.path, self.dir), open(target, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER)
                os.fsync(out.fileno())
                self.bytes_written += out.tell()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            return False
        try:
            if self.convert:
                self._copy_old_groups()
            now = _now()
            for name, rel in self.written.items():
                old = self.entries.get(name)
                if old is not None and old != rel:
                    self.retired.append((old, now))
                self.entries[name] = rel
            # only a write that commits cleans up: a failed one (a damaged store) leaves
            # every file as it was
            with _writable(self.path, self.dir):
                self._collect_garbage()
                _fsync_dir(self.dir)
            with _writable(self.path, self.folder):
                size = _commit_index(self.path, self.entries, self.retired)
        except BaseException:
            # the rename is _commit_index's last step: it did not happen, the old
            # index stands and names none of our files
            self._discard()
            raise
        self.bytes_written += size
        _fsync_dir(self.folder)  # after the commit: a failure here must not drop named files
        return False

    def _discard(self) -> None:
        """Remove this transaction's new files (no index names them)."""
        for rel in self.written.values():
            with contextlib.suppress(FileNotFoundError):
                (self.folder / rel).unlink()
        if self._made_dir:  # a failed create leaves no empty products folder behind
            with contextlib.suppress(OSError):
                self.dir.rmdir()

    def _copy_old_groups(self) -> None:
        """Converting a single-file store: every group not replaced moves to its own file."""
        import xarray as xr

        for name in self._old_groups:
            if name in self.written:
                continue
            with xr.open_dataset(self.path, group=name, engine="h5netcdf", mask_and_scale=False,
                                 decode_times=False, cache=False) as ds:
                self.put({name: ds.load()})

    def _collect_garbage(self) -> None:
        """Delete product files no index names: leftovers of killed writers at
        once (every writer holds the lock while its files are unnamed, and
        this runs under the lock), replaced ones after ``GC_GRACE_SECONDS``."""
        named = set(self.entries.values())
        now, keep = _now(), []
        for rel, when in self.retired:
            if now - when < GC_GRACE_SECONDS and rel not in named:
                keep.append((rel, when))
        waiting = {rel for rel, _ in keep}
        self.retired = keep
        for entry in _product_files(self.dir):
            rel = f"{self.dir.name}/{entry.name}"
            if rel in named or rel in waiting:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


@contextlib.contextmanager
def _writable(path: Path, folder: Path):
    """Report a permission error while writing into ``folder`` in one line naming it
    (h5py's text for it is a clause list of HDF5 internals)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            raise
        raise StoreError(f"{path}: cannot write to {folder}: permission denied") from None


def _now() -> float:
    import time
    return time.time()


def _check_unclaimed(path: Path, folder: Path) -> None:
    """Refuse to create the linked store ``path`` (new, or converted from a single
    file) while its products folder holds product files: no index names them, so
    they are another store's (one renamed by hand still links to this folder) or a
    killed create's, and cannot be told apart. The new index's clean-up would
    delete them."""
    found = _product_files(folder)
    if found:
        raise StoreError(f"{path}: {folder} already holds {len(found)} product file(s) of another "
                         f"store (renamed by hand?); restore that store's name, or move {folder} away")


def _commit_index(path: Path, entries: dict[str, str], retired) -> int:
    """Write a fresh index naming ``entries`` and rename it over ``path``; returns its size."""
    import json
    folder = _folder_of(path)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = LINKED_VERSION
            f.attrs["retired"] = json.dumps([[rel, when] for rel, when in retired])
            for group in sorted(entries):
                parent, _, leaf = group.rpartition("/")
                where = f.require_group(parent) if parent else f
                where[leaf] = h5py.ExternalLink(entries[group], "/" + group)
        if path.exists():
            shutil.copymode(path, tmp)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
            size = os.fstat(fh.fileno()).st_size
        os.replace(tmp, path)  # the commit; the caller fsyncs the folder
        return size
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def open_store(path) -> Store:
    """Open an existing store."""
    return Store(path)


# ------------------------------------------------------------------ whole stores
_COPY_BUFFER = 8 << 20


def store_files(path) -> list[Path]:
    """Every file of the store at ``path`` on disk: the store file, and for a
    linked store every file of its products folder (named or not)."""
    path = Path(path)
    files = [path]
    folder = products_dir(path)
    if folder.is_dir():
        files += sorted(p for p in folder.iterdir() if p.is_file())
    return files


@contextlib.contextmanager
def _open_version(path: Path):
    """Open every file of the store's current version for reading: ``(layout,
    {group: file} or the store file)``. Held open, they stay readable whatever
    writers (or the clean-up of replaced products) do meanwhile."""
    store = Store(path)  # refuses what is not a sound store of a version we know
    path = store.path  # a symlink's target
    with contextlib.ExitStack() as stack:
        with store._h5() as f:
            layout = _layout_of(f)
            if layout == "single":
                yield layout, stack.enter_context(open(path, "rb"))
                return
            entries = _index_entries(f)
        files = {}
        for group, rel in entries.items():
            try:
                files[group] = stack.enter_context(open(_folder_of(path) / rel, "rb"))
            except FileNotFoundError:
                raise StoreError(f"{path}: group {group!r}: its file {rel} is missing") from None
        yield layout, files


def _check_free(dest: Path) -> None:
    if dest.exists():
        raise StoreError(f"{dest}: already exists")


def _paste(src: Path, dest: Path, link: bool) -> None:
    """Write the current version of store ``src`` as the new store ``dest`` (call
    with the writer lock of ``dest`` held); ``link`` hard-links product files."""
    with _open_version(src) as (layout, files):
        _remove_stale_temps(dest)
        _check_free(dest)
        if layout == "single":
            with _transaction(dest, new=True, source=files):
                pass
            return
        with _LinkedTransaction(dest, new=True) as tx:
            for group, fh in files.items():
                tx.put_file(group, fh, link=link)


def copy_store(src, dest) -> Store:
    """Copy the current version of store ``src`` to the new store ``dest``; returns it.

    Like every write, atomic: ``dest`` appears complete or not at all, and a
    copy taken while another process writes ``src`` is one consistent version.
    The copy keeps the layout; a linked one gets its own ``<dest>.d`` (the
    links of an index copied by hand would still point at ``src``'s folder).
    """
    src, dest = _store_path(src), _store_path(dest)
    with _locked(dest):
        _paste(src, dest, link=False)
    return Store(dest)


def move_store(src, dest) -> Store:
    """Move (rename) store ``src`` to the new store ``dest``; returns it.

    ``dest`` is committed first (hard links to the product files, a copy across
    file systems), then ``src`` removed, both under the writer locks: a move
    killed half-way leaves ``src`` intact (and perhaps ``dest`` too), never
    neither, and no write to ``src`` is lost.
    """
    src, dest = _store_path(src), _store_path(dest)
    with _locked(src, dest):
        try:
            _paste(src, dest, link=True)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _paste(src, dest, link=False)
        _unlink_store(src)
    return Store(dest)


def remove_store(path) -> None:
    """Delete the store at ``path`` (and a linked store's products folder).

    The store file goes first, so an interrupted removal leaves no store that
    names missing files; readers that have it open keep reading their version.
    Refuses a file that is not a scarletstore store. Through a symlink, the
    store it names is removed (the link is left).
    """
    path = _store_path(path)
    try:
        with h5py.File(path, "r") as f:
            fmt = _plain(f.attrs.get("format"))
    except FileNotFoundError:
        raise StoreError(f"{path}: no such store") from None
    except OSError:
        raise StoreError(f"{path}: not an HDF5 file") from None
    if fmt != FORMAT:
        raise StoreError(f"{path}: not a scarletstore store")
    with _locked(path):
        _unlink_store(path)


def _unlink_store(path: Path) -> None:
    _remove_stale_temps(path)
    os.unlink(path)
    _fsync_dir(_folder_of(path))
    shutil.rmtree(products_dir(path), ignore_errors=True)
