"""The model part of a deblended child's flux error and its covariance with neighbours.

A child's model flux is its share ``s_i = T_i / sum_j T_j`` of the blend's
light ``M = sum_j T_j``. The noise part of its error is the catalog's
``sum s_i^2 var``; the deblend adds the uncertainty of the templates: how
contested light is split is only as good as the templates there. Each
template k is taken to be off in log by an independent ``eps_k`` of standard
deviation ``kappa_k`` (too wide or too bright the same way over its whole
overlap). Share i then moves by ``s_i (delta_ik - s_k) eps_k``, so the flux
by ``A_ik eps_k`` with ``A_ii = sum_p s_i (1 - s_i) M_p`` (the child's
*contested flux*) and ``A_ik = -sum_p s_i s_k M_p``, and the fluxes have
covariance ``A diag(kappa^2) A^T``: a positive variance for every child
that shares light, anti-correlated errors of neighbours that split it.

The footprint itself is found on the noisy data, so its boundary jitters: a
coherent shift by ``FOOTPRINT_EDGE_SIGMA`` pixels adds (or drops) each
child's light on the edge pixels, isolated children included.

Each template is also off in normalisation by ``FLUX_SIGMA`` of its flux,
independently (the free-form templates miss wings below the noise; this is
all an isolated bright child has beyond the noise and the edge).

The noise part is not the pixel variance under the child's share alone: the
fitted morphology is shared by all bands, so in band b the model flux
``F_b`` moves with the noise as a fixed-template amplitude fit (the Fisher
covariance ``F_i F_j (N^-1)_ij``, ``N_ij = sum_p T_i T_j / var_p``, which
correlates neighbours) plus the morphology's own noise, which is the
share-weighted variance beyond that fixed-template part times the band's
fraction ``q_b`` of the child's S/N^2 over all bands. For one free-form
template on P pixels and per-pixel noise sigma_b this is exact to first
order: ``var F_b = sigma_b^2 (P_eff + q_b (P - P_eff))`` with ``P_eff =
(sum T)^2 / sum T^2`` (a single band gives the aperture variance
``sigma^2 P``); a band where the child is faint takes its morphology from
the others and its error is near the fixed-template one.

``kappa_k`` comes from a small table by template k's own blendedness and S/N
(``KAPPA_TABLE``), times a factor of the band PSF's wings (:func:`wing_scale`:
the same blendedness means more or less overlap of the templates under a
PSF with wider or narrower wings); table, power of that factor, edge jitter
and ``FLUX_SIGMA`` are derived by
``benchmarks/calibrate_flux_errors.py`` on calibration fields never used to
judge them (``benchmarks/bench_measure.py errors``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# kappa, the log-error of a template, by the template's own blendedness (rows: edges
# BLENDEDNESS_EDGES) and S/N (columns: edges SNR_EDGES), measured on calibration fields
# that are never used to judge it: ``benchmarks/calibrate_flux_errors.py --write`` derives
# it (a row whose bin had too few children repeats the less blended row's value there).
BLENDEDNESS_EDGES = (0.02, 0.2)
SNR_EDGES = (50.0,)
KAPPA_TABLE = ((1.214, 0.569),
               (0.965, 0.036),
               (0.800, 0.320))
# rms jitter (pixels) of the footprint boundary, found on the noisy data; same calibration
FOOTPRINT_EDGE_SIGMA = 1.247
# independent normalisation error of each template, as a fraction of its flux; same calibration
FLUX_SIGMA = 0.0008
# kappa scales with the band PSF's wings as (psf_wing_ratio / KAPPA_WING_REF) ** KAPPA_WING_POWER;
# the reference is fixed (about the simulator's default Moffat beta 3.5), the power fitted
# with the table (same calibration; 0 leaves kappa as the table has it)
KAPPA_WING_REF = 0.7
KAPPA_WING_POWER = -0.940
# wing ratios outside the calibration fields' span (Moffat beta 4.5-2.5) count as its ends
KAPPA_WING_RANGE = (0.55, 1.1)


def psf_wing_ratio(psf, extent=4.0) -> float:
    """Second moment of a PSF image over its FWHM squared: ``sum_p P r^2 / FWHM^2`` within
    ``extent`` FWHM of the peak (unit-sum P; the FWHM of
    :func:`~scarletstore.detect.psf_size.psf_fwhm_linear`).

    A measure of the PSF's wings that does not depend on its size or its
    stamp (when the stamp holds ``extent`` FWHM): the simulator's Moffat PSFs
    of beta 4.5, 3.5, 2.8 and 2.5 have 0.60, 0.73, 0.93 and 1.07 (every
    band within 0.02); a Gaussian about 0.38. The wider the wings, the more the templates overlap for
    the same blendedness; the template log-error is scaled by this ratio
    (:data:`KAPPA_WING_POWER`).
    """
    from ...detect.psf_size import psf_fwhm_linear as psf_fwhm

    p = np.asarray(psf, np.float64)
    total = p.sum()
    if not total > 0:
        return float("nan")
    p = p / total
    fwhm = psf_fwhm(p)
    if not fwhm > 0:
        return float("nan")
    cy, cx = np.unravel_index(np.argmax(p), p.shape)
    y, x = np.indices(p.shape)
    r2 = (y - cy) ** 2 + (x - cx) ** 2
    return float((p * r2)[r2 <= (extent * fwhm) ** 2].sum() / fwhm ** 2)


def wing_scale(psf, power=KAPPA_WING_POWER, ref=KAPPA_WING_REF, span=KAPPA_WING_RANGE) -> float:
    """Factor on every template's kappa for a band PSF: ``(psf_wing_ratio(psf) / ref) ** power``,
    the ratio held to ``span`` (the calibrated range: a power law is not extrapolated); 1 for
    power 0 or a PSF whose ratio cannot be measured."""
    if power == 0:
        return 1.0
    w = psf_wing_ratio(psf)
    if not (np.isfinite(w) and w > 0):
        return 1.0
    return float((min(max(w, span[0]), span[1]) / ref) ** power)


def kappa_of(blendedness, snr, table=KAPPA_TABLE) -> np.ndarray:
    """Each template's kappa from its blendedness and S/N (bins of the table; NaN counts as the lowest)."""
    b = np.nan_to_num(np.asarray(blendedness, np.float64), nan=0.0)
    r = np.nan_to_num(np.asarray(snr, np.float64), nan=0.0)
    t = np.asarray(table, np.float64)
    return t[np.searchsorted(BLENDEDNESS_EDGES, b, side="right"), np.searchsorted(SNR_EDGES, r, side="right")]


@njit(cache=True)
def contested_flux(templates, footprint):
    """``sum_p T_i (1 - T_i / sum_j T_j)`` over the footprint for every child (positive parts)."""
    n, h, w = templates.shape
    out = np.zeros(n)
    for y in range(h):
        for x in range(w):
            if not footprint[y, x]:
                continue
            total = 0.0
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    total += t
            if total <= 0:
                continue
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    out[i] += t * (1.0 - t / total)
    return out


@njit(cache=True)
def share_products(templates, footprint, variance, good, has_data):
    """Pairwise contested flux, share-weighted noise and fixed-template Fisher matrix of a blend's children.

    Returns ``(c, noise, edge, own, fisher)``; ``c``, ``noise`` and ``fisher``
    are (n, n): ``c[i, j] = sum_p s_i s_j M_p`` for i != j with
    ``c[i, i] = sum_p s_i (1 - s_i) M_p`` (the contested flux, which is the
    row sum of the off-diagonal terms), ``noise[i, j] = sum_p s_i s_j var_p``
    over good pixels (the covariance of the share-weighted fluxes
    ``s_i * data``; its diagonal is the square of the aperture-like noise
    error) and ``fisher[i, j] = sum_p T_i T_j / var_p`` over good pixels (the
    normal matrix of the children's amplitudes with the templates fixed).
    ``edge[i]`` is the child's template summed over the footprint's edge
    pixels: the light a shift of the footprint boundary by one pixel moves in
    or out (the footprint is found on the noisy data, so its edge jitters);
    ``own[i]`` the template's positive flux in the footprint.
    Shares use the positive parts of the templates, as the catalog does.
    """
    none = np.zeros((1, 1, 1), np.float32)
    return _share_pass(templates, footprint, variance, good, has_data, False, none, none[0].astype(np.float64),
                       none)[:5]


@njit(cache=True)
def share_planes(templates, footprint, variance, good):
    """:func:`share_products` with data, and in the same pass the planes the suite measures with.

    Returns ``(c, noise, edge, own, fisher, var_eff, weight, geometry)``:
    ``var_eff`` (n, h, w) float32 is each child's share squared times the
    variance on usable footprint pixels (0 elsewhere), ``weight`` (h, w) the
    inverse variance there (0 elsewhere), ``geometry`` (n, h, w) float32 the
    templates inside the footprint (0 outside): what
    :func:`~scarletstore.measure.photometry.kernels.noise_planes` and a masked
    copy make, value for value, without two more passes over the box.
    """
    n, h, w = templates.shape
    var_eff = np.empty((n, h, w), np.float32)
    weight = np.empty((h, w))
    geometry = np.empty((n, h, w), np.float32)
    return _share_pass(templates, footprint, variance, good, True, True, var_eff, weight, geometry)


@njit(cache=True)
def _share_pass(templates, footprint, variance, good, has_data, planes, var_eff, weight, geometry):
    """The pixel pass of :func:`share_products`; with ``planes`` it also fills ``var_eff``,
    ``weight`` and ``geometry`` (see :func:`share_planes`)."""
    n, h, w = templates.shape
    c = np.zeros((n, n))
    noise = np.zeros((n, n))
    fisher = np.zeros((n, n))
    edge = np.zeros(n)
    own = np.zeros(n)
    contested = np.zeros(n)  # the diagonal of c, kept apart so the j loops need no test
    s = np.empty(n)
    t = np.empty(n, templates.dtype)  # the pixel's templates, contiguous (they are n planes apart)
    for y in range(h):
        for x in range(w):
            if not footprint[y, x]:
                if planes:
                    weight[y, x] = 0.0
                    for i in range(n):
                        var_eff[i, y, x] = 0.0
                        geometry[i, y, x] = 0.0
                continue
            on_edge = (y == 0 or x == 0 or y == h - 1 or x == w - 1 or not footprint[y - 1, x]
                       or not footprint[y + 1, x] or not footprint[y, x - 1] or not footprint[y, x + 1])
            for i in range(n):
                t[i] = templates[i, y, x]
                if planes:
                    geometry[i, y, x] = t[i]
            for i in range(n):
                ti = t[i]
                if ti > 0:
                    own[i] += ti
                    if on_edge:
                        edge[i] += ti
            usable = has_data and good[y, x]
            v = variance[y, x] if usable else 0.0
            if usable and v > 0:
                iv = 1.0 / v
                for i in range(n):
                    ti = t[i]
                    if ti == 0.0:
                        continue
                    for j in range(n):
                        fisher[i, j] += ti * t[j] * iv
            total = 0.0
            for i in range(n):
                ti = t[i]
                s[i] = ti if ti > 0 else 0.0
                total += s[i]
            if planes:
                weight[y, x] = 1.0 / v if usable else 0.0
                for i in range(n):
                    # noise_planes' share: 0 where no template is positive
                    share = s[i] / total if total > 0 else 0.0
                    var_eff[i, y, x] = share * share * v if usable else 0.0
            if total <= 0:
                continue
            for i in range(n):
                s[i] /= total
            for i in range(n):
                si = s[i]
                if si == 0.0:
                    continue
                contested[i] += si * (1.0 - si) * total
                for j in range(n):  # c[i, i] gets junk here, replaced below
                    c[i, j] += si * s[j] * total
                    noise[i, j] += si * s[j] * v
    for i in range(n):
        c[i, i] = contested[i]
    return c, noise, edge, own, fisher, var_eff, weight, geometry


def noise_covariance(noise, fisher, flux, q):
    """Covariance of the children's model fluxes from the pixel noise (reference for :func:`error_model`).

    ``fixed = F_i F_j (N^+)_ij`` is the amplitude part (templates held
    fixed; ``N^+`` the pseudo-inverse of ``fisher``); the morphology adds
    what the share-weighted covariance ``noise`` has beyond it, scaled by
    ``sqrt(q_i q_j)`` (``q``: each child's fraction of its S/N^2 over all
    bands in this band); a negative diagonal excess counts as none.
    """
    fixed = np.outer(flux, flux) * np.linalg.pinv(fisher)
    morph = noise - fixed
    np.fill_diagonal(morph, np.clip(np.diag(morph), 0, None))
    return fixed + np.sqrt(np.outer(q, q)) * morph


@njit(cache=True)
def band_share_of_snr2(fluxes, sigma, band):
    """Each child's fraction of its S/N^2 over all bands that is in ``band``.

    ``fluxes``: (n, B) model fluxes of the children in every band; ``sigma``:
    (B,) typical pixel noise of each band. The footprint is one for all
    bands, so a child's S/N in band b goes as ``F_b / sigma_b``; bands of
    unknown noise count for nothing, and a child with no positive flux where
    the noise is known has all of it in ``band``.
    """
    n, nb = fluxes.shape
    q = np.ones(n)
    for i in range(n):
        total = 0.0
        mine = 0.0
        for b in range(nb):
            f = fluxes[i, b]
            if not (np.isfinite(f) and f > 0 and np.isfinite(sigma[b]) and sigma[b] > 0):
                continue
            r2 = (f / sigma[b]) ** 2
            total += r2
            if b == band:
                mine = r2
        if total > 0:
            q[i] = mine / total
    return q


def template_covariance(c: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """Covariance of the children's fluxes from independent template errors.

    Each template k is taken to be off in log by an independent ``eps_k`` of
    standard deviation ``kappa[k]``. A child's share moves by
    ``s_i (delta_ik - s_k) eps_k``, so its flux by ``A_ik eps_k`` with
    ``A_ii = c_ii`` (its contested flux) and ``A_ik = -c_ik``; the covariance
    is ``A diag(kappa^2) A^T``.
    """
    a = -c.copy()
    np.fill_diagonal(a, np.diag(c))
    return (a * np.square(kappa)[None, :]) @ a.T


def most_covariant_neighbour(cov: np.ndarray):
    """(index, correlation) of each child's most correlated neighbour in absolute value (-1, nan alone)."""
    n = len(cov)
    d = np.sqrt(np.clip(np.diag(cov), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.outer(d, d)
    np.fill_diagonal(r, 0.0)
    r = np.where(np.isfinite(r), r, 0.0)
    if n < 2:
        return np.full(n, -1, np.int64), np.full(n, np.nan)
    k = np.argmax(np.abs(r), axis=1)
    corr = r[np.arange(n), k]
    return np.where(corr != 0, k, -1).astype(np.int64), np.where(corr != 0, corr, np.nan)


@njit(cache=True)
def _bin(value, edges):
    k = 0
    while k < len(edges) and value >= edges[k]:
        k += 1
    return k


@njit(cache=True)
def error_model(c, noise, fisher, edge, own, flux, q, err_share, blendedness, table, b_edges, snr_edges, scale,
                edge_sigma, flux_sigma, has_data):
    """One compiled call for a blend: (noise error, model error, neighbour index, neighbour correlation).

    The noise covariance is :func:`noise_covariance`; the model covariance
    :func:`template_covariance` with kappa by :func:`kappa_of` (S/N: own
    flux over the share-weighted error ``err_share``; ``scale`` multiplies
    kappa) plus the coherent edge shift ``edge_sigma`` and each template's
    independent normalisation error ``flux_sigma``; the neighbour is
    :func:`most_covariant_neighbour` of their sum (index -1 and NaN for a
    child with no correlated neighbour). Without data the noise error is NaN.
    """
    n = len(own)
    kappa2 = np.empty(n)
    for k in range(n):
        b = blendedness[k] if np.isfinite(blendedness[k]) else 0.0
        snr = own[k] / err_share[k] if err_share[k] > 0 else 0.0
        if not np.isfinite(snr):
            snr = 0.0
        kk = scale * table[_bin(b, b_edges), _bin(snr, snr_edges)]
        kappa2[k] = kk * kk
    cov = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            acc = 0.0
            for k in range(n):
                a_ik = c[i, k] if k == i else -c[i, k]
                a_jk = c[j, k] if k == j else -c[j, k]
                acc += a_ik * a_jk * kappa2[k]
            cov[i, j] = acc + edge_sigma * edge_sigma * edge[i] * edge[j]
        cov[i, i] += (flux_sigma * flux[i]) ** 2
    vn = np.zeros((n, n))
    if has_data:
        inv = np.linalg.pinv(fisher)
        for i in range(n):
            for j in range(n):
                fixed = flux[i] * flux[j] * inv[i, j]
                morph = noise[i, j] - fixed
                if i == j and morph < 0:
                    morph = 0.0
                vn[i, j] = fixed + np.sqrt(q[i] * q[j]) * morph
    err_noise = np.empty(n)
    err = np.empty(n)
    for i in range(n):
        err_noise[i] = np.sqrt(max(vn[i, i], 0.0)) if has_data else np.nan
        err[i] = np.sqrt(max(cov[i, i], 0.0))
    best = np.full(n, -1, np.int64)
    corr = np.full(n, np.nan)
    for i in range(n):
        vi = cov[i, i] + vn[i, i]
        top = 0.0
        for j in range(n):
            if j == i:
                continue
            vj = cov[j, j] + vn[j, j]
            if vi <= 0 or vj <= 0:
                continue
            r = (cov[i, j] + vn[i, j]) / np.sqrt(vi * vj)
            if abs(r) > abs(top):
                top = r
                best[i] = j
        if best[i] >= 0:
            corr[i] = top
    return err_noise, err, best, corr
