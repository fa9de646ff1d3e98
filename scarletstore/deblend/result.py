"""What a deblender returns for one blend (plain arrays, no I/O).

Coordinates are blend-local pixels: (0, 0) is the first pixel of the arrays
handed to the deblender; the caller adds the blend's bbox origin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..store.components import SourceResult


@dataclass
class BlendResult:
    """Output of one deblender on one blend.

    ``frame`` is ``"model"`` when components live in the partially
    deconvolved model frame (render with the difference kernels) or
    ``"observed"`` when they are already in the observed frame.
    """

    sources: list[SourceResult]
    iterations: int
    log_likelihood: float
    converged: bool
    chi2: float
    frame: str = "model"
    model_psf: np.ndarray | None = None
    flags: int = 0
    extra: dict = field(default_factory=dict)
