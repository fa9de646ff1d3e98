"""Measurement windows on unusable pixels: flagged, with errors that are never a false 0.

A saturated star's core (SAT, a bad plane) used to give a 3 px aperture of
6e5 +- 0 in model mode (the model was summed there, the variance of those
pixels was 0) and 0 +- 0 in redistribute mode, with no flag; a star wholly in
a NO_DATA region kept a model flux 8000 times its truth, flagged only by its
fit. The same blends as test_catalog_unusable_pixels, with holes put on the star.
"""

import numpy as np
import pytest
from test_catalog_unusable_pixels import BANDS, BLENDS, H, NO_DATA, NOISE, W, _blob, _records

from scarletstore.deblend.psf import gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.catalog import CATALOG_FLAGS, band_catalog
from scarletstore.store.runs import build_run
from scarletstore.store.store import Store

STAR = (50, 76)  # the star's centre (blend 1), exposure pixels
F = CATALOG_FLAGS


def _store(path, holes, dark=False):
    """The two-band store with NO_DATA on ``holes``: {band index: (rows, columns)};
    ``dark``: the second galaxy has no model light in r."""
    rng = np.random.default_rng(4)
    image = rng.normal(0, NOISE, (2, H, W)).astype(np.float32)
    for _, comps in BLENDS:
        for cy, cx, s, spec in comps:
            for b in range(2):
                image[b, cy:cy + 21, cx:cx + 21] += spec[b] * _blob(21, s)
    mask = np.zeros((2, H, W), np.int32)
    for b, where in holes.items():
        mask[b][where] = NO_DATA
    ex = make_exposure(image, np.full((2, H, W), NOISE ** 2, np.float32), mask,
                       [gaussian_psf(s, 25) for s in (1.4, 1.9)], BANDS, mask_defects=False)
    records = _records()
    if dark:
        records[0].sources[1].components[0].spectrum[1] = 0.0
    run = build_run(records, BANDS, ex["psf"].values, gaussian_psf(0.8), name="m", method="scarlet",
                    config_json="{}", package_version="test")
    Store.create(path, {"exposure": ex, "runs/m": run})
    return Store(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("windows")
    y, x = STAR
    core = (slice(y - 4, y + 5), slice(x - 4, x + 5))  # 9 x 9: the whole 3 px aperture
    return {"clean": _store(tmp / "clean.h5", {}),
            "core": _store(tmp / "core.h5", {0: core, 1: core}),
            "gone": _store(tmp / "gone.h5", {1: (slice(34, H), slice(60, W))}),
            "dark": _store(tmp / "dark.h5", {}, dark=True),
            "dark_hole": _store(tmp / "dark_hole.h5", {1: (slice(27, 34), slice(39, 46))}, dark=True)}


@pytest.mark.parametrize("redistribute", [False, True])
def test_a_masked_core_flags_its_windows_and_never_reads_zero_error(stores, redistribute):
    clean = band_catalog(stores["clean"], "r", redistribute=redistribute).compute()
    core = band_catalog(stores["core"], "r", redistribute=redistribute).compute()
    star = 2
    assert int(clean["flags"].values[star]) == 0
    flags = int(core["flags"].values[star])
    assert flags & F["aperture_masked"] and flags & F["kron_masked"] and flags & F["gaap_masked"]
    # the 3 px aperture has no usable pixel: nothing measured, NaN rather than 0 +- 0
    assert np.isnan(core["aperture_flux_3"].values[star]) and np.isnan(core["aperture_flux_3_err"].values[star])
    for name in ("aperture_flux_6", "aperture_flux_12", "kron_flux", "gaap_flux"):
        err, err_clean = core[name + "_err"].values[star], clean[name + "_err"].values[star]
        assert np.isfinite(err) and err > 0, name
        if not redistribute:  # the model's amplitude seen through fewer pixels: a larger error
            assert err > err_clean, name
    # the galaxies of the other blend see none of it
    np.testing.assert_array_equal(core["flags"].values[:2], clean["flags"].values[:2])


def test_a_star_with_no_data_in_a_band_is_flagged_flux_masked(stores):
    gone = band_catalog(stores["gone"], "r").compute()
    assert gone["flux_coverage"].values[2] == 0.0
    assert int(gone["flags"].values[2]) & F["flux_masked"]
    g = band_catalog(stores["gone"], "g").compute()  # the other band has its data
    assert g["flux_coverage"].values[2] == pytest.approx(1.0) and not int(g["flags"].values[2]) & F["flux_masked"]
    clean = band_catalog(stores["clean"], "r").compute()
    np.testing.assert_allclose(clean["flux_coverage"].values, 1.0)
    assert not np.any(clean["flags"].values & F["flux_masked"])


def test_a_zero_flux_child_on_unusable_pixels_has_no_upper_limit(stores):
    """A child with no model light gets a point source's noise at its peak as its error;
    with its peak on NO_DATA there is no such noise (it read 0 +- 12.5 against a truth of
    470): NaN, flagged flux_masked."""
    dark = band_catalog(stores["dark"], "r").compute()
    hole = band_catalog(stores["dark_hole"], "r").compute()
    assert dark["flux"].values[1] == 0 and int(dark["flags"].values[1]) & F["zero_flux"]
    assert np.isfinite(dark["flux_err"].values[1]) and dark["flux_err"].values[1] > 0
    assert not int(dark["flags"].values[1]) & F["flux_masked"]
    assert np.isnan(hole["flux_err"].values[1]) and int(hole["flags"].values[1]) & F["flux_masked"]
    assert np.nanmin(dark["blendedness"].values) >= 0  # float32 rounding once gave -7e-9


def test_parent_flux_is_its_childrens_sum_on_a_field_with_masked_columns(tmp_path):
    """In model mode a parent's flux was its children's models summed over its footprint,
    while each child's flux is its whole model: with masked columns cutting footprints, a
    one-child parent read 91.9 against its child's 132.4."""
    from scarletstore.cli import main
    from scarletstore.measure.parents import parent_catalog

    sim = tmp_path / "sim"
    assert main(["simulate", str(sim), "--size", "200", "--seed", "5", "--bands", "gr",
                 "--cosmic-rays", "10", "--bad-columns", "3"]) == 0
    path = tmp_path / "s.h5"
    assert main(["ingest", str(path), str(sim / "g.fits"), str(sim / "r.fits")]) == 0
    assert main(["detect", str(path)]) == 0 and main(["deblend", str(path)]) == 0
    store = Store(path)
    for redistribute, key in ((False, "flux"), (True, "flux_redistributed")):
        children = band_catalog(store, "g", redistribute=redistribute).compute()
        parents = parent_catalog(store, "g", redistribute=redistribute).compute()
        sums = np.array([children[key].values[children["parent"].values == p].sum()
                         for p in parents["parent"].values])
        np.testing.assert_allclose(parents["flux"].values, sums, rtol=1e-6, atol=1e-9, err_msg=key)


def test_catalog_says_why_ra_dec_are_nan(stores):
    """A store made without a WCS has NaN ra / dec on every row; the catalog says why."""
    cat = band_catalog(stores["clean"], "g")
    assert np.all(np.isnan(cat["ra"].values))
    assert cat.attrs["sky_coordinates"] == "none: the exposure has no WCS"
