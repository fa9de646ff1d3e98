"""The store's group writer and the import cost of the CLI's modules.

Groups are written through xarray's netCDF4 encoder without ``to_netcdf``
(whose scheduler probe imports dask.distributed): every product type must
come back from plain xarray identical, bit for bit, to what ``to_netcdf``
writes, with the same HDF5 layout. The data are the real HSC cut-out (not
the simulated fields the costs were measured on), a direct coadd of
simulated visits, an imported Rubin model file and a version-1 store.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from conftest import shared_file

from scarletstore.store.store import CHECKSUM_ATTR, RECORDED_CHECKSUMS, Store, _encoding, _write_groups

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """``{group name: Dataset}`` of every product type the store holds."""
    from scarletstore.coadd.stack import direct_coadd
    from scarletstore.coadd.visits import read_grid, read_visits
    from scarletstore.deblend import DeblendConfig
    from scarletstore.deblend.run import deblend_exposure
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import read_npz
    from scarletstore.lsst import read_lsst_models
    from scarletstore.simulate.visits import simulate_visits

    exposure = read_npz(shared_file("hsc_cosmos.npz"))
    parents = detect(exposure)
    out = {"exposure": exposure, "parents": parents}
    for method in ("scarlet", "sdss"):
        out[f"runs/{method}"] = deblend_exposure(exposure, parents, DeblendConfig(), method,
                                                 name=method)
    out["runs/lsst"] = read_lsst_models(shared_file("lsst_v29_models.json"), name="lsst")
    sim = simulate_visits(tmp_path_factory.mktemp("visits"), n_visits=2, size=48, seed=5,
                          bands="r", density=20, n_stars=3)
    grid = read_grid(sim["grid"])
    coadd, table, _ = direct_coadd(read_visits(sim["visits"], grid), grid)
    out["coadd/exposure"], out["visits"] = coadd, table
    old = Store(ROOT / "tests" / "data" / "store_v1.h5")  # older schema versions, as stored
    for name in old.groups():
        out[f"v1/{name}"] = old.read(name, upgrade=False)
    return out


def _reference(path: Path, name: str, ds: xr.Dataset) -> None:
    """What ``Dataset.to_netcdf`` writes for the group (the layout the store promises)."""
    if not path.exists():
        with h5py.File(path, "w") as f:
            f.attrs["format"] = "scarletstore"
            f.attrs["format_version"] = 1
    ds.to_netcdf(path, mode="a", group=name, engine="h5netcdf", encoding=_encoding(ds))


def _layout(path: Path, group: str) -> dict:
    """Every HDF5 object under ``group``: dtype, shape, chunks, filters, fill value and
    attributes (dimension references resolved to names)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {}
            for key, value in obj.attrs.items():
                if key in ("DIMENSION_LIST", "REFERENCE_LIST"):
                    value = _refs(f, obj, key)
                elif isinstance(value, np.ndarray):
                    value = (value.dtype.str, value.tolist())
                else:
                    value = (type(value).__name__, value)
                attrs[key] = value
            entry = {"attrs": attrs}
            if isinstance(obj, h5py.Dataset):
                entry.update(dtype=obj.dtype.str if obj.dtype.kind != "O" else str(obj.dtype),
                             shape=obj.shape, chunks=obj.chunks, compression=obj.compression,
                             maxshape=obj.maxshape, fillvalue=repr(obj.fillvalue),
                             bytes=obj[()].tobytes() if obj.dtype.kind not in "OSU" else
                             [str(v) for v in np.ravel(obj[()])])
            out[name] = entry
        entry = {k: v for k, v in f[group].attrs.items()}
        out["."] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
        f[group].visititems(visit)
    return out


def _refs(f, obj, key):
    value = obj.attrs[key]
    if key == "DIMENSION_LIST":
        return [[f[r].name for r in refs] for refs in value]
    return sorted((f[r[0]].name, int(r[1])) for r in value)


def _same_bits(a: xr.Dataset, b: xr.Dataset) -> None:
    assert a.identical(b)
    assert sorted(a.variables) == sorted(b.variables)
    for name in a.variables:
        va, vb = a[name].values, b[name].values
        assert va.shape == vb.shape, name
        if va.dtype.kind in "OSU":  # netCDF strings read back as objects, whatever went in
            assert vb.dtype.kind in "OSU", name
            assert [str(v) for v in va.ravel()] == [str(v) for v in vb.ravel()], name
        else:
            assert va.dtype == vb.dtype, name
            assert va.tobytes() == vb.tobytes(), name  # NaN payloads and -0.0 included


def test_every_product_written_as_to_netcdf_writes_it(products, tmp_path):
    new, ref = tmp_path / "new.h5", tmp_path / "ref.h5"
    with h5py.File(new, "w") as f:
        f.attrs["format"] = "scarletstore"
        f.attrs["format_version"] = 1
    _write_groups(new, products)  # all groups in one call, as a transaction does
    for name, ds in products.items():
        _reference(ref, name, ds)
    assert len(products) >= 9
    for name, ds in products.items():
        assert ds.sizes and min(ds.sizes.values()) >= 0
        with xr.open_dataset(new, group=name, engine="h5netcdf") as got, \
                xr.open_dataset(ref, group=name, engine="h5netcdf") as want:
            _same_bits(got.load(), want.load())
        raw = dict(mask_and_scale=False, decode_times=False)
        with xr.open_dataset(new, group=name, engine="h5netcdf", **raw) as got:
            _same_bits(got.load(), ds.drop_encoding())  # and what was given, unchanged
        assert _layout(new, name) == _layout(ref, name), name


def test_every_product_survives_the_linked_layout_bit_for_bit(products, tmp_path):
    """Each product in its own chunked, compressed file (the default layout): plain
    xarray reads back exactly what was given, and no product pays for another."""
    store = Store.create(tmp_path / "s.h5", products)
    assert store.layout == "linked"
    raw = dict(mask_and_scale=False, decode_times=False)
    files = set()
    for name, ds in products.items():
        files.add(store.product_path(name))
        with xr.open_dataset(store.product_path(name), group=name, engine="h5netcdf", **raw) as got:
            got = got.load()
        # the one attribute the store adds: the content checksum of a deblend's inputs
        recorded = got.attrs.pop(CHECKSUM_ATTR, None)
        assert recorded == (store.checksum(name) if name in RECORDED_CHECKSUMS else None), name
        _same_bits(got, ds.drop_encoding())
    assert len(files) == len(products)


def test_nan_and_negative_zero_survive_a_store_write(products, tmp_path):
    ex = products["exposure"].copy(deep=True)
    img = ex["image"].values
    img[0, 0, 0], img[0, 0, 1] = np.nan, -0.0
    img[0, 0, 2] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]  # NaN payload
    store = Store.create(tmp_path / "s.h5", {"exposure": ex})
    with xr.open_dataset(store.product_path("exposure"), group="exposure", engine="h5netcdf") as back:
        assert back["image"].values.tobytes() == img.tobytes()


def _imported_by(code: str) -> set[str]:
    """Top-level package names in sys.modules after running ``code`` in a fresh interpreter."""
    prog = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_store_writes_do_not_import_dask_distributed(tmp_path):
    code = f"""
import numpy as np
from scarletstore.ingest.exposure import make_exposure
from scarletstore.store.store import Store
ex = make_exposure(np.zeros((2, 20, 30), np.float32), np.ones((2, 20, 30), np.float32), None,
                   [np.ones((3, 3))] * 2, ["g", "r"])
store = Store.create({str(tmp_path / 's.h5')!r}, {{"exposure": ex}})
store.write({{"exposure": ex}}, replace=True)
assert store.read("exposure")["image"].shape == (2, 20, 30)
"""
    mods = _imported_by(code)
    assert "xarray" in mods and "h5netcdf" in mods  # it did write through xarray
    assert "distributed" not in mods


def test_cli_start_up_imports_only_what_a_command_needs():
    mods = _imported_by("import scarletstore.cli; scarletstore.cli.build_parser()")
    assert not {"numpy", "xarray", "pandas", "numba", "scipy", "h5py", "astropy", "dask",
                "importlib.metadata"} & mods  # --help and bad arguments cost no imports
    # the catalog and deblend paths: no mask labelling, no progress-bar probing
    # and no version lookup until a bar or a run is made
    mods = _imported_by("import scarletstore.measure.catalog, scarletstore.deblend.run, scarletstore.store.store")
    assert "scipy.ndimage" not in mods
    assert "tqdm" not in mods
    assert "distributed" not in mods
    assert "xarray" not in mods and "pandas" not in mods  # only the lazy Datasets need them


def test_version_is_looked_up_on_first_use():
    from importlib.metadata import PackageNotFoundError, version

    import scarletstore

    try:
        expected = version("scarletstore")
    except PackageNotFoundError:
        expected = "0.0.0+unknown"
    assert scarletstore.__version__ == expected
    with pytest.raises(AttributeError):
        scarletstore.no_such_attribute  # noqa: B018


def test_dask_backed_dataset_goes_through_to_netcdf(products, tmp_path):
    ex = products["exposure"]
    lazy = ex.chunk({"band": 1})
    assert lazy["image"].chunks is not None
    store = Store.create(tmp_path / "s.h5", {"exposure": lazy})
    with xr.open_dataset(store.product_path("exposure"), group="exposure", engine="h5netcdf") as back:
        assert back["image"].values.tobytes() == ex["image"].values.tobytes()
        assert back["mask"].values.tobytes() == ex["mask"].values.tobytes()


def test_hidden_progress_bar_iterates_and_counts_without_tqdm():
    code = """
from scarletstore.progress import progress
items = list(progress(range(5), desc="x"))  # stderr is a pipe: hidden
with progress(total=3, desc="y", unit="blend") as bar:
    for _ in range(3):
        bar.update(1)
assert items == [0, 1, 2, 3, 4] and bar.n == 3
"""
    mods = _imported_by(code)
    assert "tqdm" not in mods


def test_frames_of_every_product_are_written_as_xarray_writes_them(products, tmp_path):
    """The h5netcdf-only writer (store/h5write.py) against xarray's, on the real HSC
    cut-out's products and the others: each product as a Frame, where the writer
    takes it, gives the same HDF5 objects, attributes, storage and bytes."""
    from scarletstore.store.frame import Frame
    from scarletstore.store.h5write import writable
    from scarletstore.store.store import _product_encoding

    taken = set()
    for encoding, mode in ((_encoding, "a"), (_product_encoding, "w")):
        for name, ds in products.items():
            frame = Frame.from_dataset(ds.drop_encoding())
            if not writable(frame, encoding(frame)):
                continue
            taken.add(name)
            for which, obj in (("frame", frame), ("xarray", ds.drop_encoding())):
                path = tmp_path / f"{which}-{encoding.__name__}.h5"
                _write_groups(path, {name: obj}, encoding=encoding, mode=mode)
            assert _layout(tmp_path / f"frame-{encoding.__name__}.h5", name) == \
                _layout(tmp_path / f"xarray-{encoding.__name__}.h5", name), name
            mode = "a"
    # what the command line writes without xarray must be among them
    assert {"exposure", "parents", "runs/scarlet", "runs/sdss"} <= taken
