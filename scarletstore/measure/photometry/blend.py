"""The measurement suite on one blend of a stored run: children and the parent as a whole.

Glue between :class:`scarletstore.measure.catalog.BlendMeasurer` (which rebuilds the
models, footprint and data of a blend in one band) and the families: it
builds each child's pixels, effective variance and fit weight, and the
band PSF with its Gaussian covariance (once per PSF).
"""

from __future__ import annotations

import numpy as np

from . import PHOT_FLAGS, PhotometryConfig, SuiteSetup, flux_columns, odd_psf, run_suite
from .deblend_errors import (BLENDEDNESS_EDGES, SNR_EDGES, band_share_of_snr2, error_model,
                             share_planes, share_products, wing_scale)
from .kernels import noise_planes
from .moments import psf_covariance


def _good_if_masked(fp, data):
    """The usable-pixel plane for :func:`run_suite` when some footprint pixel is not
    usable, else None: one (h, w) test per blend instead of the suite's (n, h, w) one,
    so the common blend with all its pixels usable pays nothing for the coverage sums."""
    if data is None or bool(data[2][fp].all()):
        return None
    return data[2]


def child_shares(models: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Each child's share ``T_i+ / sum_j T_j+`` of every footprint pixel (0 where no template is positive)."""
    pos = np.where(footprint[None], np.clip(models, 0, None), 0).astype(np.float64)
    total = pos.sum(axis=0)
    return np.divide(pos, total, out=np.zeros_like(pos), where=total > 0)


def model_fluxes(sources, n_bands: int) -> np.ndarray:
    """(n, B) model flux of each source in every band, from its stored components (no convolution)."""
    return _fluxes_and_cubes(sources, n_bands)[0]


def _fluxes_and_cubes(sources, n_bands: int):
    """:func:`model_fluxes` and which sources have a cube component (a morphology per band), in one pass."""
    out = np.zeros((len(sources), n_bands))
    cube = np.zeros(len(sources), np.bool_)
    for i, src in enumerate(sources):
        for c in src.components:
            if c.morph.ndim == 3:
                out[i] += c.morph.sum(axis=(1, 2), dtype=np.float64)
                cube[i] = True
            else:
                out[i] += np.asarray(c.spectrum, np.float64) * float(c.morph.sum(dtype=np.float64))
    return out, cube


def band_noise(variance, planes=1 << 14) -> np.ndarray:
    """(B,) typical pixel noise of each band: sqrt of the median finite positive variance.

    ``variance`` is a (B, H, W) array or HDF5 dataset, read on a regular
    subgrid of about ``planes`` pixels per band (a median needs no more, and
    the whole plane of a 600 x 600 field cost 50 ms, half a catalog).
    """
    nb, h, w = variance.shape
    step = max(1, int(np.sqrt(h * w / planes)))
    v = np.asarray(variance[:, ::step, ::step], np.float64).reshape(nb, -1)
    out = np.full(nb, np.nan)
    for b in range(nb):
        good = v[b][np.isfinite(v[b]) & (v[b] > 0)]
        if good.size:
            out[b] = np.sqrt(np.median(good))
    return out


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
    """Runs :func:`~scarletstore.measure.photometry.measure_suite` on the blends a measurer rebuilds."""

    def __init__(self, measurer, config: PhotometryConfig | None = None):
        self.measurer = measurer
        self.config = config or PhotometryConfig()
        self.apcorr = None  # an ApertureCorrection applied to the flux columns, if set
        self._psf = {}
        self._setups = {}
        self._kappa = {}
        self._wing = {}
        self._edges = (np.array(BLENDEDNESS_EDGES, np.float64), np.array(SNR_EDGES, np.float64))
        self._sigma = None

    def band_sigma(self) -> np.ndarray:
        """(B,) typical pixel noise of every band of the run (the reprocessed image's for its band)."""
        if self._sigma is None:
            m = self.measurer
            nb = len(m.tables.bands)
            sigma = np.full(nb, np.nan)
            if m.exposure is not None:
                sigma = m.store.cached(("band_noise",), lambda: band_noise(m.exposure.arrays["variance"]))
                sigma = np.array(sigma, np.float64)  # the copy is the measurer's own
            if m.image_override is not None:
                sigma[m.b] = band_noise(np.asarray(m.image_override["variance"])[None])[0]
            self._sigma = sigma
        return self._sigma

    @property
    def _kappa_table(self):
        table = self._kappa.get(self.config.kappa_table)
        if table is None:  # one array per table, not one per blend
            table = self._kappa[self.config.kappa_table] = np.asarray(self.config.kappa_table, np.float64)
        return table

    def psf(self, b: int):
        """The band PSF used for blend ``b`` (override, the blend's own, or the run's) and its covariance."""
        k = self.measurer.kernels
        band = self.measurer.b
        key = k.key(b, band)
        if key not in self._psf:
            psf = np.asarray(k.band_psf(b, band), np.float64)
            psf = psf / psf.sum()
            self._psf[key] = (odd_psf(psf), psf_covariance(psf))
        return self._psf[key]

    def kappa_scale(self, b: int) -> float:
        """The factor on the templates' kappa for blend ``b``'s band PSF (:func:`~.deblend_errors.wing_scale`)."""
        key = (self.measurer.kernels.key(b, self.measurer.b), self.config.kappa_wing_power)
        if key not in self._wing:
            self._wing[key] = wing_scale(self.psf(b)[0], self.config.kappa_wing_power)
        return self._wing[key]

    def suite_setup(self, b: int) -> SuiteSetup:
        """The suite's prepared PSF and settings for blend ``b`` (one per PSF and configuration)."""
        key = (self.measurer.kernels.key(b, self.measurer.b), self.config)
        setup = self._setups.get(key)
        if setup is None:
            setup = self._setups[key] = SuiteSetup(*self.psf(b), self.config)
        return setup

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
        shares = None
        if data is None:
            geometry = np.where(fp[None], models, 0)
            weight, var_eff = self._noise(models, fp, data)
        else:  # the noise planes, the masked models and the flux errors' sums in one pass
            shares = share_planes(np.ascontiguousarray(models, np.float32), np.ascontiguousarray(fp, np.bool_),
                                  np.ascontiguousarray(data[1], np.float32), np.ascontiguousarray(data[2], np.bool_))
            var_eff, weight, geometry = shares[5:]
        on_data = self.measurer.redistribute and redist is not None
        values = redist if on_data else geometry
        centroids = m[:, 2:4] - np.array((x0, y0), np.float64)
        cols, flags = run_suite(self.suite_setup(b), values, geometry, var_eff, weight, centroids, m[:, 4:7],
                                good=_good_if_masked(fp, data), model_values=not on_data)
        if self.apcorr is not None:
            self.apcorr.apply(cols, m[:, 2], m[:, 3])
        cols.update(self.flux_errors(blend, models, fp, data, m, shares, b))
        flags |= self._zero_flux_errors(cols, b, blend, models, data)
        return cols, flags

    def _zero_flux_errors(self, cols, b, blend, models, data) -> np.ndarray:
        """A child with no model light in the band has no template, so its Fisher
        error was 0, which reads as an exact zero: give it the noise of a point
        source on its peak, sqrt(var / sum psf^2) (the scale of an upper limit).
        A peak on an unusable pixel has no such limit (a star in a NO_DATA region
        read 0 +- 12.5 against a truth of 470): its error is NaN, and the flags
        returned (``flux_masked`` on those rows) say why."""
        noise = cols["flux_err_noise"]
        flags = np.zeros(len(noise), np.int32)
        empty = (noise <= 0) & ~np.any(models > 0, axis=(1, 2))
        if data is None or not empty.any():
            return flags
        _, variance, good = data
        psf = self.psf(b)[0]
        norm = float((psf * psf).sum())
        peaks = np.rint(self.measurer._local_peaks(b, blend.bbox)).astype(np.int64)
        h, w = variance.shape
        out = noise.copy()
        for k in np.flatnonzero(empty):
            y, x = peaks[k]
            if 0 <= y < h and 0 <= x < w and bool(good[y, x]):
                out[k] = np.sqrt(float(variance[y, x]) / norm)
            else:
                out[k] = np.nan
                flags[k] = PHOT_FLAGS["flux_masked"]
        cols["flux_err_noise"] = out
        cols["flux_err"] = np.hypot(out, cols["flux_err_model"])
        return flags

    def flux_errors(self, blend, models, fp, data, m, shares=None, b=0) -> dict:
        """The model flux's error (noise and template parts) and its most correlated neighbour.

        The noise part is the fixed-template (Fisher) covariance plus the
        morphology's share of the noise by the band's fraction of each
        child's S/N^2; the model part the covariance of independent template
        log-errors (kappa from each template's blendedness and S/N, times the
        band PSF's wing factor :meth:`kappa_scale`), a
        coherent shift of the footprint edge by ``footprint_edge_sigma``
        pixels and each template's normalisation error ``flux_sigma``; all in
        one compiled call (:func:`~.deblend_errors.error_model`). ``shares``: the
        output of :func:`~.deblend_errors.share_planes` for this blend, if made;
        ``b``: the blend's number (its band PSF scales kappa, :meth:`kappa_scale`).
        """
        inputs = self.error_inputs(blend, models, fp, data, m, shares)
        cfg = self.config
        scale = cfg.template_log_ratio_sigma * self.kappa_scale(b)
        err_noise, err, k, corr = error_model(*inputs, self._kappa_table, self._edges[0], self._edges[1],
                                              scale, cfg.footprint_edge_sigma,
                                              cfg.flux_sigma, data is not None)
        ids = np.asarray(blend.source_ids, np.int64)
        return {"flux_err_noise": err_noise, "flux_err_model": err, "flux_corr_neighbour": corr,
                "flux_corr_neighbour_id": np.where(k >= 0, ids[np.maximum(k, 0)], -1),
                "flux_err": np.hypot(err_noise, err)}

    def error_inputs(self, blend, models, fp, data, m, shares=None) -> tuple:
        """The blend's arrays :func:`~.deblend_errors.error_model` takes before its constants:
        ``(c, noise, fisher, edge, own, flux, q, err_share, blendedness)``; ``shares`` as for
        :meth:`flux_errors` (None: the sums are made here)."""
        has = data is not None
        if shares is None:
            if has:
                variance, good = np.ascontiguousarray(data[1], np.float32), np.ascontiguousarray(data[2])
            else:
                variance, good = np.zeros(fp.shape, np.float32), np.zeros(fp.shape, np.bool_)
            shares = share_products(np.ascontiguousarray(models, np.float32), np.ascontiguousarray(fp, np.bool_),
                                    variance, good, has)
        c, noise, edge, own, fisher = shares[:5]
        fluxes, cube = _fluxes_and_cubes(blend.sources, len(self.measurer.tables.bands))
        q = band_share_of_snr2(fluxes, self.band_sigma(), self.measurer.b) if has else np.ones(len(own))
        # a cube component (SDSS templates) has a morphology of its own in every band
        q[cube] = 1.0
        return (c, noise, fisher, edge, own, np.ascontiguousarray(fluxes[:, self.measurer.b]), q,
                np.ascontiguousarray(m[:, 1]), np.ascontiguousarray(m[:, 7]))

    def parent(self, b, blend, models, fp, data):
        """Suite columns of the parent as a whole (one row).

        Model mode measures the sum of the children's models; redistribute mode
        the observed image inside the footprint (which is what the children's
        re-apportioned pixels add up to). ``flux`` is the sum of the children's
        (model: their model fluxes; redistribute: the image over the good
        footprint pixels, the sum of the children's ``flux_redistributed``).
        Geometry comes from the summed model.
        """
        geometry = np.where(fp, models.sum(axis=0), 0)[None]
        on_data = self.measurer.redistribute and data is not None
        values = np.where(fp & data[2], data[0], 0)[None] if on_data else geometry
        weight, var_eff = self._noise(geometry, fp, data, unit_shares=True)
        (cx, cy), mom = moments_of(geometry[0])
        cols, flags = run_suite(self.suite_setup(b), values, geometry, var_eff, weight, np.array([[cx, cy]]),
                                np.array([mom]), good=_good_if_masked(fp, data), model_values=not on_data)
        # model mode: the children's model fluxes summed (their models reach past the footprint,
        # by 44 % of a one-child parent's light on a field with masked columns, and the sum
        # over the footprint disagreed with its child's row); redistribute: the image over the
        # footprint's usable pixels, which the children's flux_redistributed add up to
        flux = float(values.sum(dtype=np.float64)) if on_data else \
            float(model_fluxes(blend.sources, len(self.measurer.tables.bands))[:, self.measurer.b].sum())
        cols.update(centroid_x=np.array([cx + blend.bbox[1]]), centroid_y=np.array([cy + blend.bbox[0]]),
                    flux=np.array([flux]))
        if self.apcorr is not None:
            self.apcorr.apply(cols, cols["centroid_x"], cols["centroid_y"])
        return cols, flags

    def corrected_columns(self) -> list[str]:
        """Columns the aperture correction adds (the uncorrected values and errors)."""
        if self.apcorr is None:
            return []
        have = flux_columns(self.config)
        return [f"{n}{s}" for n in self.apcorr.names if n in have for s in ("_uncorrected", "_err_uncorrected")]
