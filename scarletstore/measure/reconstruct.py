"""Per-band heavy footprints rebuilt from stored models (no I/O here).

Model mode: each source's model-frame image in the band, convolved with the
band's difference kernel, inside the parent footprint. Redistribute mode: the
observed image apportioned in proportion to those models clipped at zero,
``image * T_i / sum_j T_j``; footprint pixels where no template is positive
go to the nearest child's peak, so the children sum exactly to the image over
the whole footprint.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import pocketfft as sfft  # scipy.fft's transforms without importing scipy.fft
from ..deblend.psf import difference_kernels

CUBE_DIM = 3


def band_kernel(model_psf: np.ndarray, psf_b: np.ndarray) -> np.ndarray | None:
    """Difference kernel from the model PSF to one band's PSF (None: identity)."""
    model_psf = np.asarray(model_psf, np.float64)
    if model_psf.size == 1:  # observed-frame run: models need no convolution
        return None
    kern, _ = difference_kernels(np.asarray(psf_b, np.float64)[None], model_psf)
    return kern[0]


def source_models(sources, band: int, kernel: np.ndarray | None, bbox) -> np.ndarray:
    """(n_sources, h, w) observed-frame model of every source of one blend in one band.

    ``sources`` carry components in exposure pixels (as read by
    :func:`scarletstore.store.runs.read_blend`); ``bbox`` = (y0, x0, h, w).
    Factorised components are convolved with ``kernel``; cube components are
    already in the observed frame and are added as they are.
    """
    y0, x0, h, w = bbox
    frame = np.zeros((len(sources), h, w), np.float32)
    observed = np.zeros((len(sources), h, w), np.float32)
    any_model = False
    for i, src in enumerate(sources):
        for c in src.components:
            if c.morph.ndim == CUBE_DIM:
                img, target = c.morph[band], observed
            else:
                img, target = c.spectrum[band] * c.morph, frame
                any_model = True
            add_clipped(target[i], img, c.y0 - y0, c.x0 - x0)
    if any_model:
        if kernel is None:
            observed += frame
        else:
            observed += convolve_stack(frame, kernel)
    return observed


def convolve_stack(stack: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'same'-size zero-padded convolution of every (h, w) image of ``stack`` with ``kernel``.

    FFT on a grid padded by half the kernel: the images are zero outside
    their box and only the box is kept, so circular wrap-around never lands
    inside it. One forward transform serves every source of the blend.
    """
    n, h, w = stack.shape
    ky, kx = kernel.shape
    # the grid must hold the kernel itself, even for boxes smaller than it
    fy = sfft.next_fast_len(max(h + ky // 2, ky), real=True)
    fx = sfft.next_fast_len(max(w + kx // 2, kx), real=True)
    kpad = np.zeros((fy, fx), np.float32)
    kpad[:ky, :kx] = kernel
    kpad = np.roll(kpad, (-(ky // 2), -(kx // 2)), axis=(0, 1))  # kernel centre at the origin
    f = sfft.rfft2(stack, s=(fy, fx), workers=1)
    f *= sfft.rfft2(kpad)
    return sfft.irfft2(f, s=(fy, fx))[:, :h, :w].astype(np.float32)


def add_clipped(target, img, oy, ox):
    """Add ``img`` into ``target`` with its origin at (oy, ox), keeping only the overlap."""
    H, W = target.shape
    h, w = img.shape
    ya, xa, yb, xb = max(oy, 0), max(ox, 0), min(oy + h, H), min(ox + w, W)
    if ya < yb and xa < xb:
        target[ya:yb, xa:xb] += img[ya - oy:yb - oy, xa - ox:xb - ox]


@njit(cache=True)
def _apportion(templates, footprint, peak_y, peak_x, out):
    n, h, w = templates.shape
    for y in range(h):
        for x in range(w):
            for i in range(n):
                out[i, y, x] = 0.0
            if not footprint[y, x] or n == 0:
                continue
            total = 0.0
            for i in range(n):
                t = templates[i, y, x]
                if t > 0:
                    total += t
            if total > 0:
                for i in range(n):
                    t = templates[i, y, x]
                    if t > 0:
                        out[i, y, x] = t / total
                continue
            # stray flux (no positive template here): all of it to the nearest peak,
            # so the children still sum to the image over the whole footprint
            best, best_d = 0, np.inf
            for i in range(n):
                d = (y - peak_y[i]) ** 2 + (x - peak_x[i]) ** 2
                if d < best_d:
                    best, best_d = i, d
            out[best, y, x] = 1.0


def apportion_weights(templates: np.ndarray, footprint: np.ndarray, peaks=None) -> np.ndarray:
    """(n, h, w) share of every footprint pixel that goes to each child (sums to 1 there).

    A pixel is shared in proportion to the positive templates, ``T_i+ / sum_j T_j+``;
    a footprint pixel where no template is positive (stray flux: faint wings,
    noise, a single child's own negative pixels) goes whole to the child whose
    peak is nearest. ``peaks`` (n, 2) are (y, x) in the box's pixels; without
    them stray pixels go to the first child.
    """
    templates = np.ascontiguousarray(templates, np.float32)
    n = templates.shape[0]
    peaks = np.zeros((n, 2)) if peaks is None else np.asarray(peaks, np.float64).reshape(n, 2)
    out = np.empty(templates.shape, np.float32)
    _apportion(templates, np.ascontiguousarray(footprint, np.bool_),
               np.ascontiguousarray(peaks[:, 0]), np.ascontiguousarray(peaks[:, 1]), out)
    return out


def redistribute(image: np.ndarray, templates: np.ndarray, footprint: np.ndarray,
                 peaks=None) -> np.ndarray:
    """The image apportioned to the children inside ``footprint`` (zero elsewhere).

    The children sum exactly to the image over the footprint (see
    :func:`apportion_weights`); a lone child's share is the image itself.
    """
    weights = apportion_weights(templates, footprint, peaks)
    return (weights * np.asarray(image, np.float32)[None]).astype(np.float32)


def heavy_values(models: np.ndarray, footprint: np.ndarray, image: np.ndarray | None = None,
                 redistribute_flux: bool = False, peaks=None) -> np.ndarray:
    """Pixel values of every child's heavy footprint (zero outside it).

    ``peaks`` (n, 2): the children's (y, x) in the box, which take the stray
    flux when redistributing.
    """
    if redistribute_flux:
        if image is None:
            raise ValueError("redistribution needs the observed image")
        return redistribute(image, models, footprint, peaks)
    return np.where(footprint[None], models, 0).astype(np.float32)
