"""The store layer never deletes what is not its own, cleans up a failed commit,
follows symlinks and refuses an index that HDF5 would resolve through the
working directory, and reports API misuse with its own one-line errors."""

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from test_store import _exposure, _tiny_run

import scarletstore as ss
import scarletstore.store.store as store_module
from scarletstore.cli import main
from scarletstore.errors import InputError, StoreError
from scarletstore.store.store import Store, products_dir, store_files


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------- 1. garbage collection
def test_existing_folder_with_other_files_is_kept(tmp_path, fits_bands, capsys):
    """``mkdir s.h5.d; echo x > s.h5.d/notes.txt; ingest s.h5``: the note survives the
    create and every later write (only product-named files are ever collected)."""
    paths, _, _ = fits_bands
    path = tmp_path / "s.h5"
    products_dir(path).mkdir()
    notes = products_dir(path) / "notes.txt"
    notes.write_text("x")
    lookalike = products_dir(path) / "runs-scarlet-1-notahexuuid.h5"  # near miss of the pattern
    lookalike.write_text("mine")
    assert main(["ingest", str(path), *map(str, paths)]) == 0
    Store(path).add_run(_tiny_run())
    Store(path).add_run(_tiny_run())
    assert notes.read_text() == "x" and lookalike.read_text() == "mine"
    assert Store(path).runs() == ["scarlet-1", "scarlet-2"]


def test_killed_writer_leftover_still_collected(tmp_path):
    """A product-named file no index names is still removed by the next commit."""
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    leftover = products_dir(path) / f"runs-scarlet-9-{'a' * 32}.h5"
    leftover.write_bytes(b"partial")
    store.add_run(_tiny_run())
    assert not leftover.exists()


def test_create_over_renamed_store_refused(tmp_path, fits_bands, capsys):
    """``mv s.h5 gone.h5; ingest s.h5 ...`` must not delete gone.h5's products: the
    create is refused in one line (exit 2) and the products are untouched."""
    paths, _, _ = fits_bands
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)}).add_run(_tiny_run())
    before = {p.name: p.read_bytes() for p in products_dir(path).iterdir()}
    os.rename(path, tmp_path / "gone.h5")
    capsys.readouterr()
    assert main(["ingest", str(path), *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds 2 product file(s)" in err, err
    assert not path.exists()
    assert {p.name: p.read_bytes() for p in products_dir(path).iterdir()} == before
    with pytest.raises(StoreError, match="renamed by hand"):
        Store.create(path, {"exposure": _exposure(1)})
    (tmp_path / "fresh").mkdir()
    fresh = Store.create(tmp_path / "fresh" / "f.h5", {"exposure": _exposure(2)})
    with pytest.raises(StoreError, match="already holds"):
        ss.copy_store(fresh.path, path)
    # renamed back, the store is whole again
    os.rename(tmp_path / "gone.h5", path)
    assert Store(path).runs() == ["scarlet-1"] and Store(path).check() == []


def test_migrate_beside_another_stores_products_refused(tmp_path):
    """Converting a single-file store to linked also starts a fresh products folder:
    one already holding another store's files is refused, not collected."""
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)})
    os.rename(path, tmp_path / "gone.h5")  # gone.h5 still links into s.h5.d
    before = {p.name: p.read_bytes() for p in products_dir(path).iterdir()}
    single = Store.create(path, {"exposure": _exposure(1)}, layout="single")
    with pytest.raises(StoreError, match="already holds 1 product file"):
        single.convert("linked")
    assert single.layout == "single"
    assert {p.name: p.read_bytes() for p in products_dir(path).iterdir()} == before


# ---------------------------------------------------------------- 2. failed commits
def test_failed_commit_removes_its_new_files(tmp_path, monkeypatch):
    """The index rename refused (a read-only index or folder, simulated: tests run as
    root): the write raises one line naming the folder and leaves the store as it was."""
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = {p: p.read_bytes() for p in store_files(path)}

    def refused(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(store_module.os, "replace", refused)
    with pytest.raises(StoreError) as exc:
        store.add_run(_tiny_run())
    assert _one_line(exc) == f"{path}: cannot write to {tmp_path}: permission denied"
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in store_files(path)} == before  # no runs-...-<uuid>.h5
    assert not list(tmp_path.glob(".s.h5.*.tmp"))
    assert Store(path).add_run(_tiny_run()) == "scarlet-1"  # and the next write works


def test_failed_create_commit_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.h5"
    monkeypatch.setattr(store_module.os, "replace",
                        lambda s, d: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(StoreError, match="permission denied"):
        Store.create(path, {"exposure": _exposure(0)})
    assert sorted(tmp_path.iterdir()) == []


def test_unwritable_products_folder_one_line(tmp_path, monkeypatch):
    """h5py's text for EACCES is a clause list of HDF5 internals: name the folder instead."""
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = {p: p.read_bytes() for p in store_files(path)}
    real = store_module._write_groups

    def denied(tmp, *args, **kwargs):
        if products_dir(path) in Path(tmp).parents:  # h5py's error, errno set
            raise OSError(13, "Unable to synchronously create file (unable to open file: "
                              f"name = '{tmp}', errno = 13, error message = 'Permission denied')")
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(store_module, "_write_groups", denied)
    with pytest.raises(StoreError) as exc:
        store.add_run(_tiny_run())
    assert _one_line(exc) == f"{path}: cannot write to {products_dir(path)}: permission denied"
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in store_files(path)} == before


# ---------------------------------------------------------------- 3. symlinks, copied indexes
def test_symlinked_index_reads_and_writes_its_target(tmp_path):
    """``ln -s ../real/s.h5 other/s.h5``: writing through the link adds to the real
    store; the link stays a link and no other/s.h5.d appears."""
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    real = tmp_path / "real" / "s.h5"
    Store.create(real, {"exposure": _exposure(0)})
    link = tmp_path / "other" / "s.h5"
    link.symlink_to(os.path.join("..", "real", "s.h5"))
    store = ss.open(link)
    assert store.add_run(_tiny_run()) == "scarlet-1"
    assert link.is_symlink() and not products_dir(link).exists()
    assert Store(real).runs() == ["scarlet-1"]
    assert Store(link).read("runs/scarlet-1")["source_id"].values.tolist() == [1, 2]
    assert ss.copy_store(link, tmp_path / "copy.h5").runs() == ["scarlet-1"]


def test_copied_index_not_read_through_working_directory(tmp_path, monkeypatch, capsys):
    """``cp s.h5 sub/`` opened from the original's directory: HDF5 would find
    s.h5.d/... relative to the working directory and read the original's products."""
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)}).add_run(_tiny_run())
    (tmp_path / "sub").mkdir()
    shutil.copyfile(path, tmp_path / "sub" / "s.h5")
    before = {p: p.read_bytes() for p in store_files(path)}
    monkeypatch.chdir(tmp_path)
    for given in ("sub/s.h5", tmp_path / "sub" / "s.h5"):
        with pytest.raises(StoreError) as exc:
            Store(given)
        assert "not beside it but in the working directory" in _one_line(exc)
    with pytest.raises(StoreError, match="not beside it"):  # a writer checks again under the lock
        store_module._LinkedTransaction(Path("sub/s.h5"), new=False)
    capsys.readouterr()
    assert main(["catalog", "sub/s.h5", "--band", "g", "-o", "c.csv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not beside it" in err, err
    assert not (tmp_path / "sub" / "s.h5.d").exists()
    assert {p: p.read_bytes() for p in store_files(path)} == before
    # the original, opened from its own directory, is of course fine
    assert Store("s.h5").runs() == ["scarlet-1"]


def test_open_cost_stays_small(tmp_path):
    """The per-product check is a stat or two: opening a 20-product store stays cheap."""
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    for _ in range(19):
        store.add_run(_tiny_run())
    Store(path)
    t0 = time.perf_counter()
    for _ in range(20):
        Store(path)
    assert (time.perf_counter() - t0) / 20 < 0.05  # generous: a loaded shared machine


# ---------------------------------------------------------------- 4. API misuse
def test_copy_into_missing_directory_one_line(tmp_path):
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(0)})
    with pytest.raises(StoreError) as exc:
        ss.copy_store(path, tmp_path / "nodir" / "x.h5")
    assert _one_line(exc) == f"{tmp_path / 'nodir' / 'x.h5'}: no such directory {tmp_path / 'nodir'}"
    with pytest.raises(StoreError, match="no such directory"):
        Store.create(tmp_path / "nodir" / "y.h5", {})


@pytest.mark.parametrize("bad", [[1], {"foo": 3}, {3: None}, "exposure"])
def test_write_needs_a_mapping_of_datasets(tmp_path, bad):
    path = tmp_path / "s.h5"
    store = Store.create(path, {"exposure": _exposure(0)})
    before = {p: p.read_bytes() for p in store_files(path)}
    with pytest.raises(InputError, match="expected a mapping of group name -> Dataset"):
        store.write(bad)
    with pytest.raises(InputError, match="expected a mapping of group name -> Dataset"):
        Store.create(tmp_path / "t.h5", [_exposure(0)] if isinstance(bad, list) else bad)
    assert not (tmp_path / "t.h5").exists()
    assert {p: p.read_bytes() for p in store_files(path)} == before
    with pytest.raises(InputError, match="expected a run Dataset"):
        store.add_run({"source_id": np.arange(2)})


@pytest.mark.parametrize("bad", [None, 3, b"s.h5"])
def test_open_needs_a_path(bad):
    with pytest.raises(InputError, match="a store path must be a str or os.PathLike"):
        ss.open(bad)



def test_a_writer_that_waits_for_the_lock_says_so_on_a_terminal(tmp_path, monkeypatch):
    """A second writer waited for the folder's lock forever without a word."""
    import fcntl
    import io
    import threading

    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": _exposure(1)})

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    err = Terminal()
    monkeypatch.setattr("sys.stderr", err)
    fd = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer of this folder
    done = threading.Event()
    writer = threading.Thread(target=lambda: (Store(path).add_run(_tiny_run(), name="w"), done.set()))
    writer.start()
    time.sleep(0.5)
    assert not done.is_set() and "waiting for another writer" in err.getvalue()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    writer.join(20)
    assert done.is_set() and Store(path).runs() == ["w"]


def test_api_writes_make_the_checks_ingest_makes(tmp_path):
    """Store.create took an exposure with NaN pixels or negative variance (detect then found
    nothing, silently) and an exposure under the name 'parents'."""
    with pytest.raises(InputError, match="holds parents products, not exposure"):
        Store.create(tmp_path / "a.h5", {"exposure": _exposure(1), "parents": _exposure(2)})
    assert not (tmp_path / "a.h5").exists()
    bad = _exposure(3)
    bad["image"].values[0, 4, 5] = np.nan
    with pytest.raises(InputError, match="non-finite image values"):
        Store.create(tmp_path / "b.h5", {"exposure": bad})
    neg = _exposure(4)
    neg["variance"].values[:] = -1
    with pytest.raises(InputError, match="negative variance"):
        Store.create(tmp_path / "c.h5", {"exposure": neg})
    # a NaN under a bad plane is what bad planes are for
    planes = json.loads(bad.attrs["mask_planes"])
    bad["mask"].values[0, 4, 5] = 1 << int(planes["NO_DATA"])
    Store.create(tmp_path / "d.h5", {"exposure": bad})
    assert Store(tmp_path / "d.h5").check() == []
    # a group of the user's own name takes any schema
    Store(tmp_path / "d.h5").write({"mine": _exposure(5)})
