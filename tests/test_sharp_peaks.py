"""Children on defects nobody flagged (hot columns, hot pixels, cosmic rays left out of
the mask) carry ``sharp_peak``; children of real sources, however bright or compact,
never do (deblend/sharp.py)."""

import json

import numpy as np
import pytest
from conftest import shared_file
from test_recorded_checksum import _field

from scarletstore.cli import main
from scarletstore.deblend.run import deblend_exposure
from scarletstore.deblend.sharp import psf_neighbour_ratios, sharp_pixel
from scarletstore.detect.detect import detect
from scarletstore.ingest.exposure import read_npz
from scarletstore.measure.catalog import CATALOG_FLAGS, catalog_table
from scarletstore.store.runs import SOURCE_FLAGS
from scarletstore.store.store import Store

SHARP = SOURCE_FLAGS["sharp_peak"]
N = 25


def _profile(fwhm, kind, dy=0.0, dx=0.0, sub=5):
    """A pixel-integrated Gaussian or Moffat (beta 2.5) of unit sum, centred (dy, dx) off the middle."""
    y, x = np.mgrid[:N, :N] - N // 2
    out = np.zeros((N, N))
    for a in range(sub):
        for b in range(sub):
            r2 = (y + (a + 0.5) / sub - 0.5 - dy) ** 2 + (x + (b + 0.5) / sub - 0.5 - dx) ** 2
            if kind == "gauss":
                out += np.exp(-r2 / (2 * (fwhm / 2.3548) ** 2))
            else:
                alpha = fwhm / (2 * np.sqrt(2 ** (1 / 2.5) - 1))
                out += (1 + r2 / alpha ** 2) ** -2.5
    return out / out.sum()


@pytest.mark.parametrize("kind", ["gauss", "moffat"])
@pytest.mark.parametrize("fwhm", [1.2, 2.0, 3.5, 5.0])
def test_no_source_through_the_psf_is_sharp(kind, fwhm):
    rng = np.random.default_rng(int(fwhm * 10))
    ratios = psf_neighbour_ratios(_profile(fwhm, kind)[None])
    bad = np.zeros((1, N, N), bool)
    for dy, dx in ((0, 0), (0.5, 0), (0.5, 0.5), (0.3, -0.4), (-0.45, 0.2)):
        for flux in (3e2, 1e4, 1e7):
            src = flux * _profile(fwhm, kind, dy, dx)[None]
            var = 1.0 + src  # sky and the source's own noise
            img = src + rng.normal(size=src.shape) * np.sqrt(var)
            y, x = np.unravel_index(np.argmax(img[0]), (N, N))
            assert not sharp_pixel(img, var, bad, y, x, ratios), (dy, dx, flux)


def test_defects_are_sharp_and_noise_is_not():
    rng = np.random.default_rng(1)
    ratios = psf_neighbour_ratios(_profile(2.5, "moffat")[None])
    var, bad = np.ones((1, N, N)), np.zeros((1, N, N), bool)
    noise = rng.normal(size=(1, N, N))
    assert not sharp_pixel(noise, var, bad, 12, 12, ratios)
    for cut in ((12, 12), (slice(None), 12), (12, slice(None))):  # pixel, column, row
        img = noise.copy()
        img[(0, *cut)] += 400
        assert sharp_pixel(img, var, bad, 12, 12, ratios), cut
    # a faint defect is left to the noise; a bad neighbour is never compared with
    faint = noise.copy()
    faint[0, 12, 12] += 4
    assert not sharp_pixel(faint, var, bad, 12, 12, ratios)
    img = noise.copy()
    img[0, :, 12] += 400
    masked = bad.copy()
    masked[0, 12, 11] = masked[0, 12, 13] = masked[0, 11:14, 11] = masked[0, 11:14, 13] = True
    assert not sharp_pixel(img, var, masked, 12, 12, ratios)


def test_children_on_unflagged_defects_are_flagged_in_the_catalog(tmp_path):
    """A Moffat field (not the simulator's) with an unflagged hot column in one band and
    two unflagged cosmic rays: the children there carry sharp_peak, no other child does."""
    ex = _field(11, ny=110, nx=130)
    img = ex["image"].values
    img[1, 20:90, 64] += 3000.0  # band r: a hot column segment, in no mask plane
    rays = [(8, 20), (100, 110)]
    for y, x in rays:
        img[2, y, x] += 2000.0  # band i: cosmic rays left unflagged
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": ex})
    assert main(["detect", str(path)]) == 0
    assert main(["deblend", str(path), "--run", "a"]) == 0
    cols, attrs = catalog_table(Store(path), "r")
    assert json.loads(attrs["flag_bits"])["sharp_peak"] == SHARP == CATALOG_FLAGS["sharp_peak"]
    sharp = (cols["flags"] & SHARP) != 0
    on_column = (np.abs(cols["x"] - 64) < 1.5) & (cols["y"] > 18) & (cols["y"] < 92)
    on_ray = np.zeros(len(sharp), bool)
    for y, x in rays:
        on_ray |= np.hypot(cols["y"] - y, cols["x"] - x) < 1.5
    assert on_column.sum() >= 2 and on_ray.sum() == len(rays)
    assert sharp[on_column].all() and sharp[on_ray].all()
    assert not sharp[~(on_column | on_ray)].any()  # the field's real sources


@pytest.mark.parametrize("name", ["hsc_cosmos", "hsc_cosmos_35", "cut_hsc", "cut_hsc1"])
def test_real_hsc_sources_are_never_sharp(name):
    ex = read_npz(shared_file(f"{name}.npz"))
    run = deblend_exposure(ex, detect(ex), None, "scarlet")
    flags = run["source_flags"].values
    assert flags.size >= 5 and not (flags & SHARP).any()
