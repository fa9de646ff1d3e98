"""The store's own HDF5 reader against xarray's, on every product the package
writes, in both layouts; and the deferred dask probes (no dask import by a
command that does not ask for dask, dask arrays still recognised)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from conftest import DATA

from scarletstore.cli import main
from scarletstore.store.h5read import read_group
from scarletstore.store.store import CHECKSUM_ATTR, LAYOUT_ENV, Store, copy_store

ROOT = Path(__file__).resolve().parent.parent

from test_measure_apcorr import star_field  # noqa: E402,F401  (module fixture: stars + run a)


@pytest.fixture(scope="module")
def product_store(tmp_path_factory, star_field):  # noqa: F811
    """One single-file store holding every product kind: a coadd's exposure, visits
    table and coadds/ planes, parents, a scarlet and an sdss run, an imported LSST
    run (per-blend PSFs) when the reference models are present, and apcorr/r."""
    pytest.importorskip("galsim")
    saved = os.environ.get(LAYOUT_ENV)
    os.environ[LAYOUT_ENV] = "single"  # the "linked" case converts a copy of it
    try:
        return _every_product(tmp_path_factory.mktemp("h5read"), star_field)
    finally:
        if saved is None:
            os.environ.pop(LAYOUT_ENV, None)
        else:
            os.environ[LAYOUT_ENV] = saved


def _every_product(tmp, star_field):  # noqa: F811
    sim = tmp / "sim"
    assert main(["simulate", str(sim), "--visits", "2", "--size", "64", "--bands", "gr",
                 "--density", "40", "--seed", "5"]) == 0
    path = tmp / "all.h5"
    visits = sorted(str(p) for p in sim.glob("visit_*.fits"))
    assert main(["coadd", str(path), *visits, "--grid", str(sim / "grid.fits")]) == 0
    assert main(["detect", str(path)]) == 0
    assert main(["deblend", str(path), "--run", "a", "--set", "max_iter=20"]) == 0
    assert main(["deblend", str(path), "--run", "b", "--method", "sdss"]) == 0
    lsst = DATA / "lsst_v29_models.json"
    if lsst.is_file():  # models of another image: imported on their own, then stored here
        assert main(["import-lsst", str(lsst), str(tmp / "lsst.h5"), "--run", "lsst"]) == 0
        Store(path).write({"runs/lsst": Store(tmp / "lsst.h5").read("runs/lsst")})
    # the aperture correction needs bright isolated stars: fitted on the star field
    stars, _, _ = star_field
    apc = tmp / "stars.h5"
    copy_store(stars.path, apc)
    assert main(["apcorr", str(apc), "--band", "r"]) == 0
    Store(path).write({"apcorr/r": Store(apc).read("apcorr/r")})
    return path


@pytest.fixture(scope="module", params=["single", "linked"])
def layout_store(request, product_store, tmp_path_factory):
    if request.param == "single":
        return product_store
    path = tmp_path_factory.mktemp("linked") / "all.h5"
    copy_store(product_store, path)
    Store(path).convert("linked")
    assert Store(path).layout == "linked"
    return path


def _xarray(store: Store, group: str) -> xr.Dataset:
    with xr.open_dataset(store.product_path(group), group=group, engine="h5netcdf",
                         mask_and_scale=False, decode_times=False, cache=False) as ds:
        return ds.load()


def _store_view(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` as Store reads give it: without the store's recorded content checksum."""
    ds = ds.copy()
    ds.attrs.pop(CHECKSUM_ATTR, None)
    return ds


def _assert_same(a: xr.Dataset, b: xr.Dataset, where: str) -> None:
    """Identical, and beyond what ``identical`` compares: order, dtypes, attribute types, indexes."""
    xr.testing.assert_identical(a, b)
    assert list(a.variables) == list(b.variables), where
    assert list(a.coords) == list(b.coords), where
    assert list(a.indexes) == list(b.indexes), where
    for name, var in a.variables.items():
        other = b.variables[name]
        assert var.dtype == other.dtype, f"{where}: {name} {var.dtype} != {other.dtype}"
        assert type(var.data) is type(other.data), f"{where}: {name}"
        assert list(var.attrs) == list(other.attrs), f"{where}: {name}"
        for k, v in var.attrs.items():
            assert type(v) is type(other.attrs[k]), f"{where}: {name}.{k}"
        if var.dtype.kind == "U":
            assert all(type(s) is type(t) for s, t in zip(var.values.ravel(), other.values.ravel()))
    assert list(a.attrs) == list(b.attrs), where
    for k, v in a.attrs.items():
        assert type(v) is type(b.attrs[k]), f"{where}: attribute {k}: {type(v)} != {type(b.attrs[k])}"
        if isinstance(v, np.ndarray):
            assert v.dtype == b.attrs[k].dtype


def test_every_product_reads_as_xarray_reads_it(layout_store):
    store = Store(layout_store)
    groups = store.groups()
    kinds = {g["schema"] for g in groups.values()}
    assert {"exposure", "visits", "parents", "run", "apcorr", "likelihood_coadd"} <= kinds, kinds
    for name in groups:
        expected = _xarray(store, name)
        with h5py.File(store.path, "r") as f:  # through the index's external links when linked
            ds = read_group(f[name])
        assert ds is not None, f"{name}: the store's own products must take the fast path"
        _assert_same(ds, expected, name)
        _assert_same(store.read(name), _store_view(expected), name)  # what callers get (latest schema)
    # strings, booleans and index coordinates are among what was compared
    run = store.read("runs/a")
    assert run["blend_converged"].dtype == bool and run["blend_reason"].dtype.kind == "U"
    assert "band" in run.indexes


def test_read_with_checksum_is_read_and_checksum(layout_store, tmp_path):
    """One pass gives what ``read`` and ``checksum`` give apart, for every product."""
    store = Store(layout_store)
    for name in store.groups():
        ds, digest = store.read_with_checksum(name)
        assert digest == store.checksum(name), name
        _assert_same(ds, store.read(name), name)
    # a changed value changes the digest (the arrays hashed are the file's, not a stale copy)
    path = tmp_path / "changed.h5"
    copy_store(layout_store, path)
    with h5py.File(Store(path).product_path("exposure"), "r+") as f:
        image = f["exposure/image"][()]
        image[np.isfinite(image)] += 1.0
        f["exposure/image"][...] = image
    _, changed = Store(path).read_with_checksum("exposure")
    assert changed == Store(path).checksum("exposure") != store.checksum("exposure")


def test_unsupported_content_falls_back_to_xarray(product_store, tmp_path):
    """Attributes and variables only xarray decodes: the reader declines, reads stay right."""
    path = tmp_path / "s.h5"
    copy_store(product_store, path)
    with h5py.File(path, "r+") as f:
        g = f["parents"]
        g.attrs["list_attr"] = ["a", "b"]  # an array of strings: h5netcdf returns a list
        g["span_y"].attrs["_FillValue"] = np.int32(-1)  # CF masking (kept as an attribute here)
    store = Store(path)
    with h5py.File(path, "r") as f:
        assert read_group(f["parents"]) is None
    expected = _xarray(store, "parents")
    assert expected.attrs["list_attr"] == ["a", "b"]
    _assert_same(store.read("parents"), _store_view(expected), "parents")
    ds, digest = store.read_with_checksum("parents")  # xarray's read, the same digest
    _assert_same(ds, _store_view(expected), "parents")
    assert digest == store.checksum("parents")


def _python(code: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _after_commands(product_store, tmp_path, package: str) -> str:
    """Code running a one-blend deblend and a catalog in this process, then setting
    ``before`` to the modules of ``package`` they imported."""
    path = tmp_path / "s.h5"
    copy_store(product_store, path)
    parent = int(Store(path).read("parents")["parent_id"].values[0])
    return f"""
import json, sys
from scarletstore.cli import main
assert main(["deblend", {str(path)!r}, "--blends", "{parent}", "--run", "c"]) == 0
assert main(["catalog", {str(path)!r}, "--band", "r", "-o", {str(tmp_path / 'c.fits')!r}]) == 0
before = sorted(m for m in sys.modules if m == {package!r} or m.startswith({package + "."!r}))
"""


def test_commands_without_workers_never_import_dask(product_store, tmp_path):
    """A deblend and a catalog in a fresh process leave dask unimported; asked for
    afterwards, dask arrays and collections are recognised by xarray as before."""
    code = _after_commands(product_store, tmp_path, "dask") + """
import numpy as np, xarray as xr, dask.array as da
from xarray.namedarray.utils import is_duck_dask_array
ds = xr.Dataset({"a": ("x", np.arange(4.0))}).chunk({"x": 2})
lazy = xr.Variable("x", da.zeros(4, chunks=2))
print(json.dumps([before, ds["a"].chunks, is_duck_dask_array(ds["a"].data), lazy.chunks,
                  float(ds["a"].sum().compute())]))
"""
    before, chunks, is_dask, lazy_chunks, total = json.loads(_python(code, tmp_path))
    assert before == []
    assert chunks == [[2, 2]] and is_dask and lazy_chunks == [[2, 2]]
    assert total == 6.0


def test_commands_leave_scipy_linalg_unimported(product_store, tmp_path):
    """numba's set-up finds BLAS/LAPACK preloaded (no scipy.linalg import, ~0.15 s); compiled
    BLAS and LAPACK calls and a later ``import scipy.linalg`` still work."""
    code = _after_commands(product_store, tmp_path, "scipy.linalg") + """
import numpy as np, numba
@numba.njit
def dot_solve(a, b):
    return np.dot(a, b), np.linalg.solve(a, b)
a = np.array([[3.0, 1.0], [1.0, 2.0]]); b = np.array([[9.0], [8.0]])
d, x = dot_solve(a, b)
import scipy.linalg
print(json.dumps([before, bool(np.allclose(d, a @ b)), bool(np.allclose(x, np.linalg.solve(a, b))),
                  bool(np.allclose(scipy.linalg.solve(a, b), x))]))
"""
    before, dot_ok, solve_ok, scipy_ok = json.loads(_python(code, tmp_path))
    assert before == ["scipy.linalg.cython_blas", "scipy.linalg.cython_lapack"]
    assert dot_ok and solve_ok and scipy_ok


def test_open_stays_lazy_and_cheap(product_store, tmp_path):
    """``ss.open`` reads headers only: no array values and no xarray decoding."""
    code = f"""
import sys, scarletstore as ss
store = ss.open({str(product_store)!r})
print(int("h5netcdf" in sys.modules or "dask" in sys.modules), len(store.runs()))
"""
    loaded, runs = _python(code, tmp_path).split()
    assert loaded == "0" and int(runs) >= 2
