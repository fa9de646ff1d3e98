"""The coadd's final sky fit: a strong sky gradient removed, faint galaxies untouched."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("galsim")
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from scarletstore.coadd.pipeline import coadd
from scarletstore.coadd.sky import fit_sky
from scarletstore.coadd.visits import read_grid, read_visits
from scarletstore.simulate.visits import simulate_visits

SIZE = 192


def _add_sky(src, dst, grid, rng):
    """Copy the visits with a sky that is the same on the sky for all (a strong
    gradient and curvature across the grid, ~4 sigma of the coadd) plus a
    small plane of each visit's own."""
    paths = []
    for p in src:
        q = dst / p.name
        shutil.copy(p, q)
        with fits.open(q, mode="update") as h:
            img = h["IMAGE"].data
            sigma = np.sqrt(np.median(h["VARIANCE"].data))
            w = WCS(h["IMAGE"].header)
            y, x = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(float)
            ra, dec = w.pixel_to_world_values(x.ravel(), y.ravel())
            gx, gy = grid.wcs.world_to_pixel_values(ra, dec)
            u, v = (gx.reshape(img.shape) / SIZE - 0.5) * 2, (gy.reshape(img.shape) / SIZE - 0.5) * 2
            common = sigma * (1.5 * u - 1.0 * v + 0.8 * u * u - 0.6 * u * v + 1.2)
            a, b, c = sigma * rng.uniform(-0.3, 0.3, 3)
            own = a + b * (x / img.shape[1] - 0.5) + c * (y / img.shape[0] - 0.5)
            h["IMAGE"].data = (img + common + own).astype(np.float32)
        paths.append(q)
    return paths


def _blank(truth, radius=12.0):
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    far = np.ones((SIZE, SIZE), bool)
    for xs, ys in zip(truth["x"], truth["y"]):
        far &= (x - xs) ** 2 + (y - ys) ** 2 > radius**2
    return far


def _aperture(img, x, y, r=4.0):
    Y, X = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return float(img[(X - x) ** 2 + (Y - y) ** 2 <= r * r].sum())


@pytest.fixture(scope="module")
def fields(tmp_path_factory):
    """Noise-free visits (the sky level is measured without noise), no simulator
    background; the same visits with a strong added sky."""
    out = tmp_path_factory.mktemp("sky")
    sim = simulate_visits(out / "clean", n_visits=4, size=SIZE, seed=21, bands="i", density=120,
                          n_stars=4, background=False, artifacts=False, noise=False)
    grid = read_grid(sim["grid"])
    (out / "sky").mkdir()
    skyed = _add_sky(sim["visits"], out / "sky", grid, np.random.default_rng(4))
    truth = Table.read(sim["truth"])
    ref = coadd(read_visits(sim["visits"], grid), grid, sky=False)["exposure"]["image"].values[0]
    return sim, grid, skyed, truth, ref


def test_sky_fit_flattens_a_strong_gradient(fields):
    sim, grid, skyed, truth, ref = fields
    ex = coadd(read_visits(skyed, grid), grid)["exposure"]
    raw = coadd(read_visits(skyed, grid), grid, sky=False)["exposure"]
    far = _blank(truth) & np.isfinite(ex["variance"].values[0])
    # The sky left, in units of the coadd noise: the coadd of the same visits
    # without any sky is subtracted (the light of galaxies' wings reaches far
    # into "blank" pixels of this crowded field).
    z = (ex["image"].values[0] - ref) / np.sqrt(ex["variance"].values[0])
    zr = (raw["image"].values[0] - ref) / np.sqrt(raw["variance"].values[0])
    blocks, raw_blocks = [], []
    for y0 in range(0, SIZE, 32):
        for x0 in range(0, SIZE, 32):
            sel = far[y0:y0 + 32, x0:x0 + 32] & np.isfinite(z[y0:y0 + 32, x0:x0 + 32])
            if sel.sum() > 100:
                blocks.append(np.median(z[y0:y0 + 32, x0:x0 + 32][sel]))
                raw_blocks.append(np.median(zr[y0:y0 + 32, x0:x0 + 32][sel]))
    blocks, raw_blocks = np.array(blocks), np.array(raw_blocks)
    assert len(blocks) >= 25
    # Without the fit the sky (common to all visits) stays: several sigma, varying across the field.
    assert np.ptp(raw_blocks) > 3.0 and np.abs(raw_blocks).max() > 3.0
    assert np.abs(blocks).max() < 0.05
    assert abs(np.median(z[far & np.isfinite(z)])) < 0.02


def test_sky_fit_keeps_faint_galaxy_fluxes(fields):
    sim, grid, skyed, truth, ref = fields
    ex = coadd(read_visits(skyed, grid), grid)["exposure"]["image"].values[0]
    sel = ~truth["is_star"] & (truth["mag_i"] > 21.5) & (truth["mag_i"] < 25.5)
    ratios = []
    for row in truth[sel]:
        x, y = float(row["x"]), float(row["y"])
        if 8 <= x < SIZE - 8 and 8 <= y < SIZE - 8:
            f0 = _aperture(ref, x, y)
            if f0 > 0:
                ratios.append(_aperture(ex, x, y) / f0)
    assert len(ratios) >= 10
    assert abs(np.median(ratios) - 1) < 0.01


def test_fit_sky_on_pure_noise_is_zero_and_recovers_a_plane():
    rng = np.random.default_rng(9)
    ny, nx = 300, 260
    noise = rng.normal(0, 1, (ny, nx))
    usable = np.ones((ny, nx), bool)
    var = np.ones((ny, nx))
    model, info = fit_sky(noise, var, usable, 4.0)
    assert info["degree"] <= 1 and np.abs(model).max() < 0.02
    y, x = np.mgrid[0:ny, 0:nx]
    plane = 0.5 + 2.0 * x / nx - 1.0 * y / ny
    usable[:40, :50] = False  # a hole: the fit must bridge it
    model, _ = fit_sky(noise + plane, var, usable, 4.0)
    assert np.abs(model - plane).max() < 0.05
