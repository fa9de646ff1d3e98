"""Warping visits as dask.distributed tasks gives the same coadd as one process."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("galsim")
pytest.importorskip("dask.distributed")

from scarletstore.cli import main
from scarletstore.coadd.pipeline import coadd
from scarletstore.coadd.visits import read_grid, read_visits
from scarletstore.simulate.visits import simulate_visits


def test_two_dask_workers_give_the_one_worker_coadd(tmp_path):
    sim = simulate_visits(tmp_path, n_visits=3, size=96, seed=31, bands="gr", density=30, n_stars=3)
    grid = read_grid(sim["grid"])
    one = coadd(read_visits(sim["visits"], grid), grid, workers=1)
    two = coadd(read_visits(sim["visits"], grid), grid, workers=2)
    for group in ("exposure", "coadds/likelihood", "coadds/psf_matched"):
        for name, var in one[group].data_vars.items():
            np.testing.assert_array_equal(var.values, two[group][name].values, err_msg=f"{group}/{name}")
    assert one["exposure"]["image"].values.std() > 0
    np.testing.assert_array_equal(one["visits"]["n_rejected"].values, two["visits"]["n_rejected"].values)


def test_coadd_cli_refuses_a_bad_scheduler_address(tmp_path, capsys):
    sim = simulate_visits(tmp_path / "v", n_visits=1, size=48, seed=2, bands="g", density=5)
    rc = main(["coadd", str(tmp_path / "out.h5"), *map(str, sim["visits"]), "--grid", str(sim["grid"]),
               "--scheduler", "nonsense"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scheduler" in err[0]
    assert not (tmp_path / "out.h5").exists()
