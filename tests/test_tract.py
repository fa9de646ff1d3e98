"""Tracts of patches: boxes, the patch pipeline, the tract index, the tract catalog.

One simulated field (3 visits in g and r, 192 x 192 pixels, bright stars on a
lattice so some sit near the patch edges) is cut 2x2 and 1x1; every true
source above S/N 10 must be primary exactly once, and the primaries must
agree with the single-patch run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scarletstore.cli import main
from scarletstore.errors import InputError
from scarletstore.store.store import Store
from scarletstore.tract.patches import Box, cut_patches, parse_patches

SNR_CUT = 10.0
MATCH_RADIUS = 2.5  # pixels: a primary this close to a true source is its measurement


# ---------------------------------------------------------------- patch boxes
@pytest.mark.parametrize("shape,nx,ny,overlap", [((192, 192), 2, 2, 64), ((200, 131), 3, 2, 17),
                                                   ((64, 300), 1, 4, 0), ((97, 97), 5, 5, 38)])
def test_inner_regions_tile_the_grid_and_outer_boxes_overlap_by_the_given_pixels(shape, nx, ny, overlap):
    patches = cut_patches(shape, nx, ny, overlap)
    assert len(patches) == nx * ny
    cover = np.zeros(shape, int)
    for p in patches:
        i, o = p.inner, p.outer
        cover[i.y0:i.y0 + i.height, i.x0:i.x0 + i.width] += 1
        assert o.y0 <= i.y0 and o.x0 <= i.x0 and o.y0 + o.height >= i.y0 + i.height
        assert o.x0 + o.width >= i.x0 + i.width and o.y0 >= 0 and o.x0 >= 0
        assert o.y0 + o.height <= shape[0] and o.x0 + o.width <= shape[1]
    assert (cover == 1).all()  # no gap, no overlap
    by = {(p.i, p.j): p for p in patches}
    for (i, j), p in by.items():
        if (i + 1, j) in by:  # shared columns of the outer boxes of horizontal neighbours
            q = by[(i + 1, j)]
            assert p.outer.x0 + p.outer.width - q.outer.x0 == overlap
        if (i, j + 1) in by:
            q = by[(i, j + 1)]
            assert p.outer.y0 + p.outer.height - q.outer.y0 == overlap


def test_an_overlap_past_the_neighbouring_inner_region_is_refused():
    with pytest.raises(InputError, match="half the overlap"):
        cut_patches((97, 97), 5, 5, 39)  # inner regions of 19 pixels
    with pytest.raises(InputError, match="inner regions under"):
        cut_patches((97, 97), 7, 5, 0)


def test_box_contains_gives_every_position_one_inner_region():
    patches = cut_patches((100, 90), 3, 4, 20)
    rng = np.random.default_rng(0)
    y, x = rng.uniform(-0.5, 99.49, 5000), rng.uniform(-0.5, 89.49, 5000)
    y[:3], x[:3] = 24.5, 29.5  # exactly on a shared edge (pixel boundaries)
    owners = sum(p.inner.contains(y, x).astype(int) for p in patches)
    assert (owners == 1).all()


def test_a_source_on_a_shared_edge_is_primary_exactly_once():
    """Two patches fit one source with other neighbours, so its centre differs by a fraction of a
    pixel and can fall on either side of their shared edge: primary twice, or never, until settled."""
    from scarletstore.tract.merge import resolve_seams

    patches = {p.name: p for p in cut_patches((100, 200), 2, 1, 20)}  # shared inner edge at x = 99.5
    names = sorted(patches)
    # source 0: both copies on their own side (twice primary); source 1: both on the far side
    # (never); source 2: far from the edge, in one patch only; source 3: an overlap pair away
    # from the edge, already primary once
    x = np.array([99.4, 99.7, 99.6, 99.3, 40.0, 105.0, 105.1])
    y = np.array([30.0, 30.2, 60.0, 60.1, 50.0, 20.0, 20.0])
    patch = np.array([names[0], names[1], names[0], names[1], names[0], names[1], names[0]])
    primary = np.array([patches[n].inner.contains(yy, xx) for n, yy, xx in zip(patch, y, x)])
    assert primary.tolist() == [True, True, False, False, True, True, False]
    cols = {"x": x, "y": y, "patch": patch, "is_primary": primary.copy()}
    assert resolve_seams(cols, patches) == 2
    for rows in ([0, 1], [2, 3], [5, 6]):
        assert cols["is_primary"][rows].sum() == 1, rows
    # the owner is the patch holding the copies' mean centre (x 99.55 -> right, 99.45 -> left)
    assert cols["is_primary"].tolist() == [False, True, True, False, True, True, False]


def test_index_rewrites_are_skipped_while_they_would_cost_over_a_tenth_of_the_time(tmp_path):
    from scarletstore.tract.index import IndexWriter, read_index

    index = {"format": "scarletstore-tract", "version": 1, "patches": [{"name": "p", "status": "pending"}]}
    writer = IndexWriter(tmp_path, index)
    writer.write()
    writer._cost = 3600.0  # as if the last write had taken an hour
    index["patches"][0]["status"] = "done"
    writer.update()
    assert writer.writes == 1 and read_index(tmp_path)["patches"][0]["status"] == "pending"
    writer._cost = 0.0
    writer.update()
    assert writer.writes == 2 and read_index(tmp_path)["patches"][0]["status"] == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["tract.json"]  # no temporary left


@pytest.mark.parametrize("text", ["2", "2x", "x2", "0x2", "2x-1", "two by two", "2x2x2"])
def test_malformed_patch_counts_are_refused(text):
    with pytest.raises(InputError):
        parse_patches(text)
    assert parse_patches(" 3X2 ") == (3, 2)


def test_sub_grid_pixels_see_the_same_sky_as_the_grid(tract_sim):
    from scarletstore.coadd.visits import read_grid, sub_grid

    grid = read_grid(tract_sim["grid"])
    sub = sub_grid(grid, 40, 70, 50, 60)
    assert sub.shape == (50, 60)
    xs, ys = np.array([0.0, 10.3, 59.0]), np.array([0.0, 7.7, 49.0])
    a = np.array(sub.wcs.pixel_to_world_values(xs, ys))
    b = np.array(grid.wcs.pixel_to_world_values(xs + 70, ys + 40))
    assert np.abs(a - b).max() * 3600 < 1e-6  # arcsec
    with pytest.raises(InputError):
        sub_grid(grid, 150, 0, 50, 10)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tract_sim(tmp_path_factory):
    from scarletstore.simulate.visits import simulate_visits

    out = tmp_path_factory.mktemp("tract_sim")
    return simulate_visits(out, n_visits=3, size=192, seed=11, bands="gr", density=100, n_stars=9)


def _args(sim):
    return [*map(str, sim["visits"]), "--grid", str(sim["grid"])]


def _tract(tmp, sim, patches, overlap, *extra):
    out = tmp / f"tract_{patches}_{overlap}{''.join(extra).replace('-', '')}"
    assert main(["tract", str(out), *_args(sim), "--patches", patches, "--overlap", str(overlap),
                 *extra]) == 0
    cat = out.with_suffix(".fits")
    assert main(["merge", str(out), "--band", "r", "-o", str(cat)]) == 0
    from astropy.table import Table

    return out, Table.read(cat)


@pytest.fixture(scope="module")
def tract22(tract_sim, tmp_path_factory):
    return _tract(tmp_path_factory.mktemp("t22"), tract_sim, "2x2", 64)


@pytest.fixture(scope="module")
def tract11(tract_sim, tmp_path_factory):
    return _tract(tmp_path_factory.mktemp("t11"), tract_sim, "1x1", 0)


def _bright_truth(sim, tract_dir):
    """True static sources with point-source S/N above the cut in r (noise from the coadd)."""
    from astropy.table import Table

    from scarletstore.store.store import Store

    t = Table.read(sim["truth"])
    ex = Store(tract_dir / "patch_0_0" / "store.h5").read("exposure")
    k = list(ex.band.values).index("r")
    psf = ex["psf"].values[k].astype(np.float64)
    psf /= psf.sum()
    noise = np.sqrt(np.median(ex["variance"].values[k]) / (psf**2).sum())
    keep = (t["kind"] == "static") & (t["flux27_r"] / noise > SNR_CUT)
    return t[keep]


# ---------------------------------------------------------------- the tract
def test_2x2_tract_has_each_true_source_once_as_primary(tract_sim, tract22):
    from scipy.spatial import cKDTree

    out, cat = tract22
    truth = _bright_truth(tract_sim, out)
    assert len(truth) >= 12  # the lattice stars and the brightest galaxies
    prim = cat[cat["is_primary"]]
    tree = cKDTree(np.c_[prim["x"], prim["y"]])
    counts = [len(tree.query_ball_point([x, y], MATCH_RADIUS)) for x, y in zip(truth["x"], truth["y"])]
    assert counts == [1] * len(truth)
    assert not tree.query_pairs(1.0)  # no duplicate primaries
    # the rule was exercised: sources in the overlaps are in two or more patches, primary in one
    allrows = cKDTree(np.c_[cat["x"], cat["y"]])
    copies = [len(allrows.query_ball_point([x, y], 1.0)) for x, y in zip(prim["x"], prim["y"])]
    assert max(copies) >= 2 and len(cat) > len(prim) + 10
    assert set(cat["patch"]) == {"patch_0_0", "patch_1_0", "patch_0_1", "patch_1_1"}
    # every row's primary flag is its position in its patch's inner region, in tract pixels
    index = json.loads((out / "tract.json").read_text())
    for e in index["patches"]:
        rows = cat[cat["patch"] == e["name"]]
        inner = Box(**e["inner"])
        assert (np.asarray(rows["is_primary"]) == inner.contains(rows["y"], rows["x"])).all()
        outer = Box(**e["outer"])
        assert outer.contains(rows["y"], rows["x"]).all()


def test_tract_index_records_boxes_status_and_stores(tract_sim, tract22):
    from astropy.io import fits
    from astropy.wcs import WCS

    from scarletstore.store.store import Store

    out, cat = tract22
    index = json.loads((out / "tract.json").read_text())
    assert index["format"] == "scarletstore-tract" and index["patches_shape"] == [2, 2]
    assert index["overlap"] == 64 and index["grid"]["shape"] == [192, 192]
    assert index["bands"] == ["g", "r"]
    grid_wcs = WCS(fits.Header.fromstring(index["grid"]["wcs"]))
    for e in index["patches"]:
        assert e["status"] == "done" and e["attempts"] == 1 and e["error"] == ""
        assert e["cpu_seconds"] > 0 and e["n_visits"] == 6
        assert e["peak_rss_mb"] >= e["peak_rss_before_mb"] > 50
        store = Store(out / e["store"])
        ex = store.read("exposure")
        o = e["outer"]
        assert (ex.sizes["y"], ex.sizes["x"]) == (o["height"], o["width"])
        w = WCS(fits.Header.fromstring(ex.attrs["wcs"]))
        here = np.array(w.pixel_to_world_values(3.0, 5.0))
        there = np.array(grid_wcs.pixel_to_world_values(3.0 + o["x0"], 5.0 + o["y0"]))
        assert np.abs(here - there).max() * 3600 < 1e-6
        assert store.runs() == [e["run"]]
        # kept ids: each row is its patch store's source
        rows = cat[cat["patch"] == e["name"]]
        assert set(rows["store_id"]) == set(store.read(f"runs/{e['run']}")["source_id"].values)
    assert not list(out.glob(".*.tmp"))  # no temporary folder or index left behind
    assert index["driver"]["index_writes"] >= 2 and index["driver"]["handling_seconds"] >= 0
    ra, dec = grid_wcs.pixel_to_world_values(np.asarray(cat["x"]), np.asarray(cat["y"]))
    assert np.abs(ra - cat["ra"]).max() * 3600 < 1e-3 and np.abs(dec - cat["dec"]).max() * 3600 < 1e-3


def test_primaries_match_a_single_patch_run(tract22, tract11):
    """Recall of the 1x1 primaries among the 2x2 ones, and their fluxes.

    Measured on this field: 32 of 32 matched, median |dflux| / flux 0.011,
    median |dflux| / flux_err 0.09 (the patches fit their own sky and
    background offsets on smaller areas).
    """
    from scipy.spatial import cKDTree

    a = tract22[1][tract22[1]["is_primary"]]
    b = tract11[1][tract11[1]["is_primary"]]
    assert len(b) == len(tract11[1]) >= 25  # one patch: every row is primary
    d, j = cKDTree(np.c_[a["x"], a["y"]]).query(np.c_[b["x"], b["y"]])
    matched = d < 1.0
    assert matched.mean() >= 0.95
    assert abs(len(a) - len(b)) <= 1
    fa, fb, eb = (np.asarray(a["flux"][j[matched]]), np.asarray(b["flux"][matched]),
                  np.asarray(b["flux_err"][matched]))
    ok = np.isfinite(eb) & (fb > 0)
    assert ok.sum() >= 20
    assert np.median(np.abs(fa - fb)[ok] / fb[ok]) < 0.03
    assert np.median(np.abs(fa - fb)[ok] / eb[ok]) < 0.3



def test_workers_1_and_2_give_identical_tract_catalogs(tract_sim, tract22, tmp_path):
    """Uses a dask LocalCluster of 2 processes."""
    out, cat2 = _tract(tmp_path, tract_sim, "2x2", 64, "--workers", "2")
    cat1 = tract22[1]
    assert cat1.colnames == cat2.colnames and len(cat1) == len(cat2)
    for c in cat1.colnames:
        a, b = np.asarray(cat1[c]), np.asarray(cat2[c])
        same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b)
        assert same, c
    index = json.loads((out / "tract.json").read_text())
    assert len({e["worker"] for e in index["patches"]}) == 2  # both workers took patches


def test_merge_writes_csv_and_h5_with_the_same_rows(tract22, tmp_path):
    import pandas as pd
    import xarray as xr

    out, cat = tract22
    assert main(["merge", str(out), "--band", "r", "-o", str(tmp_path / "c.csv")]) == 0
    assert main(["merge", str(out), "--band", "r", "-o", str(tmp_path / "c.h5")]) == 0
    csv = pd.read_csv(tmp_path / "c.csv")
    h5 = xr.open_dataset(tmp_path / "c.h5", engine="h5netcdf")
    for t in (csv, h5):
        assert list(t["patch"].values) == list(cat["patch"])
        assert (np.asarray(t["is_primary"].values, bool) == np.asarray(cat["is_primary"])).all()
        assert np.allclose(t["x"].values, cat["x"])
    h5.close()


# ---------------------------------------------------------------- failures and bad input
def test_a_failing_patch_is_retried_then_recorded_and_reported(tract_sim, tmp_path, capsys, monkeypatch):
    import scarletstore.tract.run as tract_run

    real, calls = tract_run._build_store, []

    def flaky(path, job):  # patch_0_0 fails once (then works), patch_1_0 always
        calls.append((job.patch.name, job.attempt))
        if job.patch.name == "patch_1_0" or (job.patch.name == "patch_0_0" and job.attempt == 1):
            raise RuntimeError(f"disk on fire in {job.patch.name}")
        return real(path, job)

    monkeypatch.setattr(tract_run, "_build_store", flaky)
    out = tmp_path / "t"
    capsys.readouterr()
    assert main(["tract", str(out), *_args(tract_sim), "--patches", "2x1", "--overlap", "48"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 2 patches failed" in err[0] and "patch_1_0" in err[0]
    assert "disk on fire" in err[0]
    assert sorted(calls) == [("patch_0_0", 1), ("patch_0_0", 2), ("patch_1_0", 1), ("patch_1_0", 2)]
    index = json.loads((out / "tract.json").read_text())
    e = {p["name"]: p for p in index["patches"]}
    assert e["patch_0_0"]["status"] == "done" and e["patch_0_0"]["attempts"] == 2
    assert e["patch_1_0"]["status"] == "failed" and e["patch_1_0"]["attempts"] == 2
    assert "RuntimeError: disk on fire" in e["patch_1_0"]["error"]
    assert (out / "patch_0_0" / "store.h5").is_file() and not (out / "patch_1_0").exists()
    assert not list(out.glob(".*"))  # the failed attempts' folders are gone
    # the merge names what is missing and keeps it in the catalog
    assert main(["merge", str(out), "--band", "g", "-o", str(tmp_path / "c.fits")]) == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "patch_1_0" in err[0] and "1 patch not done" in err[0]
    assert "from 1 patch to" in captured.out
    from astropy.table import Table

    t = Table.read(tmp_path / "c.fits")
    assert set(t["patch"]) == {"patch_0_0"} and json.loads(t.meta["MISSING_"]) == ["patch_1_0"]


def _wide_grid(sim, path, pad):
    """The simulated grid grown by ``pad`` pixels on every side (beyond the visits)."""
    from astropy.io import fits

    with fits.open(sim["grid"]) as h:
        hdr = h["IMAGE"].header.copy()
        ny, nx = h["IMAGE"].data.shape
    hdr["CRPIX1"] += pad
    hdr["CRPIX2"] += pad
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((ny + 2 * pad, nx + 2 * pad), np.uint8),
                                                   header=hdr, name="IMAGE")]).writeto(path)
    return path


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tract_sim, tmp_path, capsys):
    out = tmp_path / "new"
    visits = [str(v) for v in tract_sim["visits"]]
    grid = str(tract_sim["grid"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    wide = str(_wide_grid(tract_sim, tmp_path / "wide.fits", 200))
    cases = [
        (["--patches", "2by2", "--overlap", "8"], "NxM"),
        (["--patches", "0x2", "--overlap", "8"], "at least 1"),
        (["--patches", "2x2", "--overlap", "-1"], "--overlap"),
        (["--patches", "20x2", "--overlap", "8"], "inner regions"),
        (["--patches", "2x2", "--overlap", "8", "--bands", "q"], "band"),
        (["--patches", "2x2", "--overlap", "8", "--threshold", "0"], "--threshold"),
        (["--patches", "2x2", "--overlap", "8", "--workers", "0"], "--workers"),
        (["--patches", "2x2", "--overlap", "8", "--set", "no_such_key=1"], "no_such_key"),
        (["--patches", "2x2", "--overlap", "8", "--scheduler", "tcp://127.0.0.1:9"], "scheduler"),
    ]
    for extra, words in cases:
        assert main(["tract", str(out), *visits, "--grid", grid, *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (extra, err)
        assert not out.exists()
    for args, words in [
        ([str(out), *visits, "--grid", str(tmp_path / "nogrid.fits")], "no such grid"),
        ([str(out), str(tmp_path / "missing.fits"), "--grid", grid], "no such file"),
        ([str(busy), *visits, "--grid", grid], "not empty"),
        ([str(tmp_path / "no" / "dir"), *visits, "--grid", grid], "does not exist"),
        ([str(out), *visits, "--grid", wide], "no visit in band"),  # corner patches see no visit
    ]:
        assert main(["tract", *args, "--patches", "3x3", "--overlap", "8"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
        assert not out.exists() and sorted(p.name for p in busy.iterdir()) == ["x"]
    for args, words in [([str(tmp_path), "--band", "r", "-o", str(tmp_path / "c.fits")], "tract.json"),
                        ([str(busy), "--band", "r", "-o", str(tmp_path / "c.txt")], ".fits, .csv or .h5")]:
        assert main(["merge", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert not (tmp_path / "c.fits").exists()


def test_merge_refuses_a_band_the_tract_does_not_have(tract22, tmp_path, capsys):
    assert main(["merge", str(tract22[0]), "--band", "z", "-o", str(tmp_path / "c.fits")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no band 'z'" in err[0]
    assert not (tmp_path / "c.fits").exists()


def test_resume_runs_only_the_patches_not_done_and_gives_the_tract_of_one_run(
        tract_sim, tmp_path, capsys, monkeypatch):
    """A tract folder could not be taken up again: after a failed patch (or an
    interrupt) a new run needed an empty folder, so every done patch ran again."""
    import scarletstore.tract.run as tract_run

    real, calls = tract_run._build_store, []

    def broken(path, job):
        calls.append(job.patch.name)
        if job.patch.name == "patch_1_0":
            raise RuntimeError("node lost")
        return real(path, job)

    out, whole = tmp_path / "t", tmp_path / "whole"
    args = [*_args(tract_sim), "--patches", "2x1", "--overlap", "48"]
    monkeypatch.setattr(tract_run, "_build_store", broken)
    assert main(["tract", str(out), *args]) == 1
    assert "--resume" in capsys.readouterr().err
    kept = (out / "patch_0_0" / "store.h5").stat().st_mtime_ns
    (out / ".patch_1_0.1.999.tmp").mkdir()  # what a killed attempt leaves
    calls.clear()
    monkeypatch.setattr(tract_run, "_build_store", lambda path, job: (calls.append(job.patch.name),
                                                                        real(path, job))[1])
    assert main(["tract", str(out), "--resume"]) == 0
    assert calls == ["patch_1_0"] and (out / "patch_0_0" / "store.h5").stat().st_mtime_ns == kept
    assert "2 of 2 patches done, 1 in this run" in capsys.readouterr().out
    index = json.loads((out / "tract.json").read_text())
    assert [e["status"] for e in index["patches"]] == ["done", "done"] and not list(out.glob(".*"))
    assert main(["tract", str(whole), *args]) == 0
    from astropy.table import Table

    cats = []
    for d in (out, whole):
        assert main(["merge", str(d), "--band", "r", "-o", str(d) + ".fits"]) == 0
        cats.append(Table.read(str(d) + ".fits"))
    assert len(cats[0]) == len(cats[1]) > 20
    for col in ("x", "y", "flux", "flux_err", "is_primary"):
        np.testing.assert_array_equal(np.ma.filled(cats[0][col]), np.ma.filled(cats[1][col]), err_msg=col)


def test_resume_refuses_a_changed_tract_in_one_line(tract_sim, tmp_path, capsys):
    import os
    import shutil

    visits = []
    for v in tract_sim["visits"]:
        visits.append(tmp_path / Path(v).name)
        shutil.copy(v, visits[-1])
    out = tmp_path / "t"
    assert main(["tract", str(out), *map(str, visits), "--grid", str(tract_sim["grid"]),
                 "--patches", "1x1", "--overlap", "0"]) == 0
    capsys.readouterr()
    for args, words in [([str(out), str(visits[0]), "--resume"], "drop VISIT"),
                        ([str(out), "--resume", "--overlap", "0"], "drop --overlap"),
                        ([str(tmp_path), "--resume"], "no tract.json"),
                        ([str(tmp_path / "new"), *map(str, visits)], "--grid, --patches, --overlap")]:
        assert main(["tract", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (args, err)
    assert main(["tract", str(out), "--resume"]) == 0  # nothing left to run
    assert "1 of 1 patch done, 0 in this run" in capsys.readouterr().out
    st = os.stat(visits[1])
    os.utime(visits[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the visit was rewritten
    assert main(["tract", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the visit changed" in err[0] and visits[1].name in err[0]


def test_a_tract_moved_with_its_visits_still_finds_them_for_forced(tract_sim, tmp_path, capsys):
    """The patch stores recorded their visits by absolute path only (the relative
    record was the coadd command's), so a tract folder moved or copied together with
    its visits lost them: forced on a patch store said the visits were not found."""
    import shutil

    field = tmp_path / "field"
    (field / "visits").mkdir(parents=True)
    visits = [shutil.copy(v, field / "visits") for v in tract_sim["visits"]]
    grid = shutil.copy(tract_sim["grid"], field / "visits")
    assert main(["tract", str(field / "tract"), *map(str, visits), "--grid", str(grid),
                 "--patches", "1x1", "--overlap", "0"]) == 0
    shutil.move(field, tmp_path / "moved")
    store = tmp_path / "moved" / "tract" / "patch_0_0" / "store.h5"
    paths = json.loads(Store(store).read("visits").attrs["paths"])
    assert paths["relative"] == [f"../../visits/{Path(v).name}" for v in visits]
    capsys.readouterr()
    assert main(["forced", str(store), "-o", str(tmp_path / "f.fits")]) == 0
    assert f"on {len(visits)} visits" in capsys.readouterr().out
