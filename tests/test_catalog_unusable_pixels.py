"""Non-finite pixels in the band catalogs: unusable exactly like bad-plane pixels.

A NaN image (or variance) pixel under NO_DATA used to reach the redistributed
footprints (a zero share times NaN is NaN) and the photometry suite, so a
child's ``flux_redistributed``, PSF, aperture, Kron and GAaP fluxes were NaN
with no flag. The parent's flux in redistribute mode was the model's, not
the image over the footprint its children share.
"""

import numpy as np
import pytest
from scipy.special import erf

from scarletstore.deblend.psf import difference_kernels, gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.catalog import CATALOG_FLAGS, band_catalog
from scarletstore.measure.parents import parent_catalog
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.store import Store

H, W = 70, 90
BANDS = ["g", "r"]
NO_DATA = 1 << 8  # LSST_MASK_PLANES["NO_DATA"], a default bad plane
NOISE = 0.05
# blend 0 (box y 5..54, x 5..62): two galaxies, the first under the hole; blend 1: a star, untouched
BLENDS = [((5, 5, 50, 58), [(12, 10, 3.0, (40.0, 60.0)), (20, 32, 2.5, (25.0, 30.0))]),
          ((36, 63, 29, 27), [(40, 66, 1.0, (15.0, 20.0))])]
HOLE = (slice(26, 32), slice(14, 30))  # rows, columns of exposure pixels with no data


def _blob(size, s):
    edges = 0.5 * np.diff(erf((np.arange(size + 1) - 0.5 - size // 2) / (np.sqrt(2) * s)))
    m = np.outer(edges, edges)
    return (m / m.max()).astype(np.float32)


def _records():
    records = []
    for i, (bbox, comps) in enumerate(BLENDS):
        sources = []
        for j, (cy, cx, s, spec) in enumerate(comps):
            morph = _blob(21, s)
            sources.append(SourceResult(j, [Component(np.array(spec, np.float32), morph, cy - bbox[0],
                                                      cx - bbox[1], (cy + 10 - bbox[0], cx + 10 - bbox[1]))]))
        peaks = np.array([[cy + 10, cx + 10] for cy, cx, _, _ in comps], float)
        records.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.arange(len(comps)) + 10 * i,
                                   peaks=peaks, sources=sources, iterations=5, log_likelihood=-1.0,
                                   chi2=1.0, converged=True))
    return records


def _store(path, hole_image, hole_variance=None, units="counts"):
    """A two-band store whose HOLE carries NO_DATA and the given image (and variance) value,
    pixel values in ``units``."""
    psfs = [gaussian_psf(s, 25) for s in (1.4, 1.9)]
    model_psf = gaussian_psf(0.8)
    rng = np.random.default_rng(4)
    image = rng.normal(0, NOISE, (2, H, W)).astype(np.float32)
    for bbox, comps in BLENDS:  # the sources (unconvolved: the models' exact shape is not the point)
        for cy, cx, s, spec in comps:
            for b in range(2):
                image[b, cy:cy + 21, cx:cx + 21] += spec[b] * _blob(21, s)
    variance = np.full((2, H, W), NOISE ** 2, np.float32)
    mask = np.zeros((2, H, W), np.int32)
    mask[:, HOLE[0], HOLE[1]] = NO_DATA
    if hole_image is not None:
        image[:, HOLE[0], HOLE[1]] = hole_image
    if hole_variance is not None:
        variance[:, HOLE[0], HOLE[1]] = hole_variance
    ex = make_exposure(image, variance, mask, psfs, BANDS, mask_defects=False, units=units)
    run = build_run(_records(), BANDS, ex["psf"].values, model_psf, name="m", method="scarlet",
                    config_json="{}", package_version="test")
    Store.create(path, {"exposure": ex, "runs/m": run})
    return Store(path), image


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nan")
    nan, image = _store(tmp / "nan.h5", np.nan)
    finite, _ = _store(tmp / "finite.h5", None)  # the same pixels, finite, under the same NO_DATA
    nan_var, _ = _store(tmp / "nanvar.h5", None, np.nan)
    return nan, finite, nan_var, image


def _good_sum(image, band, bbox):
    """The image of ``band`` over the blend box (its footprint: no parents group) outside the hole."""
    y0, x0, h, w = bbox
    good = np.ones((H, W), bool)
    good[HOLE] = False
    return float(image[band, y0:y0 + h, x0:x0 + w][good[y0:y0 + h, x0:x0 + w]].sum(dtype=np.float64))


@pytest.mark.parametrize("redistribute", [False, True])
def test_nan_pixels_measure_as_bad_plane_pixels(stores, redistribute):
    nan, finite, nan_var, image = stores
    a = band_catalog(nan, "r", redistribute=redistribute).compute()
    b = band_catalog(finite, "r", redistribute=redistribute).compute()
    c = band_catalog(nan_var, "r", redistribute=redistribute).compute()
    measured = ["flux_err", "chi2", "psf_flux", "aperture_flux_6", "aperture_flux_12", "kron_flux",
                "gaap_flux", "shape_xx", "data_coverage"] + (["flux_redistributed"] if redistribute else [])
    for name in measured:
        assert np.all(np.isfinite(a[name].values)), name
    for name in a.variables:
        # NaN or finite under NO_DATA: the same numbers, to the bit
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
        np.testing.assert_array_equal(c[name].values, b[name].values, err_msg=name)
    # the galaxies' templates (convolved, so both reach the hole; their pixels are those above
    # 1e-5 of their peaks) lost pixels to it, the star none
    np.testing.assert_allclose(a["data_coverage"].values, [0.8789, 0.9835, 1.0], atol=2e-4)
    # nothing failed: the hole is only missing data, which the 12 px aperture and the Kron
    # window of the first galaxy say (more than 10 % of their model light lies in it)
    masked = CATALOG_FLAGS["aperture_masked"] | CATALOG_FLAGS["kron_masked"]
    assert [int(f) for f in a["flags"].values] == [masked, 0, 0]
    if redistribute:
        # the children of blend 0 share the image over its good pixels
        red = a["flux_redistributed"].values
        assert red[0] + red[1] == pytest.approx(_good_sum(image, 1, BLENDS[0][0]), rel=1e-6)
        # the first galaxy keeps its light off the hole (its neighbour takes a little of it)
        cut = np.zeros((H, W))
        cut[12:33, 10:31] = 60.0 * _blob(21, 3.0)
        assert red[0] == pytest.approx(cut.sum() - cut[HOLE].sum(), rel=0.005)


def test_nan_pixels_in_a_reprocessed_image_without_mask_bits(stores):
    """An override image with NaN pixels and no mask bit: the NaN pixels are unusable on their own."""
    nan, finite, _, image = stores
    mask = np.zeros((H, W), np.int32)
    hole = image[1].copy()
    hole[HOLE] = np.nan
    override = {"image": hole, "variance": np.full((H, W), NOISE ** 2, np.float32), "mask": mask,
                "mask_planes": {"NO_DATA": 8}}
    a = band_catalog(finite, "r", redistribute=True, image_override=override).compute()
    b = band_catalog(finite, "r", redistribute=True).compute()  # the stored NO_DATA plane
    for name in ("flux_redistributed", "psf_flux", "aperture_flux_6", "aperture_flux_12", "kron_flux",
                 "gaap_flux", "data_coverage", "chi2", "flags"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_parent_flux_in_redistribute_mode_is_the_image(stores):
    nan, _, _, image = stores
    children = band_catalog(nan, "r", redistribute=True).compute()
    red = parent_catalog(nan, "r", redistribute=True).compute()
    model = parent_catalog(nan, "r").compute()
    for k, (bbox, _) in enumerate(BLENDS):
        mine = children["parent"].values == k + 1
        # what the children's re-apportioned pixels add up to
        assert red["flux"].values[k] == pytest.approx(children["flux_redistributed"].values[mine].sum(), rel=1e-6)
        assert red["flux"].values[k] == pytest.approx(_good_sum(image, 1, bbox), rel=1e-6)
        # model mode: the children's summed model (footprint = box, nothing cut off here)
        assert model["flux"].values[k] == pytest.approx(children["flux"].values[mine].sum(), rel=1e-4)
    # the hole cost blend 0's image part of its light, so the two modes differ there
    assert model["flux"].values[0] - red["flux"].values[0] > 40
