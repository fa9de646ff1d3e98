"""Runs added through the Python API get the CLI's guarantees.

Found by a new-user review: ``store.write({"runs/x": run})`` kept the run's own source ids,
so a second run written that way reused them and ``info --check`` then failed; and a run from
``deblend_exposure`` (no checksums) recorded no parents, so after ``detect --replace`` its
catalog was measured on the new parents without a word.
"""

from __future__ import annotations

import pytest
from conftest import store_bytes
from test_cli_outputs import _fails, _ok, _write_npz

from scarletstore.deblend import DeblendConfig
from scarletstore.deblend.run import deblend_exposure
from scarletstore.errors import InputError, StoreError
from scarletstore.store.store import Store, copy_store


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    """A store with an exposure and parents, and a run fitted on them through the API."""
    tmp = tmp_path_factory.mktemp("api_runs")
    path = tmp / "s.h5"
    _ok(["ingest", path, _write_npz(tmp / "in.npz")])
    _ok(["detect", path])
    store = Store(path)
    run = deblend_exposure(store.read("exposure"), store.read("parents"),
                           DeblendConfig(max_iter=20), "scarlet", name="api")
    assert not run.attrs["parents_checksum"]  # the API records none of its own
    return path, run


def _copy(detected, dest):
    copy_store(detected[0], dest)
    return Store(dest)


def test_write_of_a_run_refuses_source_ids_of_another_run(detected, tmp_path):
    store, run = _copy(detected, tmp_path / "w.h5"), detected[1]
    store.write({"runs/first": run})
    before = store_bytes(store.path)
    with pytest.raises(InputError) as err:
        store.write({"runs/second": run})
    msg = str(err.value)
    assert "source id 1 of the new run is already in the store" in msg and "add_run" in msg
    assert "\n" not in msg and store_bytes(store.path) == before
    # two runs in one write may not share ids either; replacing a run by itself may
    with pytest.raises(InputError, match="already in the store"):
        store.write({"runs/a": run, "runs/b": run})
    store.write({"runs/first": run}, replace=True)
    store.add_run(run, name="second")  # renumbers its sources
    assert store.runs() == ["first", "second"] and store.check(deep=True) == []


@pytest.mark.parametrize("how", ["add_run", "write"])
def test_api_run_is_refused_after_detect_replace(detected, tmp_path, capsys, how):
    store, run = _copy(detected, tmp_path / "r.h5"), detected[1]
    if how == "add_run":
        store.add_run(run, name="api")
    else:
        store.write({"runs/api": run})
    attrs = store.read("runs/api").attrs
    # the run records the inputs of the store it was added to, as a CLI deblend does
    assert attrs["parents_checksum"] == store.recorded_checksum("parents")
    assert attrs["exposure_checksum"] == store.recorded_checksum("exposure")
    _ok(["catalog", store.path, "--band", "r", "-o", tmp_path / "before.csv"])
    _ok(["detect", store.path, "--replace", "--threshold", "3"])
    capsys.readouterr()
    _fails(["catalog", store.path, "--band", "r", "--run", "api", "-o", tmp_path / "after.csv"],
           capsys, "'api'", "detect --replace")
    with pytest.raises(StoreError, match="deblend again"):
        Store(store.path).catalog("r", run="api")


def test_a_run_of_other_parents_is_refused(detected, tmp_path):
    store, run = _copy(detected, tmp_path / "o.h5"), detected[1]
    other = run.assign(blend_parent_id=run["blend_parent_id"] + 1000)
    before = store_bytes(store.path)
    for add in (lambda: store.add_run(other), lambda: store.write({"runs/o": other})):
        with pytest.raises(InputError, match="not among the store's parents"):
            add()
    assert store_bytes(store.path) == before and store.runs() == []
