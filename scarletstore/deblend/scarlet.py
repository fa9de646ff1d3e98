"""Scarlet-style multi-band deblender on plain arrays.

Each source is one or two components, each the outer product of a spectrum
(one amplitude per band) and a non-negative morphology that is monotonically
non-increasing away from the source's peak (Melchior et al. 2018). The scene
lives in a "model frame" with a narrow Gaussian PSF and is convolved to each
band with a difference kernel. Parameters maximise the weighted Gaussian
log-likelihood under the constraints with proximal AMSGrad (Melchior, Joseph
& Moolekamp 2019) or FISTA.

Implementation notes
--------------------
* Components are kept in a flat layout (see :mod:`.kernels`): one float32
  array of all morphology pixels plus a box table, so an iteration is
  ``assemble_scene`` -> FFT convolution -> ``weighted_residual`` -> FFT
  correlation -> one compiled update over all components; Python only
  checks convergence and, every ``resize_every`` iterations, resizes boxes.
* The gradient with respect to the model-frame scene is the adjoint of the
  convolution applied to the weighted residual, ``G_b = k_b (x) [w_b (k_b * M_b - d_b)]``
  (correlation with the kernel), shared by all components.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time

import numpy as np

from .. import pocketfft as sfft  # scipy.fft's transforms without importing scipy.fft
from ..errors import InputError
from ..store import runs as _models
from ..store.components import (SOURCE_EDGE, SOURCE_FOUND_PEAK, SOURCE_NO_FLUX, SOURCE_PSF_INIT, Component,
                                SourceResult)
from . import kernels as _k
from . import residual as _residual
from .config import DeblendConfig
from .psf import Convolver, difference_kernels, gaussian_psf, memoised, scratch
from .result import BlendResult

# Tuning constants, chosen on hsc_cosmos_35 (and its flips/transposes, to
# avoid fitting one trajectory) and on the simulated blend of the tests.
# Adam step sizes (per iteration, before Adam's normalisation): a morphology
# pixel moves by up to max(STEP_MORPH * mean pixel of its box,
# REL_MORPH * its own value); a spectrum entry by STEP_SPEC of its value.
ADAM_B1 = 0.9
ADAM_B2 = 0.999
STEP_MORPH = 1.0
REL_MORPH = 0.1
STEP_SPEC = 0.005
MONO_WEIGHTED = False       # monotonicity reference: max of inward neighbours
BOX_MARGIN = 1              # zero pixels kept around the non-zero region
BOX_GROW_MIN = 3            # pixels added to an edge that carries flux
BOX_GROW_FRAC = 0.25        # ... or this fraction of the box side, if larger
INIT_RISE_SIGMA = 3.0       # start morphologies stop where the image climbs by
INIT_RISE_FRAC = 0.1        # more than 3 sigma + 10 % (another object)
INIT_SYMMETRIC = True       # symmetric-minimum template before the monotonic start
INIT_SHARE_POWER = 1.0      # exponent of the template share in _apportion
CONVERGE_RUN = 2            # window (iterations) of the convergence test
REGION_GROW = 3             # the sources' pixels: component boxes grown by this (convergence)
DIVERGE_FRAC = 0.05         # a fit giving back more of its gain than this ...
DIVERGE_MIN = 0.02          # ... and more than this of its best loss has diverged
SYMMETRY_CHECK_PEAKS = 10   # crowded blends (this many peaks) also fit without symmetry ...
SYMMETRY_COST_MAX = 0.03    # ... and keep that fit if symmetry costs more than this of its loss
RESOLVE_SPECTRA_AT = (5, 15)  # iterations after which spectra are re-solved by least squares
FINAL_LS_SPECTRA = True     # ... and once more for the final morphologies
LS_FFT_BUDGET = 1 << 22     # max complex elements of one batched FFT in _ls_spectra
LS_BLOCK_SWEEPS = 50        # Gauss-Seidel sweeps of the large-blend spectrum solve ...
LS_BLOCK_TOL = 1e-4         # ... stopped when no amplitude moves by this of the largest
FAINT_SYMMETRIC_ALL = True  # contested symmetry: sources whose start has S/N below ...
EXTENDED_START_RATIO = 2.0  # start flux / peak over the PSF's above which a start with S/N
#                            from extended_min_snr to min_snr is extended (docs/design.md, "PSF start")
EXTENDED_START_MAX_RATIO = 12.0  # ... up to this: a faint start wider holds a neighbour's light
FAINT_SYMMETRY_SNR = 50.0   # ... this get it over their whole box (docs/design.md, "Symmetry")
WING_FLOOR = 0.7            # sparsity-cut pixels get an extrapolated wing down to this x threshold
                            # (0: none; docs/design.md, "Wings below the threshold") ...
WING_STEEP = 2.0            # ... decaying this many times as fast as the mean slope from peak to threshold
WING_FAINT_ONLY = True      # ... for the components of faint sources only: start S/N below
WING_SNR = 50.0             # this (the same as FAINT_SYMMETRY_SNR; docs/design.md, "Colours of faint sources")
WING_SINGLE = True          # ... and every component of a one-source blend (no neighbour to take from)
UNCONTESTED_MIN_ITER = 40   # a converged blend's uncontested sources iterate on (others frozen) to this
RESIDUAL_ROUNDS = 3         # residual source search (config.residual_sources): rounds of search + refit ...
RESIDUAL_MAX_NEW = 5        # ... and new sources per blend at most
RESIDUAL_MIN_SEP = 2.5      # px a new source keeps from every peak (closer: that source's own residual)
RESIDUAL_RECENTRE = 2       # new sources move to the maximum within this many px (0: not)
RESIDUAL_START_CORE = 0.0   # ... their neighbours restart from their symmetric parts beyond this px
CMODEL_MARGIN = 6          # px beyond half its size a box grows for its parametric fit
RESIDUAL_GAIN = 0.25        # a round is kept when the loss falls by this x thresh^2 per new source


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class _State:
    """Flat component storage plus bookkeeping (see :mod:`.kernels`)."""

    __slots__ = ("spec", "morph", "box", "off", "ctr", "source", "flags", "snr", "faint", "order", "nbr")

    def __init__(self, spec, morphs, boxes, ctr, source, flags, snr=None):
        self.spec = np.ascontiguousarray(spec, dtype=np.float32)
        self.box = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        sizes = self.box[:, 2] * self.box[:, 3]
        self.off = np.zeros(len(sizes), np.int64)
        if len(sizes):
            self.off[1:] = np.cumsum(sizes)[:-1]
        self.morph = np.zeros(int(sizes.sum()), np.float32)
        for k, m in enumerate(morphs):
            self.morph[self.off[k]:self.off[k] + sizes[k]] = np.asarray(m, np.float32).ravel()
        self.ctr = np.asarray(ctr, dtype=np.int64).reshape(-1, 2)
        self.source = np.asarray(source, dtype=np.int64)
        self.flags = flags  # per source
        # per source: the aperture S/N of its start (see _initialise); without
        # a measured start, 0 for a source started as the PSF and inf else
        if snr is None:
            snr = np.where((flags & SOURCE_PSF_INIT) != 0, 0.0, np.inf)
        self.snr = np.asarray(snr, np.float64)
        # ... below FAINT_SYMMETRY_SNR: a faint source (see _contest_ratios)
        self.faint = self.snr < FAINT_SYMMETRY_SNR
        self.plan()

    def plan(self, box_old=None, off_old=None):
        """(Re)compute the monotonicity plan after the boxes changed (reusing
        the plans of unchanged boxes when the previous layout is given)."""
        if box_old is None:
            self.order, self.nbr = _k.mono_plan(self.box, self.off, self.ctr, self.morph.size)
        else:
            self.order, self.nbr = _k.mono_replan(self.box, self.off, self.ctr, self.morph.size,
                                                  box_old, off_old, self.order, self.nbr)

    def view(self, k):
        """(h, w) view of component k's morphology."""
        y0, x0, h, w = self.box[k]
        return self.morph[self.off[k]:self.off[k] + h * w].reshape(h, w)


class _Rendered:
    """Morphologies as rendered into the scene (sub-pixel shifted), flat layout.

    Has the fields of :class:`_State` that model building, the least-squares
    spectra and the output read (spec is shared with the state).
    """

    __slots__ = ("spec", "morph", "box", "off", "source")
    view = _State.view


def _rendered(state, shift, H, W):
    """The state itself when nothing is shifted, else its rendered morphologies."""
    if shift is None or not shift.any():
        return state
    r = _Rendered()
    r.spec, r.source = state.spec, state.source
    r.box = _k.shifted_boxes(state.box, shift, H, W)
    sizes = r.box[:, 2] * r.box[:, 3]
    r.off = np.zeros(len(sizes), np.int64)
    if len(sizes):
        r.off[1:] = np.cumsum(sizes)[:-1]
    r.morph = np.empty(int(sizes.sum()), np.float32)
    _k.shift_flat(state.morph, state.box, state.off, shift, r.box, r.off, r.morph)
    return r


def _good_and_weights(images, variance, bad, footprint, use_weights):
    """Zero-filled data, per-pixel weights, the good-pixel mask and per-band noise.

    Weights are 1/variance (or 1) on good pixels -- not bad, inside the
    footprint, finite, positive variance -- and 0 elsewhere. The per-band
    noise sigma (median variance of good pixels) sets the sparsity
    thresholds; a band without good pixels gets a huge sigma (no threshold).
    """
    good = ~np.asarray(bad, bool) & np.asarray(footprint, bool)[None]
    good &= np.isfinite(images) & np.isfinite(variance) & (variance > 0)
    data = np.where(good, images, 0).astype(np.float32)
    if use_weights:
        with np.errstate(divide="ignore"):
            w = np.where(good, 1.0 / variance, 0).astype(np.float32)
    else:
        w = good.astype(np.float32)
    sig = np.sqrt(_k.good_variance_medians(np.ascontiguousarray(variance), good))
    sig[np.isnan(sig)] = np.inf  # a band without good pixels
    finite = np.isfinite(sig) & (sig > 0)
    if not finite.any():
        sig[:] = 1.0
    else:
        sig[~finite] = sig[finite].max() * 1e3
    return data, w, good, sig


def _detection_image(data, good, inv_var):
    """Inverse-variance weighted mean over bands and its (typical) noise."""
    wb = good * inv_var[:, None, None]
    den = wb.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        det = np.where(den > 0, (wb * data).sum(0) / den, 0.0)
    return det, 1.0 / math.sqrt(inv_var.sum())


def _peak_pixels(peaks, H, W):
    """Peaks as float (N, 2) plus their nearest pixels, clipped into the blend."""
    peaks = np.asarray(peaks, dtype=np.float64).reshape(-1, 2)
    cy = np.clip(np.floor(peaks[:, 0] + 0.5), 0, H - 1).astype(np.int64)
    cx = np.clip(np.floor(peaks[:, 1] + 0.5), 0, W - 1).astype(np.int64)
    return peaks, cy, cx


def _monotonic_start(det, cy, cx, thresh, noise):
    """Start morphology of the source at (cy, cx) from the detection image.

    The image is first reduced to its symmetric minimum about the peak (a
    neighbour's light has no mirror counterpart), then projected to be
    monotonic with trimming where it climbs again by more than
    ``INIT_RISE_SIGMA * noise`` plus ``INIT_RISE_FRAC`` (another object), and
    thresholded at ``thresh``. Small blends are done in one pass; large ones
    in a window that doubles until the non-zero region no longer touches a
    window edge (so cost follows the source size, not the blend size).
    Returns (morph, y0, x0) with the box trimmed to the non-zero pixels plus a
    margin, or None if the peak is below the threshold.
    """
    H, W = det.shape
    if det[cy, cx] <= thresh:
        return None
    # small blends: one pass over the whole blend beats repeated doubling
    r = max(H, W) if H * W <= 128 * 128 else 16
    while True:
        ya, yb = max(cy - r, 0), min(cy + r + 1, H)
        xa, xb = max(cx - r, 0), min(cx + r + 1, W)
        m = det[ya:yb, xa:xb].astype(np.float64)
        if INIT_SYMMETRIC:
            _k.symmetric_min_inplace(m, cy - ya, cx - xa)
        _k.monotonic_trim_inplace(m, cy - ya, cx - xa, MONO_WEIGHTED,
                                  INIT_RISE_SIGMA * noise, INIT_RISE_FRAC)
        m[m < thresh] = 0.0
        if MONO_WEIGHTED:
            # thresholding keeps the max-variant property (a surviving pixel's
            # brightest inward neighbour is at least as bright, so survives)
            # but not the weighted one
            _k.monotonic_inplace(m, cy - ya, cx - xa, True)
        y1, y2, x1, x2 = _k.nonzero_bounds(m)
        touches = ((y1 == 0 and ya > 0) or (y2 == m.shape[0] - 1 and yb < H)
                   or (x1 == 0 and xa > 0) or (x2 == m.shape[1] - 1 and xb < W))
        if not touches:
            break
        r *= 2
    y1, x1 = max(y1 - BOX_MARGIN, 0), max(x1 - BOX_MARGIN, 0)
    y2, x2 = min(y2 + BOX_MARGIN, m.shape[0] - 1), min(x2 + BOX_MARGIN, m.shape[1] - 1)
    return m[y1:y2 + 1, x1:x2 + 1].copy(), ya + y1, xa + x1


def _apportion(det, starts, cy, cx, thresh):
    """Share the detection image among overlapping starts.

    Each start T_k (monotonic, so it may claim its neighbours up to the
    saddle level) is replaced by ``det * T_k^p / sum_j T_j^p``
    (p = INIT_SHARE_POWER; 1 is the SDSS-style linear apportioning), then
    re-projected to be monotonic and thresholded: where a neighbour's
    template dominates, this source's share vanishes, so starts stop
    overlapping heavily and boxes stay compact. p = 2 separates harder but
    gave worse fluxes on the simulated blends, so the default is 1.
    """
    H, W = det.shape
    den = np.zeros((H, W))
    for st in starts:
        if st is not None:
            m, y0, x0 = st
            den[y0:y0 + m.shape[0], x0:x0 + m.shape[1]] += m ** INIT_SHARE_POWER
    out = []
    for i, st in enumerate(starts):
        if st is None:
            out.append(None)
            continue
        m, y0, x0 = st
        h, w = m.shape
        d = den[y0:y0 + h, x0:x0 + w]
        share = np.where(d > 0, det[y0:y0 + h, x0:x0 + w] * m ** INIT_SHARE_POWER
                         / np.where(d > 0, d, 1), 0.0)
        ly, lx = cy[i] - y0, cx[i] - x0
        _k.monotonic_inplace(share, ly, lx, MONO_WEIGHTED)
        share[share < thresh] = 0.0
        if MONO_WEIGHTED:
            _k.monotonic_inplace(share, ly, lx, True)
        a, b, c, e = _k.nonzero_bounds(share)
        if a < 0:
            out.append(None)
            continue
        a, c = max(a - BOX_MARGIN, 0), max(c - BOX_MARGIN, 0)
        b, e = min(b + BOX_MARGIN, h - 1), min(e + BOX_MARGIN, w - 1)
        a, c = min(a, ly), min(c, lx)
        b, e = max(b, ly), max(e, lx)
        out.append((share[a:b + 1, c:e + 1].copy(), y0 + a, x0 + c))
    return out


def _psf_start(model_psf, cy, cx, H, W):
    """Model PSF centred on the peak pixel, peak 1, clipped to the blend."""
    r = model_psf.shape[0] // 2
    ya, yb = max(cy - r, 0), min(cy + r + 1, H)
    xa, xb = max(cx - r, 0), min(cx + r + 1, W)
    m = model_psf[ya - cy + r:yb - cy + r, xa - cx + r:xb - cx + r]
    return m / m.max(), ya, xa


def _observed_components(state, conv, shape):
    """Every component's morphology convolved with each band's kernel, cut to
    its box grown by half a kernel and clipped to the blend: (cbox (K, 4),
    coff (K,), flats (B, total)) in the flat layout (see :func:`_ls_spectra`)."""
    K = state.box.shape[0]
    B, H, W = shape
    ky, kx = conv.kernels.shape[1:]
    cbox = state.box.copy()
    cbox[:, 0] -= ky // 2
    cbox[:, 1] -= kx // 2
    cbox[:, 2] += 2 * (ky // 2)
    cbox[:, 3] += 2 * (kx // 2)
    # clip to the blend: weights are zero outside it
    y0 = np.maximum(cbox[:, 0], 0)
    x0 = np.maximum(cbox[:, 1], 0)
    y1 = np.minimum(cbox[:, 0] + cbox[:, 2], H)
    x1 = np.minimum(cbox[:, 1] + cbox[:, 3], W)
    cbox = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1).astype(np.int64)
    sizes = cbox[:, 2] * cbox[:, 3]
    coff = np.zeros(K, np.int64)
    coff[1:] = np.cumsum(sizes)[:-1]
    flats = np.empty((B, int(sizes.sum())), np.float32)
    if conv.method == "fft":
        _convolve_local(state, conv, cbox, coff, flats)
    else:
        Fy, Fx = conv.fshape
        chunk = max(1, min(K, LS_FFT_BUDGET // (B * Fy * Fx)))
        frames = scratch("ls_frames", (chunk, Fy, Fx), np.float32)
        out = scratch("ls_out", (B, chunk, Fy, Fx), np.float32)
        origin = np.zeros((K, 2), np.int64)
        for start in range(0, K, chunk):
            n = min(chunk, K - start)
            idx = np.arange(start, start + n)
            _k.place_boxes(state.morph, state.box, state.off, idx, origin, frames[:n])
            for b in range(B):
                _k.convolve_direct(frames[:n], np.repeat(conv.kernels[b:b + 1], n, axis=0), out[b, :n])
            _k.extract_boxes(out[:, :n], idx, origin, cbox, coff, flats)
    return cbox, coff, flats


def _ls_spectra(state, conv, data, w, joint, spec0=None):
    """Weighted least-squares spectra for fixed morphologies, band by band.

    Each morphology is convolved with each band's difference kernel on a
    frame of its own (box plus a kernel, see :func:`_convolve_local`; equal to
    the model the fit uses to float32 rounding; on the blend grid when that is
    cheaper) and cut to its box grown by half a kernel. The K x K normal
    equations of every band are then accumulated from those boxes and their
    overlaps (``kernels.normal_equations``) and solved with non-negative
    amplitudes (``kernels.solve_spectra``), so memory is bounded by the
    summed box areas times the bands plus one chunk of FFT frames (at most
    LS_FFT_BUDGET complex numbers), never bands x components x H x W. With
    ``joint`` False (very large blends) the coupled system is solved by
    block Gauss-Seidel over sources from ``spec0`` (default: the state's
    spectra) instead of the joint active-set solve. Either way the result
    fits at least as well as ``spec0``.
    """
    K = state.box.shape[0]
    cbox, coff, flats = _observed_components(state, conv, data.shape)
    # the normal equations always couple every overlapping pair: sources
    # solved against the whole data each claim all the light they share
    # (2.5x the image flux on a 73-peak real HSC blend)
    A, r = _k.normal_equations(flats, cbox, coff, data, w, np.zeros(K, np.int64))
    spec0 = np.ascontiguousarray(state.spec if spec0 is None else spec0, np.float32)
    if not joint:
        return _k.solve_spectra_blocks(A, r, np.asarray(state.source, np.int64), spec0,
                                       LS_BLOCK_SWEEPS, LS_BLOCK_TOL)
    spec = _k.solve_spectra(A, r, np.zeros(K, np.int64))
    _k.keep_better_spectra(A, r, spec, spec0)
    return spec


def _convolve_local(state, conv, cbox, coff, flats):
    """Each morphology convolved with every band's kernel on a small frame.

    A frame of at least box + 2 * (kernel // 2) pixels holds the full linear
    convolution (no wrap-around), so this equals convolving on the blend's
    grid, at the cost of the components' size rather than the blend's. All
    components share one frame shape (the largest box's, or the blend grid
    when that is no larger), so a blend costs one forward and one batched
    inverse transform per chunk instead of a few per component shape; the
    kernel transforms of that shape are cached across blends.
    ``flats``: (B, total) output, see :func:`_ls_spectra`.
    """
    ky, kx = conv.kernels.shape[1:]
    ry, rx = ky // 2, kx // 2
    B = flats.shape[0]
    K = state.box.shape[0]
    fshape = (sfft.next_fast_len(int(state.box[:, 2].max()) + 2 * ry, real=True),
              sfft.next_fast_len(int(state.box[:, 3].max()) + 2 * rx, real=True))
    origin = state.box[:, :2] - np.array([ry, rx])
    if fshape[0] * fshape[1] >= conv.fshape[0] * conv.fshape[1]:
        # kernels as wide as the blend (e.g. 43 px on a 58 x 48 blend): the
        # blend's own grid is no dearer, and its kernel transforms exist
        fshape = conv.fshape
        origin = np.zeros((K, 2), np.int64)
    khat = conv.kernel_hat(fshape)
    hshape = (fshape[0], fshape[1] // 2 + 1)
    chunk = max(1, min(K, LS_FFT_BUDGET // (B * hshape[0] * hshape[1])))
    for start in range(0, K, chunk):
        n = min(chunk, K - start)
        idx = np.arange(start, start + n, dtype=np.int64)
        # per-thread scratch: these are MBs, page-faulted afresh if allocated
        frames = scratch("ls_frames", (n,) + fshape, np.float32)
        _k.place_boxes(state.morph, state.box, state.off, idx, origin, frames)
        f = conv.rfft(frames, scratch("ls_spectra", (n,) + hshape, np.complex64))
        prod = scratch("ls_product", (B, n) + hshape, np.complex64)
        np.multiply(f[None], khat[:, None], out=prod)
        out = conv.irfft(prod.reshape((B * n,) + hshape), fshape,
                         out=scratch("ls_out", (B * n,) + fshape, np.float32))
        _k.extract_boxes(out.reshape((B, n) + fshape), idx, origin, cbox, coff, flats)


def _initialise(data, w, good, sig, peaks, cy, cx, model_psf, conv, config, H, W, psf_area):
    """Cold start: morphologies from the detection image, spectra by least squares."""
    inv_var = 1.0 / sig ** 2
    det, sig_det = _detection_image(data, good, inv_var)
    thresh = config.initial_background_thresh * sig_det
    morphs, boxes, ctrs, source = [], [], [], []
    flags = np.zeros(len(peaks), np.int64)
    snrs = np.zeros(len(peaks))
    starts = [_monotonic_start(det, cy[i], cx[i], thresh, sig_det) for i in range(len(peaks))]
    if len(peaks) > 1:
        starts = _apportion(det, starts, cy, cx, thresh)
    for i in range(len(peaks)):
        start = starts[i]
        snr = 0.0
        if start is not None:
            m, y0, x0 = start
            # aperture S/N of the start's flux in the detection image
            snr = float(m.sum() / (sig_det * math.sqrt(np.count_nonzero(m))))
        snrs[i] = snr
        psf = start is None or snr < config.min_snr
        if psf and start is not None and snr >= config.extended_min_snr:
            # a resolved faint galaxy: a 9 x 9 PSF start never grows to its
            # size and a brighter neighbour takes its light (docs/design.md,
            # "PSF start"); flux / peak is the start's effective area
            peak = m[cy[i] - y0, cx[i] - x0]
            # a faint start many PSFs wide is mostly a neighbour's light (a
            # noise peak 2 px from an S/N 90 galaxy: 17-22x) and would take it
            ratio = m.sum() / (peak * psf_area) if peak > 0 else 0.0
            psf = not (EXTENDED_START_RATIO <= ratio <= EXTENDED_START_MAX_RATIO)
        if psf:
            m, y0, x0 = _psf_start(model_psf, cy[i], cx[i], H, W)
            flags[i] |= SOURCE_PSF_INIT
            comps = [m]
        else:
            m = m / m[cy[i] - y0, cx[i] - x0]
            if snr > config.bulge_snr:
                # bulge + disk: the half-maximum core (a superlevel set of a
                # monotonic image is still monotonic) and the full extent.
                core = np.where(m >= 0.5, m, 0.0)
                comps = [core, m]
            else:
                comps = [m]
        for c in comps:
            morphs.append(c)
            boxes.append((y0, x0, c.shape[0], c.shape[1]))
            ctrs.append((cy[i], cx[i]))
            source.append(i)
    K = len(morphs)
    state = _State(np.zeros((K, data.shape[0])), morphs, boxes, ctrs, source, flags, snrs)
    if config.set_spectra:
        joint = len(peaks) * H * W <= config.max_spectrum_cutoff
        state.spec[:] = _ls_spectra(state, conv, data, w, joint)
    else:
        ncomp = np.bincount(state.source, minlength=len(peaks))
        for k in range(K):
            i = state.source[k]
            state.spec[k] = np.maximum(data[:, cy[i], cx[i]], 0) / ncomp[i]
    # a component the least-squares fit switched off (e.g. the core of a
    # source whose profile the disk already explains) restarts small rather
    # than dead: a zero spectrum has a zero morphology gradient forever.
    for k in range(K):
        if not np.any(state.spec[k] > 0):
            i = state.source[k]
            state.spec[k] = np.maximum(data[:, cy[i], cx[i]], 0) * 0.1 + 1e-3 * sig
    return state


def _state_from_result(init, peaks, cy, cx, B, H, W):
    """Warm start from an earlier BlendResult of the same blend and peaks."""
    morphs, boxes, ctrs, source, specs = [], [], [], [], []
    flags = np.zeros(len(peaks), np.int64)
    have = sorted(src.peak_index for src in init.sources if src.components)
    if have != list(range(len(peaks))):
        raise InputError(f"warm start: init has components for peaks {have}, "
                         f"expected one source per peak 0..{len(peaks) - 1}")
    for src in init.sources:
        i = src.peak_index
        if not 0 <= i < len(peaks):
            continue
        flags[i] = src.flags & SOURCE_PSF_INIT
        for c in src.components:
            m = np.asarray(c.morph, np.float32)
            if m.ndim != 2:
                raise ValueError("warm start needs factorised (2-D morph) components")
            y0, x0 = int(c.y0), int(c.x0)
            h, w = m.shape
            # the box must lie in the blend and contain the peak pixel
            ny0, nx0 = max(min(y0, cy[i]), 0), max(min(x0, cx[i]), 0)
            ny1, nx1 = min(max(y0 + h, cy[i] + 1), H), min(max(x0 + w, cx[i] + 1), W)
            mm = np.zeros((ny1 - ny0, nx1 - nx0), np.float32)
            ya, yb = max(y0, ny0), min(y0 + h, ny1)
            xa, xb = max(x0, nx0), min(x0 + w, nx1)
            if ya < yb and xa < xb:
                mm[ya - ny0:yb - ny0, xa - nx0:xb - nx0] = m[ya - y0:yb - y0, xa - x0:xb - x0]
            morphs.append(mm)
            boxes.append((ny0, nx0, ny1 - ny0, nx1 - nx0))
            ctrs.append((cy[i], cx[i]))
            source.append(i)
            specs.append(np.asarray(c.spectrum, np.float32))
    spec = np.array(specs, np.float32).reshape(len(specs), B)
    return _State(spec, morphs, boxes, ctrs, source, flags)


def _same_config(init, config):
    """Whether a warm start's BlendResult was fitted with ``config`` (its
    ``extra["config"]``, as :meth:`DeblendConfig.to_json`, is equal)."""
    return (init.extra or {}).get("config") == config.to_json()


def _symmetry_centres(peaks, ctr):
    """Doubled symmetry centres (K, 2): each component's peak rounded to half a pixel.

    Kept within half a pixel of the peak pixel ``ctr`` so the peak pixel's
    mirror is itself or a neighbour.
    """
    c2 = np.rint(2 * np.asarray(peaks, np.float64)).astype(np.int64)
    return np.clip(c2, 2 * ctr - 1, 2 * ctr + 1)


def _subpixel_shifts(peaks, sym):
    """Render shifts (K, 2) that move each symmetry centre onto its exact peak.

    Symmetry is exact only about a multiple of half a pixel; a morphology kept
    symmetric about ``sym / 2`` and rendered shifted by ``peak - sym / 2``
    (at most a quarter pixel per axis, bilinear) is symmetric about the peak
    itself. A quarter pixel matters: on four simulated fields at true peaks,
    full symmetry about the half-pixel centres gave median blended flux
    errors of 10.7 % (r) / 11.7 % (i) and 3.5 % for isolated sources; about
    the exact peaks 7.5 / 8.2 % and 1.9 %.
    """
    return np.clip(np.asarray(peaks, np.float64) - 0.5 * sym, -0.5, 0.5)


def _source_runs(source):
    """(K, 2) [lo, hi) of the run of components that share each component's source.

    Components of one source are contiguous (both the cold and the warm start
    append a source's components together), but sources need not be in order.
    """
    source = np.asarray(source)
    K = source.size
    out = np.empty((K, 2), np.int64)
    lo = 0
    for k in range(1, K + 1):  # plain loop: K is small and np.r_ costs more
        if k == K or source[k] != source[k - 1]:
            out[lo:k, 0], out[lo:k, 1] = lo, k
            lo = k
    return out


def _overlaps(box):
    """Number of components whose boxes overlap each component's box (itself included)."""
    y0, x0 = box[:, 0], box[:, 1]
    y1, x1 = y0 + box[:, 2], x0 + box[:, 3]
    oy = (y0[:, None] < y1[None]) & (y0[None] < y1[:, None])
    ox = (x0[:, None] < x1[None]) & (x0[None] < x1[:, None])
    return (oy & ox).sum(axis=1).astype(np.float64)


_NO_FILL = np.zeros(3, np.bool_)
_ADAM_FILL = np.array([False, True, True])


def _resize(state, moments, H, W, sym=None):
    """Shrink boxes to their non-zero pixels (+margin), grow edges carrying flux.

    With ``sym`` (doubled symmetry centres, symmetry on) boxes are kept
    symmetric about them.

    ``moments`` are (S, P) arrays travelling with the morphologies (optimiser
    state). Returns the new moments (same list order); ``state`` is updated.
    """
    box = state.box
    new, changed = _k.resized_boxes(state.morph, box, state.off, state.ctr,
                                    state.ctr * 2 if sym is None else sym, sym is not None, H, W,
                                    BOX_MARGIN, BOX_GROW_MIN, BOX_GROW_FRAC)
    if not changed:
        return moments
    sizes = new[:, 2] * new[:, 3]
    off = np.zeros(len(sizes), np.int64)
    off[1:] = np.cumsum(sizes)[:-1]
    total = int(sizes.sum())
    off_old = state.off
    state.morph = _k.remap_flat(state.morph[None], box, state.off, new, off, total, _NO_FILL)[0]
    # Adam state rows are (m, v, v_hat): new pixels inherit the largest
    # second moments; FISTA's single row (previous iterate) starts at zero
    moments = [_k.remap_flat(m, box, state.off, new, off, total,
                             _ADAM_FILL if m.shape[0] == 3 else _NO_FILL) for m in moments]
    state.box = new
    state.off = off
    state.plan(box, off_old)
    return moments


_KERNEL_CACHE: dict = {}
_CONV_CACHE: dict = {}
_CACHE_SIZE = 16


def _psf_setup(psfs, sigma, shape):
    """Model PSF, difference kernels and convolver, memoised.

    All blends of a coadd patch share the PSF images, and the kernels cost
    a few ms of FFTs, so they are memoised by content (hash of the PSF bytes
    and the model PSF width); the convolver (kernel transforms on the blend's
    FFT grid) additionally by blend shape. Convolvers of one PSF set share
    one dict of kernel transforms per grid shape (the least-squares spectra's
    local frames recur across blends).
    """
    psfs = np.ascontiguousarray(psfs, dtype=np.float64)
    key = (hashlib.sha1(psfs.tobytes()).hexdigest(), psfs.shape, float(sigma))

    def make_kernels():
        model_psf = gaussian_psf(sigma)
        kern, kres = difference_kernels(psfs, model_psf)
        return model_psf, kern, kres, {}

    model_psf, kern, kres, khats = memoised(_KERNEL_CACHE, key, make_kernels, _CACHE_SIZE)
    conv = memoised(_CONV_CACHE, key + (tuple(shape),),
                    lambda: Convolver(kern, shape, khat_cache=khats), _CACHE_SIZE)
    return model_psf, kern, kres, conv


class _Fit:
    """What one run of the optimiser produced (see :func:`_fit`)."""

    __slots__ = ("state", "shift", "loss", "history", "converged", "iterations", "kept_start",
                 "best", "fallback")

    def diverged(self):
        """Whether the fit ended clearly worse than its best iterate or its start.

        Adam's loss wanders near convergence (by 10-100 on hsc_cosmos_35's
        -8300, under 1 % of what the fit gains from its start); a fit that
        gives back more than DIVERGE_FRAC of that gain and more than
        DIVERGE_MIN of its best loss, or ends below its start, has run
        away. (The second bound keeps blends that start near their optimum
        from being flagged for a wander of 10 in 1150: two field blends did.)
        """
        start, best = -self.history[0], self.best[0]
        lost = self.loss - best
        return self.loss > start or (lost > DIVERGE_FRAC * max(start - best, 0.0)
                                     and lost > DIVERGE_MIN * best)


class _Loop:
    """The optimiser's working state for one run of :func:`_fit`.

    Holds what the iterations share besides the model itself (``state``,
    modified in place): symmetry centres and sub-pixel shifts, Adam moments
    or FISTA momentum, the contested-symmetry inputs, the rendering work
    box and the region on which convergence is judged. Its methods are the
    loop's steps in order: :meth:`evaluate`, :meth:`step`, :meth:`maintain`
    and, after the loop, :meth:`end`.
    """

    def __init__(self, state, config, warm, peaks, conv, w, bufs, shape):
        B, H, W = shape
        self.state, self.config, self.warm, self.conv, self.bufs = state, config, warm, conv, bufs
        self.H, self.W = H, W
        scene_buf, resid_buf = bufs[0], bufs[1]
        self.scene = scene_buf[:, :H, :W]
        self.resid = resid_buf[:, :H, :W]
        K = state.box.shape[0]
        self.sym = _symmetry_centres(peaks[state.source], state.ctr)
        self.sym_s = float(config.symmetry_strength) if config.symmetric else 0.0
        # sub-pixel rendering only serves symmetry
        self.shift = (_subpixel_shifts(peaks[state.source], self.sym) if self.sym_s > 0
                      else np.zeros((K, 2)))
        if warm and self.shift.any():
            # stored morphologies are rendered (shifted); the proximal operators
            # need them in their own grid, where symmetry about ``sym`` holds.
            # Without this, symmetry about the half-pixel centre distorts them:
            # a quarter-pixel symmetric test fit fell from logL -1192 to -16831
            # on restart (test_warm_start_continues_a_subpixel_symmetric_fit).
            _k.unshift_flat(state.morph, state.box, state.off, self.shift)
        # A warm start takes proximal-gradient (FISTA) steps whatever the
        # optimizer: Adam's first steps are sign-normalised (every pixel moves
        # by the full step however small its gradient), which kicks a
        # converged model -- on hsc_cosmos_35 a warm restart lost 2.3 % of
        # logL even with steps cut to 1 %. FISTA's steps are gradient-
        # proportional (1 / Lipschitz), so a converged model stays put.
        self.adam = config.optimizer == "adaprox" and not warm
        if self.adam:
            self.mom_s = np.zeros((3, K, B))
            self.mom_m = [np.zeros((3, state.morph.size))]
        else:
            self.mom_s = state.spec[None].astype(np.float64)
            self.mom_m = [state.morph[None].astype(np.float64)]
            self.kappa = (w.reshape(B, -1).max(axis=1).astype(np.float64) * conv.norm2)
            self.t_f = 1.0
        # per component; ratio < 0: symmetry over the whole box
        self.contest = _contest_ratios(state, config, self.sym_s)
        # band-summed model frame, for the contested-symmetry test
        self.tsum = np.zeros((H, W) if (self.contest >= 0).any() else (1, 1), np.float32)
        self.spec_sum = np.zeros(K, np.float32)
        self.work = np.empty(_k._largest_box(state.box, 2), np.float32)  # one rendered box
        self.sib = _source_runs(state.source)
        self.bg = float(config.background_thresh)
        # per component (floor, steepness) of the extrapolated wing: faint
        # sources only (start S/N below WING_SNR, whose cut wings are a large
        # part of their light), and every component of a one-source fit
        # (docs/design.md, "Convergence of uncontested sources")
        self.wing = np.zeros((K, 2))
        self.wing[state.snr[state.source] < WING_SNR if WING_FAINT_ONLY else slice(None)] = (WING_FLOOR, WING_STEEP)
        n_src = int(state.source.max()) + 1 if K else 0
        # not with the residual search: the wing of one source then takes an
        # undetected neighbour's light (a star on a galaxy's slope went unfound)
        if WING_SINGLE and n_src == 1 and not config.residual_sources:
            self.wing[:] = (WING_FLOOR, WING_STEEP)
        # the sources' pixels, on which convergence is judged: the boxes (which
        # end where the morphologies fall below the noise) grown by a few
        # pixels of PSF wing. Grown by the whole difference kernel instead (12
        # px here), a 120-px stamp still stopped a median 32 iterations against
        # its tight stamp's 44; by 3 px, 48 against 51.
        self.region = np.empty((H, W), np.bool_)
        _k.boxes_region(state.box, REGION_GROW, REGION_GROW, H, W, self.region)
        self.prev = None
        self.nover = None
        self.frozen = None  # components held fixed (see freeze_contested)
        self.extend = False  # iterating on past convergence (freeze_contested)

    def freeze_contested(self):
        """Hold the components of sources whose boxes overlap another source's;
        True when some source is left to iterate."""
        st = self.state
        if not self.adam or st.box.shape[0] == 0 or int(st.source.max()) == 0:
            return False
        frozen = ~_uncontested(st)[st.source]
        if frozen.all():
            return False
        self.frozen = frozen if frozen.any() else None
        self.extend = True
        return True

    def evaluate(self, data, w):
        """Render and convolve the current model; (loss, loss on the sources' pixels).

        Leaves the weighted residual in the residual buffer for :meth:`step`.
        """
        st, H, W = self.state, self.H, self.W
        # the scene plus, for contested symmetry, its band sum and the
        # components' band-summed spectra (tsum, spec_sum)
        _k.assemble_scene(st.spec, st.morph, st.box, st.off, self.shift, self.scene, self.tsum,
                          self.spec_sum, self.work)
        cm = self.conv.convolve_padded(self.bufs[0], self.bufs[2])[:, :H, :W]
        return _k.weighted_residual_split(cm, data, w, self.resid, self.region)

    def step(self, it, loss, inv_var):
        """One Adam (adaprox) or FISTA step from the gradient of the last evaluation."""
        st, config = self.state, self.config
        if not self.adam and self.prev is not None and loss > self.prev:
            # FISTA adaptive restart: drop the momentum when the loss goes up
            self.t_f = 1.0
        self.prev = loss
        G = self.conv.adjoint_padded(self.bufs[1], self.bufs[3])[:, :self.H, :self.W]
        held = None
        if self.frozen is not None:
            # a component without flux is skipped by the step kernels
            held = st.spec[self.frozen].copy()
            st.spec[self.frozen] = 0
        if self.adam:
            _k.adaprox_step(st.spec, st.morph, st.box, st.off, st.ctr, self.sym, self.shift, G,
                            it + 1, ADAM_B1, ADAM_B2, STEP_MORPH, REL_MORPH, STEP_SPEC,
                            inv_var, self.bg, self.wing,
                            self.mom_s, self.mom_m[0], config.monotonic, MONO_WEIGHTED, self.sym_s,
                            st.order, st.nbr, self.tsum, self.contest, self.spec_sum, self.sib)
        else:
            t_new = 0.5 * (1 + math.sqrt(1 + 4 * self.t_f * self.t_f))
            beta = (self.t_f - 1) / t_new
            self.t_f = t_new
            if self.nover is None:
                self.nover = _overlaps(st.box)
            _k.fista_step(st.spec, st.morph, st.box, st.off, st.ctr, self.sym, self.shift, G,
                          beta, self.kappa, self.nover, inv_var, self.bg, self.wing, self.mom_s,
                          self.mom_m[0], config.monotonic, MONO_WEIGHTED, self.sym_s, st.order, st.nbr,
                          self.tsum, self.contest, self.spec_sum, self.sib)
        if held is not None:
            st.spec[self.frozen] = held

    def maintain(self, iterations, data, w, joint):
        """Between steps: re-solve the spectra early on, and resize the boxes every few."""
        st, config, H, W = self.state, self.config, self.H, self.W
        if iterations in RESOLVE_SPECTRA_AT and config.set_spectra and not self.warm:
            # the start morphologies are observed-frame and too wide, so
            # the initial least-squares spectra mix neighbours' colours;
            # once the morphologies have sharpened, re-solve (Adam moves
            # spectra only by STEP_SPEC per iteration)
            st.spec[:] = _ls_spectra(_rendered(st, self.shift, H, W), self.conv, data, w, joint)
            if self.adam:
                self.mom_s[:] = 0
            else:
                self.mom_s[0] = st.spec
        if config.resize_every and iterations % config.resize_every == 0:
            self.mom_m = _resize(st, self.mom_m, H, W, self.sym if self.sym_s > 0 else None)
            _k.boxes_region(st.box, REGION_GROW, REGION_GROW, H, W, self.region)
            self.nover = None
            if self.work.size < _k._largest_box(st.box, 2):
                self.work = np.empty(_k._largest_box(st.box, 2), np.float32)

    def end(self, loss, history, data, w, joint):
        """The model as returned, and its loss (appended to ``history`` when recomputed).

        FISTA's extrapolated point (where the loss was evaluated) may break
        the constraints, so its last proximal iterate x_t is returned; final
        least-squares spectra (:data:`FINAL_LS_SPECTRA`) change the loss too.
        """
        st = self.state
        if not self.adam:
            st.spec[:] = self.mom_s[0]
            st.morph[:] = self.mom_m[0][0]
        final_ls = FINAL_LS_SPECTRA and self.config.set_spectra
        if final_ls or not self.adam:
            loss = _finish(st, self.shift, final_ls, self.conv, data, w, joint, self.bufs,
                           self.tsum, self.spec_sum)
            history.append(-loss)
        return loss


def _uncontested(state):
    """Per source: True when none of its components' boxes overlaps another source's."""
    box, src = state.box, state.source
    n = int(src.max()) + 1
    y0, x0, h, w = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    over = ((y0[:, None] < (y0 + h)[None]) & (y0[None] < (y0 + h)[:, None])
            & (x0[:, None] < (x0 + w)[None]) & (x0[None] < (x0 + w)[:, None])
            & (src[:, None] != src[None]))
    out = np.ones(n, bool)
    out[src[over.any(axis=1)]] = False
    return out


def _fit(state, config, warm, refine, peaks, conv, data, w, inv_var, joint, bufs):
    """Run the optimiser on ``state`` (modified in place) with ``config``.

    Returns a :class:`_Fit`; its ``best`` is (loss, snapshot) of the best
    iterate the loop evaluated (the start included), for the fallback.
    """
    loop = _Loop(state, config, warm, peaks, conv, w, bufs, data.shape)
    # a warm start from a fit with this same configuration refines it: if
    # the continued fit ends worse (the proximal operators need not leave
    # the stored end point fixed), the start is returned unchanged
    start = copy.deepcopy(state) if warm and refine else None
    history = []
    converged = False
    iterations = 0
    best = (math.inf, None)
    for it in range(config.max_iter + 1):
        loss, loss_src = loop.evaluate(data, w)
        history.append(-loss)
        if loss < best[0] and (loop.adam or it == 0):
            # FISTA evaluates extrapolated points, which may break the
            # constraints: only its start is a valid fallback
            best = (loss, _snapshot(state))
        if loop.extend:
            if it >= UNCONTESTED_MIN_ITER:
                break
        elif _converged(history, loss_src, it, config):
            converged = True
            if it >= UNCONTESTED_MIN_ITER or not loop.freeze_contested():
                break
        if it == config.max_iter:
            break
        loop.step(it, loss, inv_var)
        iterations = it + 1
        loop.maintain(iterations, data, w, joint)
    loss = loop.end(loss, history, data, w, joint)
    kept_start = start is not None and -loss < history[0]
    if kept_start:
        state, loss = start, -history[0]
        history.append(history[0])
    out = _Fit()
    out.state, out.shift, out.loss, out.history = state, loop.shift, loss, history
    out.converged, out.iterations, out.kept_start = converged, iterations, kept_start
    out.best, out.fallback = best, ""
    return out


def _contest_ratios(state, config, sym_s):
    """Per component: the contest ratio of contested symmetry, or -1 for
    symmetry over its whole box.

    ``symmetry_region`` "all" gives every component -1. "contested" gives
    ``contest_ratio``, except (FAINT_SYMMETRIC_ALL) to the components of
    faint sources: those whose start's aperture S/N is below
    FAINT_SYMMETRY_SNR (50, the Rubin task's and the default ``min_snr``:
    the sources started as the PSF and the extended ones that
    ``extended_min_snr`` starts from the image; a fixed S/N rather than
    ``min_snr``, which a user may raise only to force single PSF starts;
    re-measured with the extended starts at 30 / 40 / 75 / 100: no better,
    docs/design.md "Colours of faint sources"). Their free pixels
    mostly fit noise, and the mirror average halves its variance. Pooled
    over the four simulated fields with true positions this took the
    blended flux errors from 9.6 / 8.3 % to 7.6 / 8.1 % (61 % of sources
    better in r and in i); bright real galaxies, where whole-box symmetry
    is ruinous, keep the contested rule.
    """
    K = state.box.shape[0]
    if sym_s <= 0 or config.symmetry_region != "contested":
        return np.full(K, -1.0)
    out = np.full(K, float(config.contest_ratio))
    if FAINT_SYMMETRIC_ALL:
        out[state.faint[state.source]] = -1.0
    return out


def _converged(history, loss_src, it, config):
    """Mean relative change of the loss over the last CONVERGE_RUN iterations.

    Relative to the loss on the sources' pixels, not the whole blend: sky
    pixels add about 1/2 each to the loss but nothing to its change, so in
    a 120-px stamp of mostly sky ten simulated three-source blends stopped
    after a median of 14 iterations where their tight 36-px stamps took 44
    (now 48 and 51; see REGION_GROW). Adam's loss decreases unevenly, and a
    single near-equal pair at a pause or turning point is not convergence
    (one pair stopped an hsc_cosmos_35 orientation at 12 iterations, logL
    -11780); two pairs stop hsc a median 15 iterations sooner than three,
    at logL -8371 instead of -8159 (docs/design.md).
    """
    n = CONVERGE_RUN
    if it < max(config.min_iter, n):
        return False
    change = sum(abs(history[-1 - i] - history[-2 - i]) for i in range(n))
    return change <= n * config.relative_error * abs(loss_src)


def _finish(state, shift, final_ls, conv, data, w, joint, bufs, tsum, spec_sum):
    """Final spectra (least squares of the final morphologies: at least as
    good as the optimiser's, which move by a small relative step per
    iteration) and the loss of the model as returned."""
    scene_buf, resid_buf, conv_out, _ = bufs
    B, H, W = data.shape
    if final_ls:
        state.spec[:] = _ls_spectra(_rendered(state, shift, H, W), conv, data, w, joint)
    work = np.empty(_k._largest_box(state.box, 2), np.float32)
    _k.assemble_scene(state.spec, state.morph, state.box, state.off, shift, scene_buf[:, :H, :W],
                      tsum, spec_sum, work)
    cm = conv.convolve_padded(scene_buf, conv_out)[:, :H, :W]
    return _k.weighted_residual(cm, data, w, resid_buf[:, :H, :W])


def _snapshot(state):
    """Copies of the arrays that define a state's model (for :func:`_restore`)."""
    return state.spec.copy(), state.morph.copy(), state.box.copy(), state.off.copy()


def _restore(state, snap):
    """Put a :func:`_snapshot` back into ``state`` (re-planning monotonicity)."""
    state.spec, state.morph, state.box, state.off = (a.copy() for a in snap)
    state.plan()


def _fall_back(fit, cold, config, peaks, conv, data, w, inv_var, joint, bufs):
    """Replace a diverged fit: refit without symmetry, else its best iterate.

    ``cold`` makes the initial state afresh (None for warm starts or fits
    without symmetry). The refit is kept when it does not diverge and ends
    better than the best iterate would; otherwise the best iterate the
    loop saw (the start included) gets final least-squares spectra (which
    cannot make it worse). ``fallback`` on the returned fit names what was
    used: ``"no_symmetry"`` or ``"best_iterate"``.
    """
    B, H, W = data.shape
    candidate = None
    if cold is not None:
        plain = dataclasses.replace(config, symmetric=False)
        candidate = _fit(cold(), plain, False, False, peaks, conv, data, w, inv_var, joint, bufs)
        candidate.iterations += fit.iterations
        if candidate.diverged():
            candidate = None
    loss = _best_iterate_loss(fit, config, conv, data, w, joint, bufs)
    if candidate is not None and candidate.loss <= loss:
        candidate.fallback = "no_symmetry"
        candidate.history = fit.history + candidate.history
        return candidate
    return _use_best_iterate(fit, loss)


def _check_symmetry_cost(fit, cold, config, peaks, conv, data, w, inv_var, joint, bufs):
    """The fit without symmetry instead of ``fit`` where symmetry costs too much.

    Contested symmetry binds a source's pixel pairs where a neighbour is
    bright; on real crowded blends (asymmetric galaxies, peaks a little off
    their galaxies' centres) that constraint fights the data, and a fit run
    ten times longer still ends 15 % below the fit without it (cut_hsc1,
    15 peaks). On simulated fields it costs a median 0.3 % and buys the
    flux separation. So a crowded blend is fitted both ways and keeps the
    symmetric fit unless its loss exceeds the plain fit's by more than
    SYMMETRY_COST_MAX (a likelihood-ratio test with a relative threshold);
    the swap is flagged ``fallback_no_symmetry`` (not ``diverged``).
    """
    plain = dataclasses.replace(config, symmetric=False)
    other = _fit(cold(), plain, False, False, peaks, conv, data, w, inv_var, joint, bufs)
    if other.diverged() or other.loss * (1.0 + SYMMETRY_COST_MAX) >= fit.loss:
        fit.iterations += other.iterations
        return fit
    other.iterations += fit.iterations
    other.history = fit.history + other.history
    other.fallback = "no_symmetry"
    return other


def _best_iterate_loss(fit, config, conv, data, w, joint, bufs):
    """Put the fit's best iterate back into its state, with final spectra;
    returns its loss (at most the best iterate's: the spectrum solve keeps
    the better spectra)."""
    _restore(fit.state, fit.best[1])
    tsum, spec_sum = np.zeros((1, 1), np.float32), np.zeros(fit.state.box.shape[0], np.float32)
    return _finish(fit.state, fit.shift, FINAL_LS_SPECTRA and config.set_spectra, conv, data, w,
                   joint, bufs, tsum, spec_sum)


def _use_best_iterate(fit, loss):
    """Mark ``fit`` (its state already the best iterate) as that fallback."""
    fit.loss = loss
    fit.history.append(-loss)
    fit.fallback = "best_iterate"
    return fit


# --------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------


def deblend_scarlet(images, variance, bad, footprint, psfs, peaks, config: DeblendConfig | None = None,
                    init: BlendResult | None = None) -> BlendResult:
    """Deblend one blend with a scarlet-style factorised model.

    Parameters
    ----------
    images, variance : (B, H, W) float arrays of the blend box.
    bad : (B, H, W) bool; True pixels get zero weight.
    footprint : (H, W) bool; pixels outside the parent footprint get zero weight.
    psfs : (B, py, px) observed PSFs (odd, centred, unit sum).
    peaks : (N, 2) float (y, x) peak positions in blend pixels.
    config : DeblendConfig, optional
    init : BlendResult, optional
        Earlier result for the same blend and peaks; the fit starts from its
        components (warm start) instead of initialising, with proximal-
        gradient (FISTA) steps. If ``init.extra["config"]`` equals this
        ``config`` (the same fit continued), a continued fit that ends with
        a lower log-likelihood than the start returns the start. Sources
        it found in its residual (``init.extra["found_peaks"]``) continue
        as sources after ``peaks``.

    Returns
    -------
    BlendResult
        Components in the model frame (``frame="model"``), one source per
        peak in input order, ``model_psf`` set. ``log_likelihood`` is
        ``-1/2 sum w (data - model)^2`` with the weights used; ``chi2`` is
        ``sum w (data - model)^2`` per good pixel. ``extra`` holds
        ``diff_kernels`` (B, k, k), ``diff_kernel_residual`` (B,),
        ``runtime`` and ``init_runtime`` (s), ``conv_method`` ("fft" or
        "direct"), ``n_components``, ``logL_history`` (logL per evaluation),
        ``warm_start``, ``warm_start_kept`` (the start was returned),
        ``config`` (JSON) and ``found_peaks`` (n, 2): the positions of the
        sources after the input peaks, found in the residual
        (``config.residual_sources``; flag ``found_peak``).
    """
    t_start = time.perf_counter()
    config = config or DeblendConfig()
    n_input = len(np.asarray(peaks, np.float64).reshape(-1, 2))
    found = np.zeros((0, 2)) if init is None else (init.extra or {}).get("found_peaks", np.zeros((0, 2)))
    if len(found):
        # a fit that found sources in its residual continues with them
        peaks = np.vstack([np.asarray(peaks, np.float64).reshape(-1, 2), np.asarray(found, np.float64)])
    blend = _blend_inputs(images, variance, bad, footprint, psfs, peaks, config)
    B, H, W = blend.data.shape
    peaks = blend.peaks
    warm = init is not None
    refine = warm and _same_config(init, config)  # the same fit continued
    fit_config = config
    if warm and config.symmetric and init.flags & _models.BLEND_FLAGS["fallback_no_symmetry"]:
        # the stored fit is the plain refit of a fallback: its morphologies
        # are unshifted and need not be symmetric, so continue it as it was
        # fitted (with symmetry the restart would unshift and symmetrise it,
        # and a 14-peak HSC blend restarted 2 % below its cold fit)
        fit_config = dataclasses.replace(config, symmetric=False)
    joint = len(peaks) * H * W <= config.max_spectrum_cutoff
    if len(peaks) == 0:
        state = None
    elif warm:
        state = _state_from_result(init, peaks, blend.cy, blend.cx, B, H, W)
    else:
        state = blend.initialise(config)
    t_init = time.perf_counter() - t_start

    # padded FFT work buffers; the loop writes only their [:, :H, :W] corner
    scene_buf = blend.conv.padded()
    resid_buf = blend.conv.padded()
    conv_out, grad_out = np.empty_like(scene_buf), np.empty_like(scene_buf)
    bufs = (scene_buf, resid_buf, conv_out, grad_out)
    if state is not None and state.box.shape[0] > 0:
        fit, diverged = _fit_with_fallbacks(blend, state, config, fit_config, warm, refine, joint,
                                            bufs)
        # a continued fallback stays one (so its next restart is plain too)
        fallback = fit.fallback or ("no_symmetry" if fit_config is not config else "")
        if config.residual_sources and not warm:
            blend, fit, fallback = _residual_sources(blend, fit, config, fallback, bufs)
        if config.cmodel_snr > 0:
            fit = _parametric_templates(blend, fit, config, joint, bufs)
    else:
        fit = _empty_fit(blend, state, bufs)
        fallback, diverged = "", False
    return _blend_result(blend, fit, config, warm, fallback, diverged, t_start, t_init, n_input)


@dataclasses.dataclass
class _BlendInputs:
    """One blend's checked inputs as the fit uses them (see :func:`_blend_inputs`)."""

    data: np.ndarray  # (B, H, W) float32, 0 on untrusted pixels
    w: np.ndarray  # fit weights
    good: np.ndarray
    sig: np.ndarray  # per-band noise
    inv_var: np.ndarray
    peaks: np.ndarray  # (N, 2) float
    cy: np.ndarray  # peak pixels
    cx: np.ndarray
    model_psf: np.ndarray
    kern: np.ndarray  # difference kernels
    kres: np.ndarray
    conv: Convolver
    psfs: np.ndarray  # observed PSFs, unit sum
    psf_key: str  # their content hash (memoised filters)
    psf_area: float  # flux / peak of the detection image's PSF (its effective area, pixels)

    def with_peaks(self, peaks):
        """The same blend with another peak list."""
        H, W = self.data.shape[1:]
        peaks, cy, cx = _peak_pixels(peaks, H, W)
        return dataclasses.replace(self, peaks=peaks, cy=cy, cx=cx)

    def initialise(self, config):
        """A cold start of the blend's model (:func:`_initialise`)."""
        H, W = self.data.shape[1:]
        return _initialise(self.data, self.w, self.good, self.sig, self.peaks, self.cy, self.cx,
                           self.model_psf, self.conv, config, H, W, self.psf_area)


def _blend_inputs(images, variance, bad, footprint, psfs, peaks, config):
    """Check and convert the arguments of :func:`deblend_scarlet`.

    Masks and weights, peak pixels, the PSFs normalised to unit sum, and
    the model PSF, difference kernels and convolver (memoised per PSF set).

    Raises
    ------
    InputError
        On arrays of the wrong shapes or PSFs that are not (B, odd, odd).
    """
    images = np.asarray(images, np.float32)
    variance = np.asarray(variance, np.float32)
    if images.ndim != 3 or variance.shape != images.shape:
        raise InputError("images and variance must be (B, H, W) arrays of one shape")
    B, H, W = images.shape
    bad = np.zeros(images.shape, bool) if bad is None else np.asarray(bad, bool)
    footprint = np.ones((H, W), bool) if footprint is None else np.asarray(footprint, bool)
    data, w, good, sig = _good_and_weights(images, variance, bad, footprint, config.use_weights)
    inv_var = 1.0 / sig ** 2
    peaks, cy, cx = _peak_pixels(peaks, H, W)

    psfs = np.asarray(psfs, dtype=np.float64)
    if psfs.ndim != 3 or psfs.shape[0] != B or psfs.shape[1] % 2 == 0 or psfs.shape[2] % 2 == 0:
        raise InputError(f"psfs must be ({B}, odd, odd) images centred on their central pixel, "
                         f"got shape {psfs.shape}")
    psfs = psfs / psfs.sum(axis=(1, 2), keepdims=True)
    model_psf, kern, kres, conv = _psf_setup(psfs, config.model_psf_sigma, (H, W))
    key = hashlib.sha1(np.ascontiguousarray(psfs).tobytes()).hexdigest()
    # the detection image is the inverse-variance weighted band mean, so its PSF is too
    det_psf = np.tensordot(inv_var / inv_var.sum(), psfs, axes=1)
    return _BlendInputs(data, w, good, sig, inv_var, peaks, cy, cx, model_psf, kern, kres, conv,
                        psfs, key, float(1.0 / det_psf.max()))


def _fit_with_fallbacks(blend, state, config, fit_config, warm, refine, joint, bufs):
    """Fit ``state`` and apply the safeguards; returns (the :class:`_Fit` to keep, diverged).

    A diverged fit is replaced (:func:`_fall_back`); one stopped at
    ``max_iter`` past its best iterate returns that iterate; a crowded cold
    fit with symmetry is checked against the fit without it
    (:func:`_check_symmetry_cost`). ``diverged`` says whether the first fit
    diverged.
    """
    # the start again, for the no-symmetry refit should the fit diverge
    # (made afresh when needed: a copy of every start costs 50 us a blend)
    cold = None
    if config.symmetric and not warm:
        def cold():
            return blend.initialise(config)
    conv, data, w, peaks = blend.conv, blend.data, blend.w, blend.peaks
    args = (peaks, conv, data, w, blend.inv_var, joint, bufs)
    fit = _fit(state, fit_config, warm, refine, *args)
    diverged = fit.diverged()
    if diverged:
        fit = _fall_back(fit, cold, config, *args)
    elif not fit.converged and fit.best[0] < fit.loss:
        # stopped at max_iter past its best (contested symmetry can keep
        # a crowded fit oscillating): the best iterate, flagged as such
        fit = _use_best_iterate(fit, _best_iterate_loss(fit, config, conv, data, w, joint, bufs))
    if cold is not None and not fit.fallback and len(peaks) >= SYMMETRY_CHECK_PEAKS:
        fit = _check_symmetry_cost(fit, cold, config, *args)
    return fit, diverged


def _observed_model(state, shift, conv, bufs, H, W, centre=None):
    """The fitted model in the observed frame (B, H, W), a copy.

    With ``centre`` (each component's peak, (K, 2)) each source keeps
    only its symmetric part, judged on its observed-frame light
    (:func:`residual.symmetric_part` on the band-summed, PSF-convolved
    components: the model frame's morphologies fit some noise, and the
    minimum of two noisy values is biased low everywhere on a bright galaxy).
    """
    scene_buf, _, conv_out, _ = bufs
    work = np.empty(_k._largest_box(state.box, 2), np.float32)
    _k.assemble_scene(state.spec, state.morph, state.box, state.off, shift, scene_buf[:, :H, :W],
                      np.zeros((1, 1), np.float32), np.zeros(state.box.shape[0], np.float32), work)
    model = conv.convolve_padded(scene_buf, conv_out)[:, :H, :W].copy()
    if centre is None:
        return model
    rend = _rendered(state, shift, H, W)
    cbox, coff, flats = _observed_components(rend, conv, model.shape)
    K = cbox.shape[0]
    light = np.empty(flats.shape[1], np.float32)
    for k in range(K):
        seg = slice(coff[k], coff[k] + cbox[k, 2] * cbox[k, 3])
        light[seg] = state.spec[k] @ flats[:, seg]
    kept = np.empty_like(light)
    _residual.symmetric_part(light, cbox, coff, np.ones(K, np.float32), _source_runs(state.source),
                             np.asarray(centre, np.float64), H, W, RESIDUAL_MIN_SEP, kept)
    with np.errstate(invalid="ignore", divide="ignore"):
        lost = np.where(light > 0, 1.0 - kept / light, 0.0)
    for k in range(K):
        y0, x0, h, w = cbox[k]
        seg = slice(coff[k], coff[k] + h * w)
        model[:, y0:y0 + h, x0:x0 + w] -= (state.spec[k][:, None] * (lost[seg] * flats[:, seg])).reshape(-1, h, w)
    return model


def _with_new_sources(state, shift, new, model_psf, H, W, sym=None):
    """A warm start: ``state``'s morphologies as rendered (their symmetric
    parts with ``sym``, see :func:`_observed_model`) plus a PSF start
    (flagged ``SOURCE_FOUND_PEAK``) at each pixel of ``new`` (n, 2) int."""
    if sym is not None:
        part = copy.copy(state)
        part.morph = np.empty_like(state.morph)
        _residual.symmetric_part(state.morph, state.box, state.off, state.spec.sum(axis=1),
                                 _source_runs(state.source), 0.5 * sym, H, W, RESIDUAL_START_CORE, part.morph)
        state = part
    rend = _rendered(state, shift, H, W)
    K = state.box.shape[0]
    morphs = [rend.view(k) for k in range(K)]
    boxes = [tuple(b) for b in rend.box]
    ctrs = [tuple(c) for c in state.ctr]
    source = list(state.source)
    n_src = len(state.flags)
    for j, (cy, cx) in enumerate(new):
        m, y0, x0 = _psf_start(model_psf, int(cy), int(cx), H, W)
        morphs.append(m)
        boxes.append((y0, x0, m.shape[0], m.shape[1]))
        ctrs.append((int(cy), int(cx)))
        source.append(n_src + j)
    spec = np.zeros((len(morphs), state.spec.shape[1]), np.float32)
    spec[:K] = state.spec
    flags = np.concatenate([state.flags, np.full(len(new), SOURCE_PSF_INIT | SOURCE_FOUND_PEAK)])
    snr = np.concatenate([state.snr, np.zeros(len(new))])
    return _State(spec, morphs, boxes, ctrs, source, flags, snr)


def _recentre(blend, fit, n, config, joint, bufs):
    """Move the new sources (peaks from ``n`` on) onto the maximum of the
    residual of the other sources' refitted model, and refit once more.

    The search's positions are biased away from the neighbour that absorbed
    the light (its core keeps what it took, see :func:`residual.symmetric_part`);
    once the refit has handed that light over, data minus the other sources
    shows the new source whole. Kept only if the refit fits at least as well.
    """
    H, W = blend.data.shape[1:]
    st = fit.state
    others = copy.copy(st)
    others.spec = np.where((st.source >= n)[:, None], 0, st.spec).astype(np.float32)
    model = _observed_model(others, fit.shift, blend.conv, bufs, H, W)
    sig, _ = _residual.significance(blend.data, model, blend.w, blend.psfs, blend.psf_key)
    peaks = blend.peaks.copy()
    for j in range(n, len(peaks)):
        y, x = _residual.window_maximum(sig, blend.cy[j], blend.cx[j], RESIDUAL_RECENTRE)
        if y is not None:
            peaks[j] = (y, x)
    if np.allclose(peaks, blend.peaks, atol=0.05):
        return blend, fit
    moved = blend.with_peaks(peaks)
    state = _with_new_sources(st, fit.shift, np.zeros((0, 2), np.int64), blend.model_psf, H, W)
    state.ctr[:] = np.c_[moved.cy, moved.cx][state.source]
    state.plan()
    refit, _ = _fit_with_fallbacks(moved, state, config, config, True, False, joint, bufs)
    if refit.loss > fit.loss:
        return blend, fit
    refit.iterations += fit.iterations
    refit.history = fit.history + refit.history
    return moved, refit


def _residual_sources(blend, fit, config, fallback, bufs):
    """Add sources where the fitted blend's residual has a significant maximum, and refit.

    Up to RESIDUAL_ROUNDS rounds of :func:`residual.find` (thresholds
    ``config.residual_thresh`` sigma and ``residual_frac`` of the model's
    significance, at most one new source per nearest peak and round) on the
    current model (with ``residual_symmetric``, on each source's symmetric
    part, and the neighbours restart from theirs); the new sources start as
    the PSF beside the others as fitted (spectra re-solved jointly), the
    blend is refitted from there (warm: proximal-gradient steps) and the
    new sources are moved to their maximum in the residual of the others
    (:func:`_recentre`). A round is kept only
    if the loss falls by more than RESIDUAL_GAIN * thresh^2 per new source
    (a real source of significance S gains about S^2 / 2). Returns the
    blend (its peaks extended by the new ones), the fit and its fallback.
    """
    H, W = blend.data.shape[1:]
    fit_config = dataclasses.replace(config, symmetric=False) if fallback == "no_symmetry" else config
    n_new = 0
    for _ in range(RESIDUAL_ROUNDS):
        if n_new >= RESIDUAL_MAX_NEW:
            break
        st = fit.state
        sym = _symmetry_centres(blend.peaks[st.source], st.ctr) if config.residual_symmetric else None
        model = _observed_model(st, fit.shift, blend.conv, bufs, H, W,
                                None if sym is None else blend.peaks[st.source])
        new, _ = _residual.find(blend.data, model, blend.w, blend.psfs, blend.psf_key, blend.peaks,
                                config.residual_thresh, config.residual_frac, RESIDUAL_MIN_SEP,
                                RESIDUAL_MAX_NEW - n_new)
        if not len(new):
            break
        trial = blend.with_peaks(np.vstack([blend.peaks, new]))
        n = len(blend.peaks)
        joint = len(trial.peaks) * H * W <= config.max_spectrum_cutoff
        # warm: a cold refit lets the PSF-started newcomer take 2x its flux from its host
        # (docs/design.md, "Sources found in the residual")
        state = _with_new_sources(fit.state, fit.shift, np.c_[trial.cy[n:], trial.cx[n:]],
                                  blend.model_psf, H, W, sym)
        if config.set_spectra:
            state.spec[:] = _ls_spectra(state, blend.conv, blend.data, blend.w, joint)
        refit, _ = _fit_with_fallbacks(trial, state, config, fit_config, True, False, joint, bufs)
        if fit.loss - refit.loss <= RESIDUAL_GAIN * config.residual_thresh ** 2 * len(new):
            break
        refit.iterations += fit.iterations
        refit.history = fit.history + refit.history
        if RESIDUAL_RECENTRE:
            trial, refit = _recentre(trial, refit, n, fit_config, joint, bufs)
        blend, fit, n_new = trial, refit, n_new + len(new)
        fallback = refit.fallback or fallback
        fit_config = dataclasses.replace(config, symmetric=False) if fallback == "no_symmetry" else config
    return blend, fit, fallback


def _boxes_meet(boxes, y0, x0, y1, x1):
    """Whether any of ``boxes`` (n, 4) overlaps [y0, y1) x [x0, x1)."""
    return bool(np.any((boxes[:, 0] < y1) & (y0 < boxes[:, 0] + boxes[:, 2])
                       & (boxes[:, 1] < x1) & (x0 < boxes[:, 1] + boxes[:, 3])))


def _parametric_templates(blend, fit, config, joint, bufs):
    """Exponential + de Vaucouleurs templates (:mod:`.cmodel`) for the faint
    uncontested one-component sources (start S/N below ``config.cmodel_snr``).

    Each is fitted to the data minus the other sources' model over its box
    grown by half its size plus CMODEL_MARGIN; it replaces the free
    morphology, on a box that holds the fitted profile, unless that box
    overlaps another source's or its chi^2 over the fit's region exceeds the
    free one's by more than ``config.cmodel_chi2`` (negative: no test). The
    spectra are then re-solved jointly. Returns ``fit`` with the new state
    (unshifted). docs/design.md, "A two-profile parametric template".
    """
    from . import cmodel as _cm  # only runs that ask for it import the profiles

    st = fit.state
    if st is None or st.box.shape[0] == 0:
        return fit
    B, H, W = blend.data.shape
    n_src = len(st.flags)
    counts = np.bincount(st.source, minlength=n_src)
    unc = _uncontested(st)
    elig = [i for i in range(n_src) if counts[i] == 1 and unc[i] and st.snr[i] < config.cmodel_snr]
    if not elig:
        return fit
    rend = _rendered(st, fit.shift, H, W)
    model = _observed_model(st, fit.shift, blend.conv, bufs, H, W)
    cbox, coff, flats = _observed_components(rend, blend.conv, blend.data.shape)
    psf_var = config.model_psf_sigma ** 2
    new = {}
    for i in elig:
        k = int(np.flatnonzero(st.source == i)[0])
        if not np.any(st.spec[k] > 0):
            continue
        y0, x0, h, w = (int(v) for v in rend.box[k])
        # the fit's region and template box: the box grown by half its size
        # plus CMODEL_MARGIN (data the template cannot reach would bias it)
        gy, gx = h // 2 + CMODEL_MARGIN, w // 2 + CMODEL_MARGIN
        ty0, tx0 = max(y0 - gy, 0), max(x0 - gx, 0)
        ty1, tx1 = min(y0 + h + gy, H), min(x0 + w + gx, W)
        ob = rend.box[st.source != i]
        if _boxes_meet(ob, ty0, tx0, ty1, tx1):
            continue  # the template's final box holds this one
        cy0, cx0, cy1, cx1 = ty0, tx0, ty1, tx1
        cb = (cy0, cx0, cy1 - cy0, cx1 - cx0)
        own = np.zeros((B, cb[2], cb[3]))
        a0, b0, hh, ww = (int(v) for v in cbox[k])
        seg = slice(coff[k], coff[k] + hh * ww)
        full = (st.spec[k][:, None] * flats[:, seg]).reshape(B, hh, ww)
        ya, yb = max(a0, cy0), min(a0 + hh, cy1)
        xa, xb = max(b0, cx0), min(b0 + ww, cx1)
        own[:, ya - cy0:yb - cy0, xa - cx0:xb - cx0] = full[:, ya - a0:yb - a0, xa - b0:xb - b0]
        region = (slice(None), slice(cy0, cy1), slice(cx0, cx1))
        wt = blend.w[region]
        target = blend.data[region] - model[region] + own
        chi2_free = float((wt * (target - own) ** 2).sum())
        centre = blend.peaks[i]
        p0 = _cm.start_params(rend.view(k), (y0, x0), centre, psf_var)
        sf = _cm.SourceFit(target, wt, (ty1 - ty0, tx1 - tx0), (ty0, tx0), cb, blend.kern, centre, psf_var)
        p = sf.fit(p0)
        t, obs = sf.observed(p)
        chi2_p = sf.chi2(p)
        if config.cmodel_chi2 >= 0 and chi2_p > chi2_free + config.cmodel_chi2:
            continue
        amp = np.clip(sf.amplitudes(obs), 0, None)
        # the template's box holds the truncated profile (within the blend):
        # the flux is the template's, wings included
        ry, rx = _cm.extent(p, psf_var)
        py, px = centre[0] + p[0], centre[1] + p[1]
        ty0, tx0 = min(ty0, max(int(math.floor(py - ry)), 0)), min(tx0, max(int(math.floor(px - rx)), 0))
        ty1, tx1 = max(ty1, min(int(math.ceil(py + ry)) + 1, H)), max(tx1, min(int(math.ceil(px + rx)) + 1, W))
        # ... and overlaps no other source's box (else the joint spectra
        # re-solve hands its wings' light to and from neighbours: blended i
        # 7.66 -> 7.85 % on field_seeds)
        if _boxes_meet(ob, ty0, tx0, ty1, tx1):
            continue
        t = _cm.render(p, (ty1 - ty0, tx1 - tx0), (ty0, tx0), centre, psf_var)
        mx = float(t.max())
        new[k] = (t / mx, (ty0, tx0, ty1 - ty0, tx1 - tx0), amp * mx)
    if not new:
        return fit
    K = st.box.shape[0]
    morphs = [new[k][0] if k in new else rend.view(k) for k in range(K)]
    boxes = [new[k][1] if k in new else tuple(rend.box[k]) for k in range(K)]
    spec = st.spec.copy()
    for k, v in new.items():
        spec[k] = v[2]
    state = _State(spec, morphs, boxes, st.ctr.copy(), st.source.copy(), st.flags, st.snr)
    tsum, spec_sum = np.zeros((1, 1), np.float32), np.zeros(K, np.float32)
    shift = np.zeros((K, 2), np.float64)
    loss = _finish(state, shift, FINAL_LS_SPECTRA and config.set_spectra, blend.conv, blend.data,
                   blend.w, joint, bufs, tsum, spec_sum)
    fit.state, fit.shift, fit.loss = state, shift, loss
    fit.history.append(-loss)
    return fit


def _empty_fit(blend, state, bufs):
    """The :class:`_Fit` of a blend without components: the loss of an empty model.

    ``state`` (None without peaks, else a start without components) is kept
    so that every peak still gets its (empty) source.
    """
    scene_buf, resid_buf = bufs[0], bufs[1]
    H, W = blend.data.shape[1:]
    scene_buf[:, :H, :W] = 0
    loss = _k.weighted_residual(blend.conv.convolve_padded(scene_buf)[:, :H, :W], blend.data,
                                blend.w, resid_buf[:, :H, :W])
    out = _Fit()
    out.state, out.shift, out.loss, out.history = state, None, loss, [-loss]
    out.converged, out.iterations, out.kept_start = True, 0, False
    out.best, out.fallback = (math.inf, None), ""
    return out


def _blend_result(blend, fit, config, warm, fallback, diverged, t_start, t_init, n_input):
    """The :class:`BlendResult` of a finished fit: trimmed sources, fit figures, flags, extras.

    Peaks from ``n_input`` on were found in the residual (``extra["found_peaks"]``).
    """
    H, W = blend.data.shape[1:]
    state, loss = fit.state, fit.loss
    n_good = int(np.count_nonzero(blend.w))
    sources = _collect(state, None if state is None else _rendered(state, fit.shift, H, W),
                       blend.peaks, blend.cy, blend.cx, H, W)
    for src in sources[n_input:]:
        src.flags |= SOURCE_FOUND_PEAK
    runtime = time.perf_counter() - t_start
    out = BlendResult(
        sources=sources,
        iterations=fit.iterations,
        log_likelihood=float(-loss),
        converged=fit.converged,
        chi2=float(2 * loss / max(n_good, 1)),
        frame="model",
        model_psf=blend.model_psf.astype(np.float32),
        flags=(_models.BLEND_FLAGS["diverged"] if diverged else 0)
        | (_models.BLEND_FLAGS["fallback_" + fallback] if fallback else 0),
        extra={
            "diff_kernels": blend.kern.astype(np.float32),
            "diff_kernel_residual": blend.kres,
            "runtime": runtime,
            "init_runtime": t_init,
            "conv_method": blend.conv.method,
            "n_components": 0 if state is None else int(state.box.shape[0]),
            "logL_history": np.asarray(fit.history),
            "warm_start": warm,
            "warm_start_kept": fit.kept_start,
            "fallback": fallback,
            "config": config.to_json(),
            "found_peaks": blend.peaks[n_input:].copy(),
        },
    )
    if config.shared_gradient and state is not None and config.set_spectra:
        from .gradient import gradient_sums

        out.extra["gradient_sums"] = gradient_sums(_rendered(state, fit.shift, H, W), blend.conv,
                                                   blend.data, blend.w)
    return out


def _collect(state, rend, peaks, cy, cx, H, W):
    """Turn the flat state into SourceResults with trimmed morphology boxes.

    ``rend`` holds the morphologies as rendered (see :func:`_rendered`): the
    stored model is the one that was fitted.
    """
    out = []
    if state is None:
        return out
    for i in range(len(peaks)):
        comps = []
        flags = int(state.flags[i])
        any_flux = False
        for k in np.flatnonzero(state.source == i):
            m = rend.view(k)
            y0, x0 = int(rend.box[k, 0]), int(rend.box[k, 1])
            a, b, c, d = _k.nonzero_bounds(m)
            spec = state.spec[k].astype(np.float32).copy()
            if a < 0 or not np.any(spec > 0):
                mm = np.zeros((1, 1), np.float32)
                y0, x0 = int(cy[i]), int(cx[i])
                spec[:] = 0
            else:
                mm = m[a:b + 1, c:d + 1].copy()
                y0, x0 = y0 + a, x0 + c
                any_flux = True
                # exact peak-1 normalisation (the loop tolerates 1 % drift)
                mx = float(mm.max())
                mm /= mx
                spec *= mx
            comps.append(Component(spectrum=spec, morph=mm, y0=y0, x0=x0,
                                   peak=(float(peaks[i, 0]), float(peaks[i, 1]))))
        if not any_flux:
            flags |= SOURCE_NO_FLUX
        if cy[i] in (0, H - 1) or cx[i] in (0, W - 1):
            flags |= SOURCE_EDGE
        out.append(SourceResult(peak_index=i, components=comps, flags=flags))
    return out

