"""The measurement suite on one blend of a stored run: children and the parent as a whole.

Glue between :class:`scarletstore.catalog.BlendMeasurer` (which rebuilds the
models, footprint and data of a blend in one band) and the families: it
builds each child's pixels, effective variance and fit weight, and the
band PSF with its Gaussian covariance (once per PSF).
"""

from __future__ import annotations

import numpy as np

from . import PhotometryConfig, flux_columns, measure_suite, odd_psf
from .deblend_errors import BLENDEDNESS_EDGES, SNR_EDGES, model_errors, share_products
from .kernels import noise_planes
from .moments import psf_covariance


def child_shares(models: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Each child's share ``T_i+ / sum_j T_j+`` of every footprint pixel (0 where no template is positive)."""
    pos = np.where(footprint[None], np.clip(models, 0, None), 0).astype(np.float64)
    total = pos.sum(axis=0)
    return np.divide(pos, total, out=np.zeros_like(pos), where=total > 0)


def moments_of(img: np.ndarray):
    """Centre (x, y) and second moments (xx, yy, xy) of the positive part of ``img``."""
    p = np.clip(np.asarray(img, np.float64), 0, None)
    s = p.sum()
    if not s > 0:
        return (np.nan, np.nan), (np.nan, np.nan, np.nan)
    y, x = np.indices(p.shape)
    cx, cy = (p * x).sum() / s, (p * y).sum() / s
    return (cx, cy), ((p * (x - cx) ** 2).sum() / s, (p * (y - cy) ** 2).sum() / s,
                      (p * (x - cx) * (y - cy)).sum() / s)


class BlendPhotometry:
    """Runs :func:`~scarletstore.photometry.measure_suite` on the blends a measurer rebuilds."""

    def __init__(self, measurer, config: PhotometryConfig | None = None):
        self.measurer = measurer
        self.config = config or PhotometryConfig()
        self.apcorr = None  # an ApertureCorrection applied to the flux columns, if set
        self._psf = {}
        self._edges = (np.array(BLENDEDNESS_EDGES, np.float64), np.array(SNR_EDGES, np.float64))

    @property
    def _kappa_table(self):
        return np.asarray(self.config.kappa_table, np.float64)

    def psf(self, b: int):
        """The band PSF used for blend ``b`` (override, the blend's own, or the run's) and its covariance."""
        k = self.measurer.kernels
        band = self.measurer.b
        key = b if (k.per_blend and band not in k.override) else -1
        if key not in self._psf:
            if band in k.override:
                psf = k.override[band]
            elif k.per_blend:
                psf = k.tables.col("blend_psf")[b, band]
            else:
                psf = k.tables.col("psf")[band]
            psf = np.asarray(psf, np.float64)
            psf = psf / psf.sum()
            self._psf[key] = (odd_psf(psf), psf_covariance(psf))
        return self._psf[key]

    def _noise(self, templates, fp, data, unit_shares=False):
        """(weight, var_eff) of the PSF fit and of each object's pixels (None without data)."""
        if data is None:
            return fp.astype(np.float64), None
        _, variance, good = data
        weight = np.empty(fp.shape)
        var_eff = np.empty(templates.shape, np.float32)
        noise_planes(np.ascontiguousarray(templates, np.float32), np.ascontiguousarray(fp, np.bool_),
                     np.ascontiguousarray(variance, np.float32), np.ascontiguousarray(good, np.bool_),
                     unit_shares, var_eff, weight)
        return weight, var_eff

    def children(self, b, blend, models, fp, data, redist, m):
        """Suite columns of the children; ``m`` is :func:`measure_children`'s output."""
        y0, x0 = blend.bbox[0], blend.bbox[1]
        geometry = np.where(fp[None], models, 0)
        values = redist if (self.measurer.redistribute and redist is not None) else geometry
        weight, var_eff = self._noise(models, fp, data)
        centroids = np.stack([m[:, 2] - x0, m[:, 3] - y0], axis=1)
        psf, cov = self.psf(b)
        cols, flags = measure_suite(values, geometry, var_eff, weight, centroids, m[:, 4:7], psf, cov, self.config)
        if self.apcorr is not None:
            self.apcorr.apply(cols, m[:, 2], m[:, 3])
        cols.update(self.flux_errors(blend, models, fp, data, m))
        return cols, flags

    def flux_errors(self, blend, models, fp, data, m) -> dict:
        """The model flux's error (noise and template parts) and its most correlated neighbour.

        The model part is the covariance of independent template log-errors
        (kappa from each template's blendedness and S/N) plus a coherent
        shift of the footprint edge by ``footprint_edge_sigma`` pixels, in
        one compiled call (:func:`~.deblend_errors.model_errors`); the noise
        part is the share-weighted one.
        """
        templates = np.ascontiguousarray(models, np.float32)
        fpc = np.ascontiguousarray(fp, np.bool_)
        if data is None:
            h, w = fp.shape
            variance, good, has = np.zeros((h, w), np.float32), np.zeros((h, w), np.bool_), False
        else:
            variance, good, has = np.ascontiguousarray(data[1], np.float32), np.ascontiguousarray(data[2]), True
        c, noise, edge, own = share_products(templates, fpc, variance, good, has)
        # the footprint's edge jitters with the noise it was found on: the same shift for every child
        edge_sigma = self.config.footprint_edge_sigma * edge
        out = {"flux_err_noise": m[:, 1].copy()}
        if len(own) == 1:  # alone: no template shares its pixels, no neighbour
            out.update(flux_err_model=edge_sigma, flux_corr_neighbour=np.full(1, np.nan),
                       flux_corr_neighbour_id=np.full(1, -1, np.int64))
        else:
            err, k, corr = model_errors(c, noise, edge, own, np.ascontiguousarray(m[:, 1]),
                                        np.ascontiguousarray(m[:, 7]), self._kappa_table,
                                        self._edges[0], self._edges[1], self.config.template_log_ratio_sigma,
                                        self.config.footprint_edge_sigma, has)
            ids = np.asarray(blend.source_ids, np.int64)
            out.update(flux_err_model=err, flux_corr_neighbour=corr,
                       flux_corr_neighbour_id=np.where(k >= 0, ids[np.maximum(k, 0)], -1))
        out["flux_err"] = np.hypot(m[:, 1], out["flux_err_model"])
        return out

    def parent(self, b, blend, models, fp, data):
        """Suite columns of the parent as a whole (one row).

        Model mode measures the sum of the children's models; redistribute mode
        the observed image inside the footprint (which is what the children's
        re-apportioned pixels add up to). Geometry comes from the summed model.
        """
        geometry = np.where(fp, models.sum(axis=0), 0)[None]
        if self.measurer.redistribute and data is not None:
            values = np.where(fp & data[2], data[0], 0)[None]
        else:
            values = geometry
        weight, var_eff = self._noise(geometry, fp, data, unit_shares=True)
        (cx, cy), mom = moments_of(geometry[0])
        psf, cov = self.psf(b)
        cols, flags = measure_suite(values, geometry, var_eff, weight, np.array([[cx, cy]]), np.array([mom]),
                                    psf, cov, self.config)
        cols.update(centroid_x=np.array([cx + blend.bbox[1]]), centroid_y=np.array([cy + blend.bbox[0]]),
                    flux=np.array([float(geometry.sum(dtype=np.float64))]))
        if self.apcorr is not None:
            self.apcorr.apply(cols, cols["centroid_x"], cols["centroid_y"])
        return cols, flags

    def corrected_columns(self) -> list[str]:
        """Columns the aperture correction adds (the uncorrected values and errors)."""
        if self.apcorr is None:
            return []
        have = flux_columns(self.config)
        return [f"{n}{s}" for n in self.apcorr.names if n in have for s in ("_uncorrected", "_err_uncorrected")]
