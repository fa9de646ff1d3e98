"""Forced photometry on visits built from a known model.

Sources are elliptical Gaussians defined on the coadd grid; each visit has
its own rotation, dither, pixel scale, Gaussian PSF and zero point, and the
visit image is the source through the visit's affine map convolved with its
PSF (drawn analytically, not with the code under test). The store holds the
exact scarlet-style models: morphology = source * model-frame PSF.
"""

from __future__ import annotations

import numpy as np
import pytest

from scarletstore.deblend.psf import gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.forced.fit import FLAGS, NOT_MEASURED
from scarletstore.measure.forced.run import forced_photometry, forced_visit, load_models
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.store import Store

# mask-plane keywords (MP_NO_DATA) are longer than 8 characters: astropy writes
# them as HIERARCH cards, as the visit format expects, and says so every time
pytestmark = pytest.mark.filterwarnings("ignore:Keyword name:astropy.io.fits.verify.VerifyWarning")

N = 96
MODEL_SIGMA = 0.8
COADD_SIGMA = 1.5
# (x, y, covariance in grid pixels^2, flux at zero point 27); sources 0 and 1 overlap
SOURCES = [(40.0, 44.0, [[2.0, 0.6], [0.6, 1.2]], 400.0),
           (44.5, 46.0, [[1.0, 0.0], [0.0, 1.0]], 250.0),
           (70.3, 25.6, [[3.0, -1.0], [-1.0, 2.0]], 600.0)]
BLENDS = [[0, 1], [2]]
# rotation (deg), dither (grid px), pixel scale (arcsec), PSF sigma (visit px), MAGZERO, flux factors
VISITS = [(0.0, (0.0, 0.0), 0.200, 1.3, 27.8, (1.00, 1.00, 1.00)),
          (37.0, (3.2, -2.1), 0.206, 1.8, 28.3, (1.20, 0.90, 1.00)),
          (191.0, (-4.4, 1.7), 0.195, 1.1, 27.6, (0.80, 1.10, 1.00)),
          (283.0, (1.3, 5.9), 0.202, 1.5, 28.1, (1.05, 0.70, 1.00))]


def grid_wcs():
    from astropy.wcs import WCS

    from tests.conftest import make_wcs_header

    return WCS(make_wcs_header(N, N))


def visit_wcs(rot, dither, scale, size):
    from astropy.wcs import WCS

    g = grid_wcs()
    c = (N - 1) / 2.0
    ra, dec = g.pixel_to_world_values(c + dither[0], c + dither[1])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    w.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    t = np.radians(rot)
    w.wcs.cd = scale / 3600.0 * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


def gaussian_image(shape, x, y, cov, flux):
    """Sampled 2-D Gaussian with the pixel's own 1/12 variance added (pixel integration)."""
    cov = np.asarray(cov, float) + np.eye(2) / 12.0
    inv = np.linalg.inv(cov)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    dx, dy = xx - x, yy - y
    q = inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy
    return flux * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))


def make_store(path, sources=SOURCES, blends=BLENDS, cube=()):
    """Store with exact models; sources in ``cube`` are stored as isolated pixel cubes at the coadd PSF."""
    bands = ["r"]
    records = []
    for k, members in enumerate(blends):
        xs = [sources[i][0] for i in members]
        ys = [sources[i][1] for i in members]
        y0, x0 = int(min(ys)) - 12, int(min(xs)) - 12
        h, w = int(max(ys)) - y0 + 13, int(max(xs)) - x0 + 13
        srcs = []
        for j, i in enumerate(members):
            x, y, cov, flux = sources[i]
            if i in cube:
                img = gaussian_image((h, w), x - x0, y - y0, np.asarray(cov) + COADD_SIGMA**2 * np.eye(2), flux)
                comp = Component(spectrum=np.array([flux], np.float32), morph=img[None].astype(np.float32),
                                 y0=0, x0=0, peak=(y - y0, x - x0))
            else:
                # model frame: the source convolved with the model PSF (unit morphology peak)
                morph = gaussian_image((h, w), x - x0, y - y0, np.asarray(cov) + MODEL_SIGMA**2 * np.eye(2), 1.0)
                comp = Component(spectrum=np.array([flux], np.float32), morph=morph.astype(np.float32),
                                 y0=0, x0=0, peak=(y - y0, x - x0))
            srcs.append(SourceResult(peak_index=j, components=[comp]))
        records.append(BlendRecord(index=k, parent_id=k + 1, bbox=(y0, x0, h, w),
                                   peak_ids=np.arange(len(members)) + 10 * k,
                                   peaks=np.array([[ys[j], xs[j]] for j in range(len(members))]),
                                   sources=srcs, converged=True, iterations=10))
    coadd_psf = gaussian_image((25, 25), 12, 12, COADD_SIGMA**2 * np.eye(2), 1.0)
    coadd_psf /= coadd_psf.sum()
    ex = make_exposure(np.zeros((1, N, N), np.float32), np.ones((1, N, N), np.float32),
                       np.zeros((1, N, N), np.int32), [coadd_psf], bands,
                       wcs=grid_wcs().to_header().tostring())
    ex.attrs["zeropoint"] = 27.0
    run = build_run(records, bands, coadd_psf[None], gaussian_psf(MODEL_SIGMA, 11), name="t",
                    method="scarlet", config_json="{}", package_version="test")
    store = Store.create(path, {"exposure": ex})
    store.add_run(run, name="t")
    return store


def write_visit(path, k, rng=None, sources=SOURCES, no_data_at=None, size=120, mjd=None, dither=None,
                noise=0.05):
    """Visit ``k`` of VISITS drawn analytically; returns its true fluxes (zero point 27)."""
    from astropy.io import fits

    rot, dither0, scale, sig, magzero, factors = VISITS[k]
    dither = dither0 if dither is None else dither
    w = visit_wcs(rot, dither, scale, size)
    g = grid_wcs()
    image = np.zeros((size, size))
    truth = []
    for (x, y, cov, flux), f in zip(sources, factors):
        ra, dec = g.pixel_to_world_values(x, y)
        u, v = w.world_to_pixel_values(ra, dec)
        # affine map grid offset -> visit offset at the source
        h = 0.5
        ra2, dec2 = g.pixel_to_world_values(np.array([x + h, x - h, x, x]), np.array([y, y, y + h, y - h]))
        uu, vv = w.world_to_pixel_values(ra2, dec2)
        A = np.array([[uu[0] - uu[1], uu[2] - uu[3]], [vv[0] - vv[1], vv[2] - vv[3]]]) / (2 * h)
        c_vis = A @ np.asarray(cov) @ A.T + sig**2 * np.eye(2)
        counts = flux * f * 10 ** (0.4 * (magzero - 27.0))
        image += gaussian_image((size, size), float(u), float(v), c_vis, counts)
        truth.append(flux * f)
    sigma = noise * 10 ** (0.4 * (magzero - 27.0))
    if rng is not None:
        image += rng.standard_normal(image.shape) * sigma
    mask = np.zeros((size, size), np.int32)
    if no_data_at is not None:
        ra, dec = g.pixel_to_world_values(*no_data_at)
        u, v = w.world_to_pixel_values(ra, dec)
        iu, iv = int(round(float(u))), int(round(float(v)))
        mask[iv - 2:iv + 3, iu - 2:iu + 3] |= 1 << 8
    psf = gaussian_image((25, 25), 12, 12, sig**2 * np.eye(2), 1.0)
    hdr = w.to_header()
    hdr.update(BAND="r", MAGZERO=magzero, EXPTIME=30.0)
    hdr["MJD-OBS"] = 60000.0 + k if mjd is None else mjd
    m = fits.ImageHDU(mask, name="MASK")
    m.header["MP_BAD"], m.header["MP_NO_DATA"] = 0, 8
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image.astype(np.float32), header=hdr, name="IMAGE"), m,
                  fits.ImageHDU(np.full((size, size), sigma**2, np.float32), name="VARIANCE"),
                  fits.ImageHDU(psf / psf.sum(), name="PSF")]).writeto(path, overwrite=True)
    return np.array(truth), sigma


@pytest.fixture
def field(tmp_path):
    store = make_store(tmp_path / "s.h5")
    paths, truths = [], []
    for k in range(len(VISITS)):
        p = tmp_path / f"v{k}.fits"
        truths.append(write_visit(p, k)[0])
        paths.append(p)
    return store, paths, np.array(truths)


def _by_visit(ds, n_visits):
    return ds["flux"].values.reshape(n_visits, -1), ds["flags"].values.reshape(n_visits, -1)


def test_noise_free_visits_recover_injected_fluxes(field):
    store, paths, truth = field
    ds = forced_photometry(store, "t", paths)
    assert ds.sizes["row"] == len(paths) * len(SOURCES)
    flux, flags = _by_visit(ds, len(paths))
    assert (flags == 0).all()
    # every visit (rotated, rescaled, other PSF, other zero point) within 0.5 %,
    # including the two overlapping sources fitted jointly
    np.testing.assert_allclose(flux, truth, rtol=5e-3)
    assert list(ds["visit"].values[:3]) == ["v0.fits"] * 3
    np.testing.assert_array_equal(ds["id"].values[:3], [1, 2, 3])


def test_redistributed_fluxes_recover_truth_and_share_the_image(field, tmp_path):
    store, paths, truth = field
    ds = forced_photometry(store, "t", paths, redistribute=True)
    flux, flags = _by_visit(ds, len(paths))
    assert (flags == 0).all()
    np.testing.assert_allclose(flux, truth, rtol=5e-3)
    # light no model has (an extra source 2 pixels from source 1, 10 % of its flux) stays
    # with the children, which sum to the image: the pair's redistributed sum gains all of it
    extra = list(SOURCES) + [(SOURCES[1][0] + 2.0, SOURCES[1][1], [[1.0, 0.0], [0.0, 1.0]], 25.0)]
    p = tmp_path / "extra.fits"
    VISITS.append(VISITS[0][:5] + ((1.0, 1.0, 1.0, 1.0),))
    try:
        write_visit(p, len(VISITS) - 1, sources=extra)
    finally:
        VISITS.pop()
    red = forced_photometry(store, "t", [p], redistribute=True)["flux"].values
    fit = forced_photometry(store, "t", [p])["flux"].values
    pair = SOURCES[0][3] + SOURCES[1][3]
    assert abs(red[0] + red[1] - (pair + 25.0)) < 0.01 * pair
    assert red[2] == pytest.approx(SOURCES[2][3], rel=5e-3) and fit[2] == pytest.approx(SOURCES[2][3], rel=5e-3)


def test_source_off_visit_and_on_no_data_is_flagged(tmp_path):
    store = make_store(tmp_path / "s.h5")
    # a small visit that misses source 2 entirely; a NO_DATA patch on source 0
    small = tmp_path / "small.fits"
    write_visit(small, 1, size=50, dither=(-7.5, 2.5), no_data_at=(SOURCES[0][0], SOURCES[0][1]))
    ds = forced_photometry(store, "t", [small])
    flags, flux = ds["flags"].values, ds["flux"].values
    assert flags[2] & FLAGS["off_visit"] and np.isnan(flux[2])
    assert flags[0] & FLAGS["bad_center"] and np.isnan(flux[0])
    # the neighbour is still measured, with source 0's light kept in the fit
    assert np.isfinite(flux[1]) and flags[1] & FLAGS["off_visit"] == 0
    assert abs(flux[1] / (SOURCES[1][3] * VISITS[1][5][1]) - 1) < 0.02


def test_isolated_cube_reaches_wider_visits_and_flags_sharper_ones(tmp_path):
    # source 2 kept as coadd pixels (process_singles off); visits 1 and 3 have a wider PSF
    # than the coadd (1.85 and 1.52 grid pixels vs 1.5), visits 0 and 2 a sharper one
    store = make_store(tmp_path / "s.h5", cube=(2,))
    paths = []
    for k in range(len(VISITS)):
        paths.append(tmp_path / f"v{k}.fits")
        write_visit(paths[-1], k)
    ds = forced_photometry(store, "t", paths)
    flux, flags = _by_visit(ds, len(paths))
    assert [bool(f & FLAGS["psf_mismatch"]) for f in flags[:, 2]] == [True, False, True, False]
    np.testing.assert_allclose(flux[[1, 3], 2], SOURCES[2][3], rtol=5e-3)
    # the blend of models beside it is untouched
    np.testing.assert_array_equal(flags[:, :2], 0)


def test_errors_match_scatter_and_chi2_near_one(tmp_path):
    store = make_store(tmp_path / "s.h5")
    models = load_models(store, "t")
    rng = np.random.default_rng(4)
    fluxes, errs, chi2 = [], [], []
    n_draws = 100
    for draw in range(n_draws):
        p = tmp_path / "n.fits"
        truth, _ = write_visit(p, 1, rng=rng, noise=1.0)  # S/N 40-100: model error << noise
        cols = forced_visit(p, models)
        fluxes.append(cols["flux"])
        errs.append(cols["flux_err"])
        chi2.append(cols["chi2"])
    fluxes, errs, chi2 = map(np.array, (fluxes, errs, chi2))
    scatter = fluxes.std(axis=0, ddof=1)
    # quoted errors = scatter over the draws: within 10 % pooled over the three
    # sources (300 draws, 4 % sampling error), within 20 % for each (7 %)
    ratio = scatter / errs.mean(axis=0)
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    assert abs(np.sqrt((((fluxes - truth) / errs) ** 2).mean()) - 1) < 0.1
    assert np.all(np.abs(fluxes.mean(axis=0) - truth) < 3 * scatter / np.sqrt(n_draws))
    assert abs(np.median(chi2) - 1) < 0.1, np.median(chi2)


def test_variable_source_light_curve_over_noisy_visits(field, tmp_path):
    store, _, truth = field
    rng = np.random.default_rng(9)
    paths = []
    for k in range(len(VISITS)):
        p = tmp_path / f"noisy{k}.fits"
        write_visit(p, k, rng=rng, noise=0.15)  # S/N 120-700 per visit
        paths.append(p)
    ds = forced_photometry(store, "t", paths)
    flux, _ = _by_visit(ds, len(paths))
    err = ds["flux_err"].values.reshape(len(paths), -1)
    assert np.all(np.abs(flux - truth) / truth < 0.02)
    assert np.all(np.abs(flux - truth) < 4 * err)


def test_workers_give_identical_rows(field):
    pytest.importorskip("dask.distributed")
    store, paths, _ = field
    one = forced_photometry(store, "t", paths[:2])
    two = forced_photometry(store, "t", paths[:2], workers=2)
    for k in ("id", "visit", "flux", "flux_err", "chi2", "flags"):
        np.testing.assert_array_equal(one[k].values, two[k].values)


def test_cli_forced_writes_table_and_refuses_bad_input(field, tmp_path, capsys):
    from scarletstore.cli import main

    store, paths, truth = field
    out = tmp_path / "f.csv"
    assert main(["forced", str(store.path), *map(str, paths), "-o", str(out)]) == 0
    import pandas as pd

    t = pd.read_csv(out)
    assert list(t.columns[:8]) == ["id", "parent", "visit", "band", "mjd", "flux", "flux_err", "chi2"]
    np.testing.assert_allclose(t["flux"].values.reshape(len(paths), -1), truth, rtol=5e-3)
    capsys.readouterr()
    for argv in (["forced", str(store.path), str(tmp_path / "missing.fits"), "-o", str(out)],
                 ["forced", str(store.path), str(paths[0]), "-o", str(tmp_path / "f.txt")],
                 ["forced", str(store.path), str(paths[0]), str(paths[0]), "-o", str(out)],
                 ["forced", str(store.path), str(paths[0]), "--run", "nope", "-o", str(out)],
                 ["forced", str(store.path), "-o", str(out)],  # no visits group: not a coadd store
                 ["forced", str(store.path), str(paths[0]), "--workers", "0", "-o", str(out)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("scarletstore forced: error:"), err


def test_end_to_end_variable_star_light_curve(tmp_path, capsys):
    """simulate --visits 3 --size 200 -> coadd -> detect -> deblend -> forced, against the truth."""
    pytest.importorskip("galsim")
    import pandas as pd
    from astropy.table import Table

    from scarletstore.cli import main
    from scarletstore.simulate.field import MAGZERO

    sim = tmp_path / "sim"
    # gri: with --bands gr the same seed puts the variable star where its coadd model
    # absorbs extra light (a deblend problem: its morphology 17x7 pixels, flux +16 %
    # in g), which forced photometry inherits as a 6-12 % excess in every visit
    assert main(["simulate", str(sim), "--visits", "3", "--size", "200", "--bands", "gri"]) == 0
    visits = sorted(str(p) for p in sim.glob("visit_*.fits"))
    store = tmp_path / "s.h5"
    assert main(["coadd", str(store), *visits, "--grid", str(sim / "grid.fits")]) == 0
    assert main(["detect", str(store)]) == 0
    assert main(["deblend", str(store), "--set", "process_singles=true"]) == 0
    out = tmp_path / "forced.fits"
    assert main(["forced", str(store), *visits, "-o", str(out)]) == 0
    capsys.readouterr()
    table = Table.read(out)
    table.convert_bytestring_to_unicode()
    rows = table.to_pandas()
    truth = Table.read(sim / "truth.fits")
    per_visit = Table.read(sim / "truth_visit_fluxes.fits")
    run = Store(store).read(f"runs/{Store(store).runs()[-1]}")
    k = int(np.flatnonzero(truth["kind"] == "variable")[0])
    d = np.hypot(run["source_x"].values - truth["x"][k], run["source_y"].values - truth["y"][k])
    assert d.min() < 1.0
    star = rows[rows["id"] == int(run["source_id"].values[np.argmin(d)])].set_index("visit")
    true = {str(f): v * 10 ** (0.4 * (27.0 - MAGZERO))
            for f, v in zip(per_visit["file"], per_visit["flux_variable"])}
    # measured in every visit (a cosmic ray on its wings may flag it partial)
    assert len(star) == len(visits) and (star["flags"] & NOT_MEASURED == 0).all()
    resid = np.array([star.loc[f, "flux"] - true[f] for f in star.index])
    t = np.array([true[f] for f in star.index])
    # per visit: within 2 % of truth or 3 sigma (S/N 40-100 per visit: 1 sigma is 1-2.5 %)
    assert np.all(np.abs(resid) < np.maximum(0.02 * t, 3 * star["flux_err"].values)), resid / t
    # the coadd models' own flux errors (this star: g -2.8 %, i +3.9 %, r +2.3 % from the
    # deblend) reach every visit; relative to each band's mean the light curve is within 2 %
    rel = star["flux"].values / t
    bands = star["band"].values
    shape = np.concatenate([rel[bands == b] / rel[bands == b].mean() - 1 for b in np.unique(bands)])
    assert np.all(np.abs(shape) < np.maximum(0.02, 3 * (star["flux_err"].values / t))), shape
    assert np.median(np.abs(shape)) < 0.02
    assert np.median(np.abs(resid / t)) < 0.04
    # the light curve is recovered, not the coadd's mean flux
    assert np.corrcoef(star["flux"].values, t)[0, 1] > 0.95
    # measured constant sources: chi^2 / dof near 1
    ok = rows[(rows["flags"] == 0) & (rows["n_pix"] > 20)]
    assert 0.8 < np.median(ok["chi2"]) < 1.3
