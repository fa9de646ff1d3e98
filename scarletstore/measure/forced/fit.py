"""Joint linear fit of a blend's children in one visit.

The templates T_i (unit flux, visit pixels) are fixed; only the amplitudes
(fluxes) a_i and, by default, one constant pedestal c per blend are free:

    minimise  sum_p ivar_p (I_p - sum_i a_i T_i,p - c)^2  over good pixels,

so every pixel's light is shared by all children at once and a neighbour's
light is never counted twice. The pedestal absorbs the residual sky a visit
carries (simulated visits have planes of up to 0.3 sigma per pixel, which
over a PSF footprint would bias a faint source by more than its error).
Errors are the square roots of the diagonal of the inverse normal matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels

FLAGS = {
    "off_visit": 1,       # centre outside the visit's pixels: no measurement
    "bad_center": 2,      # centre on a bad / NO_DATA pixel: no measurement
    "partial": 4,         # > 1 % of the template off the visit or on bad pixels (measured)
    "no_model": 8,        # the model has no positive flux in this band
    "singular": 16,       # amplitude degenerate with a neighbour's (normal matrix singular)
    "psf_mismatch": 32,   # an isolated pixel cube at the coadd PSF in a sharper visit (measured)
}
NOT_MEASURED = FLAGS["off_visit"] | FLAGS["bad_center"] | FLAGS["no_model"] | FLAGS["singular"]
PARTIAL_FRACTION = 0.01
CHI2_LEVEL = 0.01  # a source's chi^2 pixels: its template above 1 % of its peak


@dataclass
class BlendFit:
    """Per-source result of one blend in one visit (NaN where not measured)."""

    flux: np.ndarray
    flux_err: np.ndarray
    chi2: np.ndarray  # chi^2 per degree of freedom over the source's pixels
    npix: np.ndarray
    flags: np.ndarray
    amplitude: np.ndarray | None = None  # fitted amplitude of every child (NaN: not fitted)
    pedestal: float = 0.0


def fit_blend(templates, image, ivar, good, flags, background: bool = True) -> BlendFit:
    """Fit unit-flux ``templates`` (n, h, w) to ``image`` with weights ``ivar``.

    ``flags`` (n,) carry what the renderer found; sources flagged
    ``off_visit`` or ``no_model`` are left out of the fit (they add no light
    to these pixels), ``bad_center`` ones stay in it so their light is not
    given to a neighbour, but get no flux.
    """
    n = templates.shape[0]
    flags = np.asarray(flags, np.int32).copy()
    out = BlendFit(np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan),
                   np.zeros(n, np.int64), flags, np.full(n, np.nan))
    use = np.flatnonzero((flags & (FLAGS["off_visit"] | FLAGS["no_model"])) == 0)
    if use.size == 0:
        return out
    t = np.ascontiguousarray(templates[use], np.float64)
    img = np.ascontiguousarray(image, np.float64)
    iv = np.ascontiguousarray(ivar, np.float64)
    gd = np.ascontiguousarray(good, np.bool_)
    m = use.size + int(background)
    A, b = np.empty((m, m)), np.empty(m)
    kernels.normal_equations(t, img, iv, gd, background, A, b)
    coef, cov, ok = _solve(A, b)
    chi2, npix = np.zeros(use.size), np.zeros(use.size, np.int64)
    kernels.source_chi2(t, np.where(np.isfinite(coef), coef, 0.0), img, iv, gd, background,
                        CHI2_LEVEL, chi2, npix)
    if background and np.isfinite(coef[-1]):
        out.pedestal = float(coef[-1])
    for k, i in enumerate(use):
        out.amplitude[i] = coef[k] if ok[k] else np.nan
        if not ok[k]:
            out.flags[i] |= FLAGS["singular"]
            continue
        out.npix[i] = npix[k]
        # no pixel of its own measured: no chi^2 (0 read as a perfect fit)
        out.chi2[i] = chi2[k] / max(npix[k] - 1, 1) if npix[k] > 0 else np.nan
        if out.flags[i] & NOT_MEASURED:
            continue
        out.flux[i] = coef[k]
        out.flux_err[i] = np.sqrt(cov[k, k])
    return out


def _solve(A, b):
    """Solution, inverse and per-parameter usability of a symmetric normal system.

    A parameter with no weight (all its pixels bad) or degenerate with the
    others (condition above 1e12 after scaling) is dropped and the rest solved.
    """
    m = b.size
    ok = np.diag(A) > 0
    for _ in range(m):
        idx = np.flatnonzero(ok)
        coef = np.full(m, np.nan)
        cov = np.full((m, m), np.nan)
        if idx.size == 0:
            return coef, cov, ok
        sub = A[np.ix_(idx, idx)]
        d = 1.0 / np.sqrt(np.diag(sub))
        scaled = sub * d[:, None] * d[None, :]
        w, V = np.linalg.eigh(scaled)
        if w[0] > 1e-12 * w[-1]:
            inv = (V / w) @ V.T * d[:, None] * d[None, :]
            coef[idx] = inv @ b[idx]
            cov[np.ix_(idx, idx)] = inv
            return coef, cov, ok
        # drop the parameter that carries most of the null direction
        ok[idx[int(np.argmax(np.abs(V[:, 0])))]] = False
    return np.full(m, np.nan), np.full((m, m), np.nan), ok


def redistribute_fluxes(fit: BlendFit, templates, image, ivar, good):
    """Fluxes of per-visit heavy footprints: the image (less the pedestal) shared by the fitted models.

    Each fit pixel goes to the children in proportion to a_i T_i (positive
    parts; :func:`scarletstore.measure.reconstruct.apportion_weights`), so the
    children sum to the image there; the light of a child's template on
    pixels not measured (masked, off the visit, outside the fit region) is
    filled from its fitted amplitude. Errors: sqrt(sum w_i^2 / ivar).
    Sources without a fitted amplitude keep NaN.
    """
    from ..reconstruct import apportion_weights

    amp = np.where(np.isfinite(fit.amplitude), fit.amplitude, 0.0)
    models = np.clip(templates * amp[:, None, None], 0, None).astype(np.float32)
    total = models.sum(axis=0)
    # the footprint: measured pixels where the models carry light (1e-4 of the
    # blend's peak), so sky-only pixels of the fit region go to nobody
    use = good & (ivar > 0) & (total > 1e-4 * max(float(total.max()), 0.0))
    w = apportion_weights(models, use).astype(np.float64)
    data = np.where(use, image - fit.pedestal, 0.0)
    var = np.where(use, 1.0 / np.where(use, ivar, 1.0), 0.0)
    seen = (templates * use[None]).sum(axis=(1, 2))
    flux = (w * data[None]).sum(axis=(1, 2)) + amp * (1.0 - seen)
    err = np.sqrt((w**2 * var[None]).sum(axis=(1, 2)))
    keep = np.isfinite(fit.flux)
    fit.flux = np.where(keep, flux, np.nan)
    fit.flux_err = np.where(keep, err, np.nan)
    return fit
