"""Pixels sharper than the PSF allows (unflagged hot columns and cosmic rays) are set in
the CR plane when an exposure is made, so detection never builds a parent on them;
fields without defects, simulated by another generator or real, get none
(ingest/defects.py)."""

import json

import numpy as np
import pytest
from conftest import shared_file
from test_recorded_checksum import _field

from scarletstore.cli import main
from scarletstore.deblend.sharp import psf_neighbour_ratios, sharp_pixel
from scarletstore.detect.detect import detect
from scarletstore.ingest.defects import defect_plane, sharp_pixels
from scarletstore.ingest.exposure import LSST_MASK_PLANES, make_exposure, read_npz

CR = 1 << LSST_MASK_PLANES["CR"]
COLUMN = (slice(20, 90), 64)  # band r, a hot column segment in no mask plane
RAYS = [(8, 20), (100, 110), (50, 30)]  # band i, unflagged cosmic rays


def _arrays(ex):
    return [ex[k].values.copy() for k in ("image", "variance", "mask")] + [list(ex["psf"].values)]


def _remake(ex, image, **kw):
    _, var, mask, psfs = _arrays(ex)
    return make_exposure(image, var, mask, psfs, list(ex.band.values), **kw)


def _defective(seed=11):
    """The Moffat field of test_recorded_checksum with a hot column and cosmic rays added."""
    clean = _field(seed, ny=110, nx=130)
    image = clean["image"].values.copy()
    image[1][COLUMN] += 3000.0
    for y, x in RAYS:
        image[2, y, x] += 2000.0
    return clean, image


def _defect_pixels(shape):
    where = np.zeros(shape, bool)
    where[1][COLUMN] = True
    for y, x in RAYS:
        where[2, y, x] = True
    return where


def test_unflagged_column_and_rays_are_masked_cr():
    clean, image = _defective()
    ex = _remake(clean, image)
    marked = (ex["mask"].values & CR) != 0
    assert np.array_equal(marked, _defect_pixels(image.shape))
    assert json.loads(ex.attrs["defect_pixels"]) == {"g": 0, "r": 70, "i": len(RAYS), "z": 0}
    # the other planes are kept
    assert np.array_equal(ex["mask"].values & ~CR, clean["mask"].values)


def test_detection_is_as_if_the_defects_had_been_flagged():
    """Masked at ingest, the defects detect exactly as when the input flags them: no
    parent on the rays, and the column glues nothing (a masked column through a source
    leaves a peak beside it either way: detection's, not the finder's)."""
    clean, image = _defective()
    _, var, mask, psfs = _arrays(clean)
    flagged = make_exposure(clean["image"].values, var, mask | np.where(_defect_pixels(mask.shape), CR, 0),
                            psfs, list(clean.band.values))
    masked, unmasked = detect(_remake(clean, image)), detect(_remake(clean, image, mask_defects=False))
    reference = detect(flagged)

    def peaks(det):
        return np.stack([det["peak_y"].values, det["peak_x"].values], 1)

    def on_rays(p):
        return sum(int((np.hypot(p[:, 0] - y, p[:, 1] - x) < 1.5).sum()) for y, x in RAYS)

    assert unmasked.sizes["peak"] > reference.sizes["peak"]  # unmasked, the defects are peaks
    assert on_rays(peaks(unmasked)) == len(RAYS) and on_rays(peaks(masked)) == 0
    assert np.allclose(peaks(masked), peaks(reference), atol=1e-3)
    assert np.array_equal(masked["peak_count"].values, reference["peak_count"].values)


def test_whole_image_finder_is_the_peak_criterion():
    """Every pixel: the numba pass agrees with deblend/sharp.py's per-pixel check."""
    clean, image = _defective()
    _, var, mask, psfs = _arrays(clean)
    bad = (mask & 1) != 0  # BAD, the plane _field uses
    found = sharp_pixels(image, var, mask, 1, np.array(psfs))
    ratios = psf_neighbour_ratios(np.array(psfs, np.float64))
    loop = np.zeros_like(found)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            for b in range(image.shape[0]):
                one = slice(b, b + 1)
                loop[b, y, x] = sharp_pixel(image[one], var[one], bad[one], y, x, ratios[one])
    assert np.array_equal(found, loop)
    # masking what was found finds nothing more: a bad neighbour is only never compared
    again = sharp_pixels(image, var, np.where(found, mask | CR, mask), 1 | CR, np.array(psfs))
    assert not (again & ~found).any()


@pytest.mark.parametrize("seed", [3, 5, 11])
def test_fields_without_defects_get_none(seed):
    ex = _field(seed)
    assert set(json.loads(ex.attrs["defect_pixels"]).values()) == {0}
    assert not (ex["mask"].values & CR).any()


def test_off_leaves_the_mask_and_records_null():
    clean, image = _defective()
    ex = _remake(clean, image, mask_defects=False)
    assert ex.attrs["defect_pixels"] == "null"
    assert np.array_equal(ex["mask"].values, clean["mask"].values)


def test_cr_plane_added_when_the_planes_lack_it():
    planes, bit = defect_plane({"BAD": 0, "SAT": 1, "CR_OTHER": 3})
    assert planes["CR"] == 2 and bit == 4
    clean, image = _defective()
    ex = _remake(clean, image, mask_planes={"BAD": 0, "SAT": 1})
    assert json.loads(ex.attrs["mask_planes"])["CR"] == 2
    assert ((ex["mask"].values & 4) != 0).sum() == 70 + len(RAYS)


def test_ingest_masks_an_npz_and_reports_it(tmp_path, capsys):
    clean, image = _defective()
    _, var, mask, psfs = _arrays(clean)
    path = tmp_path / "f.npz"
    np.savez(path, images=image, variance=var, mask=mask, psfs=np.array(psfs),
             filters=np.array(list(clean.band.values)))
    assert json.loads(read_npz(path).attrs["defect_pixels"])["r"] == 70
    assert read_npz(path, mask_defects=False).attrs["defect_pixels"] == "null"
    assert main(["ingest", str(tmp_path / "s.h5"), str(path)]) == 0
    assert "73 pixels sharper than the PSF masked CR (g 0, r 70, i 3, z 0)" in capsys.readouterr().out
    assert main(["ingest", str(tmp_path / "t.h5"), str(path), "--no-defect-mask"]) == 0
    assert "defect masking off" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["hsc_cosmos", "hsc_cosmos_35", "cut_hsc", "cut_hsc1"])
def test_real_hsc_cutouts_get_none(name):
    ex = read_npz(shared_file(f"{name}.npz"))
    assert set(json.loads(ex.attrs["defect_pixels"]).values()) == {0}


@pytest.mark.parametrize("sky", [1000.0, -50.0])
def test_a_sky_left_in_the_image_changes_nothing(sky):
    """A sky left in (+1000 hid every cosmic ray: none is significant against its
    neighbours' sky; -50 made star cores 'sharper' than the PSF) is taken off
    before the test, so the same pixels are marked."""
    clean, image = _defective()
    ex = _remake(clean, image + np.float32(sky))
    marked = (ex["mask"].values & CR) != 0
    assert np.array_equal(marked, _defect_pixels(image.shape))


@pytest.mark.parametrize("seed", [3, 5, 11])
def test_a_sky_subtracted_field_keeps_its_sky(seed):
    """Faint source light lifts a sky-subtracted field's median by about 0.1 pixel
    sigma; that is not a sky left in, and nothing is taken off."""
    from scarletstore.ingest.defects import sky_left_in, sky_level
    ex = _field(seed)
    for b in range(ex.sizes["band"]):
        args = ex["image"].values[b], ex["variance"].values[b], np.zeros(ex["image"].shape[1:], bool)
        level, sigma = sky_level(*args)
        assert 0.0 < level < 0.2 * sigma and sky_left_in(*args) == 0.0
