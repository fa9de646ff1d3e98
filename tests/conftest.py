"""Shared fixtures: reference data paths and small synthetic inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a reference file in ../shared/data, or skip the test cleanly."""
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"reference data {name} not found in {DATA}")
    return path


def store_bytes(path) -> dict:
    """``{file name: bytes}`` of every file of a store (its file and, for a linked
    store, its products folder): what "the store is unchanged" compares."""
    from scarletstore.store.store import store_files

    base = Path(path).parent
    return {str(p.relative_to(base)): p.read_bytes() for p in store_files(path)}


@pytest.fixture
def hsc_path():
    return shared_file("hsc_cosmos_35.npz")


def make_wcs_header(ny, nx):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.1, 2.2]
    w.wcs.crpix = [nx / 2 + 0.5, ny / 2 + 0.5]
    w.wcs.cd = np.array([[-0.2, 0.0], [0.0, 0.2]]) / 3600.0
    return w.to_header()


def write_band_fits(path, band, image, variance, mask, psf, wcs_header=None, mask_planes=None,
                    band_in_header=True):
    """Write one band in the Rubin/HSC cut-out layout (IMAGE, MASK, VARIANCE, PSF)."""
    import warnings

    from astropy.io import fits

    warnings.filterwarnings("ignore", message="Keyword name", module="astropy")
    primary = fits.PrimaryHDU()
    if band_in_header:
        primary.header["BAND"] = band
    img = fits.ImageHDU(np.asarray(image, np.float32), name="IMAGE")
    if wcs_header is not None:
        img.header.update(wcs_header)
    msk = fits.ImageHDU(np.asarray(mask, np.int32), name="MASK")
    for name, bit in (mask_planes or {"BAD": 0, "SAT": 1, "DETECTED": 5}).items():
        msk.header[f"MP_{name}"] = bit
    hdus = [primary, img, msk, fits.ImageHDU(np.asarray(variance, np.float32), name="VARIANCE")]
    if psf is not None:
        hdus.append(fits.ImageHDU(np.asarray(psf, np.float32), name="PSF"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Path(path)


def gaussian_psf(size=11, sigma=1.5):
    y, x = np.mgrid[:size, :size] - size // 2
    p = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return p / p.sum()


@pytest.fixture
def fits_bands(tmp_path):
    """Three random bands as FITS files with a WCS; returns (paths, arrays dict)."""
    rng = np.random.default_rng(3)
    ny, nx = 40, 50
    hdr = make_wcs_header(ny, nx)
    paths, arrays = [], {}
    for i, band in enumerate("gri"):
        image = rng.normal(0, 1, (ny, nx)).astype(np.float32)
        variance = np.full((ny, nx), 1.0 + i, np.float32)
        mask = np.zeros((ny, nx), np.int32)
        mask[5, 5:9] = 1  # BAD
        mask[10:20, 10:20] |= 32  # DETECTED: informational, not bad
        psf = gaussian_psf(11, 1.2 + 0.2 * i)
        paths.append(write_band_fits(tmp_path / f"{band}.fits", band, image, variance, mask, psf, hdr))
        arrays[band] = (image, variance, mask, psf)
    return paths, arrays, hdr


def truth_blendedness_snr(out, exposure, band):
    """A simulated field's truth table with each source's ``band`` blendedness
    (1 - own.own / own.scene over its stamp) and optimal S/N (arrays in table order)."""
    from scarletstore.simulate.field import load_truth

    table, stamps = load_truth(out)
    kb = [str(b) for b in exposure.band.values].index(band)
    var = np.asarray(exposure["variance"].values[kb], np.float64)
    scene = np.zeros(var.shape)
    for (y0, x0, h, w), st in stamps.values():
        scene[y0:y0 + h, x0:x0 + w] += st[kb]
    blend, snr = [], []
    for sid in table["id"]:
        (y0, x0, h, w), st = stamps[int(sid)]
        own = st[kb].astype(np.float64)
        blend.append(1 - (own * own).sum() / max((own * scene[y0:y0 + h, x0:x0 + w]).sum(), 1e-30))
        snr.append(np.sqrt((own * own / var[y0:y0 + h, x0:x0 + w]).sum()))
    return table, np.array(blend), np.array(snr)
