"""The deblend driver: runs, skip reasons, failures, parallel equality, warm starts."""

import json
import time

import numpy as np
import pytest
from conftest import store_bytes

from scarletstore.cli import main
from scarletstore.deblend import DeblendConfig
from scarletstore.deblend.run import deblend_exposure, init_from_run
from scarletstore.detect.footprint import counts_to_offsets
from scarletstore.errors import InputError
from scarletstore.ingest.exposure import read_fits_bands, read_npz
from scarletstore.store.runs import BLEND_FLAGS
from scarletstore.store.store import Store, copy_store


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A small simulated field, ingested and detected: (exposure, parents, store path)."""
    pytest.importorskip("galsim")
    from scarletstore.detect.detect import detect
    from scarletstore.simulate.field import simulate_field

    tmp = tmp_path_factory.mktemp("field")
    out = simulate_field(tmp / "sim", size=128, seed=11, bands="gri", density=150)
    exposure = read_fits_bands(list(out["bands"].values()))
    parents = detect(exposure)
    path = tmp / "field.h5"
    Store.create(path, {"exposure": exposure, "parents": parents})
    return exposure, parents, path


def _reasons(run):
    return [str(r) for r in run["blend_reason"].values]


def test_run_content(field):
    exposure, parents, _ = field
    run = deblend_exposure(exposure, parents, DeblendConfig(max_iter=30), "scarlet", name="a")
    reasons = _reasons(run)
    n_peaks = parents["peak_count"].values
    assert run.sizes["blend"] == parents.sizes["parent"]
    assert all((r == "isolated") == (n == 1) for r, n in zip(reasons, n_peaks))
    fitted = np.array([r == "" for r in reasons])
    assert fitted.sum() >= 2
    # one source per peak, one or two components each
    np.testing.assert_array_equal(run["blend_n_sources"].values[fitted], n_peaks[fitted])
    assert set(np.unique(run["source_n_components"].values)) <= {1, 2}
    assert np.all(np.isfinite(run["blend_log_likelihood"].values[fitted]))
    assert np.all(run["blend_iterations"].values[fitted] >= 1)
    # source ids unique, positions are the peaks
    assert len(np.unique(run["source_id"].values)) == run.sizes["source"]
    cfg = json.loads(run.attrs["config"])
    assert cfg["max_iter"] == 30 and run.attrs["method"] == "scarlet"


@pytest.mark.parametrize("override,reason", [
    ({"max_number_of_peaks": 1}, "too_many_peaks"),
    ({"max_footprint_area": 10}, "parent_too_big"),
    ({"max_area_times_peaks": 20}, "parent_too_big"),
    ({"max_footprint_size": 4}, "parent_too_big"),
    ({"min_footprint_axis_ratio": 1.01}, "footprint_too_thin"),
    ({"mask_limits": {"DETECTED": 0.5}}, "masked"),
])
def test_size_limits_set_their_flag(field, override, reason):
    exposure, parents, _ = field
    if reason == "masked":  # flag every pixel of the image in the plane
        bit = 1 << json.loads(exposure.attrs["mask_planes"])["DETECTED"]
        exposure = exposure.copy()
        exposure["mask"] = exposure["mask"] | bit
    # the size limits skip only with splitting off (else the memory budget decides)
    config = DeblendConfig(max_iter=5, process_singles=True, split_large_parents=False, **override)
    run = deblend_exposure(exposure, parents, config, "scarlet")
    reasons = _reasons(run)
    hit = [r == reason for r in reasons]
    assert any(hit), reasons
    flags = run["blend_flags"].values
    assert np.all((flags[hit] & BLEND_FLAGS[reason]) != 0)
    # skipped parents have no sources
    assert np.all(run["blend_n_sources"].values[hit] == 0)


def test_unknown_mask_plane_is_an_input_error(field):
    from scarletstore.errors import InputError

    exposure, parents, _ = field
    with pytest.raises(InputError, match="NOPE"):
        deblend_exposure(exposure, parents, DeblendConfig(mask_limits={"NOPE": 0.1}), "scarlet")


def test_failing_blend_is_flagged_and_run_continues(field, monkeypatch):
    exposure, parents, _ = field
    import scarletstore.deblend.scarlet as scarlet

    real = scarlet.deblend_scarlet
    calls = []

    def flaky(images, *args, **kwargs):
        calls.append(images.shape)
        if len(calls) == 1:
            raise FloatingPointError("synthetic failure")
        return real(images, *args, **kwargs)

    from scarletstore.deblend import run as run_module

    run_module.warm_kernels("scarlet", DeblendConfig(max_iter=5), exposure["psf"].values)
    monkeypatch.setattr(scarlet, "deblend_scarlet", flaky)  # count real blends only
    # isolated parents' model fits off: they have a test of their own (test_isolated_model)
    run = deblend_exposure(exposure, parents, DeblendConfig(max_iter=5, isolated_model=False), "scarlet")
    reasons = _reasons(run)
    failed = [r for r in reasons if r.startswith("failed")]
    assert failed == ["failed: FloatingPointError: synthetic failure"]
    assert sum(r == "" for r in reasons) == len(calls) - 1 >= 1
    with pytest.raises(FloatingPointError):
        calls.clear()
        deblend_exposure(exposure, parents, DeblendConfig(max_iter=5, catch_failures=False,
                                                          isolated_model=False), "scarlet")


def test_later_run_leaves_earlier_unchanged(field, tmp_path):
    _, _, src = field
    path = tmp_path / "s.h5"
    copy_store(src, path)
    assert main(["deblend", str(path), "--run", "first", "--set", "max_iter=5"]) == 0
    first = Store(path).read("runs/first")
    assert main(["deblend", str(path), "--run", "second", "--set", "max_iter=8", "--method", "sdss"]) == 0
    assert main(["deblend", str(path), "--run", "first"]) == 2  # never overwritten
    again = Store(path).read("runs/first")
    for v in first.variables:
        np.testing.assert_array_equal(again[v].values, first[v].values)
    assert first.attrs == again.attrs
    assert Store(path).runs() == ["first", "second"]
    ids_a = set(first["source_id"].values.tolist())
    ids_b = set(Store(path).read("runs/second")["source_id"].values.tolist())
    assert not ids_a & ids_b  # store-unique ids


def test_workers_two_equals_workers_one(field):
    pytest.importorskip("distributed")
    exposure, parents, _ = field
    config = DeblendConfig(max_iter=20)
    one = deblend_exposure(exposure, parents, config, "scarlet", workers=1)
    two = deblend_exposure(exposure, parents, config, "scarlet", workers=2)
    for v in one.data_vars:
        if v == "blend_runtime":
            continue
        np.testing.assert_array_equal(two[v].values, one[v].values, err_msg=v)


def test_cli_errors(field, tmp_path, capsys):
    _, _, src = field
    path = tmp_path / "s.h5"
    copy_store(src, path)
    data = store_bytes(path)
    for argv, msg in [
        (["--set", "max_iter"], "KEY=VALUE"),
        (["--set", "nonsense=3"], "unknown configuration key"),
        (["--set", "optimizer=sgd"], "optimizer"),
        (["--blends", "999999"], "no parent"),
        (["--blends", "x"], "comma-separated"),
        (["--from-run", "nope"], "no run"),
        (["--workers", "0"], "--workers"),
        # wrong types and ranges are one-line errors, not tracebacks
        (["--set", "max_iter=abc"], "max_iter must be a whole number"),
        (["--set", "bad_mask_planes=3"], "bad_mask_planes must be a list"),
        (["--set", "mask_limits={'BAD':0.1}"], "mask_limits must be a JSON object"),
        (["--set", 'mask_limits={"BAD":2}'], "fraction in [0, 1]"),
        (["--set", "symmetric=1"], "symmetric must be true or false"),
        (["--set", "model_psf_sigma=0"], "model_psf_sigma must be positive"),
        (["--set", "min_snr=NaN"], "min_snr must be >= 0"),
        (["--set", "bulge_snr=-1"], "bulge_snr must be >= 0"),
        (["--set", "bulge_snr=NaN"], "bulge_snr must be >= 0"),
        (["--set", "bulge_snr=high"], "bulge_snr must be a number"),
        (["--set", "extended_min_snr=-5"], "extended_min_snr must be >= 0"),
    ]:
        assert main(["deblend", str(path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert store_bytes(path) == data


def test_config_overrides_take_the_fields_types():
    c = DeblendConfig().with_overrides(["max_iter=1e2", "min_snr=40", "symmetric=False",
                                        "bad_mask_planes=BAD,SAT", 'mask_limits={"BAD": 1}'])
    assert c.max_iter == 100 and type(c.max_iter) is int
    assert c.min_snr == 40.0 and type(c.min_snr) is float
    assert c.symmetric is False
    assert c.bad_mask_planes == ["BAD", "SAT"]
    assert c.mask_limits == {"BAD": 1.0}
    assert DeblendConfig.from_json(c.to_json()) == c
    with pytest.raises(InputError, match="max_iter must be a whole number"):
        DeblendConfig(max_iter=2.5)


def test_config_of_a_run_stored_before_the_start_settings_keeps_its_rules():
    """Runs stored before ``bulge_snr`` / ``extended_min_snr`` existed had
    bulges above 2 x min_snr and every start below min_snr the PSF; reading
    their config (``deblend --from-run``) keeps those rules."""
    import json

    old = json.loads(DeblendConfig(min_snr=40).to_json())
    del old["bulge_snr"], old["extended_min_snr"]
    c = DeblendConfig.from_json(json.dumps(old))
    assert (c.min_snr, c.bulge_snr, c.extended_min_snr) == (40.0, 80.0, 40.0)
    new = DeblendConfig(min_snr=40, bulge_snr=60, extended_min_snr=20)
    assert DeblendConfig.from_json(new.to_json()) == new


def test_warm_start_on_hsc_needs_fewer_iterations(hsc_path):
    from scarletstore.detect.detect import detect

    exposure = read_npz(hsc_path)
    parents = detect(exposure)
    config = DeblendConfig()
    cold = deblend_exposure(exposure, parents, config, "scarlet", name="cold")
    warm = deblend_exposure(exposure, parents, config, "scarlet", name="warm",
                            init=init_from_run(cold), from_run="cold")
    fitted = cold["blend_reason"].values == ""
    assert fitted.any()
    assert np.all(warm["blend_iterations"].values[fitted] < cold["blend_iterations"].values[fitted])
    assert np.all(warm["blend_log_likelihood"].values[fitted] >= cold["blend_log_likelihood"].values[fitted] - 1e-6 * np.abs(cold["blend_log_likelihood"].values[fitted]))
    assert warm.attrs["from_run"] == "cold"


def test_existing_scheduler_equals_in_process(field):
    pytest.importorskip("distributed")
    from dask.distributed import LocalCluster

    exposure, parents, _ = field
    config = DeblendConfig(max_iter=10)
    one = deblend_exposure(exposure, parents, config, "scarlet", workers=1)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = deblend_exposure(exposure, parents, config, "scarlet", scheduler=cluster.scheduler_address)
    np.testing.assert_array_equal(remote["morph"].values, one["morph"].values)
    np.testing.assert_array_equal(remote["blend_log_likelihood"].values, one["blend_log_likelihood"].values)


def test_detect_cli_errors_leave_store_unchanged(field, tmp_path, capsys):
    _, _, src = field
    path = tmp_path / "s.h5"
    copy_store(src, path)
    data = store_bytes(path)
    bad_table = tmp_path / "peaks.csv"
    bad_table.write_text("a,b\n1,2\n")
    for argv, msg in [
        (["--threshold", "0"], "threshold"),
        (["--threshold", "-2"], "threshold"),
        (["--peaks", str(tmp_path / "missing.csv"), "--replace"], "missing.csv"),
        (["--peaks", str(bad_table), "--replace"], "peaks.csv"),
        ([], "already has parents"),
    ]:
        assert main(["detect", str(path), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, (argv, err)
    assert store_bytes(path) == data
    empty = tmp_path / "empty.h5"
    Store.create(empty, {})
    assert main(["detect", str(empty)]) == 2
    assert "no exposure" in capsys.readouterr().err


def test_diff_and_info_report_runs(field, tmp_path, capsys):
    _, _, src = field
    path = tmp_path / "s.h5"
    copy_store(src, path)
    assert main(["deblend", str(path), "--run", "a", "--set", "max_iter=10"]) == 0
    assert main(["deblend", str(path), "--run", "b", "--from-run", "a", "--set", "max_iter=30"]) == 0
    capsys.readouterr()
    assert main(["diff", str(path), "a", "b"]) == 0
    out = capsys.readouterr().out
    n = Store(path).read("runs/a").sizes["source"]
    assert f"{n} sources matched" in out and "0 only in a, 0 only in b" in out
    assert all(f"  {band}: median |dflux/flux|" in out for band in "gri")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "from run: a" in out and "config: max_iter=30" in out and "exposure sha256" in out
    assert main(["diff", str(path), "a", "nope"]) == 2


def test_catalog_positions_and_redistribution_conserve_flux(field, tmp_path):
    """Every row lies on its own peak, and the redistributed children of every
    parent (isolated or fitted) sum to the image over its footprint."""
    from scarletstore.measure.catalog import band_catalog, heavy_footprint
    from scarletstore.store.runs import SOURCE_FLAGS

    exposure, parents, src = field
    path = tmp_path / "s.h5"
    copy_store(src, path)
    run = deblend_exposure(exposure, parents, DeblendConfig(max_iter=20), "scarlet", name="a")
    Store(path).write({"runs/a": run})
    h, w = exposure.sizes["y"], exposure.sizes["x"]
    iso = (run["source_flags"].values & SOURCE_FLAGS["isolated"]) != 0
    assert iso.sum() >= 2 and (~iso).sum() >= 3  # both kinds are exercised
    x, y = run["source_x"].values, run["source_y"].values
    assert ((x >= 0) & (x < w) & (y >= 0) & (y < h)).all()
    peak_at = {int(i): (py, px) for i, py, px in zip(parents["peak_id"].values, parents["peak_y"].values,
                                                      parents["peak_x"].values)}
    true = np.array([peak_at[int(p)] for p in run["source_peak_id"].values])
    assert np.abs(np.stack([y, x], axis=1) - true).max() <= 1.0
    # component peaks are stored in exposure pixels like the rows
    first_comp = counts_to_offsets(run["source_n_components"].values)[:-1]
    np.testing.assert_allclose(run["component_peak_y"].values[first_comp][iso], y[iso])
    np.testing.assert_allclose(run["component_peak_x"].values[first_comp][iso], x[iso])

    store = Store(path)
    for band in ("g", "i"):
        cat = band_catalog(store, band, redistribute=True)
        measurer = cat.attrs["_measurer"]
        flux = cat["flux_redistributed"].values
        blend_of_row = cat["blend"].values
        for b in range(run.sizes["blend"]):
            blend, models, fp, data, redist = measurer.blend_products(b)
            if not blend.sources:
                continue
            image, _, good = data
            inside = float(image[fp & good].sum(dtype=np.float64))
            rows = np.flatnonzero(blend_of_row == b)
            np.testing.assert_allclose(flux[rows].sum(), inside, rtol=1e-4, atol=1e-3)
            if len(rows) == 1 and iso[rows[0]]:
                np.testing.assert_array_equal(redist[0], np.where(fp & good, image, 0))
                # its heavy footprint covers the whole footprint, negative pixels too
                hf = heavy_footprint(store, int(cat["id"].values[rows[0]]), band, redistribute=True)
                assert len(hf.values) == int((fp & good).sum())
                assert hf.flux == pytest.approx(inside, rel=1e-5, abs=1e-3)
        measurer.close()


def test_sdss_and_isolated_record_honest_statistics(field, tmp_path):
    """SDSS blends carry their template model's chi2/logL (not 0 / -0 / 1 iteration);
    isolated parents claim no fit."""
    from scarletstore.deblend.run import make_tasks
    from scarletstore.measure.catalog import band_catalog

    exposure, parents, src = field
    config = DeblendConfig()
    run = deblend_exposure(exposure, parents, config, "sdss", name="s")
    fitted = run["blend_reason"].values == ""
    assert fitted.sum() >= 3
    assert np.all(run["blend_iterations"].values[fitted] == 0)  # a direct solution
    assert np.all(run["blend_converged"].values[fitted])
    chi2 = run["blend_chi2"].values[fitted]
    logl = run["blend_log_likelihood"].values[fitted]
    assert np.all(np.isfinite(chi2)) and np.all(chi2 > 0.5) and np.all(logl < 0)
    # chi2 per good (band, pixel) of the footprint, logL = -chi2 * n / 2
    tasks, _ = make_tasks(exposure, parents, config)
    n_good = np.array([(t.footprint[None] & ~t.bad).sum() for t in tasks])
    np.testing.assert_allclose(logl, -0.5 * chi2 * n_good, rtol=1e-9)

    iso = run["blend_reason"].values == "isolated"
    assert iso.sum() >= 2
    assert not run["blend_converged"].values[iso].any()
    assert np.all(run["blend_iterations"].values[iso] == 0)
    assert np.all(np.isnan(run["blend_chi2"].values[iso]))
    assert np.all(np.isnan(run["blend_log_likelihood"].values[iso]))
    # ... and their catalog rows are not flagged as fits that failed to converge
    path = tmp_path / "s.h5"
    copy_store(src, path)
    Store(path).write({"runs/s": run})
    cat = band_catalog(Store(path), "r").compute()
    assert not np.any(cat["flags"].values & (1 << 9))


def test_kernel_compilation_is_kept_out_of_runtimes(field, monkeypatch, capsys):
    """A first call that costs 0.5 s (as numba compilation does) is paid by the
    warm-up, recorded in the run's attrs, and announced once when the cache is cold."""
    from scarletstore.deblend import run as run_module

    exposure, parents, _ = field
    calls = []

    def slow_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.5)
        return real(*args, **kwargs)

    real = run_module._deblender("sdss")
    monkeypatch.setattr(run_module, "_deblender", lambda method: slow_first)
    monkeypatch.setattr(run_module, "_WARM", set())
    monkeypatch.setattr(run_module, "kernels_cold", lambda method: True)
    monkeypatch.setattr(run_module, "_on_terminal", lambda: True)
    run = deblend_exposure(exposure, parents, DeblendConfig(), "sdss", show_progress=True)
    fitted = run["blend_reason"].values == ""
    assert run["blend_runtime"].values[fitted].max() < 0.25
    assert run.attrs["kernel_warmup_seconds"] >= 0.5
    assert capsys.readouterr().err.splitlines() == ["compiling kernels (first run only)..."]
    # warm: quiet, and no second warm-up in this process
    monkeypatch.setattr(run_module, "kernels_cold", lambda method: False)
    run = deblend_exposure(exposure, parents, DeblendConfig(), "sdss", show_progress=True)
    assert capsys.readouterr().err == "" and run.attrs["kernel_warmup_seconds"] == 0.0


def test_kernels_cold_reads_the_numba_cache(tmp_path):
    """Cold: no kernel has a cache index, or an index is older than its source."""
    import os
    from types import SimpleNamespace

    from scarletstore.deblend.run import _dispatchers, kernels_cold

    assert len(list(_dispatchers("sdss"))) > 20  # the real kernels are found
    source = tmp_path / "kernels.py"
    source.write_text("# source\n")

    def kernel(name, index_age=None, loaded=False):
        index = tmp_path / f"{name}.nbi"
        if index_age is not None:
            index.write_bytes(b"")
            t = os.path.getmtime(source) + index_age
            os.utime(index, (t, t))
        code = SimpleNamespace(co_filename=str(source))
        return SimpleNamespace(signatures=["sig"] if loaded else [], py_func=SimpleNamespace(__code__=code),
                               _cache=SimpleNamespace(_cache_file=SimpleNamespace(_index_path=str(index))))

    never_used = kernel("a")
    assert kernels_cold("sdss", [never_used, kernel("b")])  # a fresh checkout
    assert not kernels_cold("sdss", [never_used, kernel("c", index_age=10)])  # cached
    assert kernels_cold("sdss", [kernel("d", index_age=10), kernel("e", index_age=-10)])  # source edited
    assert not kernels_cold("sdss", [never_used, kernel("f", loaded=True)])  # loaded in this process


def test_run_of_no_blends_reads_back(tmp_path):
    """A patch of blank sky detects nothing; its run (zero blends) must still be a valid product:
    xarray writes an empty object column as float64 unless told it holds strings."""
    from scarletstore.deblend.psf import gaussian_psf
    from scarletstore.detect.detect import detect
    from scarletstore.ingest.exposure import make_exposure

    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (2, 48, 48)).astype(np.float32)
    psf = np.stack([gaussian_psf(1.5, 15)] * 2)
    exposure = make_exposure(image, np.ones_like(image), np.zeros(image.shape, np.int32), psf, ["g", "r"])
    parents = detect(exposure, threshold=50.0)
    assert parents.sizes["parent"] == 0
    path = tmp_path / "blank.h5"
    Store.create(path, {"exposure": exposure, "parents": parents})
    assert main(["deblend", str(path)]) == 0
    store = Store(path)
    run = store.read(f"runs/{store.runs()[-1]}")
    assert run.sizes["blend"] == 0 and run["blend_reason"].dtype.kind in "OU"
    assert main(["info", str(path), "--check"]) == 0
    assert len(store.catalog("r").id) == 0
