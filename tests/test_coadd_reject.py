"""PSF matching, the clipped PSF-matched coadd and artifact rejection."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("galsim")
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage
from scipy.signal import fftconvolve

from scarletstore.cli import main
from scarletstore.coadd.match import gaussian_target, matching_kernel
from scarletstore.coadd.pipeline import coadd
from scarletstore.coadd.reject import BRIDGE, DILATE, clipped_mean
from scarletstore.coadd.stack import COADD_MASK_PLANES
from scarletstore.coadd.visits import read_grid, read_visits
from scarletstore.simulate.visits import simulate_visits
from scarletstore.store.store import Store


def moffat(size, fwhm, beta=3.5, e1=0.0):
    y, x = np.mgrid[0:size, 0:size] - size // 2
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r2 = (x**2 * (1 + e1) + y**2 * (1 - e1)) / alpha**2
    p = (1 + r2) ** -beta
    return p / p.sum()


@pytest.mark.parametrize("fwhm,e1", [(2.5, 0.0), (4.0, 0.08), (5.2, -0.05)])
def test_matching_kernel_takes_the_psf_to_the_target(fwhm, e1):
    psf = moffat(49, fwhm, e1=e1)
    target = gaussian_target(1.1 * 5.5, 49)
    k = matching_kernel(psf, target)
    resid = fftconvolve(psf, k, mode="same") - target
    assert np.abs(resid).max() < 2e-3 * target.max()
    assert k.sum() == pytest.approx(1.0)


def test_clipped_mean_ignores_one_outlying_visit():
    rng = np.random.default_rng(2)
    n, shape = 6, (20, 30)
    var = np.full((n, *shape), 4.0)
    images = 10 + rng.normal(0, 2, (n, *shape))
    images[2, 5:8, 10:20] += 60  # a trail in visit 2
    mean, mvar, kept = clipped_mean(images, var, np.ones((n, *shape), bool), np.ones(n))
    assert np.abs(mean[5:8, 10:20] - 10).max() < 3.5  # the trail (+60) is clipped away
    assert not kept[2, 5:8, 10:20].any()
    assert kept[[0, 1, 3, 4, 5]].mean() > 0.97  # 3-sigma clipping of Gaussian noise keeps ~99 %
    assert np.median(mvar) == pytest.approx(4.0 / 6, rel=1e-6)


def _trail_mask(sim_dir, grid, band, size):
    tv = Table.read(sim_dir / "truth_visits.fits")
    row = tv[(tv["band"] == band) & np.isfinite(tv["trail_theta"])][0]
    with fits.open(sim_dir / row["file"]) as h:
        w = WCS(h["IMAGE"].header)
        n = h["IMAGE"].data.shape[0]
    y, x = np.mgrid[0:size, 0:size].astype(float)
    ra, dec = grid.wcs.pixel_to_world_values(x.ravel(), y.ravel())
    u, v = w.world_to_pixel_values(ra, dec)
    c = (n - 1) / 2.0
    d = (u - c) * np.sin(row["trail_theta"]) - (v - c) * np.cos(row["trail_theta"]) - row["trail_offset"]
    return (np.abs(d) < 0.5).reshape(size, size), str(row["file"])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    sim = simulate_visits(out, n_visits=5, size=140, seed=12, bands="g", density=20, n_stars=4)
    grid = read_grid(sim["grid"])
    visits = read_visits(sim["visits"], grid)
    return sim, grid, visits, coadd(visits, grid), coadd(visits, grid, reject=False)


def test_trail_and_transient_are_rejected_variable_star_kept(full):
    sim, grid, visits, on, off = full
    out = sim["grid"].parent
    trail, trail_file = _trail_mask(out, grid, "g", 140)
    truth = Table.read(sim["truth"])
    ex_on, ex_off = on["exposure"], off["exposure"]
    snr_on = ex_on["image"].values[0] / np.sqrt(ex_on["variance"].values[0])
    snr_off = ex_off["image"].values[0] / np.sqrt(ex_off["variance"].values[0])
    Y, X = np.mgrid[0:140, 0:140]
    far = np.ones((140, 140), bool)
    for x, y in zip(truth["x"], truth["y"]):
        far &= (X - x) ** 2 + (Y - y) ** 2 > 12**2
    ok = far & np.isfinite(snr_on) & np.isfinite(snr_off)
    sel = trail & ok
    # Residual visit backgrounds offset the sky: compare with sky 6-12 px beside the trail.
    beside = ndimage.binary_dilation(trail, iterations=12) & ~ndimage.binary_dilation(trail, iterations=6) & ok
    assert sel.sum() > 40 and beside.sum() > 200
    excess_off = np.median(snr_off[sel]) - np.median(snr_off[beside])
    excess_on = np.median(snr_on[sel]) - np.median(snr_on[beside])
    assert excess_off > 2.5  # 8 sigma in one visit of five
    # Gone to within the noise of a median over ~75 correlated pixels (~0.2 sigma).
    assert abs(excess_on) < 0.5 and abs(excess_on) < 0.2 * excess_off
    rej = (ex_on["mask"].values[0] & (1 << COADD_MASK_PLANES["REJECTED"])) != 0
    # Where the trail visit itself contributes (not on its own bad pixels), the trail
    # is rejected, carried across the pixels its matched warp cannot test.
    from scarletstore.coadd.warp import warp_image

    tvis = next(v for v in visits if v.path.name == trail_file)
    img, var, msk = tvis.load()
    contributes = warp_image(img, var, msk, tvis.bad_bits(), tvis.wcs, grid.wcs, grid.shape).good
    assert rej[sel & contributes].mean() > 0.9
    table = on["visits"]
    files = list(table["file"].values)
    assert table["n_rejected"].values[files.index(trail_file)] > 200
    # The transient (first visit only) is rejected; the variable star is not.
    tr = truth[truth["kind"] == "transient"][0]
    va = truth[truth["kind"] == "variable"][0]
    near = lambda row, r: (X - row["x"]) ** 2 + (Y - row["y"]) ** 2 <= r * r  # noqa: E731
    assert rej[near(tr, 2)].all()
    # The variable star and bright static stars lose nothing, except where the trail
    # passes close by (in this field it crosses the variable star: the trail visit's
    # pixels there are rightly rejected).
    # The zone is the reach of a trail's mask: grown region, carried 10 px across
    # untestable pixels, dilated 2 px.
    trail_zone = ndimage.binary_dilation(trail, iterations=14)
    for row in [va, *truth[truth["is_star"] & (truth["kind"] == "static") & (truth["mag_i"] <= 21)]]:
        assert not (rej & ~trail_zone)[near(row, 8)].any()


def test_psf_matched_coadd_has_the_target_psf(full):
    sim, grid, visits, on, _ = full
    pm = on["coadds/psf_matched"]
    truth = Table.read(sim["truth"])
    img = pm["image"].values[0].astype(float)
    target = pm["psf"].values[0].astype(float)
    c = target.shape[0] // 2

    def size(im, xc, yc):
        y, x = np.mgrid[0:im.shape[0], 0:im.shape[1]]
        w = np.exp(-0.5 * ((x - xc) ** 2 + (y - yc) ** 2) / 3.0**2) * im
        return np.sqrt((w * ((x - xc) ** 2 + (y - yc) ** 2)).sum() / w.sum())

    t_size = size(target, c, c)
    ratios = []
    for row in truth[truth["is_star"] & (truth["kind"] == "static") & (truth["mag_i"] <= 21)]:
        ix, iy = int(round(row["x"])), int(round(row["y"]))
        cut = img[iy - c:iy + c + 1, ix - c:ix + c + 1]
        if cut.shape != target.shape:
            continue
        ratios.append(size(cut, row["x"] - ix + c, row["y"] - iy + c) / t_size)
    assert len(ratios) >= 3
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    fwhm = np.asarray(on["visits"]["psf_fwhm"].values)
    assert pm["target_fwhm"].values[0] > fwhm.max()  # wider than every visit by default


def test_visits_broader_than_the_target_are_left_out_and_listed(full, tmp_path):
    sim, grid, visits, _, _ = full
    fwhm = sorted(v for v in Table.read(sim["grid"].parent / "truth_visits.fits")["fwhm"])
    target = 0.5 * (fwhm[1] + fwhm[2])  # two visits narrower, three broader
    store = tmp_path / "c.h5"
    rc = main(["coadd", str(store), *map(str, sim["visits"]), "--grid", str(sim["grid"]),
               "--psf-matched-fwhm", f"{target:.4f}"])
    assert rc == 0
    s = Store(store)
    tab = s.read("visits")
    left = json.loads(s.read("coadds/psf_matched").attrs["left_out"])["g"]
    out_files = [f for f, m in zip(tab["file"].values, tab["psf_matched"].values) if not m]
    assert len(out_files) == 3 and sorted(left) == sorted(out_files)
    assert all(r for r, m in zip(tab["reason"].values, tab["psf_matched"].values) if not m)
    assert tab["used"].values.all()  # still in the direct coadd
    assert main(["coadd", str(tmp_path / "d.h5"), *map(str, sim["visits"]), "--grid",
                 str(sim["grid"]), "--psf-matched-fwhm", "-1"]) == 2
    assert not (tmp_path / "d.h5").exists()


def test_background_matching_removes_steps_where_a_visit_is_missing(tmp_path):
    """Noise-free visits with different background planes: the matched coadd carries the
    weighted mean of their backgrounds everywhere, also where a visit does not cover the grid
    (before the final sky fit); the sky fit then takes that mean off."""
    from scarletstore.coadd.warp import pixel_mapping

    sim = simulate_visits(tmp_path, n_visits=4, size=120, seed=4, bands="r", density=3,
                          background=True, artifacts=False, noise=False)
    grid = read_grid(sim["grid"])
    visits = read_visits(sim["visits"], grid)
    on = coadd(visits, grid, sky=False)
    off = coadd(visits, grid, reject=False, sky=False)
    tv = Table.read(sim["grid"].parent / "truth_visits.fits")
    assert json.loads(on["exposure"].attrs["background_reference"])["r"] in tv["file"]
    weights = on["visits"]["weight"].values
    expected = np.zeros(grid.shape)  # weighted mean of the visits' background planes
    for v, w in zip(visits, weights):
        a, b, c = tv[tv["file"] == v.path.name][0]["bg"]
        u, vv, area = pixel_mapping(grid.wcs, grid.shape, v.wcs)
        n = v.shape[0]
        expected += w * (a + b * (u / n - 0.5) + c * (vv / n - 0.5)) * v.flux_scale(27.0) * area
    expected /= weights.sum()
    truth = Table.read(sim["truth"])
    Y, X = np.mgrid[0:120, 0:120]
    blank = (on["exposure"]["mask"].values[0] & (1 << COADD_MASK_PLANES["NO_DATA"])) == 0
    for x, y in zip(truth["x"], truth["y"]):
        blank &= (X - x) ** 2 + (Y - y) ** 2 > 20**2
    inexact = blank & ((on["exposure"]["mask"].values[0] & (1 << COADD_MASK_PLANES["INEXACT_PSF"])) != 0)
    assert inexact.sum() > 100
    sigma = np.sqrt(np.nanmedian(on["exposure"]["variance"].values[0]))
    dev_on = np.abs(on["exposure"]["image"].values[0] - expected) / sigma
    dev_off = np.abs(off["exposure"]["image"].values[0] - expected) / sigma
    assert np.median(dev_on[blank]) < 0.03
    assert np.percentile(dev_on[inexact], 90) < 0.05
    assert np.percentile(dev_off[inexact], 90) > 3 * np.percentile(dev_on[inexact], 90)
    mean_sky = np.median(np.abs(expected[blank])) / sigma  # 0.08 sigma here
    flat = np.abs(coadd(visits, grid)["exposure"]["image"].values[0]) / sigma
    assert np.median(flat[blank]) < min(0.02, 0.5 * mean_sky)
    assert np.percentile(flat[blank], 90) < 0.05


@pytest.mark.parametrize("n_visits,seed", [(4, 1), (3, 6), (4, 8)])
def test_few_visits_no_trail_piece_is_detected(tmp_path, n_visits, seed):
    """With 3-4 visits per band the matched warps of a trail's neighbours are often
    unusable (their cosmic rays, spread by the matching kernel), so few visits
    remain to compare: the clip there used to leave no visit (a NaN mean, a hole in
    the rejection) or a mean holding half the trail (taken for a source, which
    stopped the trail's growth), and pieces of the trail were detected as parents.
    Seed 1 at 4 visits is the demo's field."""
    from scipy.spatial import cKDTree

    from scarletstore.detect.detect import detect

    size = 240
    sim = simulate_visits(tmp_path, n_visits=n_visits, size=size, seed=seed, bands="gr", density=60)
    grid = read_grid(sim["grid"])
    ex = coadd(read_visits(sim["visits"], grid), grid)["exposure"]
    truth = Table.read(sim["truth"])
    parents = detect(ex)
    px, py = parents["peak_x"].values, parents["peak_y"].values
    dist, _ = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(np.column_stack([px, py]))
    rej_bit = 1 << COADD_MASK_PLANES["REJECTED"]
    Y, X = np.mgrid[0:size, 0:size]
    for k, band in enumerate(str(b) for b in ex["band"].values):
        trail, _ = _trail_mask(tmp_path, grid, band, size)
        near_trail = ndimage.binary_dilation(trail, iterations=4)
        iy, ix = np.round(py).astype(int), np.round(px).astype(int)
        snr = ex["image"].values[k] / np.sqrt(ex["variance"].values[k])
        # A trail piece: a peak on the trail, no true source within 3 px, and the
        # trail's band bright there (a noise peak of another band that happens to
        # lie on the trail is not one; the demo's pieces had S/N 4.5-5 per pixel).
        on = near_trail[iy, ix] & (dist > 3) & (snr[iy, ix] > 2.5)
        assert not on.any(), list(zip(px[on], py[on]))
        # Nothing of a real source is rejected away from the artifacts' reach (the
        # trail's: grown, carried up to BRIDGE px through untestable pixels, dilated;
        # the transient's, seen in one visit, is rightly rejected too).
        rej = (ex["mask"].values[k] & rej_bit) != 0
        zone = ndimage.binary_dilation(trail, iterations=BRIDGE + DILATE + 2)
        kind = np.asarray(truth["kind"]).astype(str)
        for row in truth[kind == "transient"]:
            zone |= (X - row["x"]) ** 2 + (Y - row["y"]) ** 2 <= 15**2
        for row in truth[(kind == "static") & (truth["mag_i"] < 23)]:
            near = (X - row["x"]) ** 2 + (Y - row["y"]) ** 2 <= 36
            assert not (rej & ~zone)[near].any(), (band, row["x"], row["y"])
