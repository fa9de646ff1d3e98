"""Fitting a band's aperture corrections from the bright isolated stars of its catalog.

The correction model (Chebyshev fields) and the stored product: :mod:`scarletstore.measure.photometry.apcorr`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import InputError
from .photometry.apcorr import _exposure_shape, apcorr_dataset, fit_field, select_stars


def measure_apcorr(store, band: str, run: str | None = None, *, reference: str | None = None,
                   order: int = 2, min_snr: float = 50.0, max_blendedness: float = 0.02,
                   size_tolerance: float = 0.3, clip: float = 3.0, apertures=None,
                   redistribute: bool = False) -> xr.Dataset:
    """Fit the aperture corrections of ``band`` from the run's own catalog.

    Write the result with ``store.write({f"apcorr/{band}": ds})``; later
    catalogs of the band apply it. ``reference`` defaults to the largest
    aperture; the stars are the catalog rows passing :func:`select_stars`.
    """
    from .catalog import CATALOG_FLAGS, band_catalog
    from .photometry import flux_columns

    cat = band_catalog(store, band, run=run, redistribute=redistribute, apertures=apertures, apcorr=False)
    measurer = cat.attrs["_measurer"]
    try:
        config = measurer.photometry.config
        types = flux_columns(config)
        reference = reference or config.aperture_names()[int(np.argmax(config.apertures))]
        if reference not in types:
            raise InputError(f"reference {reference!r} is not a flux column ({', '.join(types)})")
        need = [*types, *(t + "_err" for t in types), "x", "y", "centroid_x", "centroid_y", "shape_xx",
                "shape_yy", "blendedness", "flags"]
        values = {k: np.asarray(cat[k].values) for k in need}
        _, psf_cov = measurer.photometry.psf(0)
        width, height = _exposure_shape(store)
    finally:
        measurer.close()
    bad = sum(v for k, v in CATALOG_FLAGS.items()
              if k in ("no_data", "not_converged", "zero_flux", "edge", "no_flux")
              or k.endswith("_failed") or k == "gaap_psf_too_broad")
    rows = select_stars(values, psf_cov[0] + psf_cov[1], reference, min_snr, max_blendedness,
                        size_tolerance, bad)
    x, y = values["centroid_x"][rows], values["centroid_y"][rows]
    fits = {}
    for name in types:
        if name == reference:
            continue
        f, e = values[name][rows], values[name + "_err"][rows]
        r, re = values[reference][rows], values[reference + "_err"][rows]
        ok = np.isfinite(f) & (f > 0) & np.isfinite(r) & np.isfinite(e) & np.isfinite(re)
        ratio = r[ok] / f[ok]
        ratio_err = ratio * np.hypot(re[ok] / r[ok], e[ok] / f[ok])
        fits[name] = fit_field(x[ok], y[ok], ratio, ratio_err, order, width, height, clip)
    settings = dict(order=order, min_snr=min_snr, max_blendedness=max_blendedness,
                    size_tolerance=size_tolerance, clip=clip, redistribute=bool(redistribute),
                    apertures=list(config.apertures))
    return apcorr_dataset(fits, band, cat.attrs["run"], reference, width, height, settings)
