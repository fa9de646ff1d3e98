"""Fitting a band's aperture corrections from the bright isolated stars of its catalog.

The correction model (Chebyshev fields) and the stored product: :mod:`scarletstore.measure.photometry.apcorr`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..detect.psf_size import psf_fwhm_linear
from ..errors import InputError
from .photometry.apcorr import _exposure_shape, apcorr_dataset, fit_field, select_stars

# the reference aperture must hold nearly all of a star's light: a radius below
# this many PSF FWHMs misses a part that depends on the PSF (3 px on a 3.5 px
# FWHM "corrected" PSF fluxes by x0.63)
MIN_REFERENCE_FWHM = 2.0

# catalog flags that make a star unfit to calibrate: failed or doubtful
# measurements, and peaks on masked (e.g. saturated) pixels
_UNFIT = ("no_data", "not_converged", "zero_flux", "edge", "no_flux", "masked_peak", "gaap_psf_too_broad")


def measure_apcorr(store, band: str, run: str | None = None, *, reference: str | None = None,
                   order: int = 2, min_snr: float = 50.0, max_blendedness: float = 0.02,
                   size_tolerance: float = 0.3, clip: float = 3.0, apertures=None,
                   redistribute: bool = False) -> xr.Dataset:
    """Fit the aperture corrections of ``band`` from the run's own catalog.

    Write the result with ``store.write({f"apcorr/{band}": ds})``; later
    catalogs of the band apply it. ``reference`` (an aperture column)
    defaults to the largest aperture, whose radius must be at least
    :data:`MIN_REFERENCE_FWHM` band PSF FWHMs. The stars are the catalog rows
    passing :func:`select_stars` whose reference aperture lies wholly on
    usable pixels of the band (:func:`clean_apertures`).
    """
    from .catalog import CATALOG_FLAGS, band_catalog
    from .photometry import flux_columns

    if not np.isfinite(min_snr) or min_snr <= 0:
        raise InputError(f"min_snr must be a positive number, got {min_snr}")
    cat = band_catalog(store, band, run=run, redistribute=redistribute, apertures=apertures, apcorr=False)
    measurer = cat.attrs["_measurer"]
    try:
        config = measurer.photometry.config
        types = flux_columns(config)
        radius, reference = _reference(measurer, config, types, reference, band)
        need = [*types, *(t + "_err" for t in types), "x", "y", "centroid_x", "centroid_y", "shape_xx",
                "shape_yy", "blendedness", "flags"]
        values = {k: np.asarray(cat[k].values) for k in need}
        _, psf_cov = measurer.photometry.psf(0)
        width, height = _exposure_shape(store)
        bad = sum(v for k, v in CATALOG_FLAGS.items() if k in _UNFIT or k.endswith("_failed"))
        rows = select_stars(values, psf_cov[0] + psf_cov[1], reference, min_snr, max_blendedness,
                            size_tolerance, bad)
        x, y = values["centroid_x"][rows], values["centroid_y"][rows]
        clean = clean_apertures(measurer, x, y, radius, width, height)
    finally:
        measurer.close()
    rows, x, y = rows[clean], x[clean], y[clean]
    fits = {}
    for name in types:
        if name != reference:
            fits[name] = _fit_type(values, rows, x, y, name, reference, order, width, height, clip)
    settings = dict(order=order, min_snr=min_snr, max_blendedness=max_blendedness,
                    size_tolerance=size_tolerance, clip=clip, redistribute=bool(redistribute),
                    apertures=list(config.apertures))
    return apcorr_dataset(fits, band, cat.attrs["run"], reference, width, height, settings,
                          reference_radius=radius, n_rejected=int((~clean).sum()))


def _reference(measurer, config, types, reference, band):
    """(radius, name) of the reference aperture, refused when it is not one or is too small."""
    radii = dict(zip(config.aperture_names(), config.apertures))
    reference = reference or max(radii, key=radii.get)
    if reference not in types:
        raise InputError(f"reference {reference!r} is not a flux column ({', '.join(types)})")
    if reference not in radii:
        raise InputError(f"reference {reference!r} is not an aperture flux ({', '.join(radii)})")
    radius = float(radii[reference])
    fwhm = psf_fwhm_linear(measurer.photometry.psf(0)[0])
    if radius < MIN_REFERENCE_FWHM * fwhm:
        raise InputError(f"reference aperture radius {radius:g} px is below {MIN_REFERENCE_FWHM:g} PSF "
                         f"FWHM of band {band} ({MIN_REFERENCE_FWHM * fwhm:.1f} px): it misses part of "
                         "a star's light; use larger --apertures")
    return radius, reference


def _fit_type(values, rows, x, y, name, reference, order, width, height, clip):
    """The field fit of flux type ``name`` from the stars ``rows`` with finite, positive values."""
    f, e = values[name][rows], values[name + "_err"][rows]
    r, re = values[reference][rows], values[reference + "_err"][rows]
    ok = np.isfinite(f) & (f > 0) & np.isfinite(r) & np.isfinite(e) & np.isfinite(re)
    ratio = r[ok] / f[ok]
    ratio_err = ratio * np.hypot(re[ok] / r[ok], e[ok] / f[ok])
    try:
        return fit_field(x[ok], y[ok], ratio, ratio_err, order, width, height, clip)
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None


def clean_apertures(measurer, x, y, radius: float, width: int, height: int) -> np.ndarray:
    """Bool per star: the aperture of ``radius`` at (x, y) is wholly inside the image and
    every pixel it touches is usable in the measurer's band (no bad plane, no SAT, finite,
    positive variance).

    A reference aperture cut by the edge or holding masked pixels misses light
    the PSF flux does not, and a bright star's small error lets it pin the fit.
    """
    ok = np.zeros(len(x), bool)
    for k, (cx, cy) in enumerate(zip(x, y)):
        # pixel i spans [i - 0.5, i + 0.5]
        if not (np.isfinite(cx) and np.isfinite(cy)) or min(cx, cy) - radius < -0.5 \
                or cx + radius > width - 0.5 or cy + radius > height - 0.5:
            continue
        x0, y0 = int(np.floor(cx - radius + 0.5)), int(np.floor(cy - radius + 0.5))
        x1, y1 = int(np.floor(cx + radius + 0.5)), int(np.floor(cy + radius + 0.5))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
        good = measurer.usable((y0, x0, y1 - y0 + 1, x1 - x0 + 1), extra_planes=("SAT",))
        gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
        # pixels whose centre is within half a pixel of the circle: all it touches, a few more
        touched = np.hypot(gx - cx, gy - cy) <= radius + 0.5
        ok[k] = good is not None and bool(good[touched].all())
    return ok
