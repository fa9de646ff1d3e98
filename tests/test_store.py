import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import xarray as xr

from scarletstore.errors import SchemaError, StoreError
from scarletstore.ingest import make_exposure
from scarletstore.store import Store


def _exposure(seed=0, shape=(3, 30, 40)):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=shape).astype(np.float32)
    var = np.ones(shape, np.float32)
    psf = [np.ones((3, 3)) for _ in range(shape[0])]
    return make_exposure(img, var, None, psf, ["g", "r", "i"][: shape[0]])


def test_create_write_read_roundtrip(tmp_path):
    path = tmp_path / "s.h5"
    ex = _exposure()
    store = Store.create(path, {"exposure": ex})
    back = store.read("exposure")
    for v in ("image", "variance", "mask", "psf"):
        assert back[v].dtype == ex[v].dtype
        np.testing.assert_array_equal(back[v].values, ex[v].values)
    assert list(back.band.values) == ["g", "r", "i"]
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "scarletstore"
        assert int(f.attrs["format_version"]) == 1


def test_plain_xarray_reads_group(tmp_path):
    path = tmp_path / "s.h5"
    ex = _exposure()
    Store.create(path, {"exposure": ex})
    with xr.open_dataset(path, group="exposure", engine="h5netcdf") as ds:
        assert ds["image"].dims == ("band", "y", "x")
        assert ds["psf"].dims == ("band", "psf_y", "psf_x")
        assert list(ds["band"].values) == ["g", "r", "i"]
        np.testing.assert_array_equal(ds["image"].values, ex["image"].values)


def test_existing_group_refused_and_store_unchanged(tmp_path):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = path.read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        store.write({"exposure": _exposure(1)})
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".s.h5.*.tmp"))


def test_invalid_dataset_not_written(tmp_path):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    bad = _exposure(1).drop_vars("psf")
    before = path.read_bytes()
    with pytest.raises(SchemaError, match="psf"):
        store.write({"other": bad})
    assert path.read_bytes() == before


def test_not_a_store(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5 file"):
        Store(p)
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.attrs["format"] = "other"
    with pytest.raises(StoreError, match="not a scarletstore store"):
        Store(tmp_path / "y.h5")
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "missing.h5")


def test_newer_format_refused(tmp_path):
    path = tmp_path / "s.h5"
    Store.create(path, {})
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_reader_open_while_writing(tmp_path):
    """A reader holding the store open keeps its snapshot while a writer commits."""
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    reader = store.open("exposure")
    extra = _exposure(5)
    extra.attrs["sources"] = '["second"]'
    store.write({"copy": extra})
    np.testing.assert_array_equal(reader["image"].values, _exposure(0)["image"].values)
    reader.close()
    assert set(Store(path).groups()) == {"exposure", "copy"}


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from scarletstore.ingest import make_exposure
    from scarletstore.store import Store
    store = Store(sys.argv[1])
    i = 0
    rng = np.random.default_rng(1)
    big = rng.normal(size=(3, 600, 600)).astype(np.float32)
    while True:
        ex = make_exposure(big, np.ones_like(big), None, [np.ones((3, 3))] * 3, ["g", "r", "i"])
        store.write({f"extra{i}": ex})
        i += 1
""")


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_killed_writer_leaves_store_readable(tmp_path, delay):
    path = tmp_path / "s.h5"
    ex = _exposure(0)
    Store.create(path, {"exposure": ex})
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(path)])
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(path)
    groups = store.groups()
    assert "exposure" in groups
    np.testing.assert_array_equal(store.read("exposure")["image"].values, ex["image"].values)
    for name in groups:  # every committed group is complete
        if name.startswith("extra"):
            assert store.read(name)["image"].shape == (3, 600, 600)
