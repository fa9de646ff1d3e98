"""The measurement suite inside the lazy band catalog, the parent catalog and the CLI."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import make_wcs_header
from scipy.signal import fftconvolve
from scipy.special import erf

from scarletstore.cli import main
from scarletstore.deblend.psf import difference_kernels, gaussian_psf
from scarletstore.ingest.exposure import make_exposure
from scarletstore.measure.catalog import band_catalog
from scarletstore.measure.parents import parent_catalog
from scarletstore.store.components import Component, SourceResult
from scarletstore.store.runs import BlendRecord, build_run
from scarletstore.store.store import Store

H, W = 90, 110
BANDS = ["g", "i"]
PSF_SIGMA = (1.4, 2.3)
MODEL_SIGMA = 0.8
NOISE = 0.05


def _blob(size, cx, cy, sx, sy):
    """Pixel-integrated axis-aligned Gaussian with peak 1 (a model-frame morphology)."""
    def edges(c, s, n):
        return 0.5 * np.diff(erf((np.arange(n + 1) - 0.5 - c) / (np.sqrt(2) * s)))
    m = np.outer(edges(cy, sy, size), edges(cx, sx, size))
    return (m / m.max()).astype(np.float32)


# blend 1: a star (the model PSF at a sub-pixel centre) next to a round galaxy;
# blend 2: an isolated elliptical galaxy. (bbox, [(y0, x0, morph, spectrum)])
STAR = _blob(21, 10.3, 9.6, MODEL_SIGMA, MODEL_SIGMA)
GALAXY = _blob(31, 15.0, 15.0, 2.6, 2.6)
ELLIPSE = _blob(41, 20.0, 20.0, 3.4, 2.1)
BLENDS = [((5, 5, 50, 60), [(10, 10, STAR, (60.0, 150.0)), (15, 28, GALAXY, (20.0, 35.0))]),
          ((40, 60, 50, 50), [(45, 64, ELLIPSE, (30.0, 30.0))])]


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meas")
    psfs = [gaussian_psf(s, 25) for s in PSF_SIGMA]
    model_psf = gaussian_psf(MODEL_SIGMA)
    kernels, _ = difference_kernels(np.array(psfs), model_psf)
    truth = np.zeros((2, H, W))
    records = []
    for i, (bbox, comps) in enumerate(BLENDS):
        sources = []
        for j, (cy, cx, morph, spec) in enumerate(comps):
            n = morph.shape[0]
            c = Component(np.array(spec, np.float32), morph, cy - bbox[0], cx - bbox[1],
                          (cy + n // 2 - bbox[0], cx + n // 2 - bbox[1]))
            sources.append(SourceResult(j, [c]))
            for b in range(2):
                scene = np.zeros((H, W))
                scene[cy:cy + n, cx:cx + n] = morph * spec[b]
                truth[b] += fftconvolve(scene, kernels[b], mode="same")
        peaks = np.array([[cy + m.shape[0] // 2, cx + m.shape[0] // 2] for cy, cx, m, _ in comps], float)
        records.append(BlendRecord(index=i, parent_id=i + 1, bbox=bbox, peak_ids=np.arange(len(comps)) + 10 * i,
                                   peaks=peaks, sources=sources, iterations=5, log_likelihood=-1.0,
                                   chi2=1.0, converged=True))
    rng = np.random.default_rng(21)
    image = (truth + rng.normal(0, NOISE, truth.shape)).astype(np.float32)
    var = np.full((2, H, W), NOISE ** 2, np.float32)
    ex = make_exposure(image, var, np.zeros((2, H, W), np.int32), psfs, BANDS,
                       wcs=make_wcs_header(H, W).tostring())
    run = build_run(records, BANDS, ex["psf"].values, model_psf, name="m", method="scarlet",
                    config_json="{}", package_version="test")
    path = tmp / "m.h5"
    Store.create(path, {"exposure": ex, "runs/m": run})
    return Store(path)


def _flux(morph, spec):
    return spec * morph.sum(dtype=np.float64)


def test_suite_columns_in_the_catalog(field):
    cats = {b: field.catalog(b).compute() for b in BANDS}
    star_flux = [_flux(STAR, s) for s in BLENDS[0][1][0][3]]
    for k, b in enumerate(BANDS):
        cat = cats[b]
        assert np.all(cat["flags"].values == 0)
        # the star's model is the band PSF at a sub-pixel centre: the PSF fit is its flux
        assert cat["psf_flux"].values[0] == pytest.approx(star_flux[k], rel=1e-3)
        assert cat["gaap_flux"].values[0] == pytest.approx(star_flux[k], rel=1e-2)
        # an isolated star's PSF-flux error is 1 / sqrt(sum P^2 / var)
        psf = gaussian_psf(PSF_SIGMA[k], 25)
        assert cat["psf_flux_err"].values[0] == pytest.approx(NOISE / np.sqrt((psf ** 2).sum()), rel=0.02)
        for name in ("aperture_flux_3", "aperture_flux_6", "aperture_flux_12", "kron_flux"):
            assert np.all(cat[name].values > 0) and np.all(cat[name + "_err"].values > 0)
        assert np.all(np.diff(np.c_[cat["aperture_flux_3"], cat["aperture_flux_6"]], axis=1) > 0)
        # the elliptical galaxy: adaptive moments are the model's covariance (intrinsic + band PSF - model PSF)
        extra = PSF_SIGMA[k] ** 2 - MODEL_SIGMA ** 2
        assert cat["shape_xx"].values[2] == pytest.approx(3.4 ** 2 + extra, rel=0.03)
        assert cat["shape_yy"].values[2] == pytest.approx(2.1 ** 2 + extra, rel=0.03)
        assert abs(cat["shape_xy"].values[2]) < 0.02
        assert cat["kron_radius"].values[2] > cat["kron_radius"].values[0]
    # GAaP colours of every source equal its spectrum ratio despite the different seeing
    for row, (_, _, morph, spec) in enumerate([c for _, comps in BLENDS for c in comps]):
        colour = cats["g"]["gaap_flux"].values[row] / cats["i"]["gaap_flux"].values[row]
        assert colour == pytest.approx(spec[0] / spec[1], rel=0.01)
        aper = cats["g"]["aperture_flux_3"].values[row] / cats["i"]["aperture_flux_3"].values[row]
        assert abs(aper / (spec[0] / spec[1]) - 1) > 0.03  # a fixed aperture does not
    # redistributed pixels: the star's PSF flux is the noisy one, within its error
    red = field.catalog("i", redistribute=True).compute()
    assert abs(red["psf_flux"].values[0] - star_flux[1]) < 4 * red["psf_flux_err"].values[0]
    assert red["psf_flux"].values[0] != cats["i"]["psf_flux"].values[0]


def test_every_column_has_units_and_flags_are_named(field):
    cat = field.catalog("g")
    units = json.loads(cat.attrs["units"])
    for name in list(cat.variables):
        assert cat[name].attrs.get("units"), name
        assert units[name] == cat[name].attrs["units"]
    assert cat["psf_flux"].attrs["units"] == "counts"
    assert cat["kron_radius"].attrs["units"] == "pixel" and cat["shape_xx"].attrs["units"] == "pixel^2"
    bits = json.loads(cat.attrs["flag_bits"])
    for flag in ("psf_flux_failed", "kron_failed", "gaap_psf_too_broad", "shape_failed"):
        assert flag in bits
    assert len(set(bits.values())) == len(bits)  # no two flags share a bit


def test_suite_stays_lazy(field):
    cat = band_catalog(field, "i")
    measurer = cat.attrs["_measurer"]
    assert cat.isel(row=[2])["shape_xx"].values[0] > 0
    assert measurer.decoded == [1]


def test_psf_broader_than_gaap_aperture_is_flagged(field, tmp_path):
    """A reanalysis PSF wider than the GAaP aperture sets the flag; the other columns stay."""
    from scarletstore.measure.catalog import CATALOG_FLAGS

    cat = band_catalog(field, "i", psf_override=gaussian_psf(3.1, 31)).compute()
    assert np.all(cat["flags"].values & CATALOG_FLAGS["gaap_psf_too_broad"])
    assert np.all(np.isnan(cat["gaap_flux"].values))
    assert np.all(np.isfinite(cat["psf_flux"].values))


def test_parent_catalog(field):
    children = field.catalog("g").compute()
    parents = parent_catalog(field, "g").compute()
    assert list(parents["parent"].values) == [1, 2]
    assert list(parents["n_children"].values) == [2, 1]
    for k, pid in enumerate((1, 2)):
        sel = children["parent"].values == pid
        f = children["flux"].values[sel]
        assert parents["flux"].values[k] == pytest.approx(f.sum(), rel=1e-5)
        cx = (children["centroid_x"].values[sel] * f).sum() / f.sum()
        assert parents["centroid_x"].values[k] == pytest.approx(cx, abs=0.05)
    # the isolated parent is its only child
    for name in ("psf_flux", "aperture_flux_6", "kron_flux", "gaap_flux", "shape_xx"):
        assert parents[name].values[1] == pytest.approx(children[name].values[2], rel=1e-4)
    # a parent's large aperture holds both children
    assert parents["aperture_flux_12"].values[0] > children["aperture_flux_12"].values[0]
    assert all(parents[v].attrs["units"] for v in parents.variables)
    # redistribute mode measures the image: the parent's flux inside the aperture is the data's
    red = parent_catalog(field, "g", redistribute=True).compute()
    assert abs(red["aperture_flux_12"].values[1] - parents["aperture_flux_12"].values[1]) \
        < 4 * red["aperture_flux_12_err"].values[1]


def test_cli_apertures(field, tmp_path, capsys):
    out = tmp_path / "c.csv"
    assert main(["catalog", str(field.path), "--band", "g", "--apertures", "2.5,8", "-o", str(out)]) == 0
    df = pd.read_csv(out)
    assert {"aperture_flux_2p5", "aperture_flux_8", "aperture_flux_8_err", "psf_flux", "gaap_flux_err",
            "kron_radius", "shape_xy"} <= set(df.columns)
    assert "aperture_flux_3" not in df.columns
    assert np.all(df["aperture_flux_8"] > df["aperture_flux_2p5"])
    capsys.readouterr()  # the successful call's notices ("using run ...")
    for bad in ("0", "3,x", "-2", "nan", "0.01", "3,0.2"):  # under half a pixel: 0 +- 0 on most rows
        assert main(["catalog", str(field.path), "--band", "g", "--apertures", bad, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "aperture" in err


def test_flux_error_parts(field):
    """The model flux's error is the noise part and the template (and footprint-edge) part in quadrature."""
    from scarletstore.measure.photometry import PhotometryConfig
    from scarletstore.measure.photometry.deblend_errors import contested_flux, share_products

    cat = field.catalog("g").compute()
    noise, model, total = (cat[c].values for c in ("flux_err_noise", "flux_err_model", "flux_err"))
    np.testing.assert_allclose(total, np.hypot(noise, model))
    # the isolated galaxy contests nothing: only its footprint's edge jitter and its template's
    # normalisation error are added, and it has no neighbour
    config = PhotometryConfig()
    blend, models, fp, data, _ = cat.attrs["_measurer"].blend_products(1)
    edge = share_products(np.ascontiguousarray(models, np.float32), fp, data[1], data[2], True)[2]
    assert model[2] == pytest.approx(np.hypot(config.footprint_edge_sigma * edge[0],
                                              config.flux_sigma * cat["flux"].values[2]), rel=1e-6)
    assert model[2] > 0 and cat["flux_corr_neighbour_id"].values[2] == -1
    assert model[0] > 0 and model[1] > 0  # the star and its neighbour overlap
    kappa = PhotometryConfig().template_log_ratio_sigma
    # equal shares of two identical templates: each contests half its flux
    t = np.zeros((2, 20, 20), np.float32)
    t[:, 5:15, 5:15] = 2.0
    np.testing.assert_allclose(contested_flux(t, np.ones((20, 20), bool)), [100.0, 100.0])
    t[1] = 0
    t[1, 0:4, 0:4] = 1.0  # disjoint: nothing contested
    np.testing.assert_allclose(contested_flux(t, np.ones((20, 20), bool)), [0.0, 0.0])
    # pixels outside the footprint are not the blend's
    fp = np.zeros((20, 20), bool)
    assert contested_flux(t, fp).sum() == 0 and kappa > 0


@pytest.mark.parametrize("redistribute", [False, True])
def test_eager_table_is_the_lazy_catalog(field, redistribute):
    """``catalog_table`` (no xarray) gives the columns, dtypes, bytes and attributes
    of ``catalog_columns(band_catalog(...))``."""
    from scarletstore.measure.catalog import catalog_columns, catalog_table

    lazy = band_catalog(field, "i", redistribute=redistribute)
    expected = catalog_columns(lazy)
    columns, attrs = catalog_table(field, "i", redistribute=redistribute)
    assert list(columns) == list(expected)  # same order: the FITS and CSV tables follow it
    assert ("flux_redistributed" in columns) == redistribute
    for name, values in expected.items():
        assert columns[name].dtype == values.dtype, name
        assert columns[name].tobytes() == values.tobytes(), name
    assert len(columns["id"]) == 3 and np.all(np.isfinite(columns["psf_flux"]))
    public = {k: v for k, v in lazy.attrs.items() if not k.startswith("_")}
    assert list(attrs.items()) == list(public.items())  # order too: the FITS header's
    assert list(json.loads(attrs["units"])) == list(columns)


def test_blend_chunks_break_only_between_blends():
    from scarletstore.measure.catalog import _blend_chunks

    blend = np.repeat([0, 2, 3, 5, 6], [2, 1, 3, 1, 2])
    assert _blend_chunks(blend, chunk=2) == [(0, 3), (3, 7), (7, 9)]
    assert _blend_chunks(blend) == [(0, 9)]
    assert _blend_chunks(blend[:0]) == []


def _cli_modules(store_path, out) -> set:
    """Modules loaded by a fresh interpreter that runs the catalog command into ``out``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    code = ("import sys\nfrom scarletstore.cli import main\n"
            f"assert main(['catalog', {str(store_path)!r}, '--band', 'g', '-o', {str(out)!r}]) == 0\n"
            "print(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split("\n")[-2].split())


def test_cli_fits_catalog_imports_neither_xarray_nor_pandas(field, tmp_path):
    """xarray and pandas cost 0.5-0.6 s of a catalog call; the FITS path needs neither."""
    from astropy.table import Table

    from scarletstore.measure.catalog import catalog_columns

    mods = _cli_modules(field.path, tmp_path / "c.fits")
    assert "numba" in mods and "h5py" in mods  # it did measure the store
    assert "xarray" not in mods and "pandas" not in mods
    table = Table.read(tmp_path / "c.fits")
    expected = catalog_columns(band_catalog(field, "g"))
    assert table.colnames == list(expected)
    for name, values in expected.items():
        got = np.asarray(table[name], values.dtype)  # FITS stores big-endian
        if values.dtype.kind != "f":
            assert got.tobytes() == values.tobytes(), name
        else:
            # the two processes may run different machine code for the fastmath suite
            # kernels: one that compiled them and one that loaded them from the cache
            # differ in the last bits (shapes 1e-15 relative, same tree and store, see
            # docs/design.md "Start-up and per-call costs"); bytes are equal once both load
            # (iterated adaptive moments carry them further: shape_xy of a round source,
            # ~3e-7 px^2, moved by 2.5e-16); the in-process test above compares bytes
            np.testing.assert_allclose(got, values, rtol=1e-9, atol=1e-14, err_msg=name)
            assert np.array_equal(np.isnan(got), np.isnan(values)), name


def test_cli_h5_catalog_is_written_through_xarray(field, tmp_path):
    import xarray as xr

    mods = _cli_modules(field.path, tmp_path / "c.h5")
    assert "xarray" in mods
    back = xr.open_dataset(tmp_path / "c.h5", engine="h5netcdf").load()
    cat = field.catalog("g").compute().reset_coords()
    assert list(back.data_vars) == list(cat.data_vars)
    np.testing.assert_array_equal(back["psf_flux"].values, cat["psf_flux"].values)
    assert back.attrs["units"] == cat.attrs["units"]


def test_catalog_says_its_sky_coordinates_come_from_the_wcs(field):
    cat = band_catalog(field, "g")
    assert np.all(np.isfinite(cat["ra"].values)) and cat.attrs["sky_coordinates"] == "wcs"
