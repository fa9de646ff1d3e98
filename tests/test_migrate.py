"""Frozen stores of every released schema version keep opening and migrate."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import store_bytes

from scarletstore.cli import main
from scarletstore.errors import SchemaError
from scarletstore.measure.catalog import band_catalog
from scarletstore.store.migrate import MIGRATIONS, upgrade
from scarletstore.store.schema import known_versions, latest_version
from scarletstore.store.store import Store

DATA = Path(__file__).parent / "data"
FROZEN = {"store_v1.h5": {"exposure": 1, "parents": 1, "runs/v1": 1}}


@pytest.fixture
def v1_copy(tmp_path):
    path = tmp_path / "store_v1.h5"
    shutil.copyfile(DATA / "store_v1.h5", path)
    return path


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_frozen_store_opens(name):
    store = Store(DATA / name)
    groups = store.groups()
    for group, version in FROZEN[name].items():
        assert groups[group]["schema_version"] == version
        ds = store.read(group)  # upgraded in memory
        assert ds.attrs["schema_version"] == latest_version(ds.attrs["schema"])


def test_every_version_step_is_registered():
    for name in ("exposure", "parents", "run"):
        versions = known_versions(name)
        assert versions == list(range(1, versions[-1] + 1))
        for v in versions[:-1]:
            assert (name, v) in MIGRATIONS


@pytest.mark.parametrize("layout_env", [None, "single"])
def test_v1_store_migrates_atomically_and_idempotently(v1_copy, capsys, monkeypatch, layout_env):
    """An old single-file store becomes a linked one (the default layout), or
    stays one file with SCARLETSTORE_LAYOUT=single; either way once."""
    if layout_env:
        monkeypatch.setenv("SCARLETSTORE_LAYOUT", layout_env)
    else:
        monkeypatch.delenv("SCARLETSTORE_LAYOUT", raising=False)
    before = Store(v1_copy).read("runs/v1", upgrade=False)
    assert main(["migrate", str(v1_copy)]) == 0
    out = capsys.readouterr().out
    assert "runs/v1: v1 -> v2" in out
    store = Store(v1_copy)
    assert store.layout == (layout_env or "linked")
    assert ("converted from the single to the linked store layout" in out) == (layout_env is None)
    assert store.groups()["runs/v1"]["schema_version"] == 2
    after = store.read("runs/v1", upgrade=False)
    assert after.attrs["psf_source"] == "run"
    for v in before.data_vars:
        np.testing.assert_array_equal(after[v].values, before[v].values)
    data = store_bytes(v1_copy)
    assert main(["migrate", str(v1_copy)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert store_bytes(v1_copy) == data


def test_catalog_from_v1_store(v1_copy):
    cat = band_catalog(Store(v1_copy), "i", run="v1").compute()
    assert cat.sizes["row"] == Store(v1_copy).read("runs/v1").sizes["source"]
    assert np.isfinite(cat["flux"].values).all()


def test_newer_version_refused(v1_copy, capsys):
    with h5py.File(v1_copy, "a") as f:
        f["runs/v1"].attrs["schema_version"] = np.int64(99)
    with pytest.raises(SchemaError, match="newer than this scarletstore knows"):
        Store(v1_copy).read("runs/v1")
    data = store_bytes(v1_copy)
    assert main(["migrate", str(v1_copy)]) == 2
    err = capsys.readouterr().err
    assert "newer" in err and err.count("\n") == 1
    assert store_bytes(v1_copy) == data


def test_upgrade_validates_old_layout():
    ds = Store(DATA / "store_v1.h5").read("runs/v1", upgrade=False)
    broken = ds.drop_vars("morph")
    with pytest.raises(SchemaError, match="morph"):
        upgrade(broken)
