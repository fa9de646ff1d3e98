"""The command line's xarray-free path: Frames read from the store, runs built and
written as Frames (store/frame.py, store/h5write.py).

A Frame must stand for the Dataset xarray would build (same variables, order,
coordinates, attributes), a Frame run must be written object for object as
xarray writes the same Dataset, and a deblend from the shell must never import
xarray and give the run the Dataset path gives.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_recorded_checksum import TIMING, _blends, _field
from test_write_path import _layout, _same_bits

from scarletstore.cli import main
from scarletstore.deblend import DeblendConfig
from scarletstore.deblend.run import deblend_exposure
from scarletstore.store.frame import Column, Frame
from scarletstore.store.h5write import writable
from scarletstore.store.store import Store, _encoding, _product_encoding, _write_groups, run_group

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["linked", "single"])
def detected(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"frame_{request.param}") / "s.h5"
    Store.create(path, {"exposure": _field(7)}, layout=request.param)
    assert main(["detect", str(path)]) == 0
    return path


def test_frame_reads_like_the_dataset_it_stands_for():
    f = Frame({"a": ("x", np.arange(3)), "b": (("band", "x"), np.zeros((2, 3)), {"units": "s"})},
              coords={"band": np.array(["g", "r"], object), "z": ("x", np.arange(3.0))},
              attrs={"schema": "t"})
    f["c"] = ("y", np.arange(4))
    assert list(f.variables) == ["a", "b", "band", "z", "c"]
    assert list(f) == ["a", "b", "c"] and set(f.coords) == {"band", "z"}
    assert f.sizes == {"x": 3, "band": 2, "y": 4}
    assert f.band.values.tolist() == ["g", "r"] and f["b"].attrs == {"units": "s"}
    ds = f.to_dataset()
    assert list(ds.variables) == list(f.variables)  # the order the writers follow
    assert set(ds.coords) == {"band", "z"} and ds["b"].attrs == {"units": "s"}
    back = Frame.from_dataset(ds)
    assert list(back.variables) == list(f.variables) and set(back.coords) == set(f.coords)
    g = f.assign(a=("x", np.arange(3) + 5))
    assert g["a"].values.tolist() == [5, 6, 7] and f["a"].values.tolist() == [0, 1, 2]
    g.attrs["name"] = "x"
    assert "name" not in f.attrs  # copies never share attributes
    with pytest.raises(ValueError, match="dimension 'x' has length 4"):
        f["d"] = ("x", np.arange(4))
    with pytest.raises(ValueError, match="dims"):
        Column(("x", "y"), np.arange(3))
    with pytest.raises(AttributeError):
        f.no_such_variable  # noqa: B018


def test_store_frames_are_the_datasets_the_store_reads(detected):
    assert main(["deblend", str(detected), "--run", "r", "--set", "max_iter=20"]) == 0
    store = Store(detected)
    for group in ("exposure", "parents", run_group("r")):
        frame = store.read(group, frame=True)
        assert isinstance(frame, Frame), group
        _same_bits(frame.to_dataset(), store.read(group))
        part, digest = store.read_with_checksum(group, frame=True)
        assert isinstance(part, Frame) and digest == store.checksum(group)
    boxes, _ = store.read_boxes("exposure", [(0, 0, 9, 11)], frame=True)
    assert isinstance(boxes, Frame)
    full = store.read("exposure")["image"].values
    assert np.array_equal(boxes["image"].values[:, :9, :11], full[:, :9, :11])
    assert not boxes["image"].values[:, 9:, :].any()


@pytest.mark.parametrize("method", ["scarlet", "sdss"])
@pytest.mark.parametrize("encoding", [_encoding, _product_encoding])
def test_a_frame_run_is_written_as_xarray_writes_it(detected, tmp_path, method, encoding):
    store = Store(detected)
    ex, pa = store.read("exposure", frame=True), store.read("parents", frame=True)
    run = deblend_exposure(ex, pa, DeblendConfig(max_iter=20), method, as_frame=True)
    assert isinstance(run, Frame) and run.sizes["blend"] > 3
    assert writable(run, encoding(run))  # else the comparison below would be xarray's twice
    # a zero-blend run keeps its string columns strings on both paths
    empty = deblend_exposure(ex, pa, DeblendConfig(), method, blend_ids=[], as_frame=True)
    for name, frame in (("runs/x", run), ("runs/empty", empty)):
        for which, obj in (("frame", frame), ("xarray", frame.to_dataset())):
            path = tmp_path / f"{which}.h5"
            _write_groups(path, {name: obj}, encoding=encoding, mode="w")
        assert _layout(tmp_path / "frame.h5", name) == _layout(tmp_path / "xarray.h5", name), name


def test_frames_xarray_cannot_write_alike_go_through_xarray():
    f = Frame({"a": ("x", np.arange(3.0))}, attrs={"schema": "t"})
    assert writable(f, {"a": {"_FillValue": None}})
    assert not writable(f, {"a": {"_FillValue": -1.0}})  # a CF fill value
    assert not writable(f.set_coords(["a"]).assign(b=("x", np.zeros(3))).set_coords(["b"]), {})
    assert not writable(Frame({"s": ("x", np.array([1, "a"], object))}), {})  # not all str
    assert not writable(Frame({"a": ("x", np.arange(3.0))}, attrs={"flag": True}), {})
    assert not writable(Frame({"a": ("x", np.arange(3).astype(">i4"))}), {})
    assert not writable(f.to_dataset(), {})  # Datasets keep xarray's writer


def _modules_after(argv) -> set[str]:
    code = ("import sys\nfrom scarletstore.cli import main\n"
            f"assert main({argv!r}) == 0\n"
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split("\n")[-2].split())


def test_a_deblend_from_the_shell_never_imports_xarray_and_matches_the_api(detected):
    blends = _blends(detected, 2)
    arg = ",".join(map(str, blends))
    mods = _modules_after(["deblend", str(detected), "--run", "shell", "--blends", arg,
                           "--set", "max_iter=30"])
    assert "xarray" not in mods and "pandas" not in mods
    assert "h5netcdf" in mods  # the run was written, by h5netcdf alone
    store = Store(detected)
    got = store.read(run_group("shell"))
    want = deblend_exposure(store.read("exposure"), store.read("parents"), DeblendConfig(max_iter=30),
                            blend_ids=blends, name="shell", exposure_checksum=store.checksum("exposure"),
                            parents_checksum=store.checksum("parents"))
    assert got.sizes == want.sizes
    for name in want.variables:
        if name in TIMING or name == "source_id":
            continue
        a, b = got[name].values, want[name].values
        assert a.shape == b.shape, name
        if b.dtype.kind in "OU":  # strings read back as str, whatever went in
            assert a.dtype.kind in "OU", name
            assert [str(v) for v in a.ravel()] == [str(v) for v in b.ravel()], name
        else:
            assert a.dtype == b.dtype, name
            assert a.tobytes() == b.tobytes(), name
    for key, value in want.attrs.items():
        if key not in TIMING and key != "name":
            assert got.attrs[key] == value, key
    assert store.check() == []
