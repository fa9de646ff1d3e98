"""Summary lines and errors say what happened, in the right number.

Found by a new-user review: the deblend line did not count skipped parents (a parent over
the memory budget even as one-peak pieces vanished from the run without a word), and
messages read "1 bands", "1 files were given", "runs second were",
"1 patches not done".
"""

from __future__ import annotations

from test_cli_outputs import _fails, _ok, _write_npz

from scarletstore.cli import main
from scarletstore.text import noun, plural


def test_plural():
    assert plural(1, "band") == "1 band" and plural(0, "band") == "0 bands"
    assert plural(2, "patch", "patches") == "2 patches" and plural(1, "patch", "patches") == "1 patch"
    assert noun(1, "was", "were") == "was" and noun(3, "run") == "runs"


def test_deblend_line_counts_skipped_parents_and_their_reasons(tmp_path, capsys):
    store = tmp_path / "s.h5"
    _ok(["ingest", store, _write_npz(tmp_path / "in.npz")])
    _ok(["detect", store])
    capsys.readouterr()
    # a budget no one-peak piece fits in: the two-peak parent is skipped as too big
    _ok(["deblend", store, "--set", "memory_budget=1e3"])
    out = capsys.readouterr().out
    assert "2 parents" in out and "1 isolated" in out, out
    assert "1 skipped (parent_too_big: 1)" in out and "1 source," in out, out


def test_counts_of_one_are_singular(tmp_path, capsys):
    npz = _write_npz(tmp_path / "in.npz")
    _fails(["ingest", tmp_path / "s.h5", npz, "--bands", "r"], capsys,
           "--bands names 1 band,")
    fits = [tmp_path / f"{b}.fits" for b in "gr"]
    assert main(["ingest", str(tmp_path / "t.h5"), str(fits[0]), "--bands", "g,r"]) == 2
    assert "names 2 bands but 1 file was given" in capsys.readouterr().err
    store = tmp_path / "u.h5"
    _ok(["ingest", store, npz])
    _ok(["detect", store])
    _ok(["deblend", store, "--run", "second"])
    capsys.readouterr()
    _ok(["detect", store, "--replace", "--threshold", "3"])
    err = capsys.readouterr().err
    assert "warning: run second was deblended from the replaced parents" in err, err


def test_export_lsst_output_must_be_json(tmp_path, capsys):
    store = tmp_path / "s.h5"
    _ok(["ingest", store, _write_npz(tmp_path / "in.npz")])
    _ok(["detect", store])
    _ok(["deblend", store])
    _fails(["export-lsst", store, "-o", tmp_path / "x.txt"], capsys, "must end in .json")
    assert not (tmp_path / "x.txt").exists()
    _ok(["export-lsst", store, "-o", tmp_path / "x.json"])
