"""Detection: parents layout, association, external peaks, errors, and quality."""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from scarletstore import footprint as fp
from scarletstore.truth import match_positions
from scarletstore.detect import (CHI2_BIT, PARENT_EXTERNAL_ONLY, PARENT_HAS_EXTERNAL, PEAK_EXTERNAL,
                                 PEAK_RESIDUAL,
                                 detect, psf_fwhm, read_peaks_table)
from scarletstore.errors import InputError
from scarletstore.schema import validate

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
HSC = DATA / "hsc_cosmos_35.npz"
PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
          "DETECTED_NEGATIVE": 6, "SUSPECT": 7, "NO_DATA": 8}
SIGMA = 1.6  # PSF sigma (pixels) of the synthetic fields


def _exposure(image, variance, mask, psf, bands, wcs=""):
    return xr.Dataset(
        {"image": (("band", "y", "x"), np.asarray(image, np.float32)),
         "variance": (("band", "y", "x"), np.asarray(variance, np.float32)),
         "mask": (("band", "y", "x"), np.asarray(mask, np.int32)),
         "psf": (("band", "psf_y", "psf_x"), np.asarray(psf, np.float32))},
        coords={"band": list(bands)},
        attrs={"wcs": wcs, "origin_y": 0, "origin_x": 0, "mask_planes": json.dumps(PLANES),
               "bad_mask_planes": json.dumps(["BAD", "SAT", "SUSPECT", "NO_DATA", "EDGE"]),
               "sources": "[]", "schema": "exposure", "schema_version": 1})


def _gauss(shape, y, x, sigma=SIGMA):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    g = np.exp(-0.5 * ((yy - y) ** 2 + (xx - x) ** 2) / sigma ** 2)
    return g / (2 * np.pi * sigma ** 2)


def _field(sources, shape=(80, 90), bands=("g", "r", "i"), seed=0, noise=1.0):
    """Point sources [(y, x, [flux per band])] on Gaussian noise."""
    rng = np.random.default_rng(seed)
    nb = len(bands)
    img = rng.normal(0, noise, (nb,) + shape)
    for y, x, fluxes in sources:
        g = _gauss(shape, y, x)
        for b in range(nb):
            img[b] += fluxes[b] * g
    psf = _gauss((15, 15), 7, 7)
    psf /= psf.sum()
    return _exposure(img, np.full((nb,) + shape, noise ** 2), np.zeros((nb,) + shape),
                     np.stack([psf] * nb), bands)


def _peaks_of_parent(ds, pid):
    sel = ds["peak_parent"].values == pid
    return {k: ds[k].values[sel] for k in ("peak_y", "peak_x", "peak_bands", "peak_flags")}


def _check_layout(ds):
    """Structural invariants of a parents Dataset."""
    validate(ds)
    n = ds.sizes["parent"]
    assert ds["parent_id"].values.tolist() == list(range(1, n + 1))
    assert ds["span_count"].sum() == ds.sizes["span"]
    assert ds["peak_count"].sum() == ds.sizes["peak"]
    assert ds["span_count"].attrs["sample_dimension"] == "span"
    assert ds["peak_count"].attrs["sample_dimension"] == "peak"
    assert ds["peak_id"].values.tolist() == list(range(1, ds.sizes["peak"] + 1))
    soff = fp.counts_to_offsets(ds["span_count"].values)
    poff = fp.counts_to_offsets(ds["peak_count"].values)
    shape = ds["background"].shape[1:]
    claimed = np.zeros(shape, int)
    for i in range(n):
        s, p = slice(soff[i], soff[i + 1]), slice(poff[i], poff[i + 1])
        sy, s0, s1 = ds["span_y"].values[s], ds["span_x0"].values[s], ds["span_x1"].values[s]
        key = sy.astype(np.int64) * 100000 + s0
        assert np.all(np.diff(key) > 0)
        bbox = (int(ds["bbox_y0"][i]), int(ds["bbox_x0"][i]), int(ds["bbox_height"][i]),
                int(ds["bbox_width"][i]))
        assert fp.spans_bbox(sy, s0, s1) == bbox
        assert fp.spans_area(sy, s0, s1) == int(ds["area"][i])
        m = fp.spans_to_mask(sy, s0, s1, bbox)
        claimed[bbox[0]:bbox[0] + bbox[2], bbox[1]:bbox[1] + bbox[3]] += m
        assert np.all(ds["peak_parent"].values[p] == i + 1)
        sig = ds["peak_significance"].values[p]
        assert np.all(np.diff(sig) <= 0)
        iy, ix = ds["peak_iy"].values[p], ds["peak_ix"].values[p]
        assert m[iy - bbox[0], ix - bbox[1]].all(), "a peak lies outside its parent"
    assert claimed.max() <= 1, "parents overlap"


def test_single_source_all_bands_one_peak():
    ds = detect(_field([(40.3, 44.6, [300, 400, 500])]))
    _check_layout(ds)
    assert ds.sizes["parent"] == 1 and ds.sizes["peak"] == 1
    assert abs(ds["peak_y"][0] - 40.3) < 0.3 and abs(ds["peak_x"][0] - 44.6) < 0.3
    # every band and the chi^2 image saw it, and the peaks were merged into one
    assert ds["peak_bands"][0] == 0b111 | (1 << CHI2_BIT)
    assert ds["peak_flags"][0] == 0
    assert ds["background"].shape == (3, 80, 90)
    assert json.loads(ds.attrs["detection_bands"]) == ["g", "r", "i"]


def test_association_merges_overlapping_footprints_and_keeps_band_flags():
    # A g-only and an i-only source 7 px apart: their per-band footprints
    # overlap after growth -> one parent with two peaks, each flagged with the
    # band that saw it (and the chi^2 image, which sees both).
    ds = detect(_field([(40, 40, [400, 0, 0]), (40, 47, [0, 0, 400])], seed=1))
    _check_layout(ds)
    assert ds.sizes["parent"] == 1
    pk = _peaks_of_parent(ds, 1)
    assert len(pk["peak_y"]) == 2
    for y, x, bits in zip(pk["peak_y"], pk["peak_x"], pk["peak_bands"]):
        band = 0 if x < 43.5 else 2
        assert abs(y - 40) < 1 and abs(x - (40 if band == 0 else 47)) < 1
        assert bits & (1 << band)
        assert not bits & (1 << (2 - band)), "a band that cannot see the source is flagged"
        assert not bits & 0b010


def test_separate_sources_are_separate_parents():
    ds = detect(_field([(20, 20, [300] * 3), (60, 70, [300] * 3)], seed=2))
    _check_layout(ds)
    assert ds.sizes["parent"] == 2 and ds.sizes["peak"] == 2


def test_close_pair_split_into_two_peaks():
    # 1.6 FWHM apart, 3:1 flux ratio: one parent, two peaks.
    fwhm = 2.3548 * SIGMA
    ds = detect(_field([(40, 40, [900] * 3), (40, 40 + 1.6 * fwhm, [300] * 3)], seed=3))
    _check_layout(ds)
    assert ds.sizes["parent"] == 1
    assert ds.sizes["peak"] == 2


def test_bands_subset_and_bits_index_full_band_list():
    ds = detect(_field([(40, 40, [300, 300, 300])], seed=4), bands=["i"])
    assert json.loads(ds.attrs["detection_bands"]) == ["i"]
    assert ds["peak_bands"][0] == (1 << 2) | (1 << CHI2_BIT)


def test_bad_pixels_are_ignored():
    exp = _field([(40, 40, [300] * 3)], seed=5)
    img = exp["image"].values
    img[:, 10:14, 60:64] = 1e6  # a hot patch ...
    exp["mask"].values[:, 10:14, 60:64] = 1 << PLANES["SAT"]  # ... flagged SAT
    exp["mask"].values[:, 30:50, 0:20] |= 1 << PLANES["DETECTED"]  # informational only
    ds = detect(exp)
    assert ds.sizes["peak"] == 1


def test_external_peaks_flagged():
    exp = _field([(40, 40, [300] * 3)], seed=6)
    # one inside the parent, one on the detected source, one in empty sky
    ds = detect(exp, known=(np.array([41.0, 40.1, 10.0]), np.array([45.5, 39.8, 80.0])))
    _check_layout(ds)
    ext = (ds["peak_flags"].values & PEAK_EXTERNAL) != 0
    assert ext.sum() == 3 and ds.sizes["peak"] == 3
    on_src = np.argmin(np.hypot(ds["peak_y"].values - 40.1, ds["peak_x"].values - 39.8))
    assert ds["peak_bands"][on_src] != 0  # merged with the detection
    assert ds["peak_y"][on_src] == pytest.approx(40.1)  # at the known position
    inside = np.argmin(np.hypot(ds["peak_y"].values - 41.0, ds["peak_x"].values - 45.5))
    assert ds["peak_bands"][inside] == 0
    assert ds["peak_parent"][inside] == ds["peak_parent"][on_src]
    sky = np.argmin(np.hypot(ds["peak_y"].values - 10.0, ds["peak_x"].values - 80.0))
    assert ds["peak_bands"][sky] == 0
    assert ds["peak_parent"][sky] != ds["peak_parent"][on_src]
    pflags = ds["parent_flags"].values
    assert pflags[ds["peak_parent"][sky] - 1] & PARENT_EXTERNAL_ONLY
    assert pflags[ds["peak_parent"][on_src] - 1] & PARENT_HAS_EXTERNAL
    assert not pflags[ds["peak_parent"][on_src] - 1] & PARENT_EXTERNAL_ONLY


def test_exposure_known_positions_are_external():
    exp = _field([(40, 40, [300] * 3)], seed=7)
    exp["known_y"] = ("known", np.array([15.0]))
    exp["known_x"] = ("known", np.array([15.0]))
    ds = detect(exp)
    assert ds.sizes["parent"] == 2
    assert ((ds["peak_flags"].values & PEAK_EXTERNAL) != 0).sum() == 1


def test_pure_noise_gives_nothing():
    ds = detect(_field([], shape=(120, 120), seed=8))
    _check_layout(ds)
    assert ds.sizes["parent"] == 0 and ds.sizes["peak"] == 0 and ds.sizes["span"] == 0


@pytest.mark.parametrize("thr", [0, -1, float("nan")])
def test_non_positive_threshold_rejected(thr):
    with pytest.raises(InputError, match="threshold"):
        detect(_field([]), threshold=thr)


def test_unknown_band_rejected():
    with pytest.raises(InputError, match="unknown band"):
        detect(_field([]), bands=["q"])


def test_psf_fwhm_of_gaussian():
    for s in (1.0, 1.6, 2.5):
        psf = _gauss((31, 31), 15, 15, s)
        assert psf_fwhm(psf) == pytest.approx(2.3548 * s, rel=0.03)


# ---------------------------------------------------------------- peaks tables
def _tan_header():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [50.5, 40.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    return w, w.to_header().tostring()


def test_read_peaks_table_csv_xy(tmp_path):
    p = tmp_path / "stars.csv"
    p.write_text("id,X,Y\n1,10.5,20.25\n2,3,4\n")
    y, x = read_peaks_table(p, "")
    np.testing.assert_allclose(y, [20.25, 4])
    np.testing.assert_allclose(x, [10.5, 3])


def test_read_peaks_table_fits_radec(tmp_path):
    from astropy.table import Table

    w, hdr = _tan_header()
    ra, dec = w.all_pix2world([10.0, 60.0], [20.0, 5.0], 0)
    Table({"ra": ra, "dec": dec}).write(tmp_path / "k.fits")
    y, x = read_peaks_table(tmp_path / "k.fits", hdr)
    np.testing.assert_allclose(x, [10, 60], atol=1e-6)
    np.testing.assert_allclose(y, [20, 5], atol=1e-6)


@pytest.mark.parametrize("content, name, msg", [
    (b"\x00\x01garbage\xff", "bad.fits", "not a readable FITS"),
    (b"a,b\n1,2\n", "cols.csv", "needs columns"),
    (b"x,y\n1,zz\n", "nonnum.csv", "numeric"),
    (b"ra,dec\n150.1,2.2\n", "nowcs.csv", "no WCS"),
])
def test_read_peaks_table_errors_name_the_file(tmp_path, content, name, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=msg) as err:
        read_peaks_table(p, "")
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_read_peaks_table_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such"):
        read_peaks_table(tmp_path / "nope.csv", "")


# ---------------------------------------------------------------- real and simulated data
@pytest.mark.skipif(not HSC.is_file(), reason=f"{HSC} not available (needs ../shared/data)")
def test_hsc_catalog_peaks_found():
    d = np.load(HSC)
    exp = _exposure(d["images"], d["variance"], d["mask"], d["psfs"], [str(b) for b in d["filters"]])
    ds = detect(exp)
    _check_layout(ds)
    for row in d["catalog"]:
        dist = np.hypot(ds["peak_y"].values - row["y"], ds["peak_x"].values - row["x"])
        assert dist.min() < 1.5
    # extra peaks exist (real galaxies have structure) but not absurdly many
    assert ds.sizes["peak"] <= 25


def test_recall_and_purity_on_simulated_field(tmp_path):
    pytest.importorskip("galsim")
    from astropy.io import fits

    from scarletstore.simulate import load_truth, simulate_field

    simulate_field(tmp_path, size=240, seed=11, bands="gri", density=90.0)
    table, stamps = load_truth(tmp_path)
    imgs, vars_, masks, psfs = [], [], [], []
    for b in "gri":
        with fits.open(tmp_path / f"{b}.fits") as h:
            imgs.append(h["IMAGE"].data)
            vars_.append(h["VARIANCE"].data)
            masks.append(h["MASK"].data)
            psfs.append(h["PSF"].data / h["PSF"].data.sum())
    exp = _exposure(np.stack(imgs), np.stack(vars_), np.stack(masks), np.stack(psfs), list("gri"))
    ds = detect(exp)
    _check_layout(ds)
    # optimal i-band SNR of each true source from its noise-free stamp
    var = vars_[2]
    snr = np.zeros(len(table))
    for k, sid in enumerate(table["id"]):
        (y0, x0, h, w), st = stamps[int(sid)]
        a0, b0, a1, b1 = max(y0, 0), max(x0, 0), min(y0 + h, 240), min(x0 + w, 240)
        m = st[2, a0 - y0:a1 - y0, b0 - x0:b1 - x0].astype(float)
        snr[k] = np.sqrt(np.sum(m * m / var[a0:a1, b0:b1]))
    ty, tx = np.asarray(table["y"], float), np.asarray(table["x"], float)
    mt, mp = match_positions(ty, tx, ds["peak_y"].values, ds["peak_x"].values, 2.0)
    bright = snr > 10
    assert bright.sum() >= 20  # enough sources for the fractions to mean something
    recall = (mt[bright] >= 0).mean()
    spurious = (mp < 0).mean()
    # Random peaks cannot pass both: recall needs peaks within 2 px of the
    # sources, purity forbids peaks elsewhere.
    assert recall >= 0.85, recall
    assert spurious <= 0.06, spurious
    assert ds.sizes["peak"] <= 1.2 * len(table)


def test_faint_companion_on_bright_slope_found_in_symmetric_residual():
    # 1/40 of a bright star's flux, 1.5 FWHM away: no local maximum of its
    # own, but the symmetric residual of the star reveals it.
    fwhm = 2.3548 * SIGMA
    exp = _field([(40, 40, [20000] * 3), (40, 40 + 1.5 * fwhm, [500] * 3)], seed=3)
    without = detect(exp, residual_peaks=False)
    assert without.sizes["peak"] == 1
    ds = detect(exp)
    _check_layout(ds)
    assert ds.sizes["peak"] == 2
    k = np.argmin(np.hypot(ds["peak_y"].values - 40, ds["peak_x"].values - 40 - 1.5 * fwhm))
    assert np.hypot(ds["peak_y"][k] - 40, ds["peak_x"][k] - 40 - 1.5 * fwhm) < 1.0
    assert ds["peak_flags"][k] & PEAK_RESIDUAL
