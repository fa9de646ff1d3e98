"""Patch boxes of a tract: inner regions that tile the grid, outer boxes that overlap.

Patch (i, j) is column i (along x) and row j (along y). The inner edges
along an axis of n pixels cut into k patches are ``round(t * n / k)``,
t = 0..k, so inner regions tile the grid with no gap and no overlap and
differ in size by at most one pixel. The outer box grows the inner one by
``overlap // 2`` pixels before each inner edge and ``overlap - overlap // 2``
after it (clipped to the grid), so two neighbouring outer boxes share exactly
``overlap`` pixels. A source is then measured whole by every patch whose
outer box holds it and is primary in the one whose inner region holds its
centre.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..errors import InputError

MIN_INNER = 16  # pixels: a smaller inner region holds hardly a galaxy


@dataclass(frozen=True)
class Box:
    """A pixel box of the grid: rows y0..y0+height-1, columns x0..x0+width-1."""

    y0: int
    x0: int
    height: int
    width: int

    def contains(self, y, x):
        """True where the pixel centred nearest to (y, x) is inside the box (arrays work).

        Pixel k spans [k - 0.5, k + 0.5): boxes that tile the grid then give
        every position exactly one box.
        """
        import numpy as np

        iy, ix = np.floor(np.asarray(y) + 0.5), np.floor(np.asarray(x) + 0.5)
        return ((iy >= self.y0) & (iy < self.y0 + self.height)
                & (ix >= self.x0) & (ix < self.x0 + self.width))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Patch:
    """Patch (i, j) of a tract: its name, outer box (processed) and inner box (primary)."""

    i: int
    j: int
    outer: Box
    inner: Box

    @property
    def name(self) -> str:
        return f"patch_{self.i}_{self.j}"


def parse_patches(text: str) -> tuple[int, int]:
    """``--patches NXxNY`` (e.g. ``2x2``, ``3x2``) as (nx, ny), both at least 1."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if m is None:
        raise InputError(f"--patches expects NxM (patches along x and y), e.g. 2x2, got {text!r}")
    nx, ny = int(m.group(1)), int(m.group(2))
    if nx < 1 or ny < 1:
        raise InputError(f"--patches {text}: both counts must be at least 1")
    return nx, ny


def _edges(n: int, k: int) -> list[int]:
    return [round(t * n / k) for t in range(k + 1)]


def cut_patches(shape, nx: int, ny: int, overlap: int) -> list[Patch]:
    """The patches of a grid of ``shape`` (ny, nx pixels), in row-major order (j, then i).

    Raises InputError when an inner region would be under ``MIN_INNER`` pixels
    on a side, or the overlap is negative or so large that an outer box would
    reach past its neighbour's inner region.
    """
    if overlap < 0:
        raise InputError(f"--overlap must be 0 or more pixels, got {overlap}")
    height, width = int(shape[0]), int(shape[1])
    for count, n, axis in ((nx, width, "x"), (ny, height, "y")):
        if n // count < MIN_INNER:
            raise InputError(f"--patches: {count} patches along {axis} of a {n}-pixel grid leave "
                             f"inner regions under {MIN_INNER} pixels")
    before, after = overlap // 2, overlap - overlap // 2
    xs, ys = _edges(width, nx), _edges(height, ny)
    smallest = min(min(b - a for a, b in zip(e, e[1:])) for e in (xs, ys))
    if after > smallest:  # an outer box would reach past its neighbour's inner region
        raise InputError(f"--overlap {overlap}: half the overlap must not exceed the smallest inner "
                         f"region ({smallest} pixels); use fewer patches or less overlap")
    out = []
    for j in range(ny):
        for i in range(nx):
            inner = Box(ys[j], xs[i], ys[j + 1] - ys[j], xs[i + 1] - xs[i])
            oy0, ox0 = max(0, ys[j] - before), max(0, xs[i] - before)
            oy1, ox1 = min(height, ys[j + 1] + after), min(width, xs[i + 1] + after)
            out.append(Patch(i, j, Box(oy0, ox0, oy1 - oy0, ox1 - ox0), inner))
    return out
