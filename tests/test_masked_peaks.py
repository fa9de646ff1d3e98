"""Sources whose peak pixel has no data in any band are flagged ``masked_peak``.

Their flux is extrapolated from the model, not measured: on hsc_cosmos,
detection puts three peaks 7-8.5 px inside the NO_DATA border and the fit gave
them up to 30 counts in r and 87 in i, brighter than most real sources there,
with nothing in the run to tell them apart.
"""

from pathlib import Path

import numpy as np
import pytest

from scarletstore.deblend import DeblendConfig
from scarletstore.deblend.run import deblend_exposure
from scarletstore.detect.detect import detect
from scarletstore.ingest.exposure import bad_pixels, make_exposure, read_npz
from scarletstore.store.runs import SOURCE_FLAGS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NO_DATA = 1 << 8  # the LSST plane make_exposure defines by default


def _gauss(shape, cy, cx, s):
    y, x = np.indices(shape)
    g = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return g / g.sum()


def _peak_has_no_data(exposure, run):
    bad = bad_pixels(exposure).all(axis=0)
    iy = np.clip(np.round(run["source_y"].values).astype(int), 0, bad.shape[0] - 1)
    ix = np.clip(np.round(run["source_x"].values).astype(int), 0, bad.shape[1] - 1)
    return bad[iy, ix]


@pytest.fixture(scope="module")
def edge_exposure():
    """Two galaxies, one beside a NO_DATA border; a catalogue position inside the border."""
    rng = np.random.default_rng(4)
    shape = (3, 64, 64)
    psf = _gauss((21, 21), 10, 10, 1.3)
    model = np.zeros(shape)
    for (cy, cx, s), sed in (((30, 15, 2.5), (200, 300, 400)), ((34, 40, 2.0), (300, 300, 250))):
        model += np.array(sed)[:, None, None] * _gauss(shape[1:], cy, cx, np.hypot(s, 1.3))
    image = model + rng.standard_normal(shape)
    mask = np.zeros(shape, np.int32)
    mask[:, :, :9] = NO_DATA
    image[mask != 0] = 0.0
    return make_exposure(image, np.ones(shape), mask, [psf] * 3, ["g", "r", "i"],
                         known=(np.array([30.0]), np.array([5.0])))


@pytest.mark.parametrize("method", ["scarlet", "sdss"])
def test_source_on_no_data_is_flagged(edge_exposure, method):
    parents = detect(edge_exposure)
    run = deblend_exposure(edge_exposure, parents, DeblendConfig(), method)
    flagged = (run["source_flags"].values & SOURCE_FLAGS["masked_peak"]) != 0
    on_bad = _peak_has_no_data(edge_exposure, run)
    assert on_bad.sum() >= 1  # the catalogue position in the border is kept
    np.testing.assert_array_equal(flagged, on_bad)


def test_hsc_cosmos_peaks_in_its_no_data_border_are_flagged():
    path = DATA / "hsc_cosmos.npz"
    if not path.is_file():
        pytest.skip("../shared/data/hsc_cosmos.npz not found")
    exposure = read_npz(path)
    run = deblend_exposure(exposure, detect(exposure), DeblendConfig())
    flagged = (run["source_flags"].values & SOURCE_FLAGS["masked_peak"]) != 0
    on_bad = _peak_has_no_data(exposure, run)
    # (3 of 13 peaks when this was written; a detection that stops putting peaks
    # there leaves none to flag)
    assert on_bad.sum() < on_bad.size
    np.testing.assert_array_equal(flagged, on_bad)
