"""Deblenders: a scarlet-style factorised fit and the SDSS symmetric-template baseline.

Both take plain arrays of one blend and return a :class:`BlendResult`.
"""

from .config import DeblendConfig

__all__ = ["DeblendConfig", "BlendResult", "Component", "SourceResult"]


def __getattr__(name):
    # the result classes need numpy: loaded on first use, so the command line's
    # argument checks (which read DeblendConfig) stay free of the numerical stack
    if name == "BlendResult":
        from .result import BlendResult

        return BlendResult
    if name in ("Component", "SourceResult"):
        from ..store import components

        return getattr(components, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
