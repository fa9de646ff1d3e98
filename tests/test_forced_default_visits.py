"""``forced STORE`` without visits finds the coadd's own visits wherever they are kept.

Found by a new-user review: the demo keeps its visits in ``visits/`` beside the store's
folder, and forced looked for the bare file names beside the store or in the current
directory only ("visit listed ... not found beside the store or here").
"""

from __future__ import annotations

import json
import shutil

import pytest

from scarletstore.cli import main
from scarletstore.store.store import Store, copy_store


def _ok(argv):
    assert main([str(a) for a in argv]) == 0, argv


def test_forced_finds_the_coadd_visits_in_their_own_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("galsim")
    field = tmp_path / "field"
    sim, store = field / "visits", field / "out" / "s.h5"
    field.mkdir()
    _ok(["simulate", sim, "--visits", "2", "--size", "64", "--bands", "g"])
    visits = sorted(sim.glob("visit_*.fits"))
    store.parent.mkdir()
    _ok(["coadd", store, *visits, "--grid", sim / "grid.fits"])
    paths = json.loads(Store(store).read("visits").attrs["paths"])
    assert paths["relative"] == [f"../visits/{v.name}" for v in visits]
    _ok(["detect", store])
    _ok(["deblend", store])
    monkeypatch.chdir(tmp_path)  # neither beside the store nor here
    capsys.readouterr()
    _ok(["forced", store, "-o", tmp_path / "f1.fits"])
    assert f"on {len(visits)} visits" in capsys.readouterr().out
    # the store alone copied elsewhere: the visits where they were at coadd time
    copy_store(store, tmp_path / "copy.h5")
    _ok(["forced", tmp_path / "copy.h5", "-o", tmp_path / "f2.fits"])
    # the whole folder moved: the visits where they are relative to the store
    shutil.move(field, tmp_path / "moved")
    _ok(["forced", tmp_path / "moved" / "out" / "s.h5", "-o", tmp_path / "f3.fits"])


def test_the_api_default_finds_the_recorded_visits_too(tmp_path, monkeypatch):
    """The recorded paths were first looked up by the command line only, so
    ``forced.run.default_visits`` from Python still failed on the demo's layout."""
    pytest.importorskip("galsim")
    from scarletstore.measure.forced.run import default_visits

    sim, store = tmp_path / "visits", tmp_path / "out" / "s.h5"
    _ok(["simulate", sim, "--visits", "1", "--size", "64", "--bands", "g"])
    visits = sorted(sim.glob("visit_*.fits"))
    store.parent.mkdir()
    _ok(["coadd", store, *visits, "--grid", sim / "grid.fits"])
    monkeypatch.chdir(store.parent)
    assert [p.resolve() for p in default_visits(Store(store))] == [v.resolve() for v in visits]
