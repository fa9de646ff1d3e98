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

# the criterion is ingest's (it masks such pixels over the whole image); here it
# judges the peaks of children that ingest did not mask
from ..ingest.defects import band_ratios, psf_neighbour_ratios, sharp_pixel  # noqa: F401
from ..store.components import SOURCE_SHARP_PEAK


def flag_sharp_peaks(sources, peaks, images, variance, bad, psfs):
    """Add ``sharp_peak`` to every source whose peak pixel is sharper than the PSF allows.

    ``peaks`` (n, 2) and the (band, h, w) arrays are in the blend's pixels;
    ``psfs`` (band, py, px) are the bands' observed PSFs, centred.
    """
    ratios = band_ratios(psfs)
    h, w = images.shape[1:]
    for src in sources:
        y, x = np.rint(peaks[src.peak_index]).astype(int)
        if 0 <= y < h and 0 <= x < w and sharp_pixel(images, variance, bad, y, x, ratios):
            src.flags |= SOURCE_SHARP_PEAK
    return sources
