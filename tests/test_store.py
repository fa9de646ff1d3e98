import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from conftest import store_bytes

from scarletstore.errors import SchemaError, StoreError
from scarletstore.ingest.exposure import make_exposure
from scarletstore.store.store import Store, copy_store


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
        assert int(f.attrs["format_version"]) == 2  # new stores are linked
        assert isinstance(f.get("exposure", getlink=True), h5py.ExternalLink)


@pytest.mark.parametrize("layout", ["linked", "single"])
def test_plain_xarray_reads_group(tmp_path, layout):
    """The calls the README gives: through scarletstore's ``product_path``, and
    with h5py alone (the index's link leads to the product's own file)."""
    path = tmp_path / "s.h5"
    ex = _exposure()
    Store.create(path, {"exposure": ex}, layout=layout)
    with h5py.File(path, "r") as f:
        own_file = f["exposure"].file.filename
    assert Path(own_file).resolve() == Store(path).product_path("exposure").resolve()
    for where in (own_file, Store(path).product_path("exposure")):
        with xr.open_dataset(where, group="exposure", engine="h5netcdf") as ds:
            assert ds["image"].dims == ("band", "y", "x")
            assert ds["psf"].dims == ("band", "psf_y", "psf_x")
            assert list(ds["band"].values) == ["g", "r", "i"]
            np.testing.assert_array_equal(ds["image"].values, ex["image"].values)
    if layout == "linked":  # the index itself: h5netcdf resolves dimensions in the wrong file
        with pytest.raises(KeyError):
            xr.open_dataset(path, group="exposure", engine="h5netcdf").load()


def test_existing_group_refused_and_store_unchanged(tmp_path):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = store_bytes(path)
    with pytest.raises(StoreError, match="already exists"):
        store.write({"exposure": _exposure(1)})
    assert store_bytes(path) == before
    assert not list(tmp_path.glob(".s.h5.*.tmp"))


def test_invalid_dataset_not_written(tmp_path):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    bad = _exposure(1).drop_vars("psf")
    before = store_bytes(path)
    with pytest.raises(SchemaError, match="psf"):
        store.write({"other": bad})
    assert store_bytes(path) == before


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
    from scarletstore.ingest.exposure import make_exposure
    from scarletstore.store.store import Store
    store = Store(sys.argv[1])
    prefix = sys.argv[2] if len(sys.argv) > 2 else "extra"  # new names for a restarted writer
    i = 0
    rng = np.random.default_rng(1)
    big = rng.normal(size=(3, 600, 600)).astype(np.float32)
    while True:
        ex = make_exposure(big, np.ones_like(big), None, [np.ones((3, 3))] * 3, ["g", "r", "i"])
        store.write({f"{prefix}{i}": ex})
        i += 1
""")


@pytest.mark.parametrize("layout", ["linked", "single"])
@pytest.mark.parametrize("delay", [0.3, 0.9, 1.7])
def test_killed_writer_leaves_store_readable(tmp_path, delay, layout):
    path = tmp_path / "s.h5"
    ex = _exposure(0)
    Store.create(path, {"exposure": ex}, layout=layout)
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


@pytest.mark.parametrize("layout", ["linked", "single"])
def test_killed_writer_leftover_removed_by_next_write(tmp_path, layout):
    """A writer killed mid-write leaves its temporary copy (the single file, or a
    linked store's new index); the next writer removes it."""
    path = tmp_path / "s.h5"
    ex = _exposure(0)
    Store.create(path, {"exposure": ex}, layout=layout)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    # a write takes tens of milliseconds: kill the writer the moment its copy
    # exists, and start again when the kill landed between two writes
    for _attempt in range(10):
        # each attempt writes new group names: a write that committed before the
        # kill must not make the next attempt's writer fail on "already exists"
        proc = subprocess.Popen([sys.executable, str(script), str(path), f"attempt{_attempt}_"])
        try:
            deadline = time.time() + 60
            while (not list(tmp_path.glob(".s.h5.*.tmp")) and time.time() < deadline
                   and proc.poll() is None):
                time.sleep(0.002)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        leftovers = list(tmp_path.glob(".s.h5.*.tmp"))
        if leftovers:
            break
    assert len(leftovers) == 1 and f".{proc.pid}-" in leftovers[0].name  # the writer is named
    legacy = tmp_path / ".s.h5.k2j4x_9a.tmp"  # named before writers put their pid in it
    legacy.write_bytes(b"x" * 1000)
    store = Store(path)
    store.write({"after": _exposure(3)})
    assert not list(tmp_path.glob(".s.h5.*.tmp"))
    assert "after" in store.groups()
    np.testing.assert_array_equal(store.read("exposure")["image"].values, ex["image"].values)


def test_leftover_of_live_writer_kept(tmp_path):
    """A temporary copy whose writer (by its name) still runs on this host is not removed."""
    from scarletstore.store.store import _HOST

    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        keep = tmp_path / f".s.h5.{live.pid}-{_HOST}.abc123.tmp"
        gone = tmp_path / f".s.h5.{dead.pid}-{_HOST}.abc124.tmp"
        other = tmp_path / f".s.h5.{dead.pid}-elsewhere.abc125.tmp"  # another host: undecidable
        for p in (keep, gone, other):
            p.write_bytes(b"x")
        store.write({"more": _exposure(1)})
        assert keep.exists() and other.exists() and not gone.exists()
    finally:
        live.kill()
        live.wait()


BAD_NAMES = ["a\nb", "ctl\x07x", "..", ".", "a/b", "/abs", "", "tab\tname", "sp ace", "é"]


def _tiny_run(first_id=1, n_sources=2):
    from scarletstore.store.components import Component, SourceResult
    from scarletstore.store.runs import BlendRecord, build_run

    srcs = [SourceResult(k, [Component(np.ones(3, np.float32), np.ones((3, 3), np.float32), k, k,
                                       (k + 1.0, k + 1.0))]) for k in range(n_sources)]
    rec = BlendRecord(index=0, parent_id=1, bbox=(0, 0, 8, 8), peak_ids=np.arange(n_sources) + 1,
                      peaks=np.array([[k + 1.0, k + 1.0] for k in range(n_sources)]), sources=srcs)
    return build_run([rec], ["g", "r", "i"], np.ones((3, 3, 3), np.float32) / 9,
                     np.ones((1, 1), np.float32), name="x", method="scarlet", config_json="{}",
                     package_version="test", first_source_id=first_id)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_run_names_refused_at_store_level(tmp_path, name):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = store_bytes(path)
    with pytest.raises(StoreError, match="invalid run name"):
        store.add_run(_tiny_run(), name=name)
    with pytest.raises(StoreError, match="invalid run name"):
        store.write({f"runs/{name}": _tiny_run()})
    with pytest.raises(StoreError, match="invalid run name"):
        Store.create(tmp_path / "new.h5", {f"runs/{name}": _tiny_run()})
    assert store_bytes(path) == before and not (tmp_path / "new.h5").exists()


def test_bad_run_names_one_line_from_cli(tmp_path, capsys):
    from scarletstore.cli import main
    from scarletstore.lsst import write_lsst_models

    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)})
    models = write_lsst_models(_tiny_run(), tmp_path / "m.json")
    before = store_bytes(path)
    for name in BAD_NAMES:
        for argv in (["import-lsst", str(models), str(path), "--run", name],
                     ["import-lsst", str(models), str(tmp_path / "new.h5"), "--run", name],
                     ["deblend", str(path), "--run", name]):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "invalid run name" in err and err.count("\n") == 1, err
    assert store_bytes(path) == before and not (tmp_path / "new.h5").exists()
    assert main(["import-lsst", str(models), str(path), "--run", "ok.v1_2-3"]) == 0


def test_add_run_names_and_numbers_at_commit(tmp_path):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    assert store.add_run(_tiny_run(first_id=1)) == "scarlet-1"
    assert store.add_run(_tiny_run(first_id=1, n_sources=3)) == "scarlet-2"
    assert store.add_run(_tiny_run(first_id=1), prefix="sdss") == "sdss-1"
    runs = {r: store.read(f"runs/{r}") for r in store.runs()}
    assert runs["scarlet-2"].attrs["name"] == "scarlet-2"
    assert runs["scarlet-1"]["source_id"].values.tolist() == [1, 2]
    assert runs["scarlet-2"]["source_id"].values.tolist() == [3, 4, 5]
    assert runs["sdss-1"]["source_id"].values.tolist() == [6, 7]
    with pytest.raises(StoreError, match="already exists"):
        store.add_run(_tiny_run(), name="sdss-1")
    # imports keep their own ids, which must not collide with stored ones
    assert store.add_run(_tiny_run(first_id=100), name="imp", keep_ids=True) == "imp"
    assert store.read("runs/imp")["source_id"].values.tolist() == [100, 101]
    with pytest.raises(StoreError, match="source id 6 of the new run"):
        store.add_run(_tiny_run(first_id=6), name="imp2", keep_ids=True)
    assert store.check() == []


def _deblend_child(path, barrier, results, name):
    """``scarletstore deblend`` whose fit waits for the other process before committing."""
    import scarletstore.deblend.run as deblend_run
    from scarletstore.cli import main

    real = deblend_run.deblend_exposure

    def fit_then_wait(*args, **kwargs):
        run = real(*args, **kwargs)
        barrier.wait(timeout=300)  # both fits are done before either commits
        return run

    deblend_run.deblend_exposure = fit_then_wait
    results.put(main(["deblend", str(path), "--method", "sdss", *(["--run", name] if name else [])]))


@pytest.mark.parametrize("names", [(None, None), ("x", "y")])
def test_concurrent_deblends_get_distinct_names_and_ids(tmp_path, names):
    """Two deblend processes whose fits overlap: both runs land, ids disjoint.

    Default names used to collide (the second failed after its fit); named
    runs used to share source ids (both numbered from the same maximum)."""
    import multiprocessing

    from test_damage import _field

    from scarletstore.cli import main

    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _field(seed=5)})
    assert main(["detect", str(path)]) == 0
    assert main(["deblend", str(path), "--method", "sdss", "--run", "first"]) == 0
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_deblend_child, args=(path, barrier, results, n)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert sorted(results.get(timeout=5) for _ in procs) == [0, 0]
    store = Store(path)
    expected = ["sdss-1", "sdss-2"] if names[0] is None else list(names)
    assert sorted(store.runs()) == ["first", *expected]
    ids = [store.read(f"runs/{r}")["source_id"].values for r in store.runs()]
    assert all(len(i) > 0 for i in ids)
    flat = np.concatenate(ids)
    assert len(np.unique(flat)) == len(flat)  # store-unique ids
    assert store.check() == []


from test_damage import valid_store  # noqa: E402,F401  (module fixture: a store with runs a, b)


def test_footprint_cache_equals_uncached_and_follows_writes(valid_store, tmp_path, monkeypatch):
    import scarletstore.measure.catalog as catalog

    path = tmp_path / "s.h5"
    copy_store(valid_store, path)
    store = Store(path)
    ids = store.read("runs/a")["source_id"].values.tolist()
    built = []
    real = catalog.BlendMeasurer

    class Counting(real):
        def __init__(self, *args, **kwargs):
            built.append(args[1:3])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(catalog, "BlendMeasurer", Counting)

    def uncached(sid, redistribute):
        m = real(Store(path), "a", "r", redistribute)
        try:
            return m.heavy_footprint(sid)
        finally:
            m.close()

    before = {}
    for redistribute in (False, True):
        for sid in ids + ids[::-1]:  # twice, the second time from the blend cache
            hf = store.footprint(sid, "r", run="a", redistribute=redistribute)
            ref = uncached(sid, redistribute)
            assert hf.bbox == ref.bbox and hf.values.size > 0
            for attr in ("span_y", "span_x0", "span_x1", "values"):
                np.testing.assert_array_equal(getattr(hf, attr), getattr(ref, attr))
            before[sid, redistribute] = hf
    assert built == [("a", "r"), ("a", "r")]  # one set-up per mode for 4 x len(ids) calls
    hf = store.footprint(ids[0], "r", run="a", redistribute=True)
    hf.values[:] = -1  # callers own what they get: the cache is not shared with them
    np.testing.assert_array_equal(store.footprint(ids[0], "r", run="a", redistribute=True).values,
                                  before[ids[0], True].values)

    # another writer doubles the image: the redistributed footprints must follow
    ex = Store(path).read("exposure")
    ex["image"] = ex["image"] * np.float32(2)
    Store(path).write({"exposure": ex}, replace=True)
    for sid in ids:
        hf = store.footprint(sid, "r", run="a", redistribute=True)
        np.testing.assert_allclose(hf.values, 2 * before[sid, True].values, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(store.footprint(sid, "r", run="a").values, before[sid, False].values)
    assert len(built) == 4  # rebuilt once per mode after the write
    measurer = store._cache[("footprint", "a", "r", True)]
    store.close()  # drops the set-ups and the file handles they keep
    assert measurer.tables.file is None and not store._cache
    # a new run is seen by the default (newest) run at once
    new = store.add_run(store.read("runs/b"))
    new_ids = store.read(f"runs/{new}")["source_id"].values
    assert store.footprint(int(new_ids[0]), "r").source_id == int(new_ids[0])
