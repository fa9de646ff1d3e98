"""Commands never overwrite their own inputs, and runs are measured only on their own parents.

Found by running the commands as a user would: ``catalog STORE -o STORE`` wrote a catalog over
the store's index (and ``export-lsst`` JSON over it) and reported success; after
``detect --replace`` an earlier run's catalog was measured on the new footprints without a
word; ``detect --bands r,r`` counted one band twice; npz inputs with object arrays gave a
traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scarletstore.cli import main
from scarletstore.deblend.psf import gaussian_psf
from scarletstore.store.store import Store

H = W = 64


def _scene(rng):
    y, x = np.mgrid[:H, :W]
    blob = lambda cy, cx, s: np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))  # noqa: E731
    scene = 60 * (blob(20, 20, 2.0) + blob(24, 27, 2.2) + blob(46, 44, 2.5))
    return np.array([scene * s + rng.normal(0, 1, (H, W)) for s in (0.7, 1.0, 0.9)], np.float32)


def _write_npz(path, **changes):
    rng = np.random.default_rng(3)
    arrays = dict(images=_scene(rng), variance=np.ones((3, H, W), np.float32),
                  mask=np.zeros((3, H, W), np.int32), filters=np.array(["g", "r", "i"]),
                  psfs=np.array([gaussian_psf(1.3 + 0.1 * b, 15) for b in range(3)]))
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def _ok(argv):
    assert main([str(a) for a in argv]) == 0, argv


def _fails(argv, capsys, *expect):
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def deblended(tmp_path_factory):
    """A store with parents and one scarlet run."""
    tmp = tmp_path_factory.mktemp("outputs")
    store = tmp / "s.h5"
    _ok(["ingest", store, _write_npz(tmp / "in.npz")])
    _ok(["detect", store])
    _ok(["deblend", store, "--run", "first"])
    return store


def _copy(store, dest):
    from scarletstore.store.store import copy_store

    copy_store(store, dest)
    return dest


def test_outputs_never_overwrite_the_store(deblended, tmp_path, capsys):
    store = _copy(deblended, tmp_path / "c.h5")
    before = Store(store).runs()
    _fails(["catalog", store, "--band", "r", "-o", store], capsys, "input of this command")
    product = next(Path(str(store) + ".d").iterdir())
    _fails(["catalog", store, "--band", "r", "-o", product.with_suffix(".fits")], capsys,
           "product folder")
    _fails(["export-lsst", store, "-o", store], capsys, "input of this command")
    _fails(["show", store, "--field", "-o", Path(str(store) + ".d") / "f.png"], capsys,
           "product folder")
    # the store is whole: it opens, checks clean and measures
    assert Store(store).runs() == before and Store(store).check() == []
    _ok(["catalog", store, "--band", "r", "-o", tmp_path / "cat.fits"])
    assert (tmp_path / "cat.fits").stat().st_size > 0


def test_an_override_file_named_twice_or_as_output_is_refused(deblended, tmp_path, capsys):
    psf = tmp_path / "psf.fits"
    _fails(["catalog", deblended, "--band", "r", "--psf", f"r={psf}", "--psf", f"r={psf}",
            "-o", tmp_path / "c.fits"], capsys, "twice")


def test_runs_of_replaced_parents_are_not_measured_on_the_new_ones(deblended, tmp_path, capsys):
    store = _copy(deblended, tmp_path / "r.h5")
    _ok(["catalog", store, "--band", "r", "-o", tmp_path / "before.csv"])
    capsys.readouterr()
    _ok(["detect", store, "--replace", "--threshold", "3"])
    err = capsys.readouterr().err
    assert "first" in err and "deblend again" in err
    # the old run's catalog (API and CLI) and picture are refused, in one line
    _fails(["catalog", store, "--band", "r", "--run", "first", "-o", tmp_path / "after.csv"],
           capsys, "'first'", "detect --replace")
    assert not (tmp_path / "after.csv").exists()
    _fails(["show", store, "--blend", "1", "--run", "first", "-o", tmp_path / "b.png"], capsys,
           "detect --replace")
    from scarletstore.errors import StoreError

    with pytest.raises(StoreError, match="deblend again"):
        Store(store).catalog("r", run="first")
    # a new run on the new parents measures
    _ok(["deblend", store, "--run", "second"])
    _ok(["catalog", store, "--band", "r", "--run", "second", "-o", tmp_path / "new.csv"])
    assert (tmp_path / "new.csv").stat().st_size > 0


def test_a_detection_band_named_twice_is_refused(deblended, tmp_path, capsys):
    store = _copy(deblended, tmp_path / "d.h5")
    _fails(["detect", store, "--replace", "--bands", "r,r"], capsys, "named twice")
    assert Store(store).runs() == ["first"]


@pytest.mark.parametrize("change, expect", [
    (dict(images=np.empty(3, object)), "object array"),
    (dict(mask=np.zeros((3, H, W), np.float32)), "integers"),
    (dict(images=np.zeros((3, H, W), np.complex64)), "real numbers"),
    (dict(filters=np.array(["g", " ", "i"])), "empty band name"),
    (dict(catalog=np.array([(np.nan, 3.0)], dtype=[("x", "f8"), ("y", "f8")])), "non-finite"),
])
def test_npz_inputs_that_are_not_pixels_are_refused(tmp_path, capsys, change, expect):
    npz = _write_npz(tmp_path / "bad.npz", **change)
    _fails(["ingest", tmp_path / "s.h5", npz], capsys, expect)
    assert not (tmp_path / "s.h5").exists()


def test_simulated_visits_need_an_empty_folder(tmp_path, capsys):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "visit_g_01.fits").write_bytes(b"old")
    _fails(["simulate", tmp_path / "v", "--visits", "1", "--size", "32", "--bands", "g"], capsys,
           "not empty")
    _fails(["simulate", tmp_path / "w", "--visits", "1", "--density", "0"], capsys, "--density")


def test_diff_prints_integer_source_ids_and_export_refuses_an_empty_run(deblended, tmp_path, capsys):
    store = _copy(deblended, tmp_path / "e.h5")
    _ok(["deblend", store, "--blends", "1", "--run", "one"])
    capsys.readouterr()
    _ok(["diff", store, "first", "one", "--top", "3"])
    out = capsys.readouterr().out
    table = out.splitlines()[-1].split()
    assert all("." not in v for v in table[:4]), out  # parent, peak, source ids
    empty = tmp_path / "empty.h5"
    _ok(["ingest", empty, _write_npz(tmp_path / "sky.npz", images=np.zeros((3, H, W), np.float32))])
    _ok(["detect", empty])
    _ok(["deblend", empty])
    _fails(["export-lsst", empty, "-o", tmp_path / "m.json"], capsys, "no blends")


def test_region_ra_is_one_turn_of_the_sky(deblended, capsys):
    _fails(["query", deblended, "--region", "1000", "2", "5"], capsys, "RA")


def test_the_blend_picture_labels_quote_the_catalog_flux(hsc_path, tmp_path):
    """On the real cut-out the models reach past the blend's box: the labels summed the
    box (source 8's r flux 2.19) where the catalog has the whole model (2.47)."""
    from scarletstore.display import read_blend_picture

    store = tmp_path / "hsc.h5"
    _ok(["ingest", store, hsc_path])
    _ok(["detect", store])
    _ok(["deblend", store, "--run", "first"])
    store = Store(store)
    cat = store.catalog("r", run="first").load()
    rows = {int(s): float(f) for s, f in zip(cat["id"].values, cat["flux"].values)}
    pic = read_blend_picture(store, int(cat["parent"].values[0]), "first")
    got = [rows[int(s)] for s in pic.source_ids]
    np.testing.assert_allclose(pic.fluxes[:, pic.bands.index("r")], got, rtol=1e-6)
    inside = pic.models.sum(axis=(2, 3))[:, pic.bands.index("r")]
    got = np.asarray(got)
    lit = got > 0
    assert np.max(np.abs(inside[lit] / got[lit] - 1)) > 0.05  # the case the labels got wrong


def test_a_reprocessed_image_of_another_sky_is_refused(tmp_path, capsys):
    """``catalog --image`` took any FITS of the store's size, whatever sky it held."""
    from conftest import gaussian_psf as psf_image, make_wcs_header, write_band_fits

    rng = np.random.default_rng(5)
    hdr = make_wcs_header(H, W)
    scene = _scene(rng)
    paths = [write_band_fits(tmp_path / f"{b}.fits", b, scene[k], np.ones((H, W)), np.zeros((H, W)),
                             psf_image(15, 1.4), hdr) for k, b in enumerate("gri")]
    store = tmp_path / "w.h5"
    _ok(["ingest", store, *paths])
    _ok(["detect", store])
    _ok(["deblend", store])
    same = write_band_fits(tmp_path / "same.fits", "r", scene[1] * 1.01, np.ones((H, W)),
                           np.zeros((H, W)), None, hdr)
    _ok(["catalog", store, "--band", "r", "--redistribute", "--image", f"r={same}",
         "-o", tmp_path / "ok.fits"])
    moved = hdr.copy()
    moved["CRVAL1"] += 3 / 3600  # 3 arcsec: 15 px of this 0.2" grid
    other = write_band_fits(tmp_path / "other.fits", "r", scene[1], np.ones((H, W)),
                            np.zeros((H, W)), None, moved)
    capsys.readouterr()
    _fails(["catalog", store, "--band", "r", "--redistribute", "--image", f"r={other}",
            "-o", tmp_path / "no.fits"], capsys, "different pixel grid", "store exposure")
    assert not (tmp_path / "no.fits").exists()


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "scarletstore", "info", "/nonexistent.h5"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_a_child_without_light_in_a_band_has_a_point_source_error(hsc_path, tmp_path):
    """hsc_cosmos_35's source 4 has no model light in r and y; its flux_err was 0 (an
    exact zero), now the noise of a point source on its peak."""
    store = tmp_path / "z.h5"
    _ok(["ingest", store, hsc_path])
    _ok(["detect", store])
    _ok(["deblend", store])
    seen = 0
    for band in "grizy":
        cat = Store(store).catalog(band).load()
        zero = cat["flux"].values <= 0
        seen += int(zero.sum())
        if zero.any():
            err = cat["flux_err"].values[zero]
            typical = np.nanmedian(cat["psf_flux_err"].values[~zero])
            assert np.all(err > 0.3 * typical) and np.all(err < 3 * typical), (band, err, typical)
    assert seen >= 1


def test_bands_named_against_their_headers_are_warned_about(fits_bands, tmp_path, capsys):
    paths, _, _ = fits_bands
    _ok(["ingest", tmp_path / "s.h5", *paths, "--bands", "r,g,i"])
    err = capsys.readouterr().err
    assert "g.fits: --bands names it r, its BAND header says g" in err
    assert "r.fits: --bands names it g" in err and "i.fits" not in err


def test_simulate_builds_the_fields_unlike_ours_from_the_command_line(tmp_path, capsys):
    """Other PSF wings, bright stars, saturation, cosmic rays and bad columns were Python
    keywords only; a user of the command could not make the fields where the bugs were."""
    pytest.importorskip("galsim")
    from astropy.io import fits

    _ok(["simulate", tmp_path / "plain", "--size", "64", "--bands", "r"])
    _ok(["simulate", tmp_path / "odd", "--size", "64", "--bands", "r", "--psf-beta", "2.5",
         "--cosmic-rays", "3", "--bad-columns", "1", "--bright-stars", "1", "--saturation", "2e4"])
    with fits.open(tmp_path / "plain" / "r.fits") as a, fits.open(tmp_path / "odd" / "r.fits") as b:
        planes = {k[3:]: int(v) for k, v in b["MASK"].header.items() if k.startswith("MP_")}
        plain, odd = a["MASK"].data, b["MASK"].data
        cr, bad = 1 << planes["CR"], 1 << planes["BAD"]
        assert not np.any(plain & cr) and np.any(odd & cr)
        # a bad column runs the height of the field (the plain one has scattered bad pixels)
        assert np.count_nonzero(odd & bad) >= np.count_nonzero(plain & bad) + 32
        assert not np.allclose(a["PSF"].data, b["PSF"].data)  # other wings
    assert (tmp_path / "odd" / "truth_artifacts.fits").exists()
    _fails(["simulate", tmp_path / "v", "--visits", "2", "--bad-columns", "1"], capsys, "--bad-columns")


def test_detect_warns_about_an_image_that_still_holds_its_sky(tmp_path, capsys):
    """A +1000 sky went into the deblend's fluxes (880x the truth, 'converged'): detection
    subtracts its own background, so only its warning can tell the user."""
    rng = np.random.default_rng(3)
    for sky, warned in ((0.0, False), (1000.0, True), (-50.0, True)):
        store = tmp_path / f"sky{sky:g}.h5"
        _ok(["ingest", store, _write_npz(tmp_path / f"sky{sky:g}.npz", images=_scene(rng) + sky)])
        capsys.readouterr()
        _ok(["detect", store])
        err = capsys.readouterr().err
        assert ("not sky-subtracted" in err) is warned, (sky, err)
        if warned:
            assert f"r {sky:+.3g}" in err, err


def test_a_band_psf_narrower_than_the_model_psf_still_fits(tmp_path, capsys):
    """Undersampled data (band PSF sigma 0.6 px) against the 0.8 px model PSF: no difference
    kernel exists, and a galaxy came back with 12 % of its flux, 'converged'."""
    y, x = np.mgrid[:40, :40]

    def gauss(cy, cx, s):
        g = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
        return g / g.sum()

    psf = np.exp(-(np.mgrid[-7:8, -7:8] ** 2).sum(0) / (2 * 0.6 ** 2))
    psf /= psf.sum()
    galaxy = 720 * gauss(20, 22, np.hypot(1.8, 0.6))
    scene = 960 * gauss(10.3, 9.6, 0.6) + 480 * gauss(31.2, 30.4, 0.6) + galaxy
    rng = np.random.default_rng(8)
    images = np.array([scene * s + rng.normal(0, 1, scene.shape) for s in (0.8, 1.0)], np.float32)
    npz = tmp_path / "narrow.npz"
    np.savez(npz, images=images, variance=np.ones_like(images), filters=np.array(["g", "r"]),
             psfs=np.array([psf, psf]))
    store = tmp_path / "n.h5"
    _ok(["ingest", store, npz])
    _ok(["detect", store])
    capsys.readouterr()
    _ok(["deblend", store])
    assert "model_psf_sigma 0.8 ->" in capsys.readouterr().err
    cat = Store(store).catalog("r").load()
    near = np.hypot(cat["y"].values - 20, cat["x"].values - 22) < 2
    assert near.sum() == 1
    assert abs(float(cat["flux"].values[near][0]) / 720 - 1) < 0.1
    import json as _json

    run = Store(store).read("runs/" + Store(store).runs()[-1])
    assert _json.loads(run.attrs["config"])["model_psf_sigma"] < 0.6


def test_repeated_known_positions_are_one_source_and_reported(tmp_path, capsys):
    store = tmp_path / "k.h5"
    _ok(["ingest", store, _write_npz(tmp_path / "k.npz")])
    table = tmp_path / "peaks.csv"
    table.write_text("x,y\n20,20\n20,20\n20.2,20.1\n44,46\n")
    capsys.readouterr()
    _ok(["detect", store, "--peaks", table])
    err = capsys.readouterr().err
    assert "2 of 4 known position(s) repeat another within 0.5 px" in err, err
    parents = Store(store).read("parents")
    flags = parents["peak_flags"].values
    ys, xs = parents["peak_y"].values, parents["peak_x"].values
    near = np.hypot(ys - 20, xs - 20) < 1
    assert near.sum() == 1, (ys, xs, flags)
