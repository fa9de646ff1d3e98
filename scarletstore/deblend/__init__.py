"""Deblenders: a scarlet-style factorised fit and the SDSS symmetric-template baseline.

Both take plain arrays of one blend and return a :class:`BlendResult`.
"""

from .config import DeblendConfig
from .result import BlendResult, Component, SourceResult

__all__ = ["DeblendConfig", "BlendResult", "Component", "SourceResult"]
