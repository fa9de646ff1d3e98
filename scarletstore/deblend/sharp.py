"""Peaks sharper than the PSF allows: defects nobody flagged.

A hot column, a hot pixel or a cosmic ray left out of the mask planes is
found as a peak and deblended like any source (a 1e5-count column segment
across a simulated field became five children of flags 0 holding 1.5e7
counts). Light from the sky has been through the PSF, so no source can be
sharper than it: along any direction, the mean of the two neighbours of a
peak pixel is at least the PSF's own ratio psi of those pixels to its centre
times the peak (psi is smallest for a point source centred on the pixel).
A peak whose neighbours, both K sigma high, still fall below SAFETY * psi of
the peak, K sigma low, in some band and direction, cannot be a source; its
child gets the source flag ``sharp_peak``. SAFETY 0.5 leaves room for a PSF
model twice too broad at one pixel; K 5 for the noise.
"""

from __future__ import annotations

import numpy as np

from ..ingest.defects import DIRECTIONS, K_SIGMA, SAFETY, psf_neighbour_ratios
from ..store.components import SOURCE_SHARP_PEAK


def sharp_pixel(images, variance, bad, y: int, x: int, ratios) -> bool:
    """Whether pixel (y, x) is sharper than the PSF allows in some band and direction.

    ``images``, ``variance``, ``bad`` are (band, h, w); ``ratios`` is
    :func:`psf_neighbour_ratios` of the bands' PSFs. Bad pixels, and
    neighbours off the box, are never used.
    """
    nb, h, w = images.shape
    for b in range(nb):
        if bad[b, y, x] or not variance[b, y, x] > 0:
            continue
        low = images[b, y, x] - K_SIGMA * np.sqrt(variance[b, y, x])
        if low <= 0:
            continue  # not significant: noise decides its shape
        for k, (dy, dx) in enumerate(DIRECTIONS):
            y1, x1, y2, x2 = y + dy, x + dx, y - dy, x - dx
            if not (0 <= y1 < h and 0 <= y2 < h and 0 <= x1 < w and 0 <= x2 < w):
                continue
            if bad[b, y1, x1] or bad[b, y2, x2]:
                continue
            high = 0.5 * (images[b, y1, x1] + images[b, y2, x2]) \
                + K_SIGMA * 0.5 * np.sqrt(variance[b, y1, x1] + variance[b, y2, x2])
            if high < SAFETY * ratios[b, k] * low:
                return True
    return False


def flag_sharp_peaks(sources, peaks, images, variance, bad, psfs):
    """Add ``sharp_peak`` to every source whose peak pixel is sharper than the PSF allows.

    ``peaks`` (n, 2) and the (band, h, w) arrays are in the blend's pixels;
    ``psfs`` (band, py, px) are the bands' observed PSFs, centred.
    """
    ratios = psf_neighbour_ratios(np.asarray(psfs, np.float64))
    h, w = images.shape[1:]
    for src in sources:
        y, x = np.rint(peaks[src.peak_index]).astype(int)
        if 0 <= y < h and 0 <= x < w and sharp_pixel(images, variance, bad, int(y), int(x), ratios):
            src.flags |= SOURCE_SHARP_PEAK
    return sources
