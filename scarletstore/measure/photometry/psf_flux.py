"""PSF photometry: the linear least-squares amplitude of the band PSF at a fixed centre.

The PSF image is shifted to the source's sub-pixel centre in Fourier space
(a pure phase ramp, exact for a band-limited PSF) and fitted with inverse
variance weights ``w``: ``F = sum(w P I) / sum(w P^2)``. The estimate is
linear in the pixels, so ``var F = sum((w P)^2 var_eff) / (sum w P^2)^2``;
for an isolated source (``var_eff = var = 1 / w``) this is ``1 / sum(w P^2)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


class ShiftedPSF:
    """Sub-pixel shifts of one PSF image (odd-sized, centred on its central pixel).

    A Fourier phase ramp with the symmetric frequencies of an odd grid is, in
    pixel space, the separable real (Dirichlet) kernel
    ``S_d[y, y'] = sum_k cos(2 pi k (y - y' - d) / n) / n``, so a shift is
    ``S_dy P S_dx^T``: two small products in a compiled loop, a few tens of
    microseconds for 41 x 41 (an FFT pair per source costs ten times that,
    and BLAS threads on a busy machine far more).
    """

    def __init__(self, psf: np.ndarray):
        self.psf = np.ascontiguousarray(psf, np.float64)
        self.shape = self.psf.shape
        self.odd = all(n % 2 == 1 for n in self.shape)

    def __call__(self, dy: float, dx: float, rows=None, cols=None) -> np.ndarray:
        """The shifted PSF; ``rows``/``cols`` ((start, stop) of its own grid) limit the output
        to the part that is needed (the rest stays 0)."""
        ny, nx = self.shape
        if not self.odd:  # even grids have an unpaired Nyquist term: shift through the FFT
            ramp = np.exp(-2j * np.pi * (np.fft.fftfreq(ny)[:, None] * dy + np.fft.rfftfreq(nx)[None, :] * dx))
            return np.fft.irfft2(np.fft.rfft2(self.psf) * ramp, s=self.shape)
        ya, yb = rows if rows is not None else (0, ny)
        xa, xb = cols if cols is not None else (0, nx)
        return _shift_odd(self.psf, float(dy), float(dx), ya, yb, xa, xb)


@njit(cache=True)
def _dirichlet(n, d):
    """S(t) for t = m - d, m = -(n-1) .. n-1 (index m + n - 1): sin(pi t) / (n sin(pi t / n))."""
    out = np.empty(2 * n - 1)
    for m in range(-(n - 1), n):
        t = m - d
        den = n * np.sin(np.pi * t / n)
        out[m + n - 1] = 1.0 if abs(den) < 1e-12 else np.sin(np.pi * t) / den
    return out


@njit(cache=True)
def _blocks(n, size):
    """``n`` rounded up to whole blocks of ``size``."""
    return (n + size - 1) // size * size


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def _shift_odd(p, dy, dx, ya, yb, xa, xb):
    """Rows ya:yb, columns xa:xb of ``S_dy P S_dx^T`` (Dirichlet kernels, functions of y - y' only).

    The first pass runs in float32 (twice the SIMD width; a sum of ~40 terms
    keeps 1e-6 of the peak), the second accumulates in float64. The axis with
    fewer needed pixels is shifted first, so the first pass covers only them.

    Every innermost loop runs over whole blocks of 16 (float32) or 8
    (float64) columns, on zero-padded copies of the PSF and kernels and into
    padded work rows: the compiled loops then have no scalar remainder (a
    41-column PSF left 9 of 41 columns to it, a third of the time). Each
    output pixel is still the same sum, term by term in the same order, so
    the result is bit for bit the unpadded loops'; the padding columns are
    dropped.
    """
    ny, nx = p.shape
    ky = _dirichlet(ny, dy)
    kx = _dirichlet(nx, dx)
    out = np.zeros((ny, nx))
    n64 = _blocks(xb - xa, 8)
    if xb - xa < yb - ya:
        # fewer columns than rows are needed: shift along x first, only those columns
        n32 = _blocks(xb - xa, 16)
        kx32 = np.zeros(max(n32 + xa + nx, 2 * nx), np.float32)  # kx32[x + base], x < n32
        kx32[:2 * nx - 1] = kx
        tmp = np.zeros((ny, n32), np.float32)  # column x - xa of the x-shifted PSF
        for j in range(ny):
            for i in range(nx):
                s = np.float32(p[j, i])
                base = nx - 1 - i + xa
                for x in range(n32):
                    tmp[j, x] += s * kx32[x + base]
        row = np.zeros(n64)
        for y in range(ya, yb):
            row[:] = 0.0
            for j in range(ny):
                s = ky[y - j + ny - 1]
                for x in range(n64):
                    row[x] += s * tmp[j, x]
            for x in range(xb - xa):
                out[y, xa + x] = row[x]
        return out
    w32 = _blocks(nx, 16)
    p32 = np.zeros((ny, w32), np.float32)
    p32[:, :nx] = p
    ky32 = ky.astype(np.float32)
    tmp = np.zeros((ny, w32), np.float32)
    for y in range(ya, yb):
        for j in range(ny):
            s = ky32[y - j + ny - 1]
            for x in range(w32):
                tmp[y, x] += s * p32[j, x]
    kxp = np.zeros(max(n64 + xa + nx, 2 * nx))  # kxp[x + base], x < n64
    kxp[:2 * nx - 1] = kx
    row = np.zeros(n64)
    for y in range(ya, yb):
        row[:] = 0.0
        for i in range(nx):
            s = tmp[y, i]
            base = nx - 1 - i + xa  # kx index of column xa + x is x + base: contiguous in x (vectorises)
            for x in range(n64):
                row[x] += s * kxp[x + base]
        for x in range(xb - xa):
            out[y, xa + x] = row[x]
    return out


def shifted_psf(psf: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``psf`` (odd-sized, centred on its central pixel) moved by (dy, dx) pixels."""
    return ShiftedPSF(psf)(dy, dx)


@njit(cache=True, fastmath={"reassoc", "contract", "arcp"})
def psf_fit(values, weight, var_eff, psf, oy, ox):
    """Amplitude of ``psf`` placed with its pixel (0, 0) at box pixel (oy, ox).

    Returns (flux, variance, sum of w P^2); the last is 0 when no weighted
    pixel overlaps the PSF (the fit failed).
    """
    h, w = values.shape
    ph, pw = psf.shape
    a = 0.0
    b = 0.0
    v = 0.0
    for py in range(ph):
        y = oy + py
        if y < 0 or y >= h:
            continue
        for px in range(pw):
            x = ox + px
            if x < 0 or x >= w:
                continue
            wp = weight[y, x] * psf[py, px]
            a += wp * psf[py, px]
            b += wp * values[y, x]
            v += wp * wp * var_eff[y, x]
    if a <= 0.0:
        return np.nan, np.nan, 0.0
    return b / a, v / (a * a), a


def psf_flux(values, weight, var_eff, psf, cx, cy):
    """(flux, error) of the PSF fitted at (cx, cy) box pixels; NaN when no pixel is usable.

    ``psf`` is a PSF image or a :class:`ShiftedPSF` (reused across sources).
    """
    shifter = psf if isinstance(psf, ShiftedPSF) else ShiftedPSF(psf)
    ix, iy = int(np.floor(cx + 0.5)), int(np.floor(cy + 0.5))
    ph, pw = shifter.shape
    oy, ox = iy - ph // 2, ix - pw // 2
    h, w = values.shape
    rows = (min(max(-oy, 0), ph), min(max(h - oy, 0), ph))  # PSF rows that land on the box
    cols = (min(max(-ox, 0), pw), min(max(w - ox, 0), pw))
    p = shifter(cy - iy, cx - ix, rows, cols)
    f, v, a = psf_fit(values, weight, var_eff, p, oy, ox)
    return f, np.sqrt(v)
