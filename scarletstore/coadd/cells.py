"""Statistics of an image over a coarse mesh of square cells.

The smooth-background models (the difference of two visits, the coadd's own
sky) are fitted to medians over cells much larger than sources. One
``np.median`` call per cell costs more in call overhead than in sorting, so
the medians of a whole row of cells are taken in one sort.
"""

from __future__ import annotations

import numpy as np


def block_medians(values, good, block):
    """Median of the ``good`` pixels of each ``block`` x ``block`` cell, and their count.

    Vectorised over one row of cells at a time (a sort along the cell's
    pixels, non-usable ones sorted last as NaN): one ``np.median`` call per
    cell costs more in call overhead than in sorting. Equal to
    ``np.median(values[cell][good[cell]])``; NaN where a cell has no usable pixel.
    """
    ny, nx = values.shape
    by, bx = max(1, -(-ny // block)), max(1, -(-nx // block))
    med = np.full((by, bx), np.nan)
    count = np.zeros((by, bx), np.int64)
    row = np.full((block, bx * block), np.nan)
    for i in range(by):
        y0, y1 = i * block, min(ny, (i + 1) * block)
        row[:] = np.nan
        row[:y1 - y0, :nx] = np.where(good[y0:y1], values[y0:y1], np.nan)
        cells = np.sort(row.reshape(block, bx, block).transpose(1, 0, 2).reshape(bx, -1), axis=1)
        n = np.count_nonzero(np.isfinite(cells), axis=1)
        j = np.arange(bx)
        lo, hi = cells[j, np.maximum(n - 1, 0) // 2], cells[j, n // 2 - (n == 0)]
        med[i] = np.where(n > 0, (lo + hi) / 2.0, np.nan)
        count[i] = n
    return med, count


def cell_sums(values, good, cell):
    """Sum of ``values`` over the ``good`` pixels of each ``cell`` x ``cell`` cell."""
    ny, nx = values.shape
    by, bx = max(1, -(-ny // cell)), max(1, -(-nx // cell))
    padded = np.zeros((by * cell, bx * cell))
    padded[:ny, :nx] = np.where(good, values, 0.0)
    return padded.reshape(by, cell, bx, cell).sum(axis=(1, 3))


def per_pixel(cell_values, shape, cell):
    """A (by, bx) array of cell values spread onto the (ny, nx) pixels of the cells."""
    ny, nx = shape
    return cell_values[np.arange(ny) // cell][:, np.arange(nx) // cell]
