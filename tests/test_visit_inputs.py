"""The visit-level commands (coadd, tract, merge, forced) on inputs unlike the simulator's.

Found by running them as a user: ``forced STORE -o visit.fits`` (visits taken from the store)
overwrote one of its own visits; a visit masked over half the grid failed every tract patch
it did not reach with pixels; a PSF-matched target no visit could reach left artifact
rejection and background matching off without a word; ``merge -o`` overwrote the grid; a
truncated visit gave a traceback; forced chi2 was 0 where no pixel was measured.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from scarletstore.cli import main


@pytest.fixture(scope="module")
def visits(tmp_path_factory):
    pytest.importorskip("galsim")
    from scarletstore.simulate.visits import simulate_visits

    out = tmp_path_factory.mktemp("visits") / "v"
    return simulate_visits(out, n_visits=3, size=96, seed=4, bands="gr", density=120)


@pytest.fixture(scope="module")
def coadded(visits, tmp_path_factory):
    folder = Path(visits["grid"]).parent
    store = folder / "s.h5"
    for argv in (["coadd", store, *visits["visits"], "--grid", visits["grid"]], ["detect", store],
                 ["deblend", store]):
        assert main([str(a) for a in argv]) == 0
    return store


def _fails(argv, capsys, *expect):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in err, err


def test_forced_never_writes_over_the_stores_own_visits(coadded, visits, capsys):
    target = Path(visits["visits"][0])
    before = target.read_bytes()
    _fails(["forced", coadded, "-o", target], capsys, "input of this command")
    assert target.read_bytes() == before


def test_a_visit_without_usable_pixels_on_a_patch_is_left_out_of_it(visits, tmp_path, capsys):
    from astropy.io import fits

    from astropy.wcs import WCS

    half = tmp_path / "half.fits"
    with fits.open(visits["grid"]) as g:
        grid = WCS(g[0].header if g[0].header.get("CTYPE1") else g[1].header)
    with fits.open(visits["visits"][-1]) as h:  # an r visit, masked where grid x >= 30
        img = h["IMAGE"].data
        yy, xx = np.mgrid[:img.shape[0], :img.shape[1]]
        ra, dec = WCS(h["IMAGE"].header).celestial.all_pix2world(xx, yy, 0)
        gx, _ = grid.celestial.all_world2pix(ra, dec, 0)
        img[gx >= 30] = np.nan  # the second patch's outer box starts at x = 40
        h.writeto(half)
    others = [v for v in visits["visits"][:-1]]
    out = tmp_path / "t"
    capsys.readouterr()
    assert main([str(a) for a in ["tract", out, *others, half, "--grid", visits["grid"],
                                  "--patches", "2x1", "--overlap", "16"]]) == 0
    assert "half.fits" in capsys.readouterr().err
    index = json.loads((out / "tract.json").read_text())
    status = {p["name"]: (p["status"], p.get("visits_dropped")) for p in index["patches"]}
    assert all(s == "done" for s, _ in status.values()), status
    assert sum(d == ["half.fits"] for _, d in status.values()) == 1, status  # the far patch only
    grid = Path(visits["grid"])
    copy = grid.read_bytes()
    _fails(["merge", out, "--band", "r", "-o", grid], capsys, "input of this command")
    assert grid.read_bytes() == copy


def test_a_coadd_says_which_bands_lost_rejection_and_matching(visits, tmp_path, capsys):
    store = tmp_path / "narrow.h5"
    capsys.readouterr()
    assert main([str(a) for a in ["coadd", store, *visits["visits"], "--grid", visits["grid"],
                                  "--psf-matched-fwhm", "0.1"]]) == 0
    err = capsys.readouterr().err
    for band in "gr":
        assert f"band {band}: artifact rejection needs 3 PSF-matched visits, has 0: not done" in err
        assert f"band {band}: no visit is narrower than the PSF-matched target" in err
    from scarletstore.store.store import Store

    attrs = Store(store).read("exposure").attrs
    assert attrs["artifact_rejection"] == 0
    assert json.loads(attrs["artifact_rejection_bands"]) == {"g": False, "r": False}


def test_a_truncated_visit_is_one_line(visits, tmp_path, capsys):
    data = Path(visits["visits"][0]).read_bytes()
    for name, cut in (("short.fits", len(data) - 3000), ("half.fits", len(data) // 2)):
        (tmp_path / name).write_bytes(data[:cut])
        _fails(["coadd", tmp_path / "x.h5", visits["visits"][1], tmp_path / name, "--grid",
                visits["grid"]], capsys, "truncated")
        assert not (tmp_path / "x.h5").exists()


def test_forced_chi2_is_nan_where_no_pixel_was_measured(coadded, visits, tmp_path):
    from astropy.io import fits
    from astropy.table import Table

    blank = tmp_path / "blank.fits"
    with fits.open(visits["visits"][0]) as h:
        h["IMAGE"].data[:] = np.nan
        h.writeto(blank)
    assert main([str(a) for a in ["forced", coadded, blank, "-o", tmp_path / "f.fits"]]) == 0
    t = Table.read(tmp_path / "f.fits")
    none = np.asarray(t["n_pix"]) == 0
    assert none.any() and np.all(np.isnan(np.asarray(t["chi2"])[none]))
    assert str(t["mjd"].unit) == "d"


def test_one_exposure_under_two_names_is_refused(coadded, visits, tmp_path, capsys):
    copy = tmp_path / "copy.fits"
    shutil.copy(visits["visits"][0], copy)
    _fails(["coadd", tmp_path / "x.h5", *visits["visits"], copy, "--grid", visits["grid"]], capsys,
           "the same exposure as")
    _fails(["forced", coadded, visits["visits"][0], copy, "-o", tmp_path / "f.csv"],
           capsys, "the same exposure as")


def test_an_interrupted_tract_says_one_line_and_its_index_matches_the_disk(visits, tmp_path):
    """Ctrl-C reached every dask process: 79 lines of worker tracebacks, and a patch whose
    store was complete stayed 'pending' in the index (merge then left it out)."""
    pytest.importorskip("dask.distributed")
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "t"
    proc = subprocess.Popen([sys.executable, "-m", "scarletstore", "tract", str(out), *map(str, visits["visits"]),
                             "--grid", str(visits["grid"]), "--patches", "4x4", "--overlap", "16",
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.glob("patch_*")) and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the tract finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines() == [
        f"scarletstore tract: interrupted; 'scarletstore tract {out} --resume' takes it up"], err
    index = json.loads((out / "tract.json").read_text())
    for entry in index["patches"]:
        on_disk = (out / entry["name"] / "store.h5").is_file()
        assert (entry["status"] == "done") == on_disk, entry
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # taken up again, only the patches not done run, and the tract completes
    done = {e["name"]: (out / e["name"] / "store.h5").stat().st_mtime_ns
            for e in index["patches"] if e["status"] == "done"}
    assert main(["tract", str(out), "--resume"]) == 0
    index = json.loads((out / "tract.json").read_text())
    assert {e["status"] for e in index["patches"]} == {"done"} and len(index["resumed"]) == 1
    assert {n: (out / n / "store.h5").stat().st_mtime_ns for n in done} == done


def test_simulated_visits_take_bright_stars_for_the_aperture_correction(tmp_path):
    """--bright-stars was refused with --visits, so a coadd from simulated visits had too few
    stars for apcorr (the demo's field: 1 of the 3 needed)."""
    from astropy.table import Table

    for name, extra in (("v", ["--bright-stars", "4"]), ("plain", [])):
        assert main(["simulate", str(tmp_path / name), "--visits", "1", "--size", "64", "--bands", "r",
                     *extra]) == 0
    truth, plain = (Table.read(tmp_path / n / "truth.fits") for n in ("v", "plain"))
    assert len(truth) == len(plain) + 4
    assert main(["simulate", str(tmp_path / "w"), "--visits", "1", "--bright-stars", "-1"]) == 2
