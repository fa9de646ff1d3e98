"""Checksums recorded when the exposure and parents are written, and the deblend of a
few blends that reads only their boxes of the exposure and takes the recorded digest."""

import h5py
import numpy as np
import pytest
from conftest import gaussian_psf, make_wcs_header

from scarletstore.cli import main
from scarletstore.ingest.exposure import make_exposure
from scarletstore.store.store import CHECKSUM_ATTR, RECORDED_CHECKSUMS, Store

BANDS = ["g", "r", "i", "z"]
# values that depend on the clock or the call, not on the fit
TIMING = {"blend_runtime", "kernel_warmup_seconds", "created", "package_version"}


def _field(seed, ny=96, nx=120):
    """Moffat-profile sources in four bands with a few masked pixels (not the
    simulator's scenes): blends of two or three and isolated sources."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ny, :nx]
    image = np.zeros((len(BANDS), ny, nx))
    for _ in range(14):
        cy, cx = rng.uniform(8, ny - 8), rng.uniform(8, nx - 8)
        amp, r = rng.uniform(20, 80), rng.uniform(1.5, 3.0)
        sed = rng.uniform(0.4, 1.2, len(BANDS))
        image += amp * sed[:, None, None] * (1 + ((y - cy) ** 2 + (x - cx) ** 2) / r**2) ** -2.5
    var = rng.uniform(0.8, 1.2, image.shape)
    image += rng.normal(0, 1, image.shape) * np.sqrt(var)
    mask = np.zeros(image.shape, np.int32)
    mask[:, rng.integers(0, ny, 20), rng.integers(0, nx, 20)] = 1  # a few BAD pixels
    psfs = [gaussian_psf(15, 1.3 + 0.15 * b) for b in range(len(BANDS))]
    return make_exposure(image.astype(np.float32), var.astype(np.float32), mask, psfs, BANDS,
                         wcs=make_wcs_header(ny, nx).tostring())


@pytest.fixture(scope="module", params=["linked", "single"])
def detected(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"recorded_{request.param}") / "s.h5"
    Store.create(path, {"exposure": _field(5)}, layout=request.param)
    assert main(["detect", str(path)]) == 0
    assert Store(path).layout == request.param
    return path


def _blends(path, n):
    parents = Store(path).read("parents")
    multi = parents["parent_id"].values[parents["peak_count"].values > 1]
    assert multi.size >= n
    return [int(p) for p in multi[:n]]


def test_recorded_checksum_is_the_content_checksum(detected):
    store = Store(detected)
    for group in RECORDED_CHECKSUMS:
        assert store.recorded_checksum(group) == store.checksum(group)
        # bookkeeping of the store, not a product attribute
        assert CHECKSUM_ATTR not in store.read(group).attrs
        with store.open(group) as ds:
            assert CHECKSUM_ATTR not in ds.attrs
    assert store.check() == []


def _run_arrays(path, run):
    ds = Store(path).read(f"runs/{run}")
    return ds, {k: v.values for k, v in ds.variables.items() if k not in TIMING}


def test_one_blend_deblend_reads_boxes_and_matches_full_read(detected, tmp_path):
    """The boxes-only read gives the run a full read gives (every array, the checksums)."""
    blends = _blends(detected, 2)
    store = Store(detected)
    part, digest = store.read_boxes("exposure", [(0, 0, 5, 7)])
    assert digest == store.checksum("exposure")
    full = store.read("exposure")
    assert part["image"].shape == full["image"].shape
    np.testing.assert_array_equal(part["image"].values[:, :5, :7], full["image"].values[:, :5, :7])
    assert not part["image"].values[:, 5:, :].any() and not part["mask"].values[:, :, 7:].any()
    np.testing.assert_array_equal(part["psf"].values, full["psf"].values)
    assert part.attrs == full.attrs

    old = tmp_path / "old.h5"  # the same store as written before checksums were recorded
    Store(detected).copy_to(old)
    with h5py.File(Store(old).product_path("exposure"), "r+") as f:
        del f["exposure"].attrs[CHECKSUM_ATTR]
    assert Store(old).read_boxes("exposure", [(0, 0, 5, 7)]) is None
    new = tmp_path / "new.h5"
    Store(detected).copy_to(new)
    arg = ",".join(map(str, blends))
    for path in (old, new):
        assert main(["deblend", str(path), "--run", "one", "--blends", arg, "--set", "max_iter=30"]) == 0
    (ra, a), (rb, b) = _run_arrays(old, "one"), _run_arrays(new, "one")
    assert a.keys() == b.keys() and rb.sizes["blend"] == len(blends)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for attr in ("exposure_checksum", "parents_checksum", "config", "split_pieces"):
        assert ra.attrs[attr] == rb.attrs[attr]
    assert rb.attrs["exposure_checksum"] == store.checksum("exposure")
    assert rb.attrs["parents_checksum"] == store.checksum("parents")


def test_rewritten_exposure_changes_its_recorded_checksum(detected, tmp_path):
    path = tmp_path / "s.h5"
    Store(detected).copy_to(path)
    store = Store(path)
    before = store.recorded_checksum("exposure")
    ex = store.read("exposure")
    ex["image"].values[0, 3, 4] += 1.0
    store.write({"exposure": ex}, replace=True)
    after = store.recorded_checksum("exposure")
    assert after != before and after == store.checksum("exposure")
    assert store.layout == Store(detected).layout


def test_check_reports_content_changed_behind_the_store(detected, tmp_path):
    """A pixel changed in place (not through the store) no longer matches the record."""
    path = tmp_path / "s.h5"
    Store(detected).copy_to(path)
    with h5py.File(Store(path).product_path("exposure"), "r+") as f:
        f["exposure/image"][1, 10, 10] = 1e6
    problems = Store(path).check()
    assert len(problems) == 1 and "does not match the checksum recorded" in problems[0]
