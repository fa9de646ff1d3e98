"""A deblended child as the store keeps it: its components (spectrum x morphology or a cube).

Coordinates are blend-local pixels: (0, 0) is the first pixel of the arrays
handed to the deblender; the caller adds the blend's bbox origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Component:
    """One component of a source.

    ``morph`` is either 2-D (h, w): a factorised component whose model is
    ``spectrum[:, None, None] * morph`` (scarlet: peak value 1), or 3-D
    (band, h, w): a "cube" component whose model is ``morph`` itself
    (SDSS templates); ``spectrum`` then holds its per-band sums.
    ``y0, x0`` is the origin of the morph box in blend-local pixels.
    """

    spectrum: np.ndarray
    morph: np.ndarray
    y0: int
    x0: int
    peak: tuple[float, float]

    @property
    def is_cube(self) -> bool:
        return self.morph.ndim == 3

    def model(self) -> np.ndarray:
        """(band, h, w) model of this component in its own box."""
        if self.is_cube:
            return self.morph
        return self.spectrum[:, None, None] * self.morph[None]


@dataclass
class SourceResult:
    """One deblended child: which input peak it came from and its components."""

    peak_index: int
    components: list[Component]
    flags: int = 0


# Source flags (bit values)
SOURCE_PSF_INIT = 1        # too faint for a monotonic start; started as the PSF
SOURCE_POINT = 2           # SDSS: peak fitted as a point source
SOURCE_NO_FLUX = 4         # the fit drove every component to zero
SOURCE_EDGE = 8            # the peak sits on the blend box edge
SOURCE_MASKED_PEAK = 32    # no band has data at the peak pixel: the flux there is extrapolated
SOURCE_FOUND_PEAK = 64     # no detected peak: the deblender found it in a fitted blend's residual
SOURCE_SHARP_PEAK = 128    # the peak pixel is sharper than the PSF allows: an unflagged defect
