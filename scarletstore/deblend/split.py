"""Deblending parents too large for one fit's memory, in overlapping pieces.

A crowded parent (a cluster core, a bright galaxy's halo full of
neighbours) can need more memory than a worker has: the scarlet fit keeps
several band x pixel work arrays of the whole blend box and a dense
component x component system for the spectra. Instead of skipping such a
parent, its peaks are partitioned by recursive bisection (a k-d tree: the
cell is cut at the median peak along its longer side) until every piece's
estimated fit memory fits :attr:`DeblendConfig.memory_budget`. Each piece is
its cell grown by ``split_margin`` pixels; it is fitted with its own peaks
plus every other peak inside the grown box ("guests", fitted free so that
light from across the seam is not pushed onto the piece's own sources), and
keeps only its own sources. Every peak is owned by exactly one cell, so the
merged blend has one source per peak, and flux is apportioned once: the
children's heavy footprints are built over the whole parent from all its
sources' models (:mod:`scarletstore.measure.reconstruct`), not per piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..store.components import Component, SourceResult
from .result import BlendResult

# Bytes the scarlet fit allocates. The terms follow scarlet.py's arrays; the
# constants are least-squares fits to the peak RSS growth of eight whole fits
# of simulated cluster scenes (30-900 peaks, 260-800 px boxes, 3 bands;
# benchmarks/bench_split.py --calibrate), which the model matches to within
# 0.82-1.12.
PAD_BYTES = 26           # per band x padded-box pixel: the inputs, data, weights
#                          and good mask, the four float32 FFT work buffers and
#                          the kernel transforms (the FFT spectra reuse scratch)
COMPONENTS_PER_PEAK = 1.6  # sources above bulge_snr get a bulge and a disk
SYSTEM_BYTES = 8         # per band x component^2: the float64 normal equations
BOX_PIXELS = 1420        # a component box during the fit (starts are wide)
MORPH_BYTES = 4 + 3 * 8 + 4 + 4 * 16  # per box pixel: the float32 morphology,
#                          three float64 Adam moments, the rendered copy, and
#                          the copies a resize and the snapshots make
MORPH_BYTES_PER_BAND = 4  # ... and per band: the convolved least-squares flats
LS_SCRATCH = 35e6        # the least-squares spectra's batched FFT scratch, which
#                          grows with the components up to scarlet.LS_FFT_BUDGET
LS_SCRATCH_PER_COMPONENT = 2.5e5


def fit_memory(n_bands: int, height: int, width: int, n_peaks: int,
               kernel_shape: tuple[int, int] = (41, 41)) -> int:
    """Estimated peak bytes of a scarlet fit of one blend.

    Parameters
    ----------
    n_bands, height, width : int
        Bands and blend box size.
    n_peaks : int
        Sources fitted (``COMPONENTS_PER_PEAK`` components each on average).
    kernel_shape : tuple of int
        Difference-kernel size (about the observed PSF's): the FFT grid is
        the box padded by half of it.

    Returns
    -------
    int
        Bytes: per-pixel arrays of the padded box, the component x
        component spectrum system, the components' boxes (each
        ``BOX_PIXELS``, at most the blend) and the spectrum solve's scratch.
    """
    ky, kx = kernel_shape
    fy, fx = height + ky // 2, width + kx // 2
    k = COMPONENTS_PER_PEAK * max(n_peaks, 1)
    box = min(height * width, BOX_PIXELS)
    total = (n_bands * fy * fx * PAD_BYTES + n_bands * k * k * SYSTEM_BYTES
             + k * box * (MORPH_BYTES + n_bands * MORPH_BYTES_PER_BAND)
             + min(LS_SCRATCH, k * LS_SCRATCH_PER_COMPONENT))
    return int(total)


# A process fitting pieces one after another peaked 25-65 % above its largest
# piece's estimate (allocator pools, cached kernel transforms and scratch of
# the earlier pieces; 4 pieces of a 520-peak parent: 139 MB for a 92 MB
# estimate; 8 pieces, three runs: 89, 104 and 113 MB of growth for a 70 MB
# estimate), so pieces are planned to the budget over this factor.
PIECE_HEADROOM = 1.75


def parent_bytes(n_bands: int, height: int, width: int) -> int:
    """Bytes of a parent's own arrays (images, variance, bad mask, footprint),
    held while its pieces are fitted."""
    return int(n_bands * height * width * (4 + 4 + 1) + height * width)


def piece_budget(budget: float, n_bands: int, height: int, width: int) -> float:
    """Estimated bytes one piece's fit may use so that the worker stays within
    ``budget`` (0 or less: not even the parent's own arrays fit)."""
    return (budget - parent_bytes(n_bands, height, width)) / PIECE_HEADROOM


@dataclass
class Piece:
    """One piece of a split parent, in parent-local pixels.

    Attributes
    ----------
    own : ndarray of int
        Indices (into the parent's peaks) of the sources this piece keeps.
    guests : ndarray of int
        Other peaks inside the box, fitted but dropped.
    box : tuple of int
        (y0, x0, height, width) of the pixels fitted.
    memory : int
        Estimated fit bytes (:func:`fit_memory`).
    """

    own: np.ndarray
    guests: np.ndarray
    box: tuple
    memory: int


class CannotSplit(Exception):
    """A piece with a single peak still exceeds the budget."""


def _piece(peaks, footprint, own, cell, margin, n_bands, kernel_shape):
    """The piece of the cell (y0, x0, y1, x1): grown by the margin, trimmed to the footprint."""
    H, W = footprint.shape
    y0, x0 = max(int(math.floor(cell[0] - margin)), 0), max(int(math.floor(cell[1] - margin)), 0)
    y1, x1 = min(int(math.ceil(cell[2] + margin)), H), min(int(math.ceil(cell[3] + margin)), W)
    rows = np.flatnonzero(footprint[y0:y1, x0:x1].any(axis=1))
    cols = np.flatnonzero(footprint[y0:y1, x0:x1].any(axis=0))
    if rows.size:
        y0, y1 = y0 + rows[0], y0 + rows[-1] + 1
        x0, x1 = x0 + cols[0], x0 + cols[-1] + 1
    # the own peaks' pixels always lie in the box (a peak may sit off the footprint)
    py = np.floor(peaks[own, 0] + 0.5).astype(np.int64)
    px = np.floor(peaks[own, 1] + 0.5).astype(np.int64)
    y0, x0 = min(y0, int(py.min())), min(x0, int(px.min()))
    y1, x1 = max(y1, int(py.max()) + 1), max(x1, int(px.max()) + 1)
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    inside = ((peaks[:, 0] >= y0 - 0.5) & (peaks[:, 0] < y1 - 0.5)
              & (peaks[:, 1] >= x0 - 0.5) & (peaks[:, 1] < x1 - 0.5))
    mine = np.zeros(len(peaks), bool)
    mine[own] = True
    guests = np.flatnonzero(inside & ~mine)
    h, w = y1 - y0, x1 - x0
    return Piece(own=np.asarray(own, np.int64), guests=guests, box=(y0, x0, h, w),
                 memory=fit_memory(n_bands, h, w, len(own) + len(guests), kernel_shape))


def plan_pieces(peaks, footprint, n_bands: int, budget: float, margin: float,
                kernel_shape=(41, 41)) -> list[Piece]:
    """Partition a parent's peaks into pieces whose fits fit ``budget`` bytes.

    Recursive bisection: a cell whose piece is over budget is cut at the
    median peak coordinate along its longer side (halfway between the two
    middle peaks, so no peak sits on a seam), until every piece fits.

    Parameters
    ----------
    peaks : (N, 2) float
        Parent-local (y, x) peaks.
    footprint : (H, W) bool
    n_bands : int
    budget : float
        Bytes one piece's fit may use.
    margin : float
        Pixels each cell is grown by on every side.

    Returns
    -------
    list of Piece
        One piece (the whole parent) when it already fits.

    Raises
    ------
    CannotSplit
        When a piece of one peak is still over the budget.
    """
    peaks = np.asarray(peaks, np.float64).reshape(-1, 2)
    footprint = np.asarray(footprint, bool)
    H, W = footprint.shape
    out = []
    stack = [(np.arange(len(peaks)), (-0.5, -0.5, H - 0.5, W - 0.5))]
    while stack:
        own, cell = stack.pop()
        piece = _piece(peaks, footprint, own, (cell[0] + 0.5, cell[1] + 0.5,
                                               cell[2] + 0.5, cell[3] + 0.5),
                       margin, n_bands, kernel_shape)
        if piece.memory <= budget:
            out.append(piece)
            continue
        if len(own) < 2:
            raise CannotSplit(f"a piece of one peak needs {piece.memory / 1e9:.2f} GB, "
                              f"over the memory budget of {budget / 1e9:.2f} GB")
        axis = 0 if cell[2] - cell[0] >= cell[3] - cell[1] else 1
        order = own[np.argsort(peaks[own, axis], kind="stable")]
        half = len(order) // 2
        cut = 0.5 * (peaks[order[half - 1], axis] + peaks[order[half], axis])
        lo, hi = order[:half], order[half:]
        if cut <= peaks[order[half - 1], axis] or cut >= peaks[order[half], axis]:
            # equal coordinates at the median: split the set, not the plane
            cut = peaks[order[half], axis]
        lo_cell, hi_cell = list(cell), list(cell)
        lo_cell[2 + axis] = cut
        hi_cell[axis] = cut
        stack.append((hi, tuple(hi_cell)))
        stack.append((lo, tuple(lo_cell)))
    out.sort(key=lambda p: (p.box[0], p.box[1]))
    return out


def deblend_pieces(fit, images, variance, bad, footprint, psfs, peaks, pieces, config):
    """Fit every piece with ``fit`` and merge their own sources into one result.

    Parameters
    ----------
    fit : callable
        ``fit(images, variance, bad, footprint, psfs, peaks, config, init=None)
        -> BlendResult`` (a deblender).
    images, variance, bad, footprint, psfs, peaks
        The whole parent, as a deblender takes them (parent-local peaks).
    pieces : list of Piece
    config : DeblendConfig

    Returns
    -------
    BlendResult
        One source per parent peak (in peak order), components in
        parent-local pixels. ``iterations`` is the largest of the pieces',
        ``converged`` whether all converged, ``flags`` their union;
        ``log_likelihood`` and ``chi2`` are those of the merged model over
        the whole parent (:func:`merged_fit_statistics`), comparable with an
        unsplit fit's. ``extra["pieces"]`` is the number of pieces and
        ``extra["piece_memory"]`` their estimated bytes.
    """
    peaks = np.asarray(peaks, np.float64).reshape(-1, 2)
    sources: list = [None] * len(peaks)
    iterations, converged, flags, model_psf, kernels, frame = 0, True, 0, None, None, "model"
    for piece in pieces:
        y0, x0, h, w = piece.box
        sel = np.concatenate([piece.own, piece.guests])
        box = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
        res = fit(images[box], variance[box], bad[box], footprint[y0:y0 + h, x0:x0 + w], psfs,
                  peaks[sel] - [y0, x0], config, init=None)
        iterations = max(iterations, int(res.iterations))
        converged &= bool(res.converged)
        flags |= int(res.flags)
        model_psf = res.model_psf if model_psf is None else model_psf
        kernels = res.extra.get("diff_kernels") if kernels is None else kernels
        frame = res.frame
        for src in res.sources:
            if src.peak_index >= len(piece.own):
                continue  # a guest: its own piece keeps it
            i = int(sel[src.peak_index])
            comps = [Component(spectrum=c.spectrum, morph=c.morph, y0=c.y0 + y0, x0=c.x0 + x0,
                               peak=(c.peak[0] + y0, c.peak[1] + x0)) for c in src.components]
            sources[i] = SourceResult(peak_index=i, components=comps, flags=src.flags)
    missing = [i for i, s in enumerate(sources) if s is None]
    if missing:
        raise RuntimeError(f"peaks {missing} belong to no piece")  # a planning bug, never input
    log_l, chi2 = merged_fit_statistics(images, variance, bad, footprint, sources,
                                        kernels if frame == "model" else None, config.use_weights)
    return BlendResult(sources=sources, iterations=iterations, log_likelihood=log_l,
                       converged=converged, chi2=chi2, frame=frame, model_psf=model_psf, flags=flags,
                       extra={"pieces": len(pieces), "diff_kernels": kernels,
                              "piece_memory": [int(p.memory) for p in pieces]})


STATISTICS_TILE = 256  # pixels a side: the merged model is rendered one tile at a time


def merged_fit_statistics(images, variance, bad, footprint, sources, diff_kernels, use_weights,
                          tile: int = STATISTICS_TILE):
    """``(log_likelihood, chi2)`` of the sources' summed model over the whole parent.

    The same quantities a whole fit reports (``-1/2 sum w (data - model)^2``
    and ``sum w (data - model)^2`` per good pixel, the same weights), so a
    split parent's fit quality compares with an unsplit one's. The model is
    rendered and convolved one tile (grown by half a kernel, so the light
    every component throws into the tile is in) at a time: the parent's
    whole model frame is never held, which is what the split avoided.

    Parameters
    ----------
    images, variance, bad, footprint
        The parent, as a deblender takes them.
    sources : list of SourceResult
        Components in parent-local pixels.
    diff_kernels : (B, ky, kx) array or None
        Model-to-observed kernels (None: components are already observed).
    use_weights : bool
        Inverse-variance weights (else 1 on good pixels), as the fit used.
    tile : int
        Tile side in pixels (the result does not depend on it).
    """
    from .psf import Convolver
    from .scarlet import _good_and_weights

    B, H, W = images.shape
    ry, rx = (0, 0) if diff_kernels is None else (diff_kernels.shape[1] // 2, diff_kernels.shape[2] // 2)
    comps = [c for s in sources for c in s.components]
    boxes = np.array([(c.y0, c.x0, c.y0 + c.morph.shape[-2], c.x0 + c.morph.shape[-1])
                      for c in comps], np.int64).reshape(-1, 4)
    loss, n_good = 0.0, 0
    for ty in range(0, H, tile):
        for tx in range(0, W, tile):
            ty1, tx1 = min(ty + tile, H), min(tx + tile, W)
            ya, xa, yb, xb = max(ty - ry, 0), max(tx - rx, 0), min(ty1 + ry, H), min(tx1 + rx, W)
            scene = np.zeros((B, yb - ya, xb - xa), np.float32)
            near = (boxes[:, 0] < yb) & (boxes[:, 2] > ya) & (boxes[:, 1] < xb) & (boxes[:, 3] > xa)
            for k in np.flatnonzero(near):
                c, (cy0, cx0, cy1, cx1) = comps[k], boxes[k]
                y0, x0, y1, x1 = max(cy0, ya), max(cx0, xa), min(cy1, yb), min(cx1, xb)
                scene[:, y0 - ya:y1 - ya, x0 - xa:x1 - xa] += c.model()[:, y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
            if diff_kernels is not None:
                scene = Convolver(diff_kernels, scene.shape[1:]).convolve(scene)
            model = scene[:, ty - ya:ty1 - ya, tx - xa:tx1 - xa]
            sl = (slice(None), slice(ty, ty1), slice(tx, tx1))
            data, w, _, _ = _good_and_weights(images[sl], variance[sl], bad[sl],
                                              footprint[ty:ty1, tx:tx1], use_weights)
            resid = data.astype(np.float64) - model
            loss += 0.5 * float(np.sum(w * resid * resid))
            n_good += int(np.count_nonzero(w))
    return -loss, 2 * loss / max(n_good, 1)
