"""The linked store layout: writes cost what they add, stay atomic, and old stores migrate."""

import os
import random
import shutil
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
from test_store import _exposure, _tiny_run

import scarletstore.store.store as store_module
from scarletstore.cli import main
from scarletstore.errors import StoreError
from scarletstore.store.store import Store, products_dir

DATA = Path(__file__).parent / "data"


def _files(path):
    d = products_dir(path)
    return {p.name: p.stat().st_size for p in d.iterdir()} if d.exists() else {}


def _write_cost(path, action):
    """Bytes of the files a write created or rewrote: new product files + the new
    store file (index or whole copy), measured from the folder before and after."""
    folder = path.parent
    before = {p: (p.stat().st_ino, p.stat().st_size) for p in folder.rglob("*") if p.is_file()}
    action()
    cost = 0
    for p in folder.rglob("*"):
        if p.is_file():
            st = p.stat()
            if before.get(p) != (st.st_ino, st.st_size):
                cost += st.st_size
    return cost


def test_linked_roundtrip_and_plain_xarray(tmp_path, capsys):
    path = tmp_path / "s.h5"
    ex = _exposure(0)
    store = Store.create(path, {"exposure": ex}, layout="linked")
    assert store.layout == "linked"
    with h5py.File(path, "r") as f:
        assert int(f.attrs["format_version"]) == 2
        assert isinstance(f.get("exposure", getlink=True), h5py.ExternalLink)
    np.testing.assert_array_equal(store.read("exposure")["image"].values, ex["image"].values)
    assert store.add_run(_tiny_run()) == "scarlet-1"
    assert store.add_run(_tiny_run(n_sources=3)) == "scarlet-2"
    assert store.read("runs/scarlet-2")["source_id"].values.tolist() == [3, 4, 5]
    with xr.open_dataset(store.product_path("runs/scarlet-1"), group="runs/scarlet-1",
                         engine="h5netcdf") as ds:  # what the README tells xarray users
        assert ds["source_id"].values.tolist() == [1, 2]
    with xr.open_dataset(store.product_path("exposure"), group="exposure", engine="h5netcdf") as ds:
        np.testing.assert_array_equal(ds["image"].values, ex["image"].values)
    assert store.check() == []
    on_disk = path.stat().st_size + sum(_files(path).values())
    assert store.disk_bytes() == on_disk > 10 * path.stat().st_size  # the index is small
    capsys.readouterr()
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    # the header's size is the files', each group's its arrays' decoded size
    assert f"({on_disk / 1e6:.2f} MB on disk, linked)" in out and " MB in memory" in out
    # a store moved with its folder keeps working (links are relative)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(path), moved / "s.h5")
    shutil.move(str(products_dir(path)), products_dir(moved / "s.h5"))
    assert Store(moved / "s.h5").read("runs/scarlet-1")["source_id"].values.tolist() == [1, 2]
    # the index copied without its folder: one line naming what is missing
    shutil.copyfile(moved / "s.h5", tmp_path / "alone.h5")
    capsys.readouterr()
    assert main(["catalog", str(tmp_path / "alone.h5"), "--band", "g", "-o", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "products are in s.h5.d, not alone.h5.d" in err, err
    # copied by hand beside the original, it would share (and one day lose) its files
    shutil.copyfile(moved / "s.h5", moved / "twin.h5")
    with pytest.raises(StoreError, match="copied or renamed by hand"):
        Store(moved / "twin.h5")
    # the index alone (folder deleted): names the missing file
    shutil.copyfile(moved / "s.h5", tmp_path / "s.h5")
    capsys.readouterr()
    assert main(["catalog", str(tmp_path / "s.h5"), "--band", "g", "-o", str(tmp_path / "c.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is missing" in err and "s.h5.d" in err, err


def test_layout_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SCARLETSTORE_LAYOUT", raising=False)
    assert Store.create(tmp_path / "a.h5", {"exposure": _exposure()}).layout == "linked"
    monkeypatch.setenv("SCARLETSTORE_LAYOUT", "nonsense")
    with pytest.raises(StoreError, match="SCARLETSTORE_LAYOUT"):
        Store.create(tmp_path / "b.h5", {})
    assert not (tmp_path / "b.h5").exists()
    monkeypatch.setenv("SCARLETSTORE_LAYOUT", "single")  # the opt-out
    single = Store.create(tmp_path / "c.h5", {"exposure": _exposure()})
    assert single.layout == "single" and not products_dir(single.path).exists()
    single.add_run(_tiny_run())  # still written as one file
    assert single.layout == "single" and single.runs() == ["scarlet-1"]
    monkeypatch.delenv("SCARLETSTORE_LAYOUT")
    single.add_run(_tiny_run())  # a store keeps its layout whatever the environment says
    assert single.layout == "single" and not products_dir(single.path).exists()


@pytest.mark.parametrize("layout", ["single", "linked"])
def test_write_cost_does_not_grow_with_store_size(tmp_path, layout):
    """Adding the same small run to a 20 kB and to a 13-25 MB store: bytes written."""
    costs, sizes = [], []
    for shape in [(3, 30, 40), (3, 1024, 1024)]:
        path = tmp_path / f"{shape[1]}" / "s.h5"
        path.parent.mkdir()
        store = Store.create(path, {"exposure": _exposure(1, shape)}, layout=layout)
        sizes.append(sum(p.stat().st_size for p in path.parent.rglob("*") if p.is_file()))
        costs.append(_write_cost(path, lambda: store.add_run(_tiny_run())))
    assert sizes[1] > 10e6 and sizes[1] > 100 * sizes[0]
    if layout == "linked":
        assert costs[1] <= 1.1 * costs[0] and costs[1] < 200_000, (costs, sizes)
    else:  # the single file is copied whole on every write: the cost the linked layout removes
        assert costs[1] > sizes[1] * 0.9, (costs, sizes)


def test_replaced_product_kept_for_grace_then_collected(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)}, layout="linked")
    first = store.product_path("exposure")
    reader = store.open("exposure")  # a reader holding the old snapshot
    store.write({"exposure": _exposure(1)}, replace=True)
    assert first.exists() and store.product_path("exposure") != first
    np.testing.assert_array_equal(reader["image"].values, _exposure(0)["image"].values)
    reader.close()
    np.testing.assert_array_equal(store.read("exposure")["image"].values, _exposure(1)["image"].values)
    orphan = products_dir(path) / ("runs-x-" + "deadbeef" * 4 + ".h5")  # left by a killed writer: never named
    orphan.write_bytes(b"x" * 100)
    store.add_run(_tiny_run())
    assert first.exists() and not orphan.exists()  # replaced file still within its grace period
    monkeypatch.setattr(store_module, "GC_GRACE_SECONDS", 0.0)
    store.add_run(_tiny_run())
    assert not first.exists()
    with h5py.File(path, "r") as f:
        named = {link for link in store_module._index_entries(f).values()}
    assert {f"s.h5.d/{n}" for n in _files(path)} == named  # nothing else is left
    assert store.check() == []


def test_products_are_chunked_and_compressed_where_it_pays(tmp_path):
    path = tmp_path / "s.h5"
    ex = _exposure(0, (3, 256, 256))
    ex["mask"].values[:, 100:120, :] = 5  # a realistic mask: mostly zero, some planes set
    store = Store.create(path, {"exposure": ex}, layout="linked")
    store.add_run(_tiny_run())
    with h5py.File(store.product_path("exposure"), "r") as f:
        g = f["exposure"]
        assert g["mask"].compression == "gzip" and g["mask"].shuffle
        assert g["mask"].id.get_storage_size() < g["mask"].nbytes / 10
        assert g["image"].compression is None and g["image"].chunks == (1, 256, 256)
    with h5py.File(store.product_path("runs/scarlet-1"), "r") as f:
        assert f["runs/scarlet-1/morph"].dtype == np.float32
    np.testing.assert_array_equal(store.read("exposure")["mask"].values, ex["mask"].values)


KILLED = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_store import _exposure, _tiny_run
    from scarletstore.store.store import Store
    store = Store(sys.argv[1])
    i = int(sys.argv[3])
    print(store.add_run(_tiny_run()), flush=True)  # the imports of a first write take seconds
    print("ready", flush=True)
    while True:
        if i % 2:
            name = store.add_run(_tiny_run(n_sources=2 + i % 3))
        else:
            name = f"extra{i}"
            store.write({name: _exposure(i, (3, 200 + i, 300))})
        print(name, flush=True)
        i += 1
""")


def test_writer_killed_at_random_points_loses_no_committed_product(tmp_path):
    """kill -9 at random delays: every product the writer reported committed is
    there and complete; the store stays sound and the next write cleans up."""
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)}, layout="linked")
    script = tmp_path / "writer.py"
    script.write_text(KILLED)
    rng = random.Random(7)
    committed = set()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for trial in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(Path(__file__).parent),
                                 str(1000 * trial)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        first = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        committed.add(first)
        time.sleep(rng.uniform(0.0, 1.2))  # anywhere in a write (one takes ~0.1-0.5 s)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        committed |= {line.strip() for line in out.splitlines() if line.strip()}
        store = Store(path)
        groups = set(store.groups())
        for name in committed:
            group = name if name.startswith("extra") else f"runs/{name}"
            assert group in groups, (trial, name)
        assert store.check() == [], trial
        for name in groups:
            if name.startswith("extra"):
                assert store.read(name)["image"].shape[0] == 3
    assert len(committed) >= 5  # the trials did commit products
    Store(path).add_run(_tiny_run())  # the next write removes every leftover
    with h5py.File(path, "r") as f:
        named = set(store_module._index_entries(f).values())
    retired = {rel for rel, _ in store_module._retired_of(h5py.File(path, "r"))}
    assert {f"s.h5.d/{n}" for n in _files(path)} == named | retired
    assert not list(tmp_path.glob(".s.h5.*.tmp"))


CONCURRENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_store import _tiny_run
    from scarletstore.store.store import Store
    store = Store(sys.argv[1])
    for k in range(4):
        store.add_run(_tiny_run(n_sources=2), name=f"{sys.argv[3]}-{k}")
""")


def test_two_writers_adding_runs_both_land(tmp_path):
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)}, layout="linked")
    script = tmp_path / "w.py"
    script.write_text(CONCURRENT)
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(Path(__file__).parent), w])
             for w in ("a", "b")]
    assert [p.wait(300) for p in procs] == [0, 0]
    store = Store(path)
    assert sorted(store.runs()) == sorted(f"{w}-{k}" for w in "ab" for k in range(4))
    ids = np.concatenate([store.read(f"runs/{r}")["source_id"].values for r in store.runs()])
    assert sorted(ids.tolist()) == list(range(1, 17))
    assert store.check() == []


def test_v1_store_migrates_to_linked(tmp_path, capsys):
    path = tmp_path / "store_v1.h5"
    shutil.copyfile(DATA / "store_v1.h5", path)
    old = Store(path)
    before = {g: old.read(g, upgrade=False) for g in old.groups()}
    assert main(["migrate", "--layout", "linked", str(path)]) == 0
    out = capsys.readouterr().out
    assert "converted from the single to the linked store layout" in out and "runs/v1: v1 -> v2" in out
    store = Store(path)
    assert store.layout == "linked" and set(store.groups()) == set(before)
    assert store.groups()["runs/v1"]["schema_version"] == 2
    for group, ds in before.items():
        after = store.read(group, upgrade=False)
        for v in ds.variables:
            np.testing.assert_array_equal(after[v].values, ds[v].values)
    assert store.check() == []
    index = path.read_bytes()
    assert main(["migrate", "--layout", "linked", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out and path.read_bytes() == index
    assert main(["migrate", "--layout", "single", str(path)]) == 2  # no way back: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be converted back" in err
    assert store.add_run(store.read("runs/v1")) == "scarlet-1"
    from scarletstore.measure.catalog import band_catalog
    cat = band_catalog(Store(path), "i", run="v1").compute()
    assert cat.sizes["row"] == before["runs/v1"].sizes["source"] and np.isfinite(cat["flux"].values).all()


@pytest.mark.parametrize("layout", ["linked", "single"])
def test_copy_move_and_remove_whole_stores(tmp_path, layout):
    from scarletstore.store.store import copy_store, move_store, remove_store, store_files

    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)}, layout=layout)
    store.add_run(_tiny_run())
    (tmp_path / "sub").mkdir()
    copy = store.copy_to(tmp_path / "sub" / "c.h5")
    assert copy.layout == layout and copy.runs() == ["scarlet-1"] and copy.check() == []
    if layout == "linked":  # its own folder, nothing shared with the original
        assert all(p.parent == products_dir(copy.path) for p in store_files(copy.path)[1:])
        assert {p.name for p in store_files(copy.path)} - {"c.h5"} == \
            {p.name for p in store_files(path)} - {"s.h5"}
    copy.add_run(_tiny_run(n_sources=3))  # writing the copy leaves the original alone
    assert Store(path).runs() == ["scarlet-1"] and copy.runs() == ["scarlet-1", "scarlet-2"]
    with pytest.raises(StoreError, match="already exists"):
        copy_store(path, copy.path)
    moved = move_store(copy.path, tmp_path / "m.h5")
    assert not any(p.exists() for p in (copy.path, products_dir(copy.path)))
    assert moved.runs() == ["scarlet-1", "scarlet-2"] and moved.check() == []
    np.testing.assert_array_equal(moved.read("exposure")["image"].values, _exposure(0)["image"].values)
    reader = moved.open("exposure")  # a reader keeps its version through a removal
    remove_store(moved.path)
    assert not (tmp_path / "m.h5").exists() and not products_dir(tmp_path / "m.h5").exists()
    np.testing.assert_array_equal(reader["image"].values, _exposure(0)["image"].values)
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["s.h5", "sub"] + (["s.h5.d"] if layout == "linked" else []))
    other = tmp_path / "notes.txt"
    other.write_text("not a store")
    for bad, why in [(other, "not an HDF5 file"), (tmp_path / "none.h5", "no such store")]:
        with pytest.raises(StoreError, match=why):
            remove_store(bad)
        with pytest.raises(StoreError, match=why):
            copy_store(bad, tmp_path / "x.h5")
    assert other.read_text() == "not a store" and not (tmp_path / "x.h5").exists()


def test_copy_taken_while_another_process_writes_is_one_version(tmp_path):
    """Copies made while a writer adds runs and replaces the exposure are each a
    complete version: sound, and holding the runs of some moment of the original."""
    from scarletstore.store.store import copy_store

    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)})
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[2])
        from test_store import _exposure, _tiny_run
        from scarletstore.store.store import Store
        store = Store(sys.argv[1])
        for k in range(6):
            store.add_run(_tiny_run(n_sources=2), name=f"r{k}")
            store.write({"exposure": _exposure(k + 1)}, replace=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(Path(__file__).parent)])
    copies = []
    while proc.poll() is None or not copies:
        copies.append(copy_store(path, tmp_path / f"copy{len(copies)}.h5"))
    assert proc.wait() == 0
    for copy in copies[:: max(1, len(copies) // 8)]:  # at most about 8 checked
        runs = copy.runs()
        assert runs == [f"r{k}" for k in range(len(runs))] and copy.check() == []
        # the exposure of the same moment: replaced after each run (r_k, then exposure k + 1)
        image = copy.read("exposure")["image"].values
        moments = [len(runs)] + ([len(runs) - 1] if runs else [])
        assert any(np.array_equal(image, _exposure(k)["image"].values) for k in moments), runs
