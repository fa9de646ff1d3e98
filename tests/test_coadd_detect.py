"""`detect --image likelihood`: footprints from the Kaiser coadd's significance."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("galsim")
from astropy.table import Table
from scipy.spatial import cKDTree

from scarletstore.cli import main
from scarletstore.simulate.visits import simulate_visits
from scarletstore.store.store import Store


def _recall_and_spurious(parents, truth, size, radius=1.5, mag=24.0):
    peaks = np.column_stack([parents["peak_x"].values, parents["peak_y"].values])
    tx, ty = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    found = cKDTree(peaks).query(np.column_stack([tx, ty]))[0] <= radius
    inside = (tx > 3) & (ty > 3) & (tx < size - 4) & (ty < size - 4)
    bright = inside & (np.asarray(truth["kind"]).astype(str) == "static") & (truth["mag_i"] < mag)
    # A peak with no true source of any brightness within 3 px is spurious.
    spurious = int((cKDTree(np.column_stack([tx, ty])).query(peaks)[0] > 2 * radius).sum())
    return found[bright].mean(), int(bright.sum()), spurious


def test_detect_on_the_likelihood_coadd(tmp_path, capsys):
    """Recall of true sources brighter than i = 24 >= 0.97 on the likelihood coadd, with
    no more spurious peaks than on the direct coadd (plus a few): the Kaiser numerator
    has the fitted sky taken off, so blank sky does not shift its significance.
    A field unlike the benchmark's: 5 visits per band, another seed and size, the
    backgrounds, cosmic rays and trails on."""
    out, size = tmp_path / "sim", 480
    assert main(["simulate", str(out), "--visits", "5", "--size", str(size), "--bands", "gri",
                 "--seed", "9"]) == 0
    visits = sorted(str(p) for p in out.glob("visit_*.fits"))
    store = tmp_path / "coadd.h5"
    assert main(["coadd", str(store), *visits, "--grid", str(out / "grid.fits")]) == 0
    truth = Table.read(out / "truth.fits")
    assert main(["detect", str(store)]) == 0
    direct = _recall_and_spurious(Store(store).read("parents"), truth, size)
    assert main(["detect", str(store), "--image", "likelihood", "--replace"]) == 0
    parents = Store(store).read("parents")
    assert '"significance": "given"' in parents.attrs["config"]
    recall, n_bright, spurious = _recall_and_spurious(parents, truth, size)
    assert n_bright >= 25
    assert recall >= 0.97, (recall, direct)
    assert spurious <= direct[2] + 3, (spurious, direct)
    capsys.readouterr()


def test_detect_likelihood_needs_a_coadd_store(tmp_path, capsys):
    """A store ingested from a coadd has no likelihood group: one line, exit 2, nothing written."""
    from scarletstore.ingest.exposure import make_exposure

    rng = np.random.default_rng(3)
    ex = make_exposure(rng.normal(size=(1, 40, 40)), np.ones((1, 40, 40)), None,
                       [np.pad(np.ones((1, 1)), 2)], ["r"])
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": ex})
    assert main(["detect", str(path), "--image", "likelihood"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no coadds/likelihood group" in err[0]
    assert not Store(path).has("parents")
