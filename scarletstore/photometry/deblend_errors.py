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

``kappa_k`` comes from a small table by template k's own blendedness and S/N
(``KAPPA_TABLE``); table and edge jitter are derived by
``benchmarks/calibrate_flux_errors.py`` on calibration fields never used to
judge them (``benchmarks/bench_measure.py errors``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# kappa, the log-error of a template, by the template's own blendedness (rows: edges
# BLENDEDNESS_EDGES) and S/N (columns: edges SNR_EDGES), measured on calibration fields
# that are never used to judge it: ``benchmarks/calibrate_flux_errors.py`` derives it.
BLENDEDNESS_EDGES = (0.02, 0.2)
SNR_EDGES = (50.0,)
KAPPA_TABLE = ((0.058, 0.432),   # blendedness < 0.02;  S/N < 50, >= 50
               (0.606, 0.962),   # 0.02 - 0.2 (S/N >= 50: 32 children)
               (0.432, 0.962))   # >= 0.2 (S/N >= 50: 10 children, the row above's value)
# rms jitter (pixels) of the footprint boundary, found on the noisy data; same calibration
FOOTPRINT_EDGE_SIGMA = 0.729


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
    """Pairwise contested flux and share-weighted noise covariance of a blend's children.

    Returns ``(c, noise, edge, own)``; ``c`` and ``noise`` are (n, n): ``c[i, j] = sum_p s_i s_j M_p`` for
    i != j with ``c[i, i] = sum_p s_i (1 - s_i) M_p`` (the contested flux,
    which is the row sum of the off-diagonal terms), and ``noise[i, j] =
    sum_p s_i s_j var_p`` over good pixels (the covariance of the model
    fluxes ``s_i * data``; its diagonal is the square of ``flux_err_noise``).
    ``edge[i]`` is the child's template summed over the footprint's edge
    pixels: the light a shift of the footprint boundary by one pixel moves in
    or out (the footprint is found on the noisy data, so its edge jitters);
    ``own[i]`` the template's positive flux in the footprint.
    Shares use the positive parts of the templates, as the catalog does.
    """
    n, h, w = templates.shape
    c = np.zeros((n, n))
    noise = np.zeros((n, n))
    edge = np.zeros(n)
    own = np.zeros(n)
    s = np.empty(n)
    for y in range(h):
        for x in range(w):
            if not footprint[y, x]:
                continue
            on_edge = (y == 0 or x == 0 or y == h - 1 or x == w - 1 or not footprint[y - 1, x]
                       or not footprint[y + 1, x] or not footprint[y, x - 1] or not footprint[y, x + 1])
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    own[i] += t
                    if on_edge:
                        edge[i] += t
            total = 0.0
            for i in range(n):
                t = templates[i, y, x]
                s[i] = t if t > 0 else 0.0
                total += s[i]
            if total <= 0:
                continue
            for i in range(n):
                s[i] /= total
            v = variance[y, x] if (has_data and good[y, x]) else 0.0
            for i in range(n):
                if s[i] == 0.0:
                    continue
                c[i, i] += s[i] * (1.0 - s[i]) * total
                for j in range(n):
                    if j != i:
                        c[i, j] += s[i] * s[j] * total
                    noise[i, j] += s[i] * s[j] * v
    return c, noise, edge, own


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
def model_errors(c, noise, edge, own, err_noise, blendedness, table, b_edges, snr_edges, scale, edge_sigma,
                 has_data):
    """One compiled call for a blend: (model error, neighbour index, neighbour correlation).

    The same quantities as :func:`kappa_of`, :func:`template_covariance`
    plus the coherent edge shift, and :func:`most_covariant_neighbour`
    (index -1 and NaN for a child with no correlated neighbour).
    """
    n = len(own)
    kappa2 = np.empty(n)
    for k in range(n):
        b = blendedness[k] if np.isfinite(blendedness[k]) else 0.0
        snr = own[k] / err_noise[k] if err_noise[k] > 0 else 0.0
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
    err = np.empty(n)
    for i in range(n):
        err[i] = np.sqrt(max(cov[i, i], 0.0))
    best = np.full(n, -1, np.int64)
    corr = np.full(n, np.nan)
    for i in range(n):
        vi = cov[i, i] + (noise[i, i] if has_data else 0.0)
        top = 0.0
        for j in range(n):
            if j == i:
                continue
            vj = cov[j, j] + (noise[j, j] if has_data else 0.0)
            if vi <= 0 or vj <= 0:
                continue
            r = (cov[i, j] + (noise[i, j] if has_data else 0.0)) / np.sqrt(vi * vj)
            if abs(r) > abs(top):
                top = r
                best[i] = j
        if best[i] >= 0:
            corr[i] = top
    return err, best, corr
