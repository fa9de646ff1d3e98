"""Import / export of the Rubin science pipelines' persisted scarlet models."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
from conftest import shared_file, store_bytes

from scarletstore.errors import InputError
from scarletstore.lsst import lsst_models_dict, read_lsst_models, write_lsst_models
from scarletstore.measure.reconstruct import band_kernel, source_models
from scarletstore.store.runs import CUBE, SOURCE_ISOLATED, RunIndex, read_blend
from scarletstore.store.schema import validate
from scarletstore.store.store import Store

BLEND_IDS = [3495976385350991873, 3495976385350991874]
SOURCE_IDS = [3495976385351016304, 3495976385351016305]


@pytest.fixture(scope="module")
def v29_path():
    return shared_file("lsst_v29_models.json")


@pytest.fixture(scope="module")
def v29(v29_path):
    return read_lsst_models(v29_path)


def _run_models(ds):
    """Every blend of a run as plain values, for exact comparisons."""
    index = RunIndex(ds)
    out = []
    for b in range(ds.sizes["blend"]):
        blend = read_blend(index, b)
        out.append((blend.parent_id, blend.bbox, blend.source_ids.tolist(),
                    [(s.flags, [(c.spectrum, c.morph, c.y0, c.x0, c.peak) for c in s.components])
                     for s in blend.sources]))
    return out


def _assert_same_models(a, b):
    for var in ("blend_parent_id", "blend_y0", "blend_x0", "blend_height", "blend_width",
                "source_id", "source_parent_id", "source_peak_id", "source_y", "source_x",
                "source_flags", "component_type", "component_y0", "component_x0",
                "component_peak_y", "component_peak_x", "component_spectrum", "morph",
                "model_psf", "psf", "blend_psf"):
        assert a[var].dtype == b[var].dtype, var
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
    assert list(a.band.values) == list(b.band.values)
    for ma, mb in zip(_run_models(a), _run_models(b)):
        assert ma[:3] == mb[:3]
        for (fa, ca), (fb, cb) in zip(ma[3], mb[3]):
            assert fa == fb
            for x, y in zip(ca, cb):
                np.testing.assert_array_equal(x[0], y[0])
                np.testing.assert_array_equal(x[1], y[1])
                assert x[2:] == y[2:]


# ------------------------------------------------------------------ v29 legacy fixture

def test_v29_ids_bands_and_values(v29, v29_path):
    ds = v29
    assert ds.sizes["blend"] == 2
    assert ds["blend_parent_id"].dtype == np.int64
    assert ds["blend_parent_id"].values.tolist() == BLEND_IDS
    assert ds["source_id"].values.tolist() == SOURCE_IDS
    assert ds["source_parent_id"].values.tolist() == BLEND_IDS
    assert ds["source_peak_id"].values.tolist() == [2, 4]
    assert list(ds.band.values) == ["g", "i", "r", "y", "z"]
    assert ds.attrs["method"] == "lsst"
    assert ds.attrs["psf_source"] == "blend"
    config = json.loads(ds.attrs["config"])
    assert config["lsst_format"] == "legacy"
    assert config["imported_from"] == "lsst_v29_models.json"

    raw = json.loads(v29_path.read_text())
    index = RunIndex(ds)
    for b, bid in enumerate(BLEND_IDS):
        rb = raw["blends"][str(bid)]
        blend = read_blend(index, b)
        assert blend.bbox == (*rb["origin"], *rb["shape"])
        (sid, rs), = rb["sources"].items()
        assert blend.source_ids.tolist() == [int(sid)]
        (rc,), (comp,) = rs["factorized"], blend.sources[0].components
        # exact: float32 of the JSON values, no rescaling
        np.testing.assert_array_equal(comp.spectrum, np.asarray(rc["spectrum"], np.float32))
        np.testing.assert_array_equal(comp.morph,
                                      np.asarray(rc["morph"], np.float32).reshape(rc["shape"]))
        assert (comp.y0, comp.x0) == tuple(rc["origin"])  # read_blend: exposure pixels
        assert comp.peak == tuple(float(v) for v in rc["peak"])
        assert (ds["source_y"].values[b], ds["source_x"].values[b]) == tuple(rc["peak"])
        # the observed PSF of each blend is kept (already unit sum: kept bit-exact)
        psf = np.asarray(rb["psf"], np.float32).reshape(rb["psf_shape"])
        np.testing.assert_array_equal(ds["blend_psf"].values[b], psf)
        assert config["psf_center"][str(bid)] == rb["psf_center"]
    np.testing.assert_array_equal(ds["model_psf"].values,
                                  np.asarray(raw["psf"], np.float32).reshape(raw["psfShape"]))
    np.testing.assert_array_equal(ds["psf"].values, ds["blend_psf"].values[0])


def test_v29_footprints_without_exposure(v29):
    """Model-mode footprints need only the run: sum = spectrum x morph sum per band.

    The difference kernel is normalised (its sum is 1 to ~1e-6) so convolution
    conserves flux; the models are rendered in the blend box grown by the kernel
    size so that no flux spreads past the frame edge (inside the bare blend box
    5-15 % of these tight boxes' flux would be cut off). Tolerance 1e-4 relative:
    kernel normalisation (1e-6) plus float32 FFT round-off.
    """
    ds = v29
    index = RunIndex(ds)
    model_psf = ds["model_psf"].values
    for b in range(ds.sizes["blend"]):
        blend = read_blend(index, b)
        comp = blend.sources[0].components[0]
        y0, x0, h, w = blend.bbox
        for band in range(ds.sizes["band"]):
            kernel = band_kernel(model_psf, ds["blend_psf"].values[b, band])
            p = kernel.shape[-1]
            models = source_models(blend.sources, band, kernel, (y0 - p, x0 - p, h + 2 * p, w + 2 * p))
            expect = float(comp.spectrum[band]) * float(comp.morph.sum(dtype=np.float64))
            assert models.shape == (1, h + 2 * p, w + 2 * p)
            assert models.sum(dtype=np.float64) == pytest.approx(expect, rel=1e-4)
            inside = source_models(blend.sources, band, kernel, blend.bbox)
            assert 0 < inside.sum() <= models.sum() * (1 + 1e-6)


def test_v29_validates_and_roundtrips_through_store(v29, tmp_path):
    validate(v29, "run", 2)
    path = tmp_path / "s.h5"
    Store.create(path, {"runs/imported": v29})
    back = Store(path).read("runs/imported")
    _assert_same_models(v29, back)
    assert back.attrs["config"] == v29.attrs["config"]


def test_export_import_roundtrip_exact(v29, tmp_path):
    out = write_lsst_models(v29, tmp_path / "out.json")
    doc = json.loads(out.read_text())
    assert doc["version"] == "1.0.0" and doc["model_type"] == "scarlet_model"
    assert list(doc["blends"]) == [str(b) for b in BLEND_IDS]
    blend = doc["blends"][str(BLEND_IDS[0])]
    assert blend["blend_type"] == "blend"
    src = blend["sources"][str(SOURCE_IDS[0])]
    assert src["source_type"] == "source" and src["metadata"]["peak_id"] == 2
    assert src["components"][0]["component_type"] == "factorized"
    back = read_lsst_models(out)
    assert json.loads(back.attrs["config"])["lsst_format"] == "1.0.0"
    _assert_same_models(v29, back)
    # psf_center survives too, and a second export is identical
    assert json.loads(back.attrs["config"])["psf_center"] == json.loads(v29.attrs["config"])["psf_center"]
    again = write_lsst_models(back, tmp_path / "again.json")
    assert json.loads(again.read_text()) == doc


# ------------------------------------------------------------------ synthetic 1.0.x document

BANDS = ["g", "r"]


def _psf(size, sigma):
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return (p / p.sum()).astype(np.float32)


def _flat(a):
    return np.asarray(a, np.float32).ravel().astype(float).tolist()


def _blend_meta(size=7):
    psf = np.stack([_psf(size, 1.5), _psf(size, 2.0)])
    return {"psf": _flat(psf), "psf_shape": list(psf.shape), "bands": BANDS, "array_keys": ["psf"]}


def _versioned_doc():
    rng = np.random.default_rng(1)
    morph = rng.random((4, 5)).astype(np.float32)
    cube = rng.random((2, 3, 3)).astype(np.float32)
    mask = np.zeros((3, 4), np.float32)
    mask[1:, 1:3] = 1
    model_psf = _psf(5, 0.8)
    leaf_a = {"blend_type": "blend", "version": "1.0.0", "origin": [10, 20], "shape": [6, 8],
              "metadata": _blend_meta(7),
              "sources": {
                  "9000000000000000001": {
                      "source_type": "source", "version": "1.0.0",
                      "metadata": {"id": 9000000000000000001, "peak_id": 11},
                      "components": [
                          {"component_type": "factorized", "version": "1.0.0", "origin": [11, 21],
                           "shape": [4, 5], "peak": [13, 23], "spectrum": [0.5, 1.25],
                           "morph": _flat(morph)},
                          {"component_type": "component", "version": "1.0.0", "origin": [12, 22],
                           "shape": [2, 3, 3], "peak": [13, 23], "model": _flat(cube)}]},
                  "9000000000000000002": {
                      "source_type": "source", "version": "1.0.0",
                      "metadata": {"id": 9000000000000000002, "peak_id": 12},
                      "components": [
                          {"component_type": "cube", "version": "1.0.0", "origin": [10, 24],
                           "shape": [2, 3, 3], "peak": [11, 25], "model": _flat(cube * 2)}]}}}
    leaf_b = {"blend_type": "blend", "version": "1.0.0", "origin": [30, 40], "shape": [5, 6],
              "metadata": _blend_meta(9),  # a larger PSF: padded to a common size
              "sources": {
                  "9000000000000000003": {
                      "source_type": "isolated", "version": "1.0.0", "origin": [31, 41],
                      "shape": [3, 4], "peak": [32, 42], "span_array": _flat(mask),
                      "metadata": {"id": 9000000000000000003, "peak_id": 13}}}}
    return {
        "model_type": "scarlet_model", "version": "1.0.0",
        "metadata": {"model_psf": _flat(model_psf), "model_psf_shape": [5, 5], "bands": BANDS,
                     "array_keys": ["model_psf"]},
        "blends": {
            "8000000000000000000": {"blend_type": "hierarchical", "version": "1.0.0",
                                    "children": {"8000000000000000001": leaf_a,
                                                 "8000000000000000002": leaf_b}},
            "8000000000000000005": {"blend_type": "blend", "version": "1.0.0", "origin": [0, 0],
                                    "shape": [3, 3], "metadata": _blend_meta(7), "sources": {}},
        },
    }, morph, cube, mask


def test_versioned_hierarchical_isolated_cube(tmp_path):
    doc, morph, cube, mask = _versioned_doc()
    ds = read_lsst_models(copy.deepcopy(doc))
    assert ds["blend_parent_id"].values.tolist() == [8000000000000000001, 8000000000000000002,
                                                     8000000000000000005]
    assert ds["source_id"].values.tolist() == [9000000000000000001, 9000000000000000002,
                                               9000000000000000003]
    assert ds["source_peak_id"].values.tolist() == [11, 12, 13]
    assert ds["blend_n_sources"].values.tolist() == [2, 1, 0]
    config = json.loads(ds.attrs["config"])
    assert config["lsst_format"] == "1.0.0"
    assert config["hierarchy"] == {"8000000000000000001": ["8000000000000000000"],
                                   "8000000000000000002": ["8000000000000000000"]}
    assert ds["blend_psf"].shape == (3, 2, 9, 9)
    np.testing.assert_allclose(ds["blend_psf"].values.sum(axis=(2, 3)), 1, rtol=1e-6)
    np.testing.assert_array_equal(ds["blend_psf"].values[0, 0, 1:8, 1:8], _psf(7, 1.5))
    np.testing.assert_array_equal(ds["model_psf"].values, _psf(5, 0.8))

    index = RunIndex(ds)
    a = read_blend(index, 0)
    fact, cub = a.sources[0].components
    np.testing.assert_array_equal(fact.morph, morph)
    np.testing.assert_array_equal(fact.spectrum, np.float32([0.5, 1.25]))
    assert (fact.y0, fact.x0, fact.peak) == (11, 21, (13.0, 23.0))
    np.testing.assert_array_equal(cub.morph, cube)
    np.testing.assert_array_equal(cub.spectrum, cube.sum(axis=(1, 2)))
    assert ds["component_type"].values.tolist() == [0, CUBE, CUBE, CUBE]
    iso = read_blend(index, 1)
    assert iso.sources[0].flags & SOURCE_ISOLATED
    (c,) = iso.sources[0].components
    assert c.morph.shape == (2, 3, 4) and (c.y0, c.x0) == (31, 41)
    np.testing.assert_array_equal(c.morph, np.stack([mask, mask]))
    assert (ds["source_y"].values[2], ds["source_x"].values[2]) == (32, 42)

    # the same document round-trips: nesting, isolated type and all values
    out = write_lsst_models(ds, tmp_path / "syn.json")
    written = json.loads(out.read_text())
    top = written["blends"]["8000000000000000000"]
    assert top["blend_type"] == "hierarchical"
    assert list(top["children"]) == ["8000000000000000001", "8000000000000000002"]
    isolated = top["children"]["8000000000000000002"]["sources"]["9000000000000000003"]
    assert isolated["source_type"] == "isolated" and isolated["span_array"] == _flat(mask)
    _assert_same_models(ds, read_lsst_models(out))


def test_model_level_isolated_and_image_psf_form():
    """An ``lsst`` model: PSFs in the image-PSF dict form, isolated sources at the top level."""
    doc, *_ = _versioned_doc()
    meta = _blend_meta(7)
    psf = np.asarray(meta["psf"], np.float32).reshape(meta["psf_shape"])
    doc["model_type"] = "lsst"
    doc["version"] = "1.0.3"
    doc["metadata"] = {
        "bands": BANDS,
        "model_psf": {"psf_type": "image", "bands": [], "shape": [1, 5, 5], "dtype": "float32",
                      "data": _flat(_psf(5, 0.8))},
        "psf": {"psf_type": "image", "bands": BANDS, "shape": list(psf.shape), "dtype": "float32",
                "data": _flat(psf)}}
    leaf = doc["blends"]["8000000000000000000"]["children"]["8000000000000000001"]
    del leaf["metadata"]  # falls back to the model-level observed PSF and bands
    doc["isolated"] = {"7000000000000000001": {
        "source_type": "isolated", "version": "1.0.0", "origin": [50, 60], "shape": [2, 2],
        "peak": [50, 61], "span_array": [1.0, 1.0, 0.0, 1.0], "metadata": {"peak_id": 99}}}
    ds = read_lsst_models(doc)
    assert ds["blend_parent_id"].values[-1] == 7000000000000000001
    assert ds["source_id"].values[-1] == 7000000000000000001
    assert ds["source_peak_id"].values[-1] == 99
    assert ds["source_flags"].values[-1] & SOURCE_ISOLATED
    np.testing.assert_array_equal(ds["blend_psf"].values[0, :, 1:8, 1:8], psf)
    np.testing.assert_array_equal(ds["model_psf"].values, _psf(5, 0.8))


def test_band_order_and_mismatch():
    doc, *_ = _versioned_doc()
    blend = doc["blends"]["8000000000000000005"]
    blend["metadata"]["bands"] = ["r", "g"]  # same set, other order: reordered
    ds = read_lsst_models(copy.deepcopy(doc))
    np.testing.assert_array_equal(ds["blend_psf"].values[2, 0, 1:8, 1:8], _psf(7, 2.0))
    blend["metadata"]["bands"] = ["r", "i"]
    with pytest.raises(InputError, match="bands"):
        read_lsst_models(doc)


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match="nope.json"):
        read_lsst_models(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json.*not valid JSON"):
        read_lsst_models(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="bad.json"):
        read_lsst_models(bad)

    doc, *_ = _versioned_doc()
    newer = dict(copy.deepcopy(doc), version="2.0.0")
    path = tmp_path / "newer.json"
    path.write_text(json.dumps(newer))
    with pytest.raises(InputError, match=r"newer.json.*2\.0\.0"):
        read_lsst_models(path)

    def broken(edit):
        d = copy.deepcopy(doc)
        edit(d)
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(d))
        with pytest.raises(InputError, match="broken.json") as info:
            read_lsst_models(path)
        assert "\n" not in str(info.value)
        return str(info.value)

    leaf = ("blends", "8000000000000000000", "children", "8000000000000000001")

    def at(d, keys):
        for k in keys:
            d = d[k]
        return d

    assert "blends" in broken(lambda d: d.pop("blends"))
    assert "origin" in broken(lambda d: at(d, leaf).pop("origin"))
    assert "morph" in broken(lambda d: at(d, leaf)["sources"]["9000000000000000001"]["components"][0]
                             .update(morph=[1.0, 2.0]))
    assert "model_type" in broken(lambda d: d.update(model_type="other"))
    assert "blend_type" in broken(lambda d: at(d, leaf).update(blend_type="weird"))
    assert "model-frame PSF" in broken(lambda d: d["metadata"].pop("model_psf"))


def test_native_run_exports_cubes_and_isolated(tmp_path):
    """A scarletstore run (observed-frame cubes, an isolated source with pixels,
    one run-level PSF) exports as cube components and imports back unchanged."""
    from scarletstore.store.components import Component, SourceResult
    from scarletstore.store.runs import BlendRecord, build_run

    rng = np.random.default_rng(5)
    cube = rng.random((2, 4, 3)).astype(np.float32)
    pixels = rng.normal(size=(2, 3, 3)).astype(np.float32)
    recs = [
        BlendRecord(index=0, parent_id=5, bbox=(10, 20, 6, 7), peak_ids=np.array([1, 2]),
                    peaks=np.array([[12.0, 22.0], [13.0, 24.0]]), converged=True,
                    sources=[SourceResult(0, [Component(cube.sum(axis=(1, 2)), cube, 0, 1, (2.0, 2.0))],
                                          flags=2),
                             SourceResult(1, [Component(np.float32([1, 2]), rng.random((3, 3)), 1, 2,
                                                        (2.5, 3.5))])]),
        BlendRecord(index=1, parent_id=6, bbox=(40, 50, 3, 3), peak_ids=np.array([3]),
                    peaks=np.array([[41.0, 51.0]]), converged=True,
                    sources=[SourceResult(0, [Component(pixels.sum(axis=(1, 2)), pixels, 0, 0,
                                                        (1.0, 1.0))], flags=SOURCE_ISOLATED)]),
    ]
    psf = np.stack([_psf(5, 1.0), _psf(5, 1.2)])
    run = build_run(recs, BANDS, psf, np.ones((1, 1), np.float32), name="sdss", method="sdss",
                    config_json="{}", package_version="0", first_source_id=100)
    out = write_lsst_models(run, tmp_path / "native.json")
    doc = json.loads(out.read_text())
    srcs = doc["blends"]["5"]["sources"]
    assert srcs["100"]["components"][0]["component_type"] == "cube"
    iso = doc["blends"]["6"]["sources"]["102"]
    assert iso["source_type"] == "source" and iso["components"][0]["component_type"] == "cube"
    back = read_lsst_models(out)
    for var in ("blend_parent_id", "source_id", "source_peak_id", "source_y", "source_x",
                "source_flags", "component_type", "component_y0", "component_x0",
                "component_peak_y", "component_peak_x", "component_spectrum", "morph", "model_psf"):
        np.testing.assert_array_equal(run[var].values, back[var].values, err_msg=var)
    np.testing.assert_array_equal(back["blend_psf"].values[1], run["psf"].values)


def test_heavy_footprints_without_exposure_keep_model_flux(tmp_path):
    """Imported models rebuild per-band heavy footprints with no exposure in the store."""
    from scarletstore.cli import main
    from scarletstore.measure.catalog import band_catalog, heavy_footprint

    path = shared_file("lsst_v29_models.json")
    store_path = tmp_path / "imp.h5"
    assert main(["import-lsst", str(path), str(store_path), "--run", "v29"]) == 0
    store = Store(store_path)
    doc = json.loads(path.read_text())
    for band_index, band in enumerate(["g", "i", "r", "y", "z"]):
        cat = band_catalog(store, band).compute()
        for blend in doc["blends"].values():
            for sid, src in blend["sources"].items():
                comp = src["factorized"][0]
                bi = blend["bands"].index(band)
                expected = np.float32(comp["spectrum"][bi]) * np.sum(np.float32(comp["morph"]), dtype=np.float64)
                hf = heavy_footprint(store, int(sid), band)
                # the box grows by the kernel radius, so only float32 FFT round-off remains
                assert hf.flux == pytest.approx(expected, rel=1e-4)
                row = int(np.nonzero(cat["id"].values == int(sid))[0][0])
                assert cat["flux"].values[row] == pytest.approx(expected, rel=1e-6)
                assert np.isnan(cat["flux_err"].values[row])  # no data: no noise estimate


# ------------------------------------------------------------------ crafted geometry

def _import(tmp_path, doc, store_path, capsys):
    from scarletstore.cli import main

    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(doc))
    code = main(["import-lsst", str(path), str(store_path), "--run", "x"])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("edit, message", [
    (lambda leaf: leaf.update(shape=[100000, 100000]), "larger than"),
    (lambda leaf: leaf.update(shape=[9000, 9000]), "larger than"),  # each side fine, area not
    # a box within limits but so many sources that rendering them all would not fit
    (lambda leaf: leaf.update(shape=[5000, 5000], sources={
        str(9100000000000000000 + k): {"source_type": "source", "version": "1.0.0",
                                       "metadata": {"id": 9100000000000000000 + k, "peak_id": k},
                                       "components": []} for k in range(11)}), "source pixels"),
    (lambda leaf: leaf.update(shape=[-6, 8]), "must be positive"),
    (lambda leaf: leaf.update(shape=[0, 8]), "must be positive"),
    (lambda leaf: leaf.update(origin=[10.5, 20]), "non-integer"),
    (lambda leaf: leaf.update(origin=[1e300, 20]), "non-integer|beyond"),
    (lambda leaf: leaf.update(origin=[3e9, 20]), "beyond"),
    (lambda leaf: leaf.update(origin=["10", 20]), "not a list of integers"),
    # a product that matches the data but with negative sides
    (lambda leaf: leaf["sources"]["9000000000000000001"]["components"][0].update(shape=[-4, -5]),
     "must be positive"),
    (lambda leaf: leaf["sources"]["9000000000000000001"]["components"][1].update(shape=[2, -3, -3]),
     "must be positive"),
    # a component far from its blend would make the blend's catalog box meaningless
    (lambda leaf: leaf["sources"]["9000000000000000001"]["components"][0].update(origin=[5000, 21]),
     "outside the blend box"),
    (lambda leaf: leaf["sources"]["9000000000000000001"]["components"][0].update(peak=["a", 1]),
     "peak"),
])
def test_crafted_geometry_is_refused(tmp_path, capsys, edit, message):
    doc, *_ = _versioned_doc()
    edit(doc["blends"]["8000000000000000000"]["children"]["8000000000000000001"])
    store_path = tmp_path / "s.h5"
    code, err = _import(tmp_path, doc, store_path, capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "crafted.json" in err
    assert re.search(message, err), err
    assert not store_path.exists()


def _move(doc, oy, ox):
    """Shift every box and peak of a model document by (oy, ox) pixels."""
    def move(node):
        if "origin" in node:
            node["origin"] = [node["origin"][0] + oy, node["origin"][1] + ox]
        if "peak" in node:
            node["peak"] = [node["peak"][0] + oy, node["peak"][1] + ox]
        for key in ("children", "sources"):
            for child in node.get(key, {}).values():
                move(child)
        for comp in node.get("components", []):
            move(comp)

    for blend in doc["blends"].values():
        move(blend)


def _exposure_store(path, shape=(60, 60), origin=(0, 0)):
    from scarletstore.ingest.exposure import make_exposure

    rng = np.random.default_rng(2)
    image = rng.normal(0, 1, (2, *shape)).astype(np.float32)
    exposure = make_exposure(image, np.ones_like(image), None, [_psf(7, 1.5), _psf(7, 2.0)], BANDS,
                             origin=origin)
    return Store.create(path, {"exposure": exposure})


def test_models_off_the_exposure_are_refused(tmp_path, capsys):
    doc, *_ = _versioned_doc()  # boxes span y 0..35, x 0..46
    store_path = tmp_path / "s.h5"
    store = _exposure_store(store_path, shape=(30, 60))  # cuts blend 8000000000000000002 (y 30..34)
    before = store_bytes(store_path)
    code, err = _import(tmp_path, doc, store_path, capsys)
    assert code == 2 and "1 of 3 blends lie outside the store's exposure" in err
    assert len(err.splitlines()) == 1
    assert store_bytes(store_path) == before and Store(store_path).runs() == []
    # models of another patch (global pixels far from this exposure's origin): refused
    other = tmp_path / "o.h5"
    _exposure_store(other, origin=(100, 100))
    _move(doc, 4000, 4000)
    code, err = _import(tmp_path, doc, other, capsys)
    assert code == 2 and "3 of 3 blends" in err and Store(other).runs() == []


def test_models_in_global_pixels_are_placed_on_the_exposure(tmp_path, capsys):
    """Models written in tract pixels land on an exposure whose origin is that tract
    offset; the catalog then cuts the right pixels and export restores the file's frame."""
    from scarletstore.measure.catalog import band_catalog

    doc, *_ = _versioned_doc()
    oy, ox = 1000, 2000

    _move(doc, oy, ox)
    store_path = tmp_path / "s.h5"
    _exposure_store(store_path, origin=(oy, ox))
    code, err = _import(tmp_path, doc, store_path, capsys)
    assert code == 0, err
    run = Store(store_path).read("runs/x")
    assert run["blend_y0"].values.tolist() == [10, 30, 0]
    assert run["blend_x0"].values.tolist() == [20, 40, 0]
    assert run["source_y"].values.tolist()[0] == 13.0
    cat = band_catalog(Store(store_path), "g").compute()
    assert np.all(cat["data_coverage"].values[cat["n_pixels"].values > 0] == 1.0)
    back = lsst_models_dict(run)
    leaf = back["blends"]["8000000000000000000"]["children"]["8000000000000000001"]
    assert leaf["origin"] == [10 + oy, 20 + ox]
    comp = leaf["sources"]["9000000000000000001"]["components"][0]
    assert comp["origin"] == [11 + oy, 21 + ox] and comp["peak"] == [13 + oy, 23 + ox]
