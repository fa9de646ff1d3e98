"""The store layer never deletes what is not its own, cleans up a failed commit,
follows symlinks and refuses an index that HDF5 would resolve through the
working directory, and reports API misuse with its own one-line errors."""

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
