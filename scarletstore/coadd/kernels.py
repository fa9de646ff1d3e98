"""Numba kernels of the coadd warp.

The resampling loop is kept apart from the WCS work and the I/O: it takes
the input pixel position of every output pixel (already computed) and
returns the resampled image, its variance, the OR of the touched mask bits
and a status per output pixel.

All kernels are compiled with ``cache=True``; the loops release the GIL
(``nogil``) so visits can be warped on threads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# Status of an output pixel.
GOOD = 0
BAD_INPUT = 1  # the kernel touched a bad, non-finite or zero-variance pixel
NO_DATA = 2  # the kernel's support is not wholly inside the input image

LANCZOS_A = 3


@njit(cache=True)
def lanczos3(x):
    """Lanczos-3 kernel sinc(x) sinc(x / 3), zero outside |x| < 3."""
    ax = abs(x)
    if ax < 1e-12:
        return 1.0
    if ax >= 3.0:
        return 0.0
    px = math.pi * x
    return 3.0 * math.sin(px) * math.sin(px / 3.0) / (px * px)


# cos and sin of pi k / 3 for the six taps (angle addition in _weights).
_COS3 = np.cos(np.pi * np.arange(6) / 3.0)
_SIN3 = np.sin(np.pi * np.arange(6) / 3.0)


@njit(cache=True)
def _weights(pos, w):
    """The six normalised Lanczos-3 weights of the taps floor(pos)-2 .. floor(pos)+3.

    Normalising to unit sum makes a constant image stay constant whatever the
    sub-pixel phase (the raw Lanczos weights sum to 1 only at integer phases).
    The six distances d_k = f - k share sin(pi d_k) = (-1)^k sin(pi f) and,
    by angle addition, sin(pi d_k / 3) from one sin/cos pair, and sin(pi f)
    follows from the same pair by the triple-angle formula: two
    transcendental calls per axis instead of twelve. Returns the first tap.
    """
    i0 = int(math.floor(pos)) - 2
    f = pos - i0  # distance to the first tap, in [2, 3)
    s3 = math.sin(math.pi * f / 3.0)
    c3 = math.cos(math.pi * f / 3.0)
    s1 = s3 * (3.0 - 4.0 * s3 * s3)  # sin(pi f) = sin(3 theta), theta = pi f / 3
    total = 0.0
    sign = 1.0
    for k in range(6):
        d = f - k
        if abs(d) < 1e-12:
            w[k] = math.pi * math.pi / 3.0  # the limit of the unnormalised weight below
        else:
            sd3 = s3 * _COS3[k] - c3 * _SIN3[k]
            w[k] = sign * s1 * sd3 / (d * d)  # the common 3 / pi^2 cancels in the normalisation
        total += w[k]
        sign = -sign
    inv = 1.0 / total
    for k in range(6):
        w[k] *= inv
    return i0


# The image warp's weights, tabulated: TABLE_STEPS + 1 phases t in [0, 1] of the
# first tap floor(pos) - 2 (distance f = 2 + t), each row normalised to unit sum.
# Linear interpolation between rows keeps the unit sum (a constant stays
# constant) and is within 1e-7 of the exact weights (h^2 / 8 max|w''|,
# h = 1 / 4096): below float32 rounding, at a tenth of the cost of evaluating
# the kernel's sines per pixel and axis.
TABLE_STEPS = 4096


def _weight_table(steps=TABLE_STEPS):
    t = np.arange(steps + 1) / steps
    d = 2.0 + t[:, None] - np.arange(6)[None, :]
    w = np.where(np.abs(d) < 3.0, np.sinc(d) * np.sinc(d / 3.0), 0.0)
    return w / w.sum(axis=1, keepdims=True)


_TABLE = _weight_table()


@njit(cache=True, nogil=True)
def _table_weights(pos, w):
    """The six Lanczos-3 weights of :func:`_weights`, interpolated in ``_TABLE``. Returns the first tap."""
    fl = math.floor(pos)
    i0 = int(fl) - 2
    r = (pos - fl) * TABLE_STEPS
    r0 = min(int(r), TABLE_STEPS - 1)
    a = r - r0
    for k in range(6):
        lo = _TABLE[r0, k]
        w[k] = lo + a * (_TABLE[r0 + 1, k] - lo)
    return i0


@njit(cache=True, nogil=True)
def _clean_planes(image, variance, mask, bad_bits):
    """Image and variance with unusable pixels set to 0, and a flag of those pixels.

    Done once per visit so the warp's inner loop is branch-free: a zero
    stands in for a bad value (whose output is discarded anyway) and cannot
    turn a good output into NaN through a zero weight times NaN.
    """
    ny, nx = image.shape
    clean_i = np.empty((ny, nx))
    clean_v = np.empty((ny, nx))
    bad = np.empty((ny, nx), np.uint8)
    for y in range(ny):
        for x in range(nx):
            p = image[y, x]
            q = variance[y, x]
            if (mask[y, x] & bad_bits) != 0 or not math.isfinite(p) or not (q > 0.0) \
                    or not math.isfinite(q):
                clean_i[y, x] = 0.0
                clean_v[y, x] = 0.0
                bad[y, x] = 1
            else:
                clean_i[y, x] = p
                clean_v[y, x] = q
                bad[y, x] = 0
    return clean_i, clean_v, bad


@njit(cache=True, nogil=True)
def warp_lanczos3(image, variance, mask, bad_bits, u, v, scale,
                  out_image, out_variance, out_mask, status):
    """Resample ``image`` at input positions (u, v) of every output pixel.

    Parameters
    ----------
    image, variance : (ny_in, nx_in) float64
    mask : (ny_in, nx_in) int32 bit planes of the input
    bad_bits : int, the OR of the bits of the planes whose pixels are unusable
    u, v : (ny_out, nx_out) float64, input x (column) and y (row) of each
        output pixel centre; pixel centres are at integers
    scale : (ny_out, nx_out) float64, factor applied to the resampled value
        (pixel-area ratio times photometric scale); the variance gets its square
    out_image, out_variance : (ny_out, nx_out) float64, written
    out_mask : (ny_out, nx_out) int32, OR of the mask bits of the touched pixels
    status : (ny_out, nx_out) int8, GOOD, BAD_INPUT or NO_DATA

    Weights come from the table (:func:`_table_weights`). A tap with zero
    weight (an exact-integer phase) does not make the output bad. The 6 x 6 sum is separable: each row of taps is summed with the x
    weights, then the six row sums with the y weights.
    """
    ny_in, nx_in = image.shape
    ny, nx = u.shape
    clean_i, clean_v, bad_in = _clean_planes(image, variance, mask, bad_bits)
    wx = np.empty(6)
    wy = np.empty(6)
    wx2 = np.empty(6)
    for y in range(ny):
        for x in range(nx):
            uu = u[y, x]
            vv = v[y, x]
            out_image[y, x] = np.nan
            out_variance[y, x] = np.nan
            out_mask[y, x] = 0
            if not (math.isfinite(uu) and math.isfinite(vv)):
                status[y, x] = NO_DATA
                continue
            i0 = _table_weights(uu, wx)
            j0 = _table_weights(vv, wy)
            if i0 < 0 or j0 < 0 or i0 + 5 >= nx_in or j0 + 5 >= ny_in:
                status[y, x] = NO_DATA
                continue
            for i in range(6):
                wx2[i] = wx[i] * wx[i]
            acc = 0.0
            acc_var = 0.0
            bits = 0
            nbad = 0
            for j in range(6):
                r = j0 + j
                row = 0.0
                row_var = 0.0
                row_bad = 0
                for i in range(6):
                    c = i0 + i
                    bits |= mask[r, c]
                    row += wx[i] * clean_i[r, c]
                    row_var += wx2[i] * clean_v[r, c]
                    if wx[i] != 0.0:
                        row_bad += bad_in[r, c]
                wj = wy[j]
                acc += wj * row
                acc_var += wj * wj * row_var
                if wj != 0.0:
                    nbad += row_bad
            out_mask[y, x] = bits
            if nbad > 0:
                status[y, x] = BAD_INPUT
                continue
            s = scale[y, x]
            out_image[y, x] = acc * s
            out_variance[y, x] = acc_var * s * s
            status[y, x] = GOOD


@njit(cache=True, nogil=True)
def resample_plain(image, u, v, out):
    """Lanczos-3 resampling of an image that is zero outside its bounds (a PSF).

    Taps that fall outside ``image`` contribute zero, which is exact for an
    image that holds the whole profile.
    """
    ny_in, nx_in = image.shape
    ny, nx = u.shape
    wx = np.empty(6)
    wy = np.empty(6)
    for y in range(ny):
        for x in range(nx):
            i0 = _weights(u[y, x], wx)
            j0 = _weights(v[y, x], wy)
            acc = 0.0
            for j in range(6):
                jj = j0 + j
                if jj < 0 or jj >= ny_in:
                    continue
                for i in range(6):
                    ii = i0 + i
                    if ii < 0 or ii >= nx_in:
                        continue
                    acc += wy[j] * wx[i] * image[jj, ii]
            out[y, x] = acc


@njit(cache=True, nogil=True)
def accumulate(sum_wi, sum_w2v, sum_w, image, variance, status, weight):
    """Add one warp to the running sums of a weighted-mean stack (in place).

    Only GOOD pixels contribute; ``weight`` is the visit's scalar weight.
    """
    ny, nx = image.shape
    for y in range(ny):
        for x in range(nx):
            if status[y, x] != GOOD:
                continue
            sum_wi[y, x] += weight * image[y, x]
            sum_w2v[y, x] += weight * weight * variance[y, x]
            sum_w[y, x] += weight


@njit(cache=True, nogil=True)
def clipped_mean(x, var, good, weights, nsigma, iterations, mean, mean_var, kept):
    """Per-pixel sigma-clipped weighted mean of n stacked values (in place).

    Parameters
    ----------
    x, var : (n, ny, nx) float values and their variances
    good : (n, ny, nx) bool, usable values
    weights : (n,) float64, one weight per visit
    nsigma, iterations : the clip: values more than nsigma sqrt(var) from the
        current centre are dropped; the centre starts at the median of the
        usable values and is the weighted mean of the kept ones after each pass
    mean, mean_var : (ny, nx) float64, written: the centre and the variance of
        the weighted mean of the kept values; where the clip keeps none, the
        median with the usable values' variance; NaN where none is usable
    kept : (n, ny, nx) bool, written
    """
    n, ny, nx = x.shape
    vals = np.empty(n)
    keep = np.empty(n, np.bool_)
    for y in range(ny):
        for xx in range(nx):
            m = 0
            for k in range(n):
                if good[k, y, xx] and math.isfinite(x[k, y, xx]):
                    vals[m] = x[k, y, xx]
                    m += 1
            if m == 0:
                centre = np.nan
            else:
                for a in range(1, m):  # insertion sort: a handful of visits
                    t = vals[a]
                    b = a - 1
                    while b >= 0 and vals[b] > t:
                        vals[b + 1] = vals[b]
                        b -= 1
                    vals[b + 1] = t
                centre = vals[(m - 1) // 2] if m % 2 else 0.5 * (vals[m // 2 - 1] + vals[m // 2])
            sw = 0.0
            for _ in range(iterations):
                sw = 0.0
                swx = 0.0
                for k in range(n):
                    keep[k] = good[k, y, xx] and abs(x[k, y, xx] - centre) <= nsigma * math.sqrt(var[k, y, xx])
                    if keep[k]:
                        sw += weights[k]
                        swx += weights[k] * x[k, y, xx]
                if sw > 0:
                    centre = swx / sw
            if sw == 0.0:
                # The clip left no visit (few visits, one with an artifact): the
                # median of the usable ones stands, with their unclipped variance.
                for k in range(n):
                    keep[k] = good[k, y, xx]
                    if keep[k]:
                        sw += weights[k]
            swv = 0.0
            for k in range(n):
                kept[k, y, xx] = keep[k]
                if keep[k]:
                    swv += weights[k] * weights[k] * var[k, y, xx]
            if sw > 0:
                mean[y, xx] = centre
                mean_var[y, xx] = swv / (sw * sw)
            else:
                mean[y, xx] = np.nan
                mean_var[y, xx] = np.nan
