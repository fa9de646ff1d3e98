"""The command line: one-line errors with exit status 2, first-contact help, run reporting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_wcs_header, store_bytes

from scarletstore.cli import main
from scarletstore.deblend.psf import gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.store import Store, copy_store

ROOT = Path(__file__).resolve().parent.parent
H = W = 64
BANDS = ["g", "r", "i"]


def _blob(cy, cx, sigma):
    y, x = np.mgrid[:H, :W]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def _records(scale):
    """Two blends of two sources (the first converged) and one isolated parent."""
    morph = (_blob(6, 6, 2.0)[:13, :13] / _blob(6, 6, 2.0).max()).astype(np.float32)
    out = []
    for i, (bbox, peaks) in enumerate([((4, 4, 26, 26), [(12, 12), (20, 18)]),
                                       ((34, 30, 26, 28), [(42, 40), (50, 48)])]):
        sources = [SourceResult(j, [Component(np.array([3.0, 5.0, 4.0], np.float32) * scale, morph,
                                              py - bbox[0] - 6, px - bbox[1] - 6,
                                              (py - bbox[0], px - bbox[1]))])
                   for j, (py, px) in enumerate(peaks)]
        out.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.arange(2) + 10 * i,
                               peaks=np.array(peaks, float), sources=sources, iterations=20 + 5 * i,
                               log_likelihood=-100.0 * (i + 1), chi2=1.1, converged=i == 0,
                               runtime=0.01))
    out.append(BlendRecord(index=2, parent_id=3, bbox=(40, 4, 10, 10), peak_ids=np.array([30]),
                           peaks=np.array([[45.0, 9.0]]), reason="isolated"))
    return out


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """A store with a WCS exposure and two runs, ``a`` then ``b`` (the newest)."""
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(7)
    scene = 40 * (_blob(12, 12, 2) + _blob(20, 18, 2) + _blob(42, 40, 2.5) + _blob(50, 48, 2))
    image = np.array([scene * s + rng.normal(0, 1, (H, W)) for s in (0.6, 1.0, 0.8)], np.float32)
    psfs = [gaussian_psf(1.4 + 0.1 * b, 15) for b in range(3)]
    ex = make_exposure(image, np.ones_like(image), np.zeros(image.shape, np.int32), psfs, BANDS,
                       wcs=make_wcs_header(H, W).tostring())
    path = tmp / "s.h5"
    runs = {}
    for name, scale in (("a", 1.0), ("b", 1.2)):
        runs[f"runs/{name}"] = build_run(_records(scale), BANDS, ex["psf"].values, gaussian_psf(0.8),
                                         name=name, method="scarlet", config_json="{}",
                                         package_version="test")
    Store.create(path, {"exposure": ex, "runs/a": runs["runs/a"]})
    Store(path).add_run(runs["runs/b"], name="b")  # added second: the newest
    return path


def _fails(argv, capsys, *expect):
    """Run the CLI expecting exit status 2 and one stderr line containing every ``expect``."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in expect:
        assert text in err, (argv, err)
    return err


@pytest.fixture(scope="module")
def field_path(store_path, tmp_path_factory):
    """The store with parents detected in its exposure (for deblend)."""
    from scarletstore.detect.detect import detect

    path = tmp_path_factory.mktemp("field") / "f.h5"
    copy_store(store_path, path)
    store = Store(path)
    store.write({"parents": detect(store.read("exposure"))})
    return path


def _cli(*argv, **kw):
    """The CLI in a fresh interpreter (what a shell user runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kw.setdefault("capture_output", "stdout" not in kw)
    return subprocess.run([sys.executable, "-m", "scarletstore.cli", *argv], text=True, env=env,
                          timeout=300, **kw)


# ------------------------------------------------------- outputs that cannot be written
@pytest.mark.parametrize("command,name", [
    (["catalog", "--band", "r"], "x.csv"), (["show", "--blend", "1"], "x.png"),
    (["export-lsst"], "x.json")])
def test_output_into_a_missing_directory_is_one_line(store_path, tmp_path, capsys, command, name):
    out = tmp_path / "nodir" / name
    _fails([command[0], str(store_path), *command[1:], "-o", str(out)], capsys,
           str(out), "does not exist")
    assert not (tmp_path / "nodir").exists()


def test_output_that_is_a_directory_is_refused(store_path, tmp_path, capsys):
    (tmp_path / "x.json").mkdir()
    _fails(["export-lsst", str(store_path), "-o", str(tmp_path / "x.json")], capsys, "directory")


# ------------------------------------------------------- region
@pytest.mark.parametrize("region,problem", [
    (["150.1", "95", "1"], "DEC must be in [-90, 90]"),
    (["150.1", "-90.5", "1"], "DEC must be in [-90, 90]"),
    (["nan", "2.2", "1"], "finite"),
    (["150.1", "inf", "1"], "finite"),
    (["150.1", "2.2", "nan"], "finite"),
    (["150.1", "2.2", "0"], "radius must be positive"),
    (["150.1", "2.2", "-3"], "radius must be positive"),
])
def test_region_out_of_range_is_one_line(store_path, capsys, region, problem):
    _fails(["query", str(store_path), "--region", *region], capsys, problem)


def test_region_at_the_limits_is_accepted(store_path, capsys):
    # dec = 90 is a valid position (nothing of this field is there)
    assert main(["query", str(store_path), "--run", "a", "--region", "150.1", "90", "1"]) == 0
    assert "no blends of run a match" in capsys.readouterr().out


# ------------------------------------------------------- simulate
def test_simulate_into_an_existing_path_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.fits").write_text("keep me too")
    _fails(["simulate", str(afile), "--size", "16"], capsys, str(afile), "not a directory")
    _fails(["simulate", str(full), "--size", "16"], capsys, str(full), "not empty")
    _fails(["simulate", str(tmp_path / "no" / "sim"), "--size", "16"], capsys, "does not exist")
    assert afile.read_text() == "keep me" and [p.name for p in full.iterdir()] == ["old.fits"]


# ------------------------------------------------------- deblend arguments
@pytest.mark.parametrize("argv,problem", [
    (["--blends", ","], "--blends expects comma-separated parent ids"),
    (["--blends", " , ,"], "--blends expects comma-separated parent ids"),
    (["--blends", "1,,2"], "--blends expects comma-separated parent ids"),
    (["--blends", "1,1"], "twice"),
    (["--set", "relative_error=NaN"], "relative_error must be a finite number"),
    (["--set", "relative_error=Infinity"], "relative_error must be a finite number"),
    (["--set", "min_footprint_axis_ratio=Infinity"], "min_footprint_axis_ratio must be a finite number"),
    (["--set", "contest_ratio=-Infinity"], "contest_ratio must be positive"),  # the config's own check
    (["--set", "colour=3"], "valid keys: max_iter, relative_error"),
    (["--scheduler", "nonsense"], "expected an address like tcp://HOST:PORT"),
    (["--scheduler", "tcp://localhost:notaport"], "expected an address like tcp://HOST:PORT"),
    (["--scheduler", "foo://localhost:8786"], "unknown scheme 'foo'"),
    (["--scheduler", "tcp://localhost:0"], "port must be in 1..65535"),
    (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach dask scheduler tcp://127.0.0.1:1"),
])
def test_deblend_refuses_bad_arguments_before_any_work(field_path, tmp_path, capsys, argv, problem):
    path = tmp_path / "f.h5"
    copy_store(field_path, path)
    before = store_bytes(path)
    _fails(["deblend", str(path), *argv], capsys, problem)
    assert store_bytes(path) == before and Store(path).runs() == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5", "f.h5.d"]  # no temporary left behind


def test_unknown_key_error_lists_every_configuration_field(field_path, capsys):
    import dataclasses

    from scarletstore.deblend.config import DeblendConfig

    err = _fails(["deblend", str(field_path), "--set", "colour=3"], capsys, "unknown configuration key")
    assert all(f.name in err for f in dataclasses.fields(DeblendConfig))


def test_infinite_size_limit_still_means_no_limit():
    from scarletstore.cli import _check_overrides

    assert _check_overrides(["max_footprint_area=Infinity"]) == ["max_footprint_area=Infinity"]


def test_diff_top_must_not_be_negative(store_path, capsys):
    _fails(["diff", str(store_path), "a", "b", "--top", "-1"], capsys, "--top must be 0 or more")
    assert main(["diff", str(store_path), "a", "b", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "source_id_a" not in out  # no table with --top 0


# ------------------------------------------------------- temporary files are never named
def test_os_errors_name_the_store_not_its_temporary_copy():
    from scarletstore.cli import _user_path

    assert _user_path("/data/.field.h5.k3j_x9ab.tmp") == "/data/field.h5"
    assert _user_path("/data/.cat.csv.tmp") == "/data/cat.csv"
    assert _user_path("/data/field.h5") == "/data/field.h5"


@pytest.mark.parametrize("layout", ["linked", "single"])
def test_full_disk_during_a_write_names_the_store(field_path, tmp_path, capsys, monkeypatch, layout):
    import errno

    import scarletstore.store.store as store_module

    def full_disk(src, dst, *a, **k):  # writing the new product (or the single file's copy) fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    path = tmp_path / "f.h5"
    if layout == "linked":
        copy_store(field_path, path)
        monkeypatch.setattr(store_module, "_write_product", lambda file, group, ds: full_disk(None, file))
    else:
        source = Store(field_path)
        Store.create(path, {g: source.read(g, upgrade=False) for g in source.groups()}, layout="single")
        monkeypatch.setattr(store_module.shutil, "copyfile", full_disk)
    before = store_bytes(path)
    err = _fails(["deblend", str(path), "--method", "sdss", "--blends", "1"], capsys,
                 f"{path}: No space left on device")
    assert ".tmp" not in err and ".h5.d" not in err
    assert store_bytes(path) == before
    left = ["f.h5", "f.h5.d"] if layout == "linked" else ["f.h5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # no temporary left behind


# ------------------------------------------------------- | head
def _closed_pipe_run(*argv):
    """Run the CLI with stdout a pipe whose reader is already gone (``| head`` that exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return _cli(*argv, stdout=write, stderr=subprocess.PIPE)
    finally:
        os.close(write)


@pytest.mark.parametrize("argv", [["info"], ["query"], ["deblend", "--method", "sdss", "--blends", "1"]])
def test_closed_stdout_exits_quietly(field_path, tmp_path, argv):
    path = tmp_path / "f.h5"
    copy_store(field_path, path)
    res = _closed_pipe_run(argv[0], str(path), *argv[1:])
    assert res.stderr.count("Traceback") == 0 and "BrokenPipe" not in res.stderr, res.stderr
    assert "Exception ignored" not in res.stderr, res.stderr
    assert res.returncode == 141
    if argv[0] == "deblend":  # the run was committed before the summary line failed to print
        assert len(Store(path).runs()) == 3


# ------------------------------------------------------- first contact
def test_version(capsys):
    from scarletstore import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"scarletstore {__version__}"


def _subparser(name):
    from scarletstore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[name]


def test_deblend_help_lists_the_configuration_keys():
    import dataclasses

    from scarletstore.deblend.config import DeblendConfig

    text = _subparser("deblend").format_help().replace("\n", " ")
    missing = [f.name for f in dataclasses.fields(DeblendConfig) if f.name not in text]
    assert not missing


def test_every_simulate_option_has_help():
    actions = [a for a in _subparser("simulate")._actions if a.dest != "help"]
    assert {a.dest for a in actions} == {"out_dir", "size", "seed", "bands", "density", "visits",
                                         "psf_beta", "bright_stars", "saturation", "cosmic_rays",
                                         "bad_columns"}
    assert all(a.help and len(a.help) > 10 for a in actions)


def test_query_help_documents_the_grammar():
    text = " ".join(_subparser("query").format_help().split())
    for part in ("and/or/not", "'in'/'not in'", "True/False", "== != < <= > >=", "reason"):
        assert part in text, part


@pytest.mark.parametrize("command", [
    ["catalog", "--band", "r", "-o", "{tmp}/c.csv"], ["query"],
    ["show", "--blend", "1", "-o", "{tmp}/b.png"], ["export-lsst", "-o", "{tmp}/m.json"]])
def test_commands_say_which_run_they_picked(store_path, tmp_path, capsys, command):
    argv = [command[0], str(store_path), *(c.format(tmp=tmp_path) for c in command[1:])]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines().count("using run b (newest)") == 1, captured.err
    assert "run b" in captured.out or command[0] == "query"
    assert main([*argv, "--run", "a"]) == 0  # named: nothing to announce
    assert "using run" not in capsys.readouterr().err


def test_export_lsst_defaults_to_the_newest_run(store_path, tmp_path, capsys):
    import json

    out = tmp_path / "m.json"
    assert main(["export-lsst", str(store_path), "-o", str(out)]) == 0
    assert "wrote run b (3 blends, 4 sources)" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert len(doc["blends"]) == 3


def test_diff_defaults_to_the_two_newest_runs(store_path, capsys):
    assert main(["diff", str(store_path)]) == 0
    captured = capsys.readouterr()
    assert "using runs a and b (the two newest)" in captured.err
    # run b's spectra are 1.2x run a's: every matched source changed flux by 20 %
    assert captured.out.startswith("a -> b: 4 sources matched")
    assert "g: median |dflux/flux| 0.2000" in captured.out
    assert main(["diff", str(store_path), "a"]) == 0
    assert "using run b (newest, to compare with)" in capsys.readouterr().err
    _fails(["diff", str(store_path), "b"], capsys, "is the newest")


# ------------------------------------------------------- the Python entry point
def test_open_returns_the_store(store_path):
    import scarletstore as ss

    store = ss.open(store_path)
    assert isinstance(store, ss.Store) and store.runs() == ["a", "b"]
    assert ss.Store is Store and "Store" in dir(ss)
    with pytest.raises(ss.StoreError, match="no such store"):
        ss.open(store_path.with_name("missing.h5"))
    with pytest.raises(AttributeError):
        ss.no_such_thing  # noqa: B018


def test_import_is_cheap():
    code = ("import sys, scarletstore as ss; "
            "print(sorted(m for m in ('numpy', 'pandas', 'xarray', 'h5py', 'numba', 'astropy') "
            "if m in sys.modules)); ss.Store; print('h5py' in sys.modules, 'xarray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    # the store module loads on first use, and it opens stores without xarray (store/frame.py)
    assert res.stdout.split("\n")[:2] == ["[]", "True False"]


def test_the_command_exits_without_teardown_and_loses_nothing(tmp_path):
    """``python -m scarletstore.cli`` (and the ``scarletstore`` script) ends with
    ``os._exit`` after every exit handler: statuses, piped output and the store
    written must be what a normal exit gives."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args, extra=""):
        code = ("import atexit, sys\n"
                f"{extra}\n"
                "from scarletstore.cli import run\n"
                f"sys.argv = ['scarletstore', *{[str(a) for a in args]!r}]\n"
                "sys.exit(run())")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)

    res = cli("info", tmp_path / "missing.h5")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such store" in res.stderr
    image = np.random.default_rng(3).normal(0, 1, (2, 40, 50)).astype(np.float32)
    image[:, 18:23, 20:26] += 40  # one source
    ex = make_exposure(image, np.ones_like(image), None, [gaussian_psf(0.9)] * 2, ["g", "r"],
                       wcs=make_wcs_header(40, 50).tostring())
    path = tmp_path / "s.h5"
    Store.create(path, {"exposure": ex})
    # an exit handler registered while the command runs (as its imports do) still runs
    hook = ("import scarletstore.cli as c\n_main = c.main\n"
            "def main(argv=None):\n"
            "    atexit.register(lambda: print('handler ran', flush=True))\n"
            "    return _main(argv)\n"
            "c.main = main")
    res = cli("detect", path, extra=hook)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("handler ran") and "detected 1 parent with" in res.stdout
    res = cli("deblend", path, "--run", "a")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("run a: ") and res.stdout.endswith("\n")
    assert Store(path).check() == [] and Store(path).runs() == ["a"]
    res = cli("query", path)  # a long table through a pipe arrives whole
    assert res.returncode == 0 and res.stdout.count("\n") >= 2
