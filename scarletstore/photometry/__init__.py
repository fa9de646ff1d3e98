"""Measurement families of the band catalog, one module each.

``psf_flux`` (PSF fit), ``aperture`` (circular, exact overlap), ``kron``
(Kron 1980), ``gaap`` (Kuijken et al. 2015), ``moments`` (Bernstein & Jarvis
2002 adaptive moments) and ``apcorr`` (aperture corrections). They take plain
arrays; :func:`measure_suite` composes them for the children (or the parent)
of one blend, and the catalog adds the columns it returns.

Geometry (centre, Kron ellipse) comes from the noise-free model of each
child, so every flux is a fixed linear function of the measured pixels and
its error is exact; the fluxes and adaptive moments are measured on the
pixels of the chosen heavy footprint (model or re-apportioned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .aperture import circular_flux
from .gaap import effective_weight, gaap_flux
from .kron import kron_flux, kron_radius
from .moments import FAILED, NOT_CONVERGED, adaptive_moments
from .psf_flux import ShiftedPSF, psf_flux

# catalog flag bits of the measurement families (the catalog's own use bits 0-10)
PHOT_FLAGS = {
    "psf_flux_failed": 1 << 11,     # no usable pixel under the PSF, or no centre
    "aperture_failed": 1 << 12,     # no centre to put the apertures on
    "kron_failed": 1 << 13,         # moments not positive definite or no positive pixel in the window
    "gaap_failed": 1 << 14,         # no centre
    "gaap_psf_too_broad": 1 << 15,  # the band PSF is not narrower than the pre-seeing aperture
    "shape_failed": 1 << 16,        # adaptive moments diverged (flux, definiteness, centre)
    "shape_not_converged": 1 << 17,  # adaptive moments hit the iteration limit (values kept)
}


@dataclass(frozen=True)
class PhotometryConfig:
    """Settings of the measurement suite.

    apertures : circular aperture radii (pixels); columns ``aperture_flux_<R>``
    gaap_sigma : sigma (pixels) of the round pre-seeing GAaP aperture
    kron_min_radius : smallest Kron aperture radius (pixels)
    moments_max_iter, moments_tol : adaptive-moment iteration limits
    """

    apertures: tuple = (3.0, 6.0, 12.0)
    gaap_sigma: float = 3.0
    kron_min_radius: float = 3.5
    moments_max_iter: int = 100
    moments_tol: float = 1e-5
    extra: dict = field(default_factory=dict)

    def aperture_names(self):
        return [f"aperture_flux_{_radius_name(r)}" for r in self.apertures]


def _radius_name(r: float) -> str:
    return str(int(r)) if float(r).is_integer() else str(r).replace(".", "p")


def flux_columns(config: PhotometryConfig) -> list[str]:
    """Names of the flux-type columns (each has ``<name>_err``)."""
    return ["psf_flux", *config.aperture_names(), "kron_flux", "gaap_flux"]


def suite_columns(config: PhotometryConfig, flux_units: str) -> dict[str, str]:
    """Column name -> units of every column :func:`measure_suite` returns (flags apart)."""
    cols = {}
    for name in flux_columns(config):
        cols[name] = flux_units
        cols[name + "_err"] = flux_units
    cols["kron_radius"] = "pixel"
    cols.update(shape_xx="pixel^2", shape_yy="pixel^2", shape_xy="pixel^2")
    return cols


def measure_suite(values, geometry, var_eff, weight, centroids, moments, psf, psf_cov,
                  config: PhotometryConfig):
    """Every family's columns for ``n`` objects of one blend box.

    Parameters
    ----------
    values : (n, h, w) pixels to measure (heavy footprints, or a parent's image)
    geometry : (n, h, w) noise-free model of each object (Kron radius)
    var_eff : (n, h, w) variance of each object's pixels (its share squared
        times the pixel variance; 0 on unusable pixels) or None without data
    weight : (h, w) inverse-variance weight of the PSF fit (0 on unusable pixels)
    centroids : (n, 2) centres (x, y) in box pixels
    moments : (n, 3) second moments (xx, yy, xy) of the model, pixel^2
    psf : (ph, pw) band PSF, centred, unit sum (or its :class:`ShiftedPSF`);
        psf_cov : its covariance (xx, yy, xy)

    Returns
    -------
    (columns, flags) : dict of (n,) float64 arrays, (n,) int32 flag bits
    """
    n = values.shape[0]
    values = np.ascontiguousarray(values, np.float64)
    geometry = np.ascontiguousarray(geometry, np.float64)
    if var_eff is None:
        var_eff = np.full(values.shape, np.nan)
    var_eff = np.ascontiguousarray(var_eff, np.float64)
    weight = np.ascontiguousarray(weight, np.float64)
    names = flux_columns(config)
    cols = {k: np.full(n, np.nan) for k in
            [*names, *(c + "_err" for c in names), "kron_radius", "shape_xx", "shape_yy", "shape_xy"]}
    flags = np.zeros(n, np.int32)
    gaap_w = effective_weight(config.gaap_sigma, psf_cov)
    shifter = psf if isinstance(psf, ShiftedPSF) else ShiftedPSF(psf)
    for i in range(n):
        cx, cy = centroids[i]
        v, ve = values[i], var_eff[i]
        if not (np.isfinite(cx) and np.isfinite(cy)):
            flags[i] |= (PHOT_FLAGS["psf_flux_failed"] | PHOT_FLAGS["aperture_failed"]
                         | PHOT_FLAGS["kron_failed"] | PHOT_FLAGS["gaap_failed"] | PHOT_FLAGS["shape_failed"])
            continue
        f, e = psf_flux(v, weight, ve, shifter, cx, cy)
        if np.isfinite(f):
            cols["psf_flux"][i], cols["psf_flux_err"][i] = f, e
        else:
            flags[i] |= PHOT_FLAGS["psf_flux_failed"]
        for name, r in zip(config.aperture_names(), config.apertures):
            cols[name][i], cols[name + "_err"][i], _ = circular_flux(v, ve, cx, cy, r)
        r1, metric = kron_radius(geometry[i], cx, cy, moments[i])
        if metric is None:
            flags[i] |= PHOT_FLAGS["kron_failed"]
        else:
            cols["kron_radius"][i] = r1
            cols["kron_flux"][i], cols["kron_flux_err"][i] = kron_flux(v, ve, cx, cy, r1, metric,
                                                                      config.kron_min_radius)
        if gaap_w is None:
            flags[i] |= PHOT_FLAGS["gaap_psf_too_broad"]
        else:
            cols["gaap_flux"][i], cols["gaap_flux_err"][i] = gaap_flux(v, ve, cx, cy, gaap_w)
        size = np.sqrt(0.5 * (moments[i][0] + moments[i][1]))
        sigma0 = float(size) if np.isfinite(size) and size > 0.5 else 2.0
        xx, yy, xy, _, _, status = adaptive_moments(v, float(cx), float(cy), sigma0,
                                                    config.moments_max_iter, config.moments_tol)
        if status == FAILED:
            flags[i] |= PHOT_FLAGS["shape_failed"]
        else:
            if status == NOT_CONVERGED:
                flags[i] |= PHOT_FLAGS["shape_not_converged"]
            cols["shape_xx"][i], cols["shape_yy"][i], cols["shape_xy"][i] = xx, yy, xy
    return cols, flags
