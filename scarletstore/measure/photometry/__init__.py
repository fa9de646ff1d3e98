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

from dataclasses import dataclass

import numpy as np

from .deblend_errors import FLUX_SIGMA, FOOTPRINT_EDGE_SIGMA, KAPPA_TABLE, KAPPA_WING_POWER
from .gaap import effective_weight
from .psf_flux import ShiftedPSF

# catalog flag bits of the measurement families (the catalog's own use bits 0-10)
PHOT_FLAGS = {
    "psf_flux_failed": 1 << 11,     # no usable pixel under the PSF, or no centre
    "aperture_failed": 1 << 12,     # no centre to put the apertures on
    "kron_failed": 1 << 13,         # moments not positive definite or no positive pixel in the window
    "gaap_failed": 1 << 14,         # no centre
    "gaap_psf_too_broad": 1 << 15,  # the band PSF is not narrower than the pre-seeing aperture
    "shape_failed": 1 << 16,        # adaptive moments diverged (flux, definiteness, centre)
    "shape_not_converged": 1 << 17,  # adaptive moments hit the iteration limit (values kept)
    # under 90 % of the window's model light on usable pixels (bad planes, non-finite, no
    # variance): model mode measured the model there, its error scaled by that coverage;
    # redistribute mode measured nothing there. No usable pixel at all: NaN.
    "aperture_masked": 1 << 18,     # any of the circular apertures
    "kron_masked": 1 << 19,
    "gaap_masked": 1 << 20,
    # under half the child's model light in the band on usable pixels (its flux there is the
    # model's extrapolation), or, for a child with no model light, its peak on an unusable pixel
    "flux_masked": 1 << 21,
}


@dataclass(frozen=True)
class PhotometryConfig:
    """Settings of the measurement suite.

    apertures : circular aperture radii (pixels); columns ``aperture_flux_<R>``
    gaap_sigma : sigma (pixels) of the round pre-seeing GAaP aperture
    kron_min_radius : smallest Kron aperture radius (pixels)
    moments_max_iter, moments_tol : adaptive-moment iteration limits
    template_log_ratio_sigma : scale applied to the calibrated template log-errors
        (1 = as calibrated; see :mod:`~scarletstore.measure.photometry.deblend_errors`)
    kappa_table : template log-error by blendedness and S/N bins
        (``deblend_errors.KAPPA_TABLE``)
    footprint_edge_sigma : rms jitter (pixels) of the footprint boundary
        (``deblend_errors.FOOTPRINT_EDGE_SIGMA``)
    flux_sigma : independent normalisation error of each template, fraction of its flux
        (``deblend_errors.FLUX_SIGMA``)
    kappa_wing_power : power of the band PSF's wing ratio in the factor on kappa
        (``deblend_errors.KAPPA_WING_POWER``; 0: no factor)
    """

    apertures: tuple = (3.0, 6.0, 12.0)
    gaap_sigma: float = 3.0
    kron_min_radius: float = 3.5
    moments_max_iter: int = 100
    moments_tol: float = 1e-4
    template_log_ratio_sigma: float = 1.0
    kappa_table: tuple = KAPPA_TABLE
    footprint_edge_sigma: float = FOOTPRINT_EDGE_SIGMA
    flux_sigma: float = FLUX_SIGMA
    kappa_wing_power: float = KAPPA_WING_POWER

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


def column_names(config: PhotometryConfig) -> list[str]:
    """Columns of :func:`~scarletstore.measure.photometry.kernels.suite_kernel`'s output, in order."""
    cols = ["psf_flux", "psf_flux_err"]
    for name in config.aperture_names():
        cols += [name, name + "_err"]
    return cols + ["kron_flux", "kron_flux_err", "gaap_flux", "gaap_flux_err", "kron_radius",
                   "shape_xx", "shape_yy", "shape_xy"]


def odd_psf(psf) -> np.ndarray:
    """The PSF as float64 on an odd grid (an even side gets a zero row/column at its end)."""
    psf = np.asarray(psf.psf if isinstance(psf, ShiftedPSF) else psf, np.float64)
    pad = [(0, 1 - n % 2) for n in psf.shape]
    return np.ascontiguousarray(np.pad(psf, pad) if any(p[1] for p in pad) else psf)


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
    return run_suite(SuiteSetup(psf, psf_cov, config), values, geometry, var_eff, weight, centroids, moments)


class SuiteSetup:
    """What :func:`run_suite` needs of one band PSF and the settings, prepared once.

    A catalog measures every blend of a band with the same PSF (or a few) and
    settings; preparing them per blend (column names, the odd-grid PSF, the
    GAaP weight) was Python work per blend.
    """

    def __init__(self, psf, psf_cov, config: PhotometryConfig):
        self.names = column_names(config)
        self.psf = odd_psf(psf)
        gaap_w = effective_weight(config.gaap_sigma, psf_cov)
        self.gaap_ok = gaap_w is not None
        self.gaap_w = np.array(gaap_w if self.gaap_ok else (0.0, 1.0, 1.0, 0.0), np.float64)
        self.radii = np.array(config.apertures, np.float64)
        self.kron_min_radius = float(config.kron_min_radius)
        self.moments_max_iter = int(config.moments_max_iter)
        self.moments_tol = float(config.moments_tol)


def run_suite(setup: SuiteSetup, values, geometry, var_eff, weight, centroids, moments, good=None,
              model_values=True):
    """:func:`measure_suite` with the PSF and settings prepared (:class:`SuiteSetup`).

    ``good`` (h, w) marks the usable pixels; where some footprint pixel is not
    usable, every aperture, Kron and GAaP window gets its coverage (flags
    ``*_masked``, see ``PHOT_FLAGS``); ``model_values``: ``values`` are the
    models (model mode) rather than re-apportioned data.
    """
    from .kernels import suite_kernel

    values = np.ascontiguousarray(values, np.float32)
    geometry = np.ascontiguousarray(geometry, np.float32)
    n = values.shape[0]
    if var_eff is None:
        var_eff = np.full(values.shape, np.nan, np.float32)
    masked = good is not None and bool(np.any((geometry != 0) & ~np.asarray(good, bool)[None]))
    geom_good = np.where(good[None], geometry, 0).astype(np.float32) if masked else geometry
    out = np.empty((n, len(setup.names)))
    flags = np.zeros(n, np.int32)
    suite_kernel(values, geometry, np.ascontiguousarray(var_eff, np.float32),
                 np.ascontiguousarray(weight, np.float64), np.ascontiguousarray(centroids, np.float64),
                 np.ascontiguousarray(moments, np.float64), setup.psf, setup.gaap_w, setup.gaap_ok,
                 setup.radii, setup.kron_min_radius, setup.moments_max_iter, setup.moments_tol,
                 geom_good, masked, bool(model_values), out, flags)
    return {name: out[:, k] for k, name in enumerate(setup.names)}, flags
