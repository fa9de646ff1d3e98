"""Detection next to pixels without data (NO_DATA / EDGE): nothing is extrapolated into them.

The rule tested (docs/design.md, "Detection on flagged fields and bright wings"): a pixel
flagged NO_DATA or EDGE is treated as if it were off the image. No detection seeds, grows
or peaks there, and a footprint never covers a pixel without data in every band (only the
disk given to a known position there does). Other bad pixels (SAT, CR, BAD) are holes in
data that surround them: a footprint may bridge them and a saturated core keeps its peak.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from scarletstore.detect.detect import detect
from scarletstore.detect.peaks import PEAK_EXTERNAL
from scarletstore.ingest.exposure import read_npz
from scarletstore.ingest.masks import LSST_MASK_PLANES

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
NO_DATA = 1 << LSST_MASK_PLANES["NO_DATA"]


def _moffat(shape, y, x, fwhm=3.8, beta=2.5):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    m = (1 + ((yy - y) ** 2 + (xx - x) ** 2) / alpha ** 2) ** -beta
    return m / m.sum()


def _footprint_mask(ds, shape):
    fpm = np.zeros(shape, bool)
    for y, x0, x1 in zip(ds["span_y"].values, ds["span_x0"].values, ds["span_x1"].values):
        fpm[y, x0:x1 + 1] = True
    return fpm


def _no_data_violations(ds, no_data):
    """(detected peaks on pixels without data in every band, footprint pixels there)."""
    iy, ix = ds["peak_iy"].values, ds["peak_ix"].values
    detected = (ds["peak_flags"].values & PEAK_EXTERNAL) == 0
    on = no_data[iy, ix] & detected
    return np.c_[ds["peak_y"].values[on], ds["peak_x"].values[on]], int((_footprint_mask(
        ds, no_data.shape) & no_data).sum())


def _bordered_field(seed):
    """Bright Moffat stars 2-4 px from a 30 px NO_DATA border and a 26 x 26 NO_DATA hole
    (7 PSF FWHM), three bands, image 0 where there are no data (as a coadd writes it)."""
    rng = np.random.default_rng(seed)
    shape = (110, 130)
    no_data = np.zeros(shape, bool)
    no_data[:, :30] = True
    no_data[40:66, 70:96] = True
    stars = [(20 + rng.uniform(-3, 3), 33 + rng.uniform(0, 1)),   # beside the border
             (75 + rng.uniform(-3, 3), 32.5 + rng.uniform(0, 1)),
             (53 + rng.uniform(-2, 2), 67 + rng.uniform(0, 1)),   # beside the hole
             (37 + rng.uniform(0, 1), 83 + rng.uniform(-2, 2)),
             (69 + rng.uniform(0, 1), 80 + rng.uniform(-2, 2))]
    img = rng.normal(0, 1, (3,) + shape)
    for y, x in stars:
        flux = 10 ** rng.uniform(3.5, 4.5)
        for b, colour in enumerate((0.6, 1.0, 1.3)):
            img[b] += flux * colour * _moffat(shape, y, x)
    img[:, no_data] = 0.0
    mask = np.where(no_data, NO_DATA, 0)[None].repeat(3, axis=0)
    psf = _moffat((31, 31), 15, 15)
    exp = xr.Dataset(
        {"image": (("band", "y", "x"), img.astype(np.float32)),
         "variance": (("band", "y", "x"), np.ones(img.shape, np.float32)),
         "mask": (("band", "y", "x"), mask.astype(np.int32)),
         "psf": (("band", "psf_y", "psf_x"), np.stack([psf] * 3).astype(np.float32))},
        coords={"band": ["g", "r", "i"]},
        attrs={"wcs": "", "origin_y": 0, "origin_x": 0, "mask_planes": json.dumps(LSST_MASK_PLANES),
               "sources": "[]", "schema": "exposure", "schema_version": 1})
    return exp, no_data, stars


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_no_peak_or_footprint_in_a_wide_no_data_border_or_hole(seed):
    exp, no_data, stars = _bordered_field(seed)
    ds = detect(exp)
    peaks_there, fp_there = _no_data_violations(ds, no_data)
    assert peaks_there.size == 0, peaks_there
    assert fp_there == 0
    # no companion from a mirror that lands where there are no data (one per star, before;
    # 16-23 of 21-28 peaks were on the no-data pixels themselves)
    assert ds.sizes["peak"] == len(stars), np.c_[ds["peak_y"].values, ds["peak_x"].values]
    # every star beside the missing data is still found, once
    for y, x in stars:
        d = np.hypot(ds["peak_y"].values - y, ds["peak_x"].values - x)
        assert (d < 1.5).sum() == 1, (y, x, np.c_[ds["peak_y"].values, ds["peak_x"].values][d < 6])


def test_hsc_cosmos_no_peak_or_footprint_in_its_no_data_border():
    path = DATA / "hsc_cosmos.npz"
    if not path.is_file():
        pytest.skip("../shared/data/hsc_cosmos.npz not found")
    exp = read_npz(path)
    no_data = ((exp["mask"].values & NO_DATA) != 0).all(axis=0)
    assert no_data.mean() > 0.3  # a third of the cut-out has no data
    ds = detect(exp)
    peaks_there, fp_there = _no_data_violations(ds, no_data)
    assert peaks_there.size == 0, peaks_there  # 3 of 13 peaks there, 7-8.5 px deep, before
    assert fp_there == 0  # 654 footprint pixels there, up to 13.5 px deep, before
    with np.load(path) as d:
        cat = d["catalog"]
    for y, x in zip(cat["y"], cat["x"]):  # the catalogue's sources are all still found
        assert np.hypot(ds["peak_y"].values - y, ds["peak_x"].values - x).min() < 1.5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_band_without_data_adds_nothing_there(seed):
    # The i band (the brightest) has no data on the 30 px border and in the hole; g and r
    # see pure noise there (and the stars beside them). A band is absent where it has no
    # data: its extrapolation put 11-13 of 16-18 peaks there before.
    exp, no_data, stars = _bordered_field(seed)
    rng = np.random.default_rng(100 + seed)
    for b in (0, 1):
        exp["mask"].values[b][no_data] = 0
        exp["image"].values[b][no_data] = rng.normal(0, 1, int(no_data.sum()))
    ds = detect(exp)
    on = no_data[ds["peak_iy"].values, ds["peak_ix"].values]
    assert not on.any(), np.c_[ds["peak_y"].values, ds["peak_x"].values][on]
    for y, x in stars:
        assert np.hypot(ds["peak_y"].values - y, ds["peak_x"].values - x).min() < 1.5
