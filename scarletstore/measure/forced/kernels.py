"""numba loops of the forced fit (no I/O)."""

from __future__ import annotations

import numpy as np
from numba import njit

from ...coadd.kernels import _weights  # the warp's normalised Lanczos-3 taps


@njit(cache=True, nogil=True)
def normal_equations(templates, image, ivar, good, background, A, b):
    """Accumulate the weighted normal equations of image ~ sum_i a_i T_i (+ c).

    ``A`` (m, m) and ``b`` (m,) are overwritten; m = n + 1 when ``background``
    (the last parameter is a constant pedestal), else n. Only ``good`` pixels
    with positive inverse variance count.
    """
    n, h, w = templates.shape
    m = A.shape[0]
    col = np.empty(m)
    for p in range(m):
        b[p] = 0.0
        for q in range(m):
            A[p, q] = 0.0
    for y in range(h):
        for x in range(w):
            wt = ivar[y, x]
            if not good[y, x] or not wt > 0:
                continue
            for i in range(n):
                col[i] = templates[i, y, x]
            if background:
                col[n] = 1.0
            d = image[y, x] * wt
            for p in range(m):
                cp = col[p]
                if cp == 0.0:
                    continue
                b[p] += cp * d
                cw = cp * wt
                for q in range(p, m):
                    A[p, q] += cw * col[q]
    for p in range(m):
        for q in range(p):
            A[p, q] = A[q, p]


@njit(cache=True, nogil=True)
def source_chi2(templates, coef, image, ivar, good, background, level, chi2, npix):
    """Per source: chi^2 of the joint model over the pixels where its own
    template exceeds ``level`` x its peak, and the number of those pixels."""
    n, h, w = templates.shape
    peak = np.zeros(n)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                if templates[i, y, x] > peak[i]:
                    peak[i] = templates[i, y, x]
        chi2[i] = 0.0
        npix[i] = 0
    for y in range(h):
        for x in range(w):
            wt = ivar[y, x]
            if not good[y, x] or not wt > 0:
                continue
            model = coef[n] if background else 0.0
            for i in range(n):
                model += coef[i] * templates[i, y, x]
            r2 = (image[y, x] - model) ** 2 * wt
            for i in range(n):
                if peak[i] > 0 and templates[i, y, x] > level * peak[i]:
                    chi2[i] += r2
                    npix[i] += 1


@njit(cache=True, nogil=True)
def resample_stack(images, support, u, v, scale, out):
    """Lanczos-3 resampling of every image of ``images`` (n, H, W) at (u, v), times ``scale``.

    The same normalised weights as :func:`scarletstore.coadd.kernels.resample_plain`
    (images zero outside their bounds), computed once per output pixel for
    all n images. ``support`` (n, 4) = (y0, y1, x0, x1) is the part of each
    image that holds its light (zero outside, to the precision asked of it):
    an output pixel whose taps miss it is set to zero without work, so a
    large blend costs about the sum of its children's areas, not n times
    the box.
    """
    n, ny_in, nx_in = images.shape
    ny, nx = u.shape
    wx = np.empty(6)
    wy = np.empty(6)
    for y in range(ny):
        for x in range(nx):
            for i in range(n):
                out[i, y, x] = 0.0
            uu, vv = u[y, x], v[y, x]
            if not (uu > -3.0 and uu < nx_in + 2.0 and vv > -3.0 and vv < ny_in + 2.0):
                continue
            i0 = _weights(uu, wx)
            j0 = _weights(vv, wy)
            for i in range(n):
                # taps j0..j0+5, i0..i0+5 against the image's support
                if j0 + 5 < support[i, 0] or j0 >= support[i, 1] or i0 + 5 < support[i, 2] \
                        or i0 >= support[i, 3]:
                    continue
                acc = 0.0
                for j in range(6):
                    jj = j0 + j
                    if jj < 0 or jj >= ny_in:
                        continue
                    for k in range(6):
                        ii = i0 + k
                        if ii < 0 or ii >= nx_in:
                            continue
                        acc += wy[j] * wx[k] * images[i, jj, ii]
                out[i, y, x] = acc * scale[y, x]
