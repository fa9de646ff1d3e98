"""The model store: one HDF5 file (netCDF4 flavour), one group per product.

Layout::

    /                 attrs: format="scarletstore", format_version
    /exposure         exposure Dataset
    /parents          parents Dataset
    /runs/<name>      one run Dataset per deblend run (append-only)

Every group is written and read through xarray's h5netcdf engine, so plain
``xarray.open_dataset(path, group="exposure", engine="h5netcdf")`` reads it.

Writes are atomic: the new state is built in a temporary file next to the
store (a copy of the old one plus the new groups), flushed to disk and then
renamed over the store. A process killed at any moment leaves either the old
or the new store, both complete. Readers never block: they hold the inode of
the version they opened. Concurrent writers are serialised by a lock file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import xarray as xr

from . import schema as _schema
from .errors import SchemaError, StoreError

FORMAT = "scarletstore"
FORMAT_VERSION = 1
RUNS = "runs"


def run_group(name: str) -> str:
    return f"{RUNS}/{name}"


def _encoding(ds: xr.Dataset) -> dict:
    # No fill values: the data must round-trip bit for bit and NaN is data here.
    return {name: {"_FillValue": None} for name in ds.variables}


def _plain(value):
    """HDF5 attribute -> Python value (netCDF writes scalars as 1-element arrays)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """A scarletstore HDF5 file.

    Parameters
    ----------
    path : str or Path
        The store file. Opening checks it exists and is a scarletstore file.
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"{self.path}: no such store")
        try:
            with self._h5() as f:
                fmt = f.attrs.get("format")
                version = f.attrs.get("format_version")
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

    # ------------------------------------------------------------------ reading
    def _h5(self):
        return h5py.File(self.path, "r")

    def group_attrs(self, f, name: str) -> dict:
        """Attributes of group ``name`` of the open file ``f`` as plain Python values."""
        return {k: _plain(v) for k, v in f[name].attrs.items()}

    def groups(self) -> dict[str, dict]:
        """Every product group: ``{name: {"schema", "schema_version", "dims", "attrs"}}``."""
        out = {}
        with self._h5() as f:
            names = [n for n in f.keys() if n != RUNS]
            # A folder group without a schema (e.g. coadds/) holds product groups.
            names = [f"{n}/{c}" if "schema" not in f[n].attrs else n for n in names
                     for c in (f[n].keys() if "schema" not in f[n].attrs else [None])]
            if RUNS in f:
                names += [run_group(n) for n in f[RUNS].keys()]
            for name in names:
                attrs = self.group_attrs(f, name)
                dims = {}
                for key, obj in f[name].items():
                    if isinstance(obj, h5py.Dataset) and obj.attrs.get("CLASS") == b"DIMENSION_SCALE":
                        dims[key] = obj.shape[0]
                out[name] = {
                    "schema": attrs.get("schema"),
                    "schema_version": attrs.get("schema_version"),
                    "dims": dims,
                    "attrs": attrs,
                    "nbytes": sum(o.size * o.dtype.itemsize for o in f[name].values()
                                  if isinstance(o, h5py.Dataset) and o.dtype.kind not in "OSU"),
                }
        return out

    def has(self, group: str) -> bool:
        with self._h5() as f:
            return group in f

    def runs(self) -> list[str]:
        """Names of the stored runs, oldest first."""
        with self._h5() as f:
            if RUNS not in f:
                return []
            items = [(self.group_attrs(f, run_group(n)).get("created", ""), n) for n in f[RUNS].keys()]
        return [n for _, n in sorted(items)]

    def max_source_id(self) -> int:
        """Largest source id of any stored run (0 when there is none)."""
        best = 0
        with self._h5() as f:
            for name in f[RUNS].keys() if RUNS in f else []:
                ids = f[RUNS][name]["source_id"]
                if ids.shape[0]:
                    best = max(best, int(np.max(ids[()])))
        return best

    def open(self, group: str, validate: bool = True, upgrade: bool = True) -> xr.Dataset:
        """Open ``group`` lazily (values are read when accessed). Close it when done.

        With ``upgrade`` (the default) an older schema version is migrated in
        memory to the latest, so code only ever sees current layouts; the file
        is not changed (``scarletstore migrate`` does that).
        """
        if not self.has(group):
            raise StoreError(f"{self.path}: no {group!r} group")
        ds = xr.open_dataset(self.path, group=group, engine="h5netcdf",
                             mask_and_scale=False, decode_times=False, cache=False)
        try:
            if upgrade:
                from .migrate import upgrade as _upgrade
                ds = _upgrade(ds)
            elif validate:
                _schema.validate(ds)
        except SchemaError as exc:
            ds.close()
            raise SchemaError(f"{self.path}: group {group!r}: {exc}") from None
        return ds

    def read(self, group: str, validate: bool = True, upgrade: bool = True) -> xr.Dataset:
        """Read ``group`` fully into memory and close the file."""
        with self.open(group, validate=validate, upgrade=upgrade) as ds:
            return ds.load()

    def h5_group(self, group: str):
        """``(h5py.File, group)`` opened read-only when ``group`` is at its latest schema
        version, else None (callers then use :meth:`read`, which migrates).

        The raw HDF5 path skips xarray's per-variable overhead on hot loops.
        """
        f = h5py.File(self.path, "r")
        try:
            if group not in f:
                raise StoreError(f"{self.path}: no {group!r} group")
            attrs = self.group_attrs(f, group)
            if int(attrs.get("schema_version", 0)) != _schema.latest_version(attrs.get("schema")):
                f.close()
                return None
            return f, f[group]
        except BaseException:
            if f.id.valid:
                f.close()
            raise

    def run_tables(self, run: str):
        """:class:`~scarletstore.models.RunTables` of a stored run (fast path when current)."""
        from .models import RunTables

        group = run_group(run)
        opened = self.h5_group(group)
        if opened is None:
            return RunTables.from_dataset(self.read(group))
        f, g = opened
        tables = RunTables.from_h5(g, self.group_attrs(f, group))
        tables.file = f  # keeps the file open for morph slices; closed with the tables
        return tables

    def blend(self, run: str, parent_id: int):
        """One blend's stored models (:class:`~scarletstore.models.StoredBlend`)."""
        from .models import RunIndex, read_blend

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
        """Lazy per-band catalog of ``run`` (default: newest); see :func:`scarletstore.catalog.band_catalog`."""
        from .catalog import band_catalog
        return band_catalog(self, band, run=run, redistribute=redistribute, **kwargs)

    def footprint(self, source_id: int, band: str, run: str | None = None, redistribute: bool = False):
        """Heavy footprint of one child; see :func:`scarletstore.catalog.heavy_footprint`."""
        from .catalog import heavy_footprint
        return heavy_footprint(self, source_id, band, run=run, redistribute=redistribute)

    def checksum(self, group: str) -> str:
        """SHA-256 over the raw bytes of every variable of ``group`` (names sorted)."""
        h = hashlib.sha256()
        with self._h5() as f:
            g = f[group]
            for key in sorted(g.keys()):
                obj = g[key]
                if not isinstance(obj, h5py.Dataset):
                    continue
                h.update(key.encode())
                data = obj[()]
                if data.dtype.kind == "O":
                    h.update("\x00".join(str(v) for v in np.ravel(data)).encode())
                else:
                    h.update(np.ascontiguousarray(data).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ writing
    @classmethod
    def create(cls, path, datasets: dict[str, xr.Dataset] | None = None) -> "Store":
        """Create a store holding ``datasets`` in one atomic step and return it.

        Either the complete store appears at ``path`` or nothing does.
        """
        path = Path(path)
        for ds in (datasets or {}).values():
            _schema.validate(ds)
        with _locked(path):
            if path.exists():
                raise StoreError(f"{path}: already exists")
            with _transaction(path, new=True) as tmp:
                _write_groups(tmp, datasets or {})
        return cls(path)

    def write(self, datasets: dict[str, xr.Dataset], replace: bool = False) -> None:
        """Add (or with ``replace`` overwrite) groups in one atomic transaction.

        Every Dataset is validated against its own schema attributes first;
        nothing is written unless all are valid.
        """
        for name, ds in datasets.items():
            _schema.validate(ds)
        with _locked(self.path):
            with _transaction(self.path, new=False) as tmp:
                with h5py.File(tmp, "a") as f:
                    for name in datasets:
                        if name in f:
                            if not replace:
                                raise StoreError(f"{self.path}: group {name!r} already exists")
                            del f[name]
                _write_groups(tmp, datasets)


def _write_groups(tmp: Path, datasets: dict[str, xr.Dataset]) -> None:
    for name, ds in datasets.items():
        ds.to_netcdf(tmp, mode="a", group=name, engine="h5netcdf", encoding=_encoding(ds))


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise writers of the stores in one folder (readers never take the lock).

    The lock is on the folder, not on the store file: a write replaces the
    store's inode, so a lock held on the old file would not exclude the next
    writer, and a separate lock file would litter the folder.
    """
    folder = path.parent if str(path.parent) else Path(".")
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def _transaction(path: Path, new: bool):
    """Yield a temporary copy of the store; rename it over the store on success."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if new or not path.exists():
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["format_version"] = FORMAT_VERSION
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


def open_store(path) -> Store:
    """Open an existing store."""
    return Store(path)
