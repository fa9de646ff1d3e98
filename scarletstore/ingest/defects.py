"""Pixels sharper than the PSF allows, masked CR at ingest.

An unflagged hot column, hot pixel or cosmic ray is detected like a source:
its pixels seed and grow footprints and glue their neighbours into one
parent. Light from the sky has been through the PSF, so no pixel of it can
be sharper than the PSF; the criterion is the one :mod:`scarletstore.deblend.sharp`
applies to a child's peak (its constants live here, below the stages that
use them), here applied to every pixel of the exposure, and
the pixels that fail it are set in the CR plane (a bad plane, so detection
and the deblender never use them).

Masking a pixel only takes comparisons away from its neighbours (a bad
neighbour is never compared), so a second pass finds nothing the first did
not: one pass is final.

The criterion compares a pixel with its neighbours above the sky. Images
come sky-subtracted, but one that still holds its sky would hide every
cosmic ray on a bright sky and mark star cores on a negative one, so a band
whose sky level (the median of its usable pixels) is beyond
``SKY_LEVEL_SIGMA`` pixel sigmas has it taken off first; the same rule makes
`detect` warn that the image is not sky-subtracted. Below it nothing is
taken off: faint source light lifts a sky-subtracted field's median by
0.1 sigma, and the sharpest star cores of a narrow Moffat PSF sit that close
to the criterion's margin.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# the four directions through a pixel: along x, along y, and the two diagonals
DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))
K_SIGMA = 5.0
SAFETY = 0.5


def psf_neighbour_ratios(psfs: np.ndarray) -> np.ndarray:
    """(band, direction) mean of the two PSF pixels one step away, over the centre pixel."""
    n, ph, pw = psfs.shape
    cy, cx = ph // 2, pw // 2
    out = np.zeros((n, len(DIRECTIONS)))
    for k, (dy, dx) in enumerate(DIRECTIONS):
        pair = psfs[:, cy + dy, cx + dx] + psfs[:, cy - dy, cx - dx]
        out[:, k] = 0.5 * pair / np.maximum(psfs[:, cy, cx], 1e-30)
    return out


#: the plane the marked pixels are set in (one of the default bad planes)
DEFECT_PLANE = "CR"
# the highest bit an int32 mask can hold without touching the sign bit
_MAX_BIT = 30

_DY = np.array([d[0] for d in DIRECTIONS], np.int64)
_DX = np.array([d[1] for d in DIRECTIONS], np.int64)


@njit(cache=True)
def pixel_is_sharp(image, variance, bad, y, x, ratios, dys, dxs, k_sigma, safety):
    """Whether one band's pixel (y, x) fails the PSF criterion in some direction.

    ``bad`` (h, w) bool: such pixels are neither tested nor compared; neighbours
    off the image are not compared either. The one test behind both the
    whole-image pass and the deblend's check of a child's peak.
    """
    h, w = image.shape
    v = variance[y, x]
    if bad[y, x] or not v > 0:
        return False
    low = image[y, x] - k_sigma * math.sqrt(v)
    if low <= 0:
        return False  # not significant: noise decides its shape
    for k in range(dys.size):
        if not ratios[k] > 0:
            continue  # a PSF with nothing one step away allows any sharpness
        y1, x1, y2, x2 = y + dys[k], x + dxs[k], y - dys[k], x - dxs[k]
        if y1 < 0 or y2 < 0 or y1 >= h or y2 >= h or x1 < 0 or x2 < 0 or x1 >= w or x2 >= w:
            continue
        if bad[y1, x1] or bad[y2, x2]:
            continue
        high = 0.5 * (image[y1, x1] + image[y2, x2]) \
            + k_sigma * 0.5 * math.sqrt(variance[y1, x1] + variance[y2, x2])
        if high < safety * ratios[k] * low:
            return True
    return False


@njit(cache=True)
def _sharp_kernel(image, variance, bad, ratios, dys, dxs, k_sigma, safety, out):
    """Set ``out[y, x]`` on every pixel of one band that :func:`pixel_is_sharp`."""
    h, w = image.shape
    for y in range(h):
        for x in range(w):
            out[y, x] = pixel_is_sharp(image, variance, bad, y, x, ratios, dys, dxs, k_sigma, safety)


def sharp_pixel(images, variance, bad, y: int, x: int, ratios) -> bool:
    """Whether pixel (y, x) is sharper than the PSF allows in some band and direction.

    ``images``, ``variance``, ``bad`` are (band, h, w); ``ratios`` is
    :func:`band_ratios` of the bands' PSFs.
    """
    return any(pixel_is_sharp(np.asarray(images[b]), np.asarray(variance[b]), np.asarray(bad[b], bool),
                              int(y), int(x), np.asarray(ratios[b], np.float64), _DY, _DX,
                              K_SIGMA, SAFETY)
               for b in range(len(images)))


def band_ratios(psfs: np.ndarray) -> np.ndarray:
    """:func:`psf_neighbour_ratios`, or zeros (test nothing) for PSFs under 3 x 3 pixels."""
    psfs = np.asarray(psfs, np.float64)
    if psfs.shape[1] < 3 or psfs.shape[2] < 3:
        return np.zeros((psfs.shape[0], len(DIRECTIONS)))
    return psf_neighbour_ratios(psfs)


def sharp_pixels(image, variance, mask, bad_bits: int, psfs) -> np.ndarray:
    """(band, y, x) bool: good pixels sharper than their band's PSF allows.

    Parameters
    ----------
    image, variance, mask : (band, y, x) arrays
    bad_bits : int
        Mask bits of the bad planes; such pixels are neither tested nor compared.
    psfs : (band, py, px) array
        The bands' PSFs, centred.
    """
    ratios = band_ratios(psfs)
    out = np.zeros(np.shape(image), bool)
    mask = np.asarray(mask, np.int32)
    for b in range(out.shape[0]):
        bad = (mask[b] & np.int32(bad_bits)) != 0
        band = np.asarray(image[b])
        _sharp_kernel(band - np.asarray(sky_left_in(band, variance[b], bad), band.dtype), np.asarray(variance[b]), bad,
                      ratios[b], _DY, _DX, K_SIGMA, SAFETY, out[b])
    return out


#: a band's median above this many pixel sigmas is a sky left in the image
SKY_LEVEL_SIGMA = 1.0
#: pixels of the regular subgrid the sky level is the median of (a median needs no more)
SKY_SUBGRID = 1 << 14


def sky_level(image, variance, bad) -> tuple[float, float]:
    """One band's sky level and its pixel sigma: the medians of the usable pixels'
    values and variances (finite, variance > 0, not bad) on a regular subgrid of
    about ``SKY_SUBGRID`` pixels; (0, 0) with none."""
    ny, nx = np.shape(image)
    step = max(1, int(np.sqrt(ny * nx / SKY_SUBGRID)))
    sub = (slice(step // 2, None, step), slice(step // 2, None, step))
    img, var, bad = np.asarray(image)[sub], np.asarray(variance)[sub], np.asarray(bad)[sub]
    good = ~bad & np.isfinite(img) & np.isfinite(var) & (var > 0)
    if not good.any():
        return 0.0, 0.0
    return float(np.median(img[good])), float(np.sqrt(np.median(var[good])))


def sky_left_in(image, variance, bad) -> float:
    """The band's sky level where it exceeds ``SKY_LEVEL_SIGMA`` pixel sigmas, else 0."""
    level, sigma = sky_level(image, variance, bad)
    return level if abs(level) > SKY_LEVEL_SIGMA * sigma else 0.0


def defect_plane(mask_planes: dict) -> tuple[dict, int]:
    """``mask_planes`` with the CR plane (added at the lowest free bit if missing), and its bit."""
    planes = dict(mask_planes)
    if DEFECT_PLANE not in planes:
        used = {int(v) for v in planes.values()}
        free = [b for b in range(_MAX_BIT + 1) if b not in used]
        if not free:
            raise ValueError("no free mask bit for the CR plane")
        planes[DEFECT_PLANE] = free[0]
    return planes, 1 << int(planes[DEFECT_PLANE])


def mask_defects(image, variance, mask, bad_bits: int, psfs, bands, mask_planes: dict):
    """Set the CR bit on every pixel sharper than the PSF allows.

    Returns the new mask (a copy), the mask planes (with CR added if they
    lacked it) and ``{band: pixels marked}``. Pixels already bad are never
    marked, so the counts are of new pixels only.
    """
    sharp = sharp_pixels(image, variance, mask, bad_bits, psfs)
    counts = {str(b): int(n) for b, n in zip(bands, sharp.sum(axis=(1, 2)))}
    if not sharp.any():
        return mask, dict(mask_planes), counts
    planes, bit = defect_plane(mask_planes)
    out = np.array(mask, np.int32)
    out[sharp] |= np.int32(bit)
    return out, planes, counts
