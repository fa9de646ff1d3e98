"""Per-band catalogs and heavy footprints rebuilt from a stored run."""

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from conftest import make_wcs_header
from scipy.signal import fftconvolve

from scarletstore.cli import main
from scarletstore.deblend.psf import difference_kernels, gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.catalog import band_catalog, heavy_footprint
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.store import Store

H = W = 120
BANDS = ["g", "r"]
# three blends of two sources each: (bbox, [(y0, x0, spectrum), ...])
BLENDS = [
    ((5, 5, 40, 40), [(8, 8, (10.0, 5.0)), (16, 20, (3.0, 8.0))]),
    ((60, 10, 40, 45), [(66, 14, (4.0, 4.0)), (70, 30, (6.0, 1.0))]),
    ((20, 65, 45, 45), [(25, 70, (2.0, 9.0)), (38, 82, (7.0, 7.0))]),
]


def _morph(size=21, sigma=2.5, ell=0.0):
    y, x = np.mgrid[:size, :size] - size // 2
    m = np.exp(-(x**2 * (1 + ell) + y**2 * (1 - ell)) / (2 * sigma**2))
    return (m / m.max()).astype(np.float32)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A store with an exposure made from known model-frame components, and its run."""
    tmp = tmp_path_factory.mktemp("cat")
    psfs = [gaussian_psf(1.5, 15), gaussian_psf(1.9, 17)]
    model_psf = gaussian_psf(0.8)
    kernels, _ = difference_kernels(np.array([np.pad(psfs[0], 1), psfs[1]]), model_psf)
    rng = np.random.default_rng(4)
    truth = np.zeros((2, H, W))
    records = []
    for i, (bbox, comps) in enumerate(BLENDS):
        sources = []
        for j, (cy, cx, spec) in enumerate(comps):
            morph = _morph(ell=0.2 * j)
            c = Component(np.array(spec, np.float32), morph, cy - bbox[0], cx - bbox[1],
                          (cy + 10.0 - bbox[0], cx + 10.0 - bbox[1]))
            sources.append(SourceResult(j, [c]))
            for b in range(2):
                scene = np.zeros((H, W))
                scene[cy:cy + 21, cx:cx + 21] = morph * spec[b]
                truth[b] += fftconvolve(scene, kernels[b], mode="same")
        peaks = np.array([[cy + 10.0, cx + 10.0] for cy, cx, _ in comps])
        records.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.arange(2) + 10 * i,
                                   peaks=peaks, sources=sources, iterations=10 + i, log_likelihood=-1.0,
                                   chi2=1.0, converged=i != 1))
    var = np.full((2, H, W), 0.01, np.float32)
    image = (truth + rng.normal(0, 0.1, truth.shape)).astype(np.float32)
    mask = np.zeros((2, H, W), np.int32)
    mask[:, 70, 40] = 1  # one BAD pixel inside blend 2
    hdr = make_wcs_header(H, W)
    ex = make_exposure(image, var, mask, psfs, BANDS, wcs=hdr.tostring())
    run = build_run(records, BANDS, ex["psf"].values, model_psf, name="t", method="scarlet",
                    config_json="{}", package_version="test")
    path = tmp / "s.h5"
    Store.create(path, {"exposure": ex, "runs/t": run})
    return Store(path), image, kernels, records


def _direct_model(rec, src, band, kernel):
    y0, x0, h, w = rec.bbox
    scene = np.zeros((h, w))
    for c in rec.sources[src].components:
        scene[c.y0:c.y0 + c.morph.shape[0], c.x0:c.x0 + c.morph.shape[1]] += c.spectrum[band] * c.morph
    return fftconvolve(scene, kernel, mode="same")


def test_model_footprint_equals_direct_convolution(synthetic):
    store, image, kernels, records = synthetic
    for band_index, band in enumerate(BANDS):
        for sid, (rec, src) in enumerate([(r, s) for r in records for s in range(2)], start=1):
            hf = store.footprint(sid, band)
            expected = _direct_model(rec, src, band_index, kernels[band_index])
            got = hf.cutout()
            assert got.shape == expected.shape
            inside = got != 0
            assert inside.sum() > 100
            np.testing.assert_allclose(got[inside], expected[inside], atol=2e-5 * expected.max())
            # nothing significant left outside the footprint's pixels
            assert np.abs(expected[~inside]).max() < 1e-4 * expected.max()


def test_redistribution_conserves_image_flux(synthetic):
    store, image, kernels, records = synthetic
    for band_index, band in enumerate(BANDS):
        for rec in records:
            y0, x0, h, w = rec.bbox
            ids = [1 + 2 * rec.index, 2 + 2 * rec.index]
            total = np.zeros((h, w))
            for sid in ids:
                total += heavy_footprint(store, sid, band, redistribute=True).cutout()
            models = sum(_direct_model(rec, s, band_index, kernels[band_index]) for s in range(2))
            box = image[band_index, y0:y0 + h, x0:x0 + w]
            covered = models > 1e-4 * models.max()
            if rec.index == 1:  # the BAD pixel is given to nobody
                covered[70 - y0, 40 - x0] = False
            np.testing.assert_allclose(total[covered], box[covered], rtol=1e-5, atol=1e-6)


def test_catalog_values(synthetic):
    store, image, kernels, records = synthetic
    cat = store.catalog("r").compute()
    assert cat.sizes["row"] == 6
    np.testing.assert_array_equal(cat["id"].values, np.arange(1, 7))
    for k, (rec, s) in enumerate([(r, s) for r in records for s in range(2)]):
        c = rec.sources[s].components[0]
        assert cat["flux"].values[k] == pytest.approx(c.spectrum[1] * c.morph.sum(dtype=np.float64), rel=1e-6)
        assert cat["centroid_x"].values[k] == pytest.approx(rec.bbox[1] + c.peak[1], abs=0.05)
        assert cat["centroid_y"].values[k] == pytest.approx(rec.bbox[0] + c.peak[0], abs=0.05)
        assert 0 <= cat["blendedness"].values[k] < 0.5
        # pure-noise residual: reduced chi2 of the child's own pixels near 1
        assert 0.7 < cat["chi2"].values[k] < 1.3
    assert np.all(cat["flux_err"].values > 0)
    not_conv = (cat["flags"].values & (1 << 9)) != 0
    np.testing.assert_array_equal(not_conv, [False, False, True, True, False, False])
    assert cat["data_coverage"].values[2] < 1 or cat["data_coverage"].values[3] < 1


def test_lazy_selection_reads_only_selected_blends(synthetic):
    store, *_ = synthetic
    cat = band_catalog(store, "g")
    measurer = cat.attrs["_measurer"]
    assert measurer.decoded == []  # building the catalog decodes nothing
    sub = cat.isel(row=[4]).compute()
    assert measurer.decoded == [2]
    assert sub["flux"].values[0] > 0
    cat.sel(id=[1, 2])["blendedness"].values
    assert measurer.decoded == [2, 0]
    cat.isel(row=[0, 1, 5])["flux"].values  # both already measured
    assert measurer.decoded == [2, 0]


@pytest.mark.parametrize("suffix", [".fits", ".csv", ".h5"])
def test_export_round_trip(synthetic, tmp_path, suffix):
    store, *_ = synthetic
    out = tmp_path / f"cat{suffix}"
    assert main(["catalog", str(store.path), "--band", "r", "--redistribute", "-o", str(out)]) == 0
    ref = band_catalog(store, "r", redistribute=True).compute()
    if suffix == ".fits":
        t = Table.read(out)
        cols = {c: np.asarray(t[c]) for c in t.colnames}
    elif suffix == ".csv":
        import pandas as pd
        df = pd.read_csv(out)
        cols = {c: df[c].values for c in df.columns}
    else:
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            cols = {c: ds[c].values for c in ds.data_vars}
    for name in ("id", "parent", "flux", "flux_redistributed", "flux_err", "blendedness", "flags", "ra", "dec"):
        expected = ref[name].values
        if suffix == ".csv" and expected.dtype.kind == "f":
            np.testing.assert_allclose(cols[name], expected, rtol=1e-15, equal_nan=True)
        else:
            np.testing.assert_array_equal(cols[name], expected)


def test_region_query_agrees_with_astropy(synthetic, capsys):
    store, *_ = synthetic
    from scarletstore.store.query import blend_table, select

    w = WCS(fits.Header.fromstring(store.read("exposure").attrs["wcs"]))
    ra, dec = w.all_pix2world([[18.0, 18.0]], 0)[0]  # the first source of blend 1 (x, y)
    table = blend_table(store, "t")
    hit = select(table, region=(ra, dec, 1.0), wcs=store.read("exposure").attrs["wcs"])
    assert list(hit["parent"]) == [1]
    # 40 px = 8 arcsec to the right reaches blend 3's first source (x=80, y=35), not blend 2
    ra2, dec2 = w.all_pix2world([[80.0, 35.0]], 0)[0]
    hit = select(table, region=(ra2, dec2, 0.5), wcs=store.read("exposure").attrs["wcs"])
    assert list(hit["parent"]) == [3]
    assert main(["query", str(store.path), "--region", str(ra), str(dec), "1.0"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 2  # header + one blend
    assert main(["query", str(store.path), "--where", "not converged"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == "2"


def test_query_errors(synthetic, capsys):
    store, *_ = synthetic
    assert main(["query", str(store.path), "--where", "nonsense >"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["query", str(store.path), "--blend", "99"]) == 2
    capsys.readouterr()
    assert main(["query", str(store.path), "--limit", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--limit must be at least 1" in err and err.count("\n") == 1


def test_show_writes_png(synthetic, tmp_path):
    store, *_ = synthetic
    out = tmp_path / "b.png"
    assert main(["show", str(store.path), "--blend", "2", "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert main(["show", str(store.path), "--blend", "42", "-o", str(out)]) == 2


def test_catalog_errors(synthetic, tmp_path, capsys):
    store, *_ = synthetic
    assert main(["catalog", str(store.path), "--band", "z", "-o", str(tmp_path / "x.fits")]) == 2
    assert "band 'z'" in capsys.readouterr().err
    assert main(["catalog", str(store.path), "--band", "r", "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["catalog", str(store.path), "--band", "r", "--run", "nope", "-o", str(tmp_path / "x.csv")]) == 2


def test_convolution_of_boxes_smaller_than_the_kernel():
    from scarletstore.measure.reconstruct import convolve_stack

    rng = np.random.default_rng(0)
    kernel = rng.random((39, 39))
    for h, w in [(5, 7), (36, 50), (39, 39), (60, 12)]:
        stack = rng.random((2, h, w)).astype(np.float32)
        got = convolve_stack(stack, kernel)
        for k in range(2):
            np.testing.assert_allclose(got[k], fftconvolve(stack[k], kernel, mode="same"), rtol=1e-4, atol=1e-4)


def test_reanalysis_with_new_psf(synthetic, tmp_path):
    """A new PSF rebuilds the band's footprints without refitting."""
    store, image, kernels, records = synthetic
    new_psf = gaussian_psf(2.6, 21)
    psf_file = tmp_path / "psf.fits"
    fits.PrimaryHDU(new_psf.astype(np.float32)).writeto(psf_file)
    cat = band_catalog(store, "r", psf_override=new_psf)
    measurer = cat.attrs["_measurer"]
    (kernel,), _ = difference_kernels(new_psf[None], gaussian_psf(0.8))
    hf = measurer.heavy_footprint(1)
    expected = _direct_model(records[0], 0, 1, kernel)
    inside = hf.cutout() != 0
    np.testing.assert_allclose(hf.cutout()[inside], expected[inside], atol=2e-5 * expected.max())
    old = heavy_footprint(store, 1, "r").cutout()
    assert np.abs(hf.cutout() - old).max() > 0.05 * old.max()  # the band really changed
    out = tmp_path / "c.csv"
    assert main(["catalog", str(store.path), "--band", "r", "--psf", f"r={psf_file}", "-o", str(out)]) == 0
    assert main(["catalog", str(store.path), "--band", "r", "--psf", f"g={psf_file}", "-o", str(out)]) == 2


def test_reanalysis_with_reprocessed_image(synthetic, tmp_path):
    """Redistributing a reprocessed image re-apportions its flux, not the stored one."""
    from conftest import write_band_fits

    store, image, kernels, records = synthetic
    new = image[1] * 2.0
    path = write_band_fits(tmp_path / "r2.fits", "r", new, np.full_like(new, 0.04),
                           np.zeros(new.shape, np.int32), None)
    out_old, out_new = tmp_path / "old.csv", tmp_path / "new.csv"
    assert main(["catalog", str(store.path), "--band", "r", "--redistribute", "-o", str(out_old)]) == 0
    assert main(["catalog", str(store.path), "--band", "r", "--redistribute", "--image", f"r={path}",
                 "-o", str(out_new)]) == 0
    import pandas as pd
    a, b = pd.read_csv(out_old), pd.read_csv(out_new)
    # blend 2 has a BAD pixel in the stored mask only, so compare the other blends
    ok = a["parent"] != 2
    np.testing.assert_allclose(b["flux_redistributed"][ok], 2 * a["flux_redistributed"][ok], rtol=1e-5)
    np.testing.assert_allclose(b["flux"], a["flux"])  # the models are unchanged
    # the noise part of the error follows the image: its fixed-template part doubles with the
    # noise, its morphology part less (the band's share of the S/N^2 falls by 4); the
    # template part follows the models
    ratio = b["flux_err_noise"][ok] / a["flux_err_noise"][ok]
    assert np.all(ratio > 1.2) and np.all(ratio <= 2 * (1 + 1e-5)), ratio
    # the model part follows the unchanged models, its kappa the S/N the noisier image halves
    assert np.all(np.isfinite(b["flux_err_model"])) and np.all(b["flux_err_model"] > 0)
    np.testing.assert_allclose(b["flux_err"], np.hypot(b["flux_err_noise"], b["flux_err_model"]))
    wrong = write_band_fits(tmp_path / "small.fits", "r", new[:50], np.ones_like(new[:50]),
                            np.zeros((50, new.shape[1]), np.int32), None)
    assert main(["catalog", str(store.path), "--band", "r", "--image", f"r={wrong}", "-o", str(out_new)]) == 2


def test_store_blend_reads_one_blend(synthetic):
    store, image, kernels, records = synthetic
    blend = store.blend("t", 3)
    rec = records[2]
    assert blend.bbox == rec.bbox and len(blend.sources) == 2
    for src, ref in zip(blend.sources, rec.sources):
        np.testing.assert_array_equal(src.components[0].morph, ref.components[0].morph)
        np.testing.assert_array_equal(src.components[0].spectrum, ref.components[0].spectrum)
        assert src.components[0].y0 == ref.components[0].y0 + rec.bbox[0]
