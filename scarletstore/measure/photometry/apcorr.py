"""Aperture corrections: each flux type tied to a large reference aperture, as a smooth field.

Every flux type (PSF, small apertures, Kron, GAaP) misses a different part of
a star's light, and by how much depends on the PSF, which varies over a
patch. The correction of a flux type is the ratio of the reference aperture
flux (default: the largest catalog aperture) to that flux, measured on
bright, isolated, point-like sources and fitted as a low-order 2-D
Chebyshev series over the patch by weighted least squares with iterative
clipping of outliers (residuals beyond ``clip`` robust sigmas: blends,
galaxies passing the size cut, cosmic rays). The fit is stored as the
``apcorr`` product (one Dataset per band); the catalog multiplies each
flux by the field at the source and adds the field's own uncertainty to
the error.
"""

from __future__ import annotations

import json

import numpy as np

from ...errors import InputError
from ...store.schema import stamp

MIN_STARS_PER_TERM = 3


def chebyshev_terms(order: int) -> list[tuple[int, int]]:
    """(i, j) degree pairs of ``T_i(u) T_j(v)`` with ``i + j <= order``."""
    return [(i, d - i) for d in range(order + 1) for i in range(d, -1, -1)]


def design_matrix(x, y, terms, width: float, height: float) -> np.ndarray:
    """(n, n_terms) Chebyshev basis at pixel positions mapped onto [-1, 1] over the patch."""
    u = 2.0 * (np.asarray(x, np.float64) + 0.5) / width - 1.0
    v = 2.0 * (np.asarray(y, np.float64) + 0.5) / height - 1.0
    deg = max(max(i, j) for i, j in terms)
    tu = np.polynomial.chebyshev.chebvander(u, deg)
    tv = np.polynomial.chebyshev.chebvander(v, deg)
    return np.stack([tu[:, i] * tv[:, j] for i, j in terms], axis=1)


def robust_sigma(r: np.ndarray) -> float:
    """1.4826 x median absolute deviation (the Gaussian sigma of the bulk)."""
    return float(1.4826 * np.median(np.abs(r - np.median(r)))) if r.size else np.nan


def fit_field(x, y, ratio, ratio_err, order: int, width: float, height: float, clip: float = 3.0,
              n_iter: int = 10):
    """Robust weighted least-squares Chebyshev fit of ``ratio`` over the patch.

    The order is lowered (down to a constant) until there are
    ``MIN_STARS_PER_TERM`` stars per term, before the fit and again whenever
    clipping leaves fewer (an outlier kept to hold the order would pin the
    field); clipping stops before a constant would keep fewer than that:
    fewer stars than terms is an exact interpolation with no scatter left to
    judge the errors by. The covariance of the coefficients is scaled by the reduced chi^2
    of the kept stars when it exceeds 1 (scatter the errors do not explain,
    e.g. PSF structure the series cannot follow).

    Returns
    -------
    dict with ``terms``, ``coefficients``, ``covariance``, ``used`` (bool per
    star), ``scatter`` (robust sigma of the kept residuals) and ``order``.
    """
    x, y, ratio, ratio_err = (np.asarray(a, np.float64) for a in (x, y, ratio, ratio_err))
    n = len(ratio)
    while order > 0 and n < MIN_STARS_PER_TERM * len(chebyshev_terms(order)):
        order -= 1
    if n < MIN_STARS_PER_TERM:
        raise InputError(f"aperture correction needs at least {MIN_STARS_PER_TERM} bright isolated "
                         f"stars, found {n}")
    terms = chebyshev_terms(order)
    a = design_matrix(x, y, terms, width, height)
    w = 1.0 / np.square(ratio_err)
    used = np.ones(n, bool)
    for _ in range(n_iter):
        coef, cov = _weighted_lstsq(a[used], ratio[used], w[used])
        resid = (ratio - a @ coef) * np.sqrt(w)
        s = robust_sigma(resid[used])
        new = np.abs(resid - np.median(resid[used])) <= clip * max(s, 1e-12)
        if new.sum() < MIN_STARS_PER_TERM or np.array_equal(new, used):
            break  # (too few left even for a constant: keep the previous set)
        # rejecting the outliers wins over the order: keeping one galaxy among 9 stars
        # to fit a plane let it pin the plane
        while order > 0 and new.sum() < MIN_STARS_PER_TERM * len(terms):
            order -= 1
            terms = chebyshev_terms(order)
            a = design_matrix(x, y, terms, width, height)
        used = new
    coef, cov = _weighted_lstsq(a[used], ratio[used], w[used])
    resid = (ratio - a @ coef) * np.sqrt(w)
    dof = max(int(used.sum()) - len(terms), 1)
    chi2 = float(np.sum(resid[used] ** 2)) / dof
    cov = cov * max(chi2, 1.0)
    return {"terms": terms, "coefficients": coef, "covariance": cov, "used": used, "order": order,
            "scatter": robust_sigma((ratio - a @ coef)[used])}


def _weighted_lstsq(a, b, w):
    aw = a * w[:, None]
    normal = a.T @ aw
    cov = np.linalg.pinv(normal)
    return cov @ (aw.T @ b), cov


def select_stars(cat: dict, psf_size: float, reference: str, min_snr: float, max_blendedness: float,
                 size_tolerance: float, bad_flags: int) -> np.ndarray:
    """Rows of bright, isolated, point-like sources with clean measurements.

    Point-like: the adaptive size ``shape_xx + shape_yy`` within
    ``size_tolerance`` (relative) of the PSF's; isolated: blendedness at most
    ``max_blendedness``; bright: reference S/N at least ``min_snr``.
    """
    size = cat["shape_xx"] + cat["shape_yy"]
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = cat[reference] / cat[reference + "_err"]
        ok = ((cat["flags"] & bad_flags) == 0) & (snr >= min_snr) \
            & (np.abs(size / psf_size - 1) <= size_tolerance) \
            & ~(cat["blendedness"] > max_blendedness)
    return np.flatnonzero(ok)


def apcorr_dataset(fits: dict, band: str, run: str, reference: str, width: int, height: int,
                   config: dict, reference_radius: float, n_rejected: int = 0) -> xr.Dataset:
    """The ``apcorr`` v1 product of one band from per-flux-type fits.

    ``reference_radius``: the reference aperture's radius (pixels);
    ``n_rejected``: stars that passed the catalog cuts but were set aside
    because their reference aperture was not wholly on usable pixels.
    """
    import xarray as xr  # here: a catalog only reads corrections (see load_apcorr)

    names = list(fits)
    order = max(f["order"] for f in fits.values())
    terms = chebyshev_terms(order)
    k = len(terms)
    coef = np.zeros((len(names), k))
    cov = np.zeros((len(names), k, k))
    for n, name in enumerate(names):
        f = fits[name]
        idx = [terms.index(t) for t in f["terms"]]  # a lowered order fills the leading terms
        coef[n, idx] = f["coefficients"]
        cov[n][np.ix_(idx, idx)] = f["covariance"]
    ds = xr.Dataset(
        {"coefficients": (("flux_type", "term"), coef),
         "covariance": (("flux_type", "term", "term_b"), cov),
         "degree_x": (("term",), np.array([t[0] for t in terms], np.int32)),
         "degree_y": (("term",), np.array([t[1] for t in terms], np.int32)),
         "n_stars": (("flux_type",), np.array([int(fits[n]["used"].sum()) for n in names], np.int64)),
         "n_candidates": (("flux_type",), np.array([len(fits[n]["used"]) for n in names], np.int64)),
         "fit_order": (("flux_type",), np.array([fits[n]["order"] for n in names], np.int32)),
         "scatter": (("flux_type",), np.array([fits[n]["scatter"] for n in names], np.float64))},
        coords={"flux_type": np.array(names, dtype=object)},
        attrs={"band": band, "run": run, "reference": reference, "width": int(width),
               "height": int(height), "order": int(order), "config": json.dumps(config),
               "reference_radius": float(reference_radius), "n_rejected": int(n_rejected)},
    )
    return stamp(ds, "apcorr", 1)


class ApertureCorrection:
    """A stored ``apcorr`` product evaluated at source positions."""

    def __init__(self, ds: xr.Dataset):
        self.names = [str(n) for n in ds["flux_type"].values]
        self.terms = list(zip(ds["degree_x"].values.tolist(), ds["degree_y"].values.tolist()))
        self.coef = np.asarray(ds["coefficients"].values, np.float64)
        self.cov = np.asarray(ds["covariance"].values, np.float64)
        self.width, self.height = float(ds.attrs["width"]), float(ds.attrs["height"])
        self.reference = str(ds.attrs["reference"])
        self.run = str(ds.attrs["run"])
        # products written before the radius was recorded: nan (unknown)
        self.reference_radius = float(ds.attrs.get("reference_radius", np.nan))

    def evaluate(self, name: str, x, y):
        """(factor, factor error) of flux type ``name`` at pixel positions (x, y)."""
        k = self.names.index(name)
        a = design_matrix(np.atleast_1d(x), np.atleast_1d(y), self.terms, self.width, self.height)
        return a @ self.coef[k], np.sqrt(np.einsum("ni,ij,nj->n", a, self.cov[k], a))

    def apply(self, cols: dict, x, y) -> None:
        """Correct the flux columns of ``cols`` in place at (x, y), keeping ``<name>_uncorrected``.

        ``err^2 = (c sigma_F)^2 + (F sigma_c)^2``; sources without a finite
        position keep NaN (their flux columns are already flagged).
        """
        x = np.where(np.isfinite(x), x, 0.0)
        y = np.where(np.isfinite(y), y, 0.0)
        for name in self.names:
            if name not in cols:
                continue
            c, ce = self.evaluate(name, x, y)
            f, e = cols[name], cols[name + "_err"]
            cols[name + "_uncorrected"] = f.copy()
            cols[name + "_err_uncorrected"] = e.copy()
            cols[name] = f * c
            cols[name + "_err"] = np.hypot(c * e, f * ce)


def _exposure_shape(store):
    if not store.has("exposure"):
        raise InputError(f"{store.path}: aperture corrections need the exposure (its grid is their domain)")
    with store.open("exposure") as ex:
        return int(ex.sizes["x"]), int(ex.sizes["y"])


def load_apcorr(store, band: str) -> ApertureCorrection | None:
    """The stored correction of ``band`` (group ``apcorr/<band>``), or None."""
    group = f"apcorr/{band}"
    if not store.has(group):
        return None
    return ApertureCorrection(store.read(group, frame=True))  # a Frame: no xarray import
