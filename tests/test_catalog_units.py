"""Units from the input to the written catalogs.

Ingest labelled every image "counts" whatever the FITS ``BUNIT`` said (the
simulator writes nJy).
"""

import numpy as np
import pytest
from conftest import gaussian_psf, write_band_fits

from scarletstore.errors import InputError
from scarletstore.ingest.exposure import read_fits_bands


def _band(path, band, bunit=None):
    rng = np.random.default_rng(len(band))
    img = rng.normal(0, 1, (20, 24)).astype(np.float32)
    header = {} if bunit is None else {"BUNIT": bunit}
    return write_band_fits(path, band, img, np.ones_like(img), np.zeros(img.shape, np.int32),
                           gaussian_psf(), wcs_header=header)


def test_ingest_takes_bunit(tmp_path):
    ex = read_fits_bands([_band(tmp_path / "g.fits", "g", " nJy"), _band(tmp_path / "r.fits", "r", "nJy")],
                         mask_defects=False)
    assert ex["image"].attrs["units"] == "nJy" and ex["variance"].attrs["units"] == "nJy^2"
    ex = read_fits_bands([_band(tmp_path / "g0.fits", "g")], mask_defects=False)  # no BUNIT
    assert ex["image"].attrs["units"] == "counts" and ex["variance"].attrs["units"] == "counts^2"
    ex = read_fits_bands([_band(tmp_path / "g1.fits", "g", "nJy / pix")], mask_defects=False)
    assert ex["variance"].attrs["units"] == "(nJy / pix)^2"
    with pytest.raises(InputError, match="same units"):
        read_fits_bands([tmp_path / "g.fits", _band(tmp_path / "r2.fits", "r", "adu")], mask_defects=False)
