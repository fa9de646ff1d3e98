"""Tests of the field simulator (scarletstore.simulate.field)."""

import sys

import numpy as np
import pytest

galsim = pytest.importorskip("galsim")

from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from scarletstore.errors import InputError  # noqa: E402
from scarletstore.simulate.field import (DEPTH_5SIGMA, MAGZERO, _draw_catalogue, _simulate,
                                         load_truth, simulate_field, truth_image)

SIZE = 128
BANDS = "gri"
SEED = 3
DENSITY = 150.0  # denser than default so a small field holds ~27 sources


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_a")
    paths = simulate_field(out, size=SIZE, seed=SEED, bands=BANDS, density=DENSITY, progress=True)
    return out, paths


def _files(out):
    return sorted(p.name for p in out.iterdir())


def _interior(bbox, size):
    y0, x0, h, w = bbox
    return y0 > 0 and x0 > 0 and y0 + h < size and x0 + w < size


def test_returned_paths(field):
    out, paths = field
    assert set(paths) == {"bands", "truth", "truth_images"}
    assert list(paths["bands"]) == list(BANDS)
    for b in BANDS:
        assert paths["bands"][b] == out / f"{b}.fits"
    assert _files(out) == sorted([f"{b}.fits" for b in BANDS] + ["truth.fits", "truth_images.npz"])


def test_same_seed_byte_identical_different_seed_differs(field, tmp_path):
    out, _ = field
    again = tmp_path / "again"
    simulate_field(again, size=SIZE, seed=SEED, bands=BANDS, density=DENSITY)
    for name in _files(out):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name

    other = tmp_path / "other"
    simulate_field(other, size=SIZE, seed=SEED + 1, bands=BANDS, density=DENSITY)
    for name in _files(out):
        assert (out / name).read_bytes() != (other / name).read_bytes(), name


def test_catalogue_and_noise_do_not_depend_on_band_list(field, tmp_path):
    out, _ = field
    simulate_field(tmp_path, size=SIZE, seed=SEED, bands="r", density=DENSITY)
    a, _ = load_truth(out)
    b, _ = load_truth(tmp_path)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["flux_r"], b["flux_r"])
    np.testing.assert_array_equal(
        fits.getdata(out / "r.fits", "IMAGE"), fits.getdata(tmp_path / "r.fits", "IMAGE")
    )


def test_fits_layout(field):
    out, paths = field
    for b, path in paths["bands"].items():
        with fits.open(path) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
            assert hdul[0].header["BAND"] == b
            image, mask, var, psf = (hdul[n] for n in ("IMAGE", "MASK", "VARIANCE", "PSF"))
            assert image.header["BAND"] == b
            assert image.data.shape == (SIZE, SIZE)
            assert image.data.dtype.kind == "f" and image.data.dtype.itemsize == 4
            assert var.data.dtype.kind == "f" and var.data.dtype.itemsize == 4
            assert mask.data.dtype.kind == "i" and mask.data.dtype.itemsize == 4
            assert image.header["MAGZERO"] == pytest.approx(MAGZERO)
            assert image.header["FLUXMAG0"] == pytest.approx(10 ** (0.4 * MAGZERO))
            expected_bits = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "NO_DATA": 8}
            for plane, bit in expected_bits.items():
                assert mask.header[f"MP_{plane}"] == bit
            assert np.all(var.data > 0)

            wcs = WCS(image.header)
            assert wcs.celestial.wcs.ctype[0].startswith("RA---TAN")
            scale = np.abs(np.diag(wcs.pixel_scale_matrix)) * 3600
            np.testing.assert_allclose(scale, 0.2, rtol=1e-9)

            p = psf.data.astype(float)
            assert p.shape[0] % 2 == 1 and p.shape[1] % 2 == 1
            assert p.sum() == pytest.approx(1.0, abs=1e-5)
            assert np.unravel_index(np.argmax(p), p.shape) == (p.shape[0] // 2, p.shape[1] // 2)


def _fwhm(psf):
    # Area above half maximum of a near-round PSF gives its FWHM.
    area = np.sum(psf >= 0.5 * psf.max())
    return 2.0 * np.sqrt(area / np.pi) * 0.2


def test_psf_fwhm_decreases_to_the_red(field):
    _, paths = field
    fwhm = [_fwhm(fits.getdata(paths["bands"][b], "PSF").astype(float)) for b in BANDS]
    assert fwhm[0] > fwhm[1] > fwhm[2]
    for b, f in zip(BANDS, fwhm):
        assert f == pytest.approx(fits.getheader(paths["bands"][b], "PSF")["FWHM"], rel=0.15)


def test_truth_table(field):
    out, paths = field
    table, images = load_truth(out)
    n = len(table)
    assert n > 10
    assert table["id"].dtype == np.int64
    np.testing.assert_array_equal(table["id"], np.arange(1, n + 1))
    for col in ("x", "y", "ra", "dec", "mag_i", "bulge_fraction"):
        assert table[col].dtype == np.float64
    assert table["is_star"].dtype == bool
    for b in BANDS:
        assert np.all(table[f"flux_{b}"] > 0)
    np.testing.assert_allclose(table["flux_i"], 10 ** (-0.4 * (table["mag_i"] - MAGZERO)), rtol=1e-9)
    assert np.all((table["x"] >= -0.5) & (table["x"] < SIZE - 0.5))
    assert np.all((table["bulge_fraction"] >= 0) & (table["bulge_fraction"] <= 1))
    assert set(images) == set(int(i) for i in table["id"])

    wcs = WCS(fits.getheader(paths["bands"]["r"], "IMAGE"))
    ra, dec = wcs.wcs_pix2world(table["x"], table["y"], 0)
    np.testing.assert_allclose(table["ra"], ra, atol=1e-9)
    np.testing.assert_allclose(table["dec"], dec, atol=1e-9)


def test_catalogue_statistics():
    # Catalogue only (no rendering): the default 600x600 field at 90/arcmin^2.
    cat = _draw_catalogue(np.random.default_rng(7), 600, 90.0)
    n = len(cat["x"])
    assert 300 < n < 420
    assert 0.05 < cat["is_star"].mean() < 0.2
    gal = ~cat["is_star"]
    # Bulges redder than disks in g - i wherever both exist.
    both = gal & (cat["bulge_fraction"] > 0) & (cat["bulge_fraction"] < 1)
    gi_bulge = -2.5 * np.log10(cat["flux_bulge_g"][both] / cat["flux_bulge_i"][both])
    gi_disk = -2.5 * np.log10(cat["flux_disk_g"][both] / cat["flux_disk_i"][both])
    assert np.median(gi_bulge - gi_disk) > 0.8


def test_interior_stamps_sum_to_truth_flux(field):
    out, _ = field
    table, images = load_truth(out)
    checked = 0
    for row in table:
        bbox, stamp = images[int(row["id"])]
        if not _interior(bbox, SIZE):
            continue
        for j, b in enumerate(BANDS):
            assert stamp[j].sum(dtype=float) == pytest.approx(row[f"flux_{b}"], rel=0.01)
        checked += 1
    assert checked >= 3


def test_truth_positions_match_stamp_centroids(field):
    out, _ = field
    table, images = load_truth(out)
    checked = 0
    for row in table:
        bbox, stamp = images[int(row["id"])]
        if not _interior(bbox, SIZE) or row["mag_i"] > 25:
            continue
        y0, x0, h, w = bbox
        yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
        for j in range(len(BANDS)):
            s = stamp[j].astype(float)
            assert np.sum(s * xx) / s.sum() == pytest.approx(row["x"], abs=0.1)
            assert np.sum(s * yy) / s.sum() == pytest.approx(row["y"], abs=0.1)
        checked += 1
    assert checked >= 2


def test_stamps_add_up_to_noise_free_field():
    sim = _simulate(64, 5, ["g", "r"], 300.0)
    total = np.zeros_like(sim["noise_free"])
    for (y0, x0, h, w), stamp in zip(sim["bbox"], sim["stamps"]):
        total[:, y0:y0 + h, x0:x0 + w] += stamp
    np.testing.assert_allclose(total, sim["noise_free"], rtol=1e-6, atol=1e-6)
    assert sim["noise_free"].max() > 10 * max(sim["sigma"].values())


def test_image_minus_stamps_is_the_stated_noise(field):
    out, paths = field
    table, images = load_truth(out)
    for j, b in enumerate(BANDS):
        with fits.open(paths["bands"][b]) as hdul:
            image = hdul["IMAGE"].data.astype(float)
            var = hdul["VARIANCE"].data.astype(float)
            mask = hdul["MASK"].data
        model = sum(truth_image(images, sid, (SIZE, SIZE))[j].astype(float) for sid in images)
        good = (mask & 1) == 0
        pull = (image - model)[good] / np.sqrt(var[good])
        assert np.std(pull) == pytest.approx(1.0, rel=0.03)
        assert abs(np.mean(pull)) < 0.03
        # The noise level is the stated ten-year depth: 5 sigma of a
        # PSF-weighted point-source flux.
        psf = fits.getdata(paths["bands"][b], "PSF").astype(float)
        sigma_flux = np.sqrt(np.median(var) / np.sum(psf**2))
        depth = MAGZERO - 2.5 * np.log10(5 * sigma_flux)
        assert depth == pytest.approx(DEPTH_5SIGMA[b], abs=0.05)


def test_bad_pixels_carry_bad_bit(field):
    _, paths = field
    for b in BANDS:
        image = fits.getdata(paths["bands"][b], "IMAGE")
        mask = fits.getdata(paths["bands"][b], "MASK")
        bad = (mask & 1) != 0
        assert bad.sum() >= 4 + 3
        assert np.all(mask[~bad] == 0)
        assert np.all(image[bad] == 0)
        # One short bad column: some column holds a run of >= 4 bad pixels.
        longest = max(np.max(np.diff(np.flatnonzero(np.r_[0, col, 0] == 0)) - 1) for col in bad.T.astype(int))
        assert longest >= 4


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="unknown band"):
        simulate_field(tmp_path, size=32, bands="gq")
    with pytest.raises(InputError, match="twice"):
        simulate_field(tmp_path, size=32, bands=["g", "g"])
    with pytest.raises(InputError, match="size"):
        simulate_field(tmp_path, size=4)
    with pytest.raises(InputError, match="density"):
        simulate_field(tmp_path, size=32, density=-1)


def test_missing_galsim_is_an_input_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "galsim", None)  # makes `import galsim` fail
    with pytest.raises(InputError, match=r"pip install 'scarletstore\[sim\]'"):
        simulate_field(tmp_path / "x", size=32, bands="r")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- fields unlike the default
@pytest.fixture(scope="module")
def odd_field(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_odd")
    paths = simulate_field(out, size=96, seed=8, bands="gri", density=60.0, psf_beta=2.5,
                           bright_stars=2, saturation=2e4, cosmic_rays=4, bad_columns=1)
    return out, paths


def test_default_field_has_no_artifacts_file(field):
    out, paths = field
    assert "artifacts" not in paths and not (out / "truth_artifacts.fits").exists()


def test_strong_wing_psf(odd_field, field):
    from scarletstore.simulate.field import load_artifacts  # noqa: F401

    _, paths = odd_field
    _, ref = field
    wide = fits.getdata(paths["bands"]["i"], "PSF").astype(float)
    core = fits.getdata(ref["bands"]["i"], "PSF").astype(float)
    assert fits.getheader(paths["bands"]["i"], "PSF")["BETA"] == 2.5
    yy, xx = np.mgrid[:41, :41] - 20
    far = np.hypot(yy, xx) > 8
    # beta 2.5 puts several times more light beyond 8 px than the default 3.5
    assert wide[far].sum() > 2.5 * core[far].sum()


def test_artifacts_are_flagged_and_recorded(odd_field):
    from scarletstore.simulate.field import MASK_PLANES, load_artifacts

    out, paths = odd_field
    art = load_artifacts(out)
    table, _ = load_truth(out)
    assert len(table) == len(_draw_catalogue(np.random.default_rng(8), 96, 60.0)["x"]) + 2
    for b in "gri":
        image = fits.getdata(paths["bands"][b], "IMAGE")
        mask = fits.getdata(paths["bands"][b], "MASK")
        rows = art[art["band"] == b]
        assert (rows["kind"] == "CR").sum() == 4 and (rows["kind"] == "BAD_COLUMN").sum() == 1
        for r in rows:
            box = (slice(r["y0"], r["y1"] + 1), slice(r["x0"], r["x1"] + 1))
            bit = {"CR": "CR", "BAD_COLUMN": "BAD", "SAT": "SAT"}[r["kind"]]
            flagged = (mask[box] & (1 << MASK_PLANES[bit])) != 0
            assert flagged.sum() >= r["n_pixels"]
        sat = (mask & (1 << MASK_PLANES["SAT"])) != 0
        assert np.all(image[sat] == np.float32(2e4)) and np.all(image[~sat] <= 2e4)
        # raw cosmic rays keep their value: far above the noise
        cr = (mask & (1 << MASK_PLANES["CR"])) != 0
        assert np.median(image[cr & ~sat]) > 10 * fits.getheader(paths["bands"][b], "IMAGE")["NOISESIG"]
    sat_rows = art[art["kind"] == "SAT"]
    assert len(sat_rows) >= 1
    # each saturated core belongs to one of the two bright stars
    assert set(sat_rows["source_id"]) <= set(range(len(table) - 1, len(table) + 1))


def test_bad_options(tmp_path):
    with pytest.raises(InputError, match="psf_beta"):
        simulate_field(tmp_path, size=32, psf_beta=1.0)
    with pytest.raises(InputError, match="non-negative"):
        simulate_field(tmp_path, size=32, cosmic_rays=-1)
    with pytest.raises(InputError, match="saturation"):
        simulate_field(tmp_path, size=32, saturation=0)
