"""The Kaiser likelihood coadd: point-source S/N per band and the chi^2 image."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("galsim")
from astropy.table import Table
from scipy import ndimage

from scarletstore.coadd.stack import direct_coadd
from scarletstore.coadd.visits import read_grid, read_visits
from scarletstore.simulate.field import MAGZERO as SIM_MAGZERO
from scarletstore.simulate.visits import simulate_visits


@pytest.fixture(scope="module")
def coadd(tmp_path_factory):
    out = tmp_path_factory.mktemp("kaiser")
    sim = simulate_visits(out, n_visits=4, size=120, seed=21, bands="gi", density=10, n_stars=9,
                          background=False, artifacts=False)
    grid = read_grid(sim["grid"])
    visits = read_visits(sim["visits"], grid)
    ex, table, lk = direct_coadd(visits, grid)
    return sim, visits, ex, lk


def test_star_significance_matches_analytic_snr(coadd):
    """S/N of a star in the Kaiser map = sqrt(sum_v F_v^2 sum(P_v^2) / sigma_v^2) in each visit's own pixels."""
    sim, visits, ex, lk = coadd
    truth = Table.read(sim["truth"])
    tv = Table.read(sim["grid"].parent / "truth_visits.fits")
    sigma = {row["file"]: row["sigma"] for row in tv}
    inexact = ex["mask"].values != 0
    for k, band in enumerate(["g", "i"]):
        sig = lk["significance"].values[k].astype(float)
        ratios = []
        for row in truth[truth["is_star"] & (truth["kind"] == "static") & (truth["mag_i"] <= 21)]:
            x, y = row["x"], row["y"]
            iy, ix = int(round(y)), int(round(x))
            if inexact[k, iy - 12:iy + 13, ix - 12:ix + 13].any():
                continue  # some visit does not cover the whole star
            snr2 = 0.0
            for v in visits:
                if v.band != band:
                    continue
                f_counts = row[f"flux_{band}"] * 10 ** (0.4 * (v.magzero - SIM_MAGZERO))
                snr2 += f_counts**2 * np.sum(v.psf**2) / sigma[v.path.name] ** 2
            measured = ndimage.map_coordinates(sig, [[y], [x]], order=3)[0]
            ratios.append(measured / np.sqrt(snr2))
        assert len(ratios) >= 4
        assert np.median(ratios) == pytest.approx(1.0, abs=0.03)


def test_significance_noise_and_chi2(tmp_path):
    """On blank sky the significance has unit variance (a S/N, not a flux); chi^2 sums the bands."""
    sim = simulate_visits(tmp_path, n_visits=3, size=160, seed=5, bands="gr", density=0.001,
                          background=False, artifacts=False)
    grid = read_grid(sim["grid"])
    ex, _, lk = direct_coadd(read_visits(sim["visits"], grid), grid)
    truth = Table.read(sim["truth"])  # only the variable star and the transient
    sig = lk["significance"].values.astype(float)
    Y, X = np.mgrid[0:160, 0:160]
    far = (ex["mask"].values == 0).all(axis=0)
    for x, y in zip(truth["x"], truth["y"]):
        far &= (X - x) ** 2 + (Y - y) ** 2 > 25**2
    assert far.sum() > 10000
    for k in range(2):
        s = sig[k][far]
        assert 0.95 < s.std() < 1.05
        assert abs(np.mean(s)) < 0.1
    chi2 = lk["chi2"].values
    np.testing.assert_allclose(chi2[far], (sig[0] ** 2 + sig[1] ** 2)[far], rtol=1e-5)
    assert np.mean(chi2[far]) == pytest.approx(2.0, rel=0.1)  # two bands of unit variance
