"""Numba kernels of the scarlet-style deblender.

Everything that touches pixels inside the optimisation loop lives here, so
one iteration is a handful of compiled calls plus two FFT round trips.

Component storage ("flat layout") used by the loop kernels
-----------------------------------------------------------
``spec``  (K, B) float32      spectrum of component k
``morph`` (P,) float32        all morphologies concatenated, row-major
``box``   (K, 4) int64        y0, x0, h, w of each morphology box (blend pixels)
``off``   (K,) int64          offset of component k's pixels in ``morph``
``ctr``   (K, 2) int64        peak pixel (y, x) in blend pixels; always in the box
``sym``   (K, 2) int64        twice the symmetry centre (y, x): the peak to half a pixel
``shift`` (K, 2) float64      sub-pixel shift (dy, dx), |d| < 1, applied when the
                              morphology is rendered into the scene (bilinear); the
                              rendered box is the box grown by one pixel on the
                              side each non-zero shift moves light to (clipped)

All kernels are compiled with ``cache=True``. ``fastmath`` is not used: the
kernels rely on exact comparisons (thresholds, maxima, zero tests) and on
IEEE behaviour of ``sqrt`` for zero second moments.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# --------------------------------------------------------------------------
# Constraints on one morphology (2-D views)
# --------------------------------------------------------------------------


@njit(cache=True)
def _mono_ref(m, y, x, cy, cx, weighted):
    """Reference value of pixel (y, x) from its inward neighbours.

    Inward neighbours are the 8-connected neighbours strictly closer (in
    Euclidean distance) to the peak pixel (cy, cx). The reference is their
    maximum (``weighted`` False) or their mean weighted by the cosine between
    the neighbour step and the inward direction (``weighted`` True); either is
    <= the largest inward neighbour, which is what makes a non-increasing path
    to the peak exist.
    """
    h, w = m.shape
    dy = y - cy
    dx = x - cx
    d2 = dy * dy + dx * dx
    ref = 0.0
    wsum = 0.0
    rnorm = math.sqrt(d2)
    for ey in range(-1, 2):
        yy = y + ey
        if yy < 0 or yy >= h:
            continue
        for ex in range(-1, 2):
            if ey == 0 and ex == 0:
                continue
            xx = x + ex
            if xx < 0 or xx >= w:
                continue
            ny = dy + ey
            nx = dx + ex
            if ny * ny + nx * nx >= d2:
                continue
            v = m[yy, xx]
            if weighted:
                # cosine between step e and the inward unit vector -d/|d|;
                # positive for every strictly-closer neighbour.
                cw = -(ey * dy + ex * dx) / (rnorm * math.sqrt(ey * ey + ex * ex))
                ref += cw * v
                wsum += cw
            elif v > ref:
                ref = v
    if weighted and wsum > 0:
        ref /= wsum
    return ref


@njit(cache=True)
def _ring_order(h, w, cy, cx, out):
    """Write the box-local flat indices of every pixel but the peak into ``out``
    in monotonicity visiting order; return how many were written.

    Order: Chebyshev ring by ring, and inside a ring from the axes towards the
    corners; this visits every pixel after all of its strictly closer
    neighbours (a neighbour one ring further out is always farther, and
    within a ring the closer pixels are those nearer the axis).
    """
    n = 0
    rmax = max(max(cy, h - 1 - cy), max(cx, w - 1 - cx))
    for r in range(1, rmax + 1):
        for k in range(r + 1):
            # the 8 symmetric offsets (+-r, +-k) and (+-k, +-r); pixels of one
            # (r, k) group are never inward neighbours of each other.
            for a in range(2):
                if a == 1 and k == r:
                    break
                ay = r if a == 0 else k
                ax = k if a == 0 else r
                for sy in range(2):
                    if sy == 1 and ay == 0:
                        break
                    y = cy + ay if sy == 0 else cy - ay
                    if y < 0 or y >= h:
                        continue
                    for sx in range(2):
                        if sx == 1 and ax == 0:
                            break
                        x = cx + ax if sx == 0 else cx - ax
                        if x < 0 or x >= w:
                            continue
                        out[n] = y * w + x
                        n += 1
    return n


@njit(cache=True)
def _monotonic_pass(m, cy, cx, weighted, trim, tol_abs, tol_rel):
    """Visit pixels outward from (cy, cx) and cap each at its inward reference.

    Order: that of :func:`_ring_order`, so every pixel is visited after all
    of its strictly closer neighbours. With ``trim``
    a pixel exceeding its reference by more than ``tol_abs + tol_rel * ref``
    (the image rises again: another object's territory) is set to zero
    instead of capped.
    """
    h, w = m.shape
    for y in range(h):
        for x in range(w):
            if m[y, x] < 0:
                m[y, x] = 0.0
    order = np.empty(h * w, np.int64)
    n = _ring_order(h, w, cy, cx, order)
    for t in range(n):
        y = order[t] // w
        x = order[t] - y * w
        ref = _mono_ref(m, y, x, cy, cx, weighted)
        v = m[y, x]
        if v > ref:
            if trim and v > ref + tol_abs + tol_rel * ref:
                m[y, x] = 0.0
            else:
                m[y, x] = ref


@njit(cache=True)
def monotonic_inplace(m, cy, cx, weighted):
    """Project a morphology onto "non-increasing away from the peak".

    Each pixel, visited in order of distance from the peak pixel (cy, cx), is
    capped at the reference value of its inward neighbours (``_mono_ref``).
    Because inward neighbours are final when a pixel is visited, a second
    application changes nothing (idempotent), and every pixel is <= its
    brightest inward neighbour, so from every pixel a non-increasing path
    leads to the peak. Negative values are set to zero first.

    Parameters
    ----------
    m : (h, w) float array, modified in place
    cy, cx : int
        Peak pixel inside the array.
    weighted : bool
        Reference = cosine-weighted mean of inward neighbours instead of their
        maximum (smoother, more restrictive).
    """
    _monotonic_pass(m, cy, cx, weighted, False, 0.0, 0.0)


@njit(cache=True)
def monotonic_trim_inplace(m, cy, cx, weighted, tol_abs, tol_rel):
    """Monotonic projection that cuts a source's start off where the image rises.

    Used to initialise morphologies from the detection image: plain
    projection would let every source claim its neighbours at the saddle
    level (a plateau over the whole blend); here pixels brighter than their
    inward reference by more than ``tol_abs + tol_rel * ref`` are zeroed, so
    each start covers the region reachable from its peak along paths that do
    not climb significantly. The output is monotonic in the same sense as
    :func:`monotonic_inplace`.
    """
    _monotonic_pass(m, cy, cx, weighted, True, tol_abs, tol_rel)


@njit(cache=True)
def symmetric_inplace(m, cy, cx):
    """Euclidean projection onto morphologies symmetric about pixel (cy, cx).

    Each pixel and its 180-degree mirror get their mean; a pixel whose mirror
    falls outside the box is set to zero (outside the box the model is zero,
    so symmetry forces zero there).
    """
    symmetric_half_inplace(m, 2 * cy, 2 * cx, 1.0)


@njit(cache=True)
def symmetric_half_inplace(m, cy2, cx2, strength):
    """:func:`symmetric_inplace` about the half-pixel point (cy2 / 2, cx2 / 2).

    ``strength`` in (0, 1] moves each pixel and its mirror that fraction of
    the way to their mean (1: the projection).

    A source centred between pixels has its mirror pixels on the same grid
    when the centre is a multiple of half a pixel, so the projection stays
    exact; symmetry about the nearest whole pixel instead would be off by up
    to half a pixel and bias the fluxes of compact sources.
    """
    big = 1 << 40
    symmetric_in_blend_inplace(m, cy2, cx2, strength, -big, big, -big, big)


@njit(cache=True)
def symmetric_in_blend_inplace(m, cy2, cx2, strength, ylo, yhi, xlo, xhi):
    """:func:`symmetric_half_inplace` for a box inside a blend.

    Box rows ``ylo <= y < yhi`` and columns ``xlo <= x < xhi`` (box
    coordinates) are inside the blend. A pixel whose mirror is off the blend
    is left free: nothing is known there, and forcing it to zero would cut a
    source near the blend edge in half. A mirror inside the blend but outside
    the box is zero in the model, so the pixel is pulled to zero.
    """
    h, w = m.shape
    for y in range(h):
        yy = cy2 - y
        for x in range(w):
            xx = cx2 - x
            if yy < 0 or yy >= h or xx < 0 or xx >= w:
                if ylo <= yy < yhi and xlo <= xx < xhi:
                    m[y, x] *= 1.0 - strength
            elif y * w + x < yy * w + xx:
                d = 0.5 * strength * (m[yy, xx] - m[y, x])
                m[y, x] += d
                m[yy, xx] -= d


@njit(cache=True)
def _contest_flags(morph, k, box, off, spec_sum, lo, hi, tsum, ratio, flags):
    """flags[i] = 1.0 where pixel i of component k's box is contested, else 0.0.

    The source's own light (components lo..hi-1, band-summed) is accumulated
    on k's box first, one overlap rectangle per component, so the test is a
    flat pass instead of a box search per pixel.
    """
    y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
    for i in range(h * w):
        flags[i] = 0.0
    for j in range(lo, hi):
        ya, yb = max(y0, box[j, 0]), min(y0 + h, box[j, 0] + box[j, 2])
        xa, xb = max(x0, box[j, 1]), min(x0 + w, box[j, 1] + box[j, 3])
        s, oj, wj = spec_sum[j], off[j], box[j, 3]
        for Y in range(ya, yb):
            for X in range(xa, xb):
                flags[(Y - y0) * w + X - x0] += s * morph[oj + (Y - box[j, 0]) * wj + X - box[j, 1]]
    for y in range(h):
        for x in range(w):
            i = y * w + x
            v = flags[i]
            flags[i] = 1.0 if tsum[y0 + y, x0 + x] - v > ratio * v else 0.0


@njit(cache=True)
def symmetric_contested_inplace(morph, k, box, off, spec_sum, lo, hi, cy2, cx2, strength, H, W,
                                tsum, ratio, work):
    """Symmetry of component k only where another source's light competes.

    A pixel is *contested* when the rest of the scene there (``tsum``, the
    band-summed model frame, minus the light of this source's own
    components ``lo..hi-1``, so a bulge does not contest its disk) exceeds
    ``ratio`` times this source's light. A mirror pair with a contested
    pixel is pulled toward its mean, as in :func:`symmetric_half_inplace`
    about (cy2 / 2, cx2 / 2) in box pixels; where the source dominates both
    pixels the pair is left free, so the asymmetric core of a real galaxy
    (or a core a little off its catalogue peak) is not forced. Symmetry is
    what keeps a source from taking a neighbour's light, and that only
    matters where the neighbour has light. Mirrors off the blend leave a
    pixel free; mirrors in the blend but off the box are zero. ``work``
    holds at least the box's pixels (the contest flags, taken before any
    pixel moves: each pixel moves once, at its pair's visit).
    """
    y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
    o = off[k]
    keep = 1.0 - strength
    _contest_flags(morph, k, box, off, spec_sum, lo, hi, tsum, ratio, work)
    for y in range(h):
        yy = cy2 - y
        for x in range(w):
            xx = cx2 - x
            i = y * w + x
            outside = yy < 0 or yy >= h or xx < 0 or xx >= w
            if outside:
                if work[i] != 0.0 and 0 <= y0 + yy < H and 0 <= x0 + xx < W:
                    morph[o + i] *= keep
                continue
            j = yy * w + xx
            if i >= j:
                continue  # each in-box pair once, from its first pixel
            if work[i] == 0.0 and work[j] == 0.0:
                continue
            d = 0.5 * strength * (morph[o + j] - morph[o + i])
            morph[o + i] += d
            morph[o + j] -= d


# the 8 neighbour steps
_NB_DY = np.array([-1, -1, -1, 0, 0, 1, 1, 1], np.int64)
_NB_DX = np.array([-1, 0, 1, -1, 1, -1, 0, 1], np.int64)


@njit(cache=True)
def mono_plan(box, off, ctr, total):
    """Precompute the monotonicity pass of every component box.

    The projection visits the same pixels in the same order with the same
    inward neighbours at every iteration; only the box changes (at resizes).
    This records, per component, the visiting order (box-local flat indices,
    peak excluded, ``h * w - 1`` entries from ``off[k]``) and, per visit,
    the box-local indices of the pixel's inward neighbours inside the box
    (at most 4 of the 8 are strictly closer to the peak; unused slots repeat
    the first, which leaves a maximum unchanged; -1 when there is none), so
    the per-iteration pass (:func:`monotonic_planned`) is a flat loop of
    four loads and a maximum, without geometry tests or branches per
    neighbour.
    """
    order = np.zeros(total, np.int32)
    nbr = np.full((total, 4), -1, np.int32)
    for k in range(box.shape[0]):
        _plan_component(box[k, 2], box[k, 3], ctr[k, 0] - box[k, 0], ctr[k, 1] - box[k, 1],
                        off[k], order, nbr)
    return order, nbr


@njit(cache=True)
def mono_replan(box, off, ctr, total, box_old, off_old, order_old, nbr_old):
    """:func:`mono_plan` after a resize: components whose box did not change
    keep their plan (box-local, so it only moves to the new offset); late in
    a fit most boxes are stable and the plan is most of a resize's cost."""
    order = np.zeros(total, np.int32)
    nbr = np.full((total, 4), -1, np.int32)
    for k in range(box.shape[0]):
        h, w = box[k, 2], box[k, 3]
        if box[k, 0] == box_old[k, 0] and box[k, 1] == box_old[k, 1] and \
                h == box_old[k, 2] and w == box_old[k, 3]:
            o, oo = off[k], off_old[k]
            for t in range(h * w):
                order[o + t] = order_old[oo + t]
                for j in range(4):
                    nbr[o + t, j] = nbr_old[oo + t, j]
        else:
            _plan_component(h, w, ctr[k, 0] - box[k, 0], ctr[k, 1] - box[k, 1], off[k], order, nbr)
    return order, nbr


@njit(cache=True)
def _plan_component(h, w, cy, cx, o, order, nbr):
    """Fill the plan of one (h, w) box with its peak at (cy, cx), from offset o."""
    n = _ring_order(h, w, cy, cx, order[o:o + h * w])
    for t in range(n):
        i = order[o + t]
        y = i // w
        x = i - y * w
        dy = y - cy
        dx = x - cx
        d2 = dy * dy + dx * dx
        c = 0
        for j in range(8):
            yy = y + _NB_DY[j]
            xx = x + _NB_DX[j]
            if yy < 0 or yy >= h or xx < 0 or xx >= w:
                continue
            ny = dy + _NB_DY[j]
            nx = dx + _NB_DX[j]
            if ny * ny + nx * nx < d2:
                nbr[o + t, c] = yy * w + xx
                c += 1
        for j in range(c, 4):
            if c > 0:
                nbr[o + t, j] = nbr[o + t, 0]


@njit(cache=True)
def monotonic_planned(morph, o, h, w, order, nbr):
    """Max-variant monotonic projection of one component using its plan.

    Same result as ``monotonic_inplace(m, cy, cx, False)`` on non-negative
    input (the plan encodes the same order and inward neighbours).
    """
    for t in range(h * w - 1):
        i = order[o + t]
        a = nbr[o + t, 0]
        if a < 0:
            morph[o + i] = 0.0  # no inward neighbour in the box
            continue
        ref = max(max(morph[o + a], morph[o + nbr[o + t, 1]]),
                  max(morph[o + nbr[o + t, 2]], morph[o + nbr[o + t, 3]]))
        if morph[o + i] > ref:
            morph[o + i] = ref


@njit(cache=True)
def symmetric_min_inplace(m, cy, cx):
    """Replace each pixel and its mirror about (cy, cx) by their minimum.

    The SDSS template trick (Lupton; Bosch et al. 2018): light of a
    neighbour has no counterpart on the opposite side of the peak, so the
    minimum removes most of it. Pixels whose mirror is outside the array are
    left unchanged (no information there).
    """
    h, w = m.shape
    for y in range(h):
        yy = 2 * cy - y
        if yy < 0 or yy >= h:
            continue
        for x in range(w):
            xx = 2 * cx - x
            if xx < 0 or xx >= w:
                continue
            if y * w + x < yy * w + xx:
                v = min(m[y, x], m[yy, xx])
                m[y, x] = v
                m[yy, xx] = v


@njit(cache=True)
def nonzero_bounds(m):
    """Inclusive bounds (ymin, ymax, xmin, xmax) of pixels > 0; (-1,-1,-1,-1) if none."""
    h, w = m.shape
    ymin = h
    ymax = -1
    xmin = w
    xmax = -1
    for y in range(h):
        for x in range(w):
            if m[y, x] > 0:
                if y < ymin:
                    ymin = y
                if y > ymax:
                    ymax = y
                if x < xmin:
                    xmin = x
                if x > xmax:
                    xmax = x
    if ymax < 0:
        return -1, -1, -1, -1
    return ymin, ymax, xmin, xmax


# --------------------------------------------------------------------------
# Direct convolution (small kernels) and its adjoint
# --------------------------------------------------------------------------


@njit(cache=True)
def convolve_direct(img, kern, out):
    """'same' zero-padded convolution per band: out_b = img_b * kern_b.

    img, out: (B, H, W); kern: (B, ky, kx) with odd sizes, centred.
    """
    B, H, W = img.shape
    ky, kx = kern.shape[1], kern.shape[2]
    ry, rx = ky // 2, kx // 2
    for b in range(B):
        for y in range(H):
            for x in range(W):
                acc = 0.0
                for i in range(ky):
                    yy = y - (i - ry)
                    if yy < 0 or yy >= H:
                        continue
                    for j in range(kx):
                        xx = x - (j - rx)
                        if xx < 0 or xx >= W:
                            continue
                        acc += kern[b, i, j] * img[b, yy, xx]
                out[b, y, x] = acc


@njit(cache=True)
def correlate_direct(img, kern, out):
    """Adjoint of :func:`convolve_direct` (correlation with the same kernel)."""
    B, H, W = img.shape
    ky, kx = kern.shape[1], kern.shape[2]
    ry, rx = ky // 2, kx // 2
    for b in range(B):
        for y in range(H):
            for x in range(W):
                acc = 0.0
                for i in range(ky):
                    yy = y + (i - ry)
                    if yy < 0 or yy >= H:
                        continue
                    for j in range(kx):
                        xx = x + (j - rx)
                        if xx < 0 or xx >= W:
                            continue
                        acc += kern[b, i, j] * img[b, yy, xx]
                out[b, y, x] = acc


# --------------------------------------------------------------------------
# Loop kernels on the flat component layout
# --------------------------------------------------------------------------


@njit(cache=True)
def assemble_model(spec, morph, box, off, out):
    """Model-frame scene: out[b] = sum_k spec[k, b] * morph_k (placed in its box)."""
    out[:] = 0.0
    for k in range(spec.shape[0]):
        _add_component(out, spec, k, morph, off[k], box[k, 0], box[k, 1], box[k, 2], box[k, 3])


@njit(cache=True)
def _add_component(out, spec, k, src, o, y0, x0, h, w):
    """out[b, box] += spec[k, b] * the (h, w) image at src[o:] (corner y0, x0)."""
    for b in range(spec.shape[1]):
        s = spec[k, b]
        if s == 0.0:
            continue
        for yy in range(h):
            row = o + yy * w
            for xx in range(w):
                out[b, y0 + yy, x0 + xx] += s * src[row + xx]


@njit(cache=True)
def _rendered_box(y0, x0, h, w, dy, dx, H, W):
    """Box (Y0, X0, h2, w2) of a morphology box rendered with shift (dy, dx):
    one pixel more on the side the shift moves toward, clipped to the blend."""
    ya, xa = y0, x0
    yb, xb = y0 + h, x0 + w
    if dy > 0:
        yb += 1
    elif dy < 0:
        ya -= 1
    if dx > 0:
        xb += 1
    elif dx < 0:
        xa -= 1
    ya, xa = max(ya, 0), max(xa, 0)
    yb, xb = min(yb, H), min(xb, W)
    return ya, xa, yb - ya, xb - xa


@njit(cache=True)
def assemble_scene(spec, morph, box, off, shift, scene, tsum, spec_sum, work):
    """The loop's model-frame scene, rendered with the sub-pixel shifts, in one pass.

    Equals :func:`assemble_model` of the :func:`shift_flat` rendering (same
    float32 rendering and summation order). With ``tsum`` of the scene's
    (H, W) shape it also fills the band-summed scene and ``spec_sum`` (each
    component's band-summed spectrum) for contested symmetry; pass a (1, 1)
    ``tsum`` to skip that. ``work``: float32, at least the largest box grown
    by one pixel per side.
    """
    scene[:] = 0.0
    K, B = spec.shape
    H, W = scene.shape[1], scene.shape[2]
    for k in range(K):
        y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
        o = off[k]
        dy, dx = shift[k, 0], shift[k, 1]
        if dy == 0.0 and dx == 0.0:
            _add_component(scene, spec, k, morph, o, y0, x0, h, w)
            continue
        # rendered as shift_flat, into the work buffer
        Y0, X0, h2, w2 = _rendered_box(y0, x0, h, w, dy, dx, H, W)
        for i in range(h2 * w2):
            work[i] = 0.0
        _render_shifted(morph, o, y0, x0, h, w, dy, dx, Y0, X0, h2, w2, work, 0)
        _add_component(scene, spec, k, work, 0, Y0, X0, h2, w2)
    if tsum.shape[0] == H and tsum.shape[1] == W:
        for y in range(H):
            for x in range(W):
                t = scene[0, y, x]
                for b in range(1, B):
                    t += scene[b, y, x]
                tsum[y, x] = t
        for k in range(K):
            t = spec[k, 0]
            for b in range(1, B):
                t += spec[k, b]
            spec_sum[k] = t


@njit(cache=True)
def shifted_boxes(box, shift, H, W):
    """Boxes of the rendered (sub-pixel shifted) morphologies, clipped to the blend."""
    out = box.copy()
    for k in range(box.shape[0]):
        out[k, 0], out[k, 1], out[k, 2], out[k, 3] = _rendered_box(
            box[k, 0], box[k, 1], box[k, 2], box[k, 3], shift[k, 0], shift[k, 1], H, W)
    return out


@njit(cache=True)
def _taps(d):
    """Bilinear taps of a shift d (|d| < 1): offsets (0, sign d), weights (1 - |d|, |d|)."""
    if d >= 0:
        return 1, 1.0 - d, d
    return -1, 1.0 + d, -d


@njit(cache=True)
def _tap(base, i, t, w0, w1, n):
    """Index and weight of tap i (0 or 1) of :func:`_taps` from ``base``; weight 0 off [0, n)."""
    j = base + i * t
    if j < 0 or j >= n:
        return j, 0.0
    return j, (w0 if i == 0 else w1)


@njit(cache=True)
def shift_flat(morph, box, off, shift, box2, off2, out):
    """Render each morphology shifted by (dy, dx): out_k(y, x) = morph_k(y - dy, x - dx).

    Bilinear interpolation, so the rendered morphology stays non-negative and
    its sum is kept except for light moved off the blend. ``box2``/``off2``
    come from :func:`shifted_boxes`. A morphology is symmetric and monotonic
    in its own (pixel-centred) grid; the shift moves its centre to the exact
    sub-pixel peak.
    """
    out[:] = 0.0
    for k in range(box.shape[0]):
        _render_shifted(morph, off[k], box[k, 0], box[k, 1], box[k, 2], box[k, 3], shift[k, 0],
                        shift[k, 1], box2[k, 0], box2[k, 1], box2[k, 2], box2[k, 3], out, off2[k])


@njit(cache=True)
def _render_shifted(morph, o, y0, x0, h, w, dy, dx, Y0, X0, h2, w2, out, o2):
    """Add the (h, w) morphology at ``morph[o:]`` (box corner y0, x0), shifted
    bilinearly by (dy, dx), into the zeroed (h2, w2) rendered box at
    ``out[o2:]`` (corner Y0, X0); taps outside the rendered box are dropped."""
    ty, wy0, wy1 = _taps(dy)
    tx, wx0, wx1 = _taps(dx)
    for yy in range(h):
        for xx in range(w):
            v = morph[o + yy * w + xx]
            if v == 0.0:
                continue
            Y = y0 + yy - Y0
            X = x0 + xx - X0
            for iy in range(2):
                Yt, fy = _tap(Y, iy, ty, wy0, wy1, h2)
                if fy == 0.0:
                    continue
                for ix in range(2):
                    Xt, fx = _tap(X, ix, tx, wx0, wx1, w2)
                    if fx != 0.0:
                        out[o2 + Yt * w2 + Xt] += fy * fx * v


@njit(cache=True)
def unshift_flat(morph, box, off, shift):
    """Invert :func:`shift_flat` in place: each (rendered) morphology becomes the
    one whose bilinear shift by ``shift[k]`` it is, on the same box.

    The shift is separable, ``R[i] = (1 - |d|) M[i] + |d| M[i - sign d]``
    per axis, so each row and column is solved by recursion from the side the
    shift moves away from (where M has nothing before the box). The recursion
    factor |d| / (1 - |d|) is at most 1/3 for the quarter-pixel render shifts,
    so rounding errors die out; tiny negatives from rounding are set to 0.
    A warm start uses this to recover the morphologies its proximal operators
    act on (symmetric in their own pixel grid) from the stored rendered ones.
    """
    for k in range(box.shape[0]):
        h, w = box[k, 2], box[k, 3]
        o = off[k]
        if shift[k, 0] != 0.0:
            for xx in range(w):  # columns
                _unshift_line(morph, o + xx, w, h, shift[k, 0])
        if shift[k, 1] != 0.0:
            for yy in range(h):  # rows
                _unshift_line(morph, o + yy * w, 1, w, shift[k, 1])
        for i in range(h * w):
            if morph[o + i] < 0.0:
                morph[o + i] = 0.0


@njit(cache=True)
def _unshift_line(morph, start, stride, n, d):
    """Invert a bilinear shift by d along one line of n pixels (see :func:`unshift_flat`)."""
    a = abs(d)
    r = a / (1.0 - a)
    prev = 0.0
    for i in range(n):
        j = start + stride * (i if d > 0 else n - 1 - i)
        v = morph[j] / (1.0 - a) - r * prev
        morph[j] = v
        prev = v


@njit(cache=True)
def good_variance_medians(variance, good):
    """(B,) median of each band's variance over its good pixels (NaN where none).

    The same values as ``np.median(variance[b][good[b]])`` (for an even count
    the mean of the two middle values, exact in float32 as in numpy), without
    numpy's per-call overhead (80 us a band on field blends).
    """
    B, H, W = variance.shape
    out = np.empty(B)
    buf = np.empty(H * W, variance.dtype)
    for b in range(B):
        n = 0
        for y in range(H):
            for x in range(W):
                if good[b, y, x]:
                    buf[n] = variance[b, y, x]
                    n += 1
        if n == 0:
            out[b] = np.nan
        else:
            out[b] = np.median(buf[:n])
    return out


@njit(cache=True)
def weighted_residual_split(model, data, weight, out, region):
    """:func:`weighted_residual` plus the part of the loss on the pixels where
    ``region`` (H, W) is True. Returns (loss, loss_in_region)."""
    B, H, W = data.shape
    loss = 0.0
    inside = 0.0
    for b in range(B):
        for y in range(H):
            part = 0.0
            for x in range(W):
                r = model[b, y, x] - data[b, y, x]
                wr = weight[b, y, x] * r
                out[b, y, x] = wr
                q = wr * r
                loss += q
                if region[y, x]:
                    part += q
            inside += part
    return 0.5 * loss, 0.5 * inside


@njit(cache=True)
def boxes_region(box, gy, gx, H, W, out):
    """``out`` (H, W) bool: the union of the boxes, each grown by (gy, gx) per side."""
    out[:] = False
    for k in range(box.shape[0]):
        y0 = max(box[k, 0] - gy, 0)
        y1 = min(box[k, 0] + box[k, 2] + gy, H)
        x0 = max(box[k, 1] - gx, 0)
        x1 = min(box[k, 1] + box[k, 3] + gx, W)
        for y in range(y0, y1):
            for x in range(x0, x1):
                out[y, x] = True


@njit(cache=True)
def weighted_residual(model, data, weight, out):
    """out = weight * (model - data); returns the loss 1/2 sum weight (model - data)^2."""
    B, H, W = data.shape
    loss = 0.0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                r = model[b, y, x] - data[b, y, x]
                wr = weight[b, y, x] * r
                out[b, y, x] = wr
                loss += wr * r
    return 0.5 * loss


@njit(cache=True)
def wing_fill(morph, o, h, w, order, nbr, thr, floor, steep):
    """Give the sub-threshold pixels of one thresholded morphology an extrapolated wing.

    The sparsity threshold cuts a source's profile where it falls below
    ``thr`` (peak = 1), and the light of the cut wing is lost to the model
    (a noise-free exponential disc at peak S/N 4 lost a quarter of its flux).
    Left free, those pixels absorb noise instead; here each takes its inward
    neighbours' largest value times one decay ratio per pixel step, visited
    outward in the monotonicity plan's order, while the wing stays above
    ``floor * thr``; it never exceeds ``thr``. The ratio is
    ``thr ** (steep / r_t)``, ``r_t = sqrt(area / pi)`` of the pixels above
    the threshold: with ``steep`` 1 an exponential continued from the peak
    to the threshold, 2 the edge slope of a Gaussian (most faint sources are
    near the PSF, whose tail the mean slope overestimates). The area is an
    integral of the fit, steadier than the local slope of pixels at 1 sigma.
    """
    n = h * w
    area = 0
    for p in range(o, o + n):
        if morph[p] > 0.0:
            area += 1
    r_t = math.sqrt(area / math.pi)
    ratio = thr ** (steep / r_t) if r_t > 1.0 else thr
    if ratio >= 1.0:
        return
    lo = floor * thr
    for t in range(n - 1):
        i = order[o + t]
        if morph[o + i] > 0.0:
            continue
        a = nbr[o + t, 0]
        if a < 0:
            continue
        ref = max(max(morph[o + a], morph[o + nbr[o + t, 1]]),
                  max(morph[o + nbr[o + t, 2]], morph[o + nbr[o + t, 3]]))
        v = ref * ratio
        if v > thr:
            v = thr
        if v >= lo:
            morph[o + i] = v


@njit(cache=True)
def _prox_component(spec, morph, k, y0, x0, h, w, o, cy, cx, sy2, sx2, H, W, inv_var, bg_thresh, wing,
                    monotonic, weighted, sym_strength, order, nbr, tsum, contest, box, off, spec_sum, sib,
                    work):
    """Sparsity, symmetry and monotonicity of component k (positivity done by caller).

    The sparsity threshold is ``bg_thresh`` noise sigmas expressed in
    morphology units: a pixel of component k is measured with noise
    ``1 / sqrt(sum_b spec_kb^2 / sigma_b^2)``. The peak pixel is exempt so a
    faint source keeps at least a point-like core instead of vanishing.
    With ``wing[k, 0]`` > 0 the cut pixels get an extrapolated wing down to
    ``wing[k, 0]`` times the threshold, decaying ``wing[k, 1]`` times as
    fast as the mean slope (:func:`wing_fill`).
    ``sym_strength`` in [0, 1] pulls pixel pairs toward symmetry about
    (sy2 / 2, sx2 / 2); 0 is off. ``contest`` holds one ratio per component:
    >= 0 applies symmetry only to contested pairs, < 0 over the whole box.
    (H, W) is the blend's shape.
    """
    B = spec.shape[1]
    m = morph[o:o + h * w].reshape(h, w)
    ly = cy - y0
    lx = cx - x0
    if bg_thresh > 0:
        sn = 0.0
        for b in range(B):
            sn += spec[k, b] * spec[k, b] * inv_var[b]
        if sn > 0:
            thr = bg_thresh / math.sqrt(sn)
            for yy in range(h):
                for xx in range(w):
                    if m[yy, xx] < thr and not (yy == ly and xx == lx):
                        m[yy, xx] = 0.0
            if wing[k, 0] > 0 and monotonic and not weighted:
                wing_fill(morph, o, h, w, order, nbr, thr, wing[k, 0], wing[k, 1])
    if sym_strength > 0 and contest[k] >= 0:
        symmetric_contested_inplace(morph, k, box, off, spec_sum, sib[k, 0], sib[k, 1], sy2 - 2 * y0,
                                    sx2 - 2 * x0, sym_strength, H, W, tsum, contest[k], work)
    elif sym_strength > 0:
        symmetric_in_blend_inplace(m, sy2 - 2 * y0, sx2 - 2 * x0, sym_strength,
                                   -y0, H - y0, -x0, W - x0)
    if monotonic:
        if weighted:
            monotonic_inplace(m, ly, lx, True)
        else:
            monotonic_planned(morph, o, h, w, order, nbr)


@njit(cache=True)
def _normalise_component(spec, morph, k, o, n, mom_s, mom_m, grad_like):
    """Rescale so the morphology maximum is 1 (spectrum carries the amplitude).

    The factorisation is degenerate under s -> c s, m -> m / c; fixing the
    peak keeps the morphology step size meaningful. Optimiser state is
    rescaled consistently. With ``grad_like`` (Adam moments) index 0 of the
    state scales like the gradient and the others like its square: the
    gradient w.r.t. the morphology is proportional to the spectrum and vice
    versa. Otherwise (FISTA's previous iterate, index 0 only) the state scales
    like the parameter itself.
    Returns False when the component has no flux left.
    """
    mx = 0.0
    for p in range(o, o + n):
        if morph[p] > mx:
            mx = morph[p]
    B = spec.shape[1]
    if mx <= 0.0:
        for b in range(B):
            spec[k, b] = 0.0
        return False
    if abs(mx - 1.0) < 1e-2:
        # within 1 %: skip the rescale (four passes over the box); the
        # exact peak-1 normalisation is applied to the output
        return True
    inv = 1.0 / mx
    for p in range(o, o + n):
        morph[p] *= inv
    for b in range(B):
        spec[k, b] *= mx
    fm = mx if grad_like else inv
    fs = inv if grad_like else mx
    for i in range(mom_m.shape[0]):
        f = fm if i == 0 else fm * fm
        for p in range(o, o + n):
            mom_m[i, p] *= f
    for i in range(mom_s.shape[0]):
        f = fs if i == 0 else fs * fs
        for b in range(B):
            mom_s[i, k, b] *= f
    return True


@njit(cache=True)
def _component_gradient(spec, morph, k, y0, x0, h, w, o, G, gm, gs, dy, dx, work):
    """Gradients of the loss for component k from the model-frame gradient G.

    d loss / d morph_k = sum_b spec_kb (T^T G_b)[box]; d loss / d spec_kb =
    <(T^T G_b)[box], morph_k> = <G_b, T morph_k>, with T the bilinear shift by
    (dy, dx) of :func:`shift_flat` (the identity when both are 0); taps off the
    blend carry no light, as in the forward shift. T is the same in every
    band, so with a shift the bands are summed first (``S = sum_b spec_kb
    G_b`` on the rendered box) and T^T is applied once, and the spectrum
    gradient takes the rendered morphology ``T morph_k``: two tap passes per
    pixel instead of two per pixel and band. ``work`` holds at least
    ``2 (h + 1) (w + 1)`` floats.
    """
    B = spec.shape[1]
    for b in range(B):
        gs[b] = 0.0
    if dy == 0.0 and dx == 0.0:
        for yy in range(h):
            for xx in range(w):
                p = o + yy * w + xx
                mv = morph[p]
                g = 0.0
                for b in range(B):
                    gv = G[b, y0 + yy, x0 + xx]
                    g += spec[k, b] * gv
                    gs[b] += gv * mv
                gm[yy * w + xx] = g
        return
    H, W = G.shape[1], G.shape[2]
    ty, wy0, wy1 = _taps(dy)
    tx, wx0, wx1 = _taps(dx)
    # every in-blend tap lands in the rendered box
    ya, xa, h2, w2 = _rendered_box(y0, x0, h, w, dy, dx, H, W)
    yb, xb = ya + h2, xa + w2
    S = work[:h2 * w2]
    R = work[h2 * w2:2 * h2 * w2]
    for Y in range(ya, yb):
        for X in range(xa, xb):
            s = 0.0
            for b in range(B):
                s += spec[k, b] * G[b, Y, X]
            q = (Y - ya) * w2 + X - xa
            S[q] = s
            R[q] = 0.0
    for yy in range(h):
        for xx in range(w):
            mv = morph[o + yy * w + xx]
            g = 0.0
            for iy in range(2):
                Y, fy = _tap(y0 + yy, iy, ty, wy0, wy1, H)
                if fy == 0.0:
                    continue
                for ix in range(2):
                    X, fx = _tap(x0 + xx, ix, tx, wx0, wx1, W)
                    if fx != 0.0:
                        q = (Y - ya) * w2 + X - xa
                        f = fy * fx
                        g += f * S[q]
                        R[q] += f * mv
            gm[yy * w + xx] = g
    for Y in range(ya, yb):
        for X in range(xa, xb):
            r = R[(Y - ya) * w2 + X - xa]
            if r != 0.0:
                for b in range(B):
                    gs[b] += r * G[b, Y, X]


@njit(cache=True)
def _largest_box(box, grow=0):
    """Pixels in the largest component box, each side grown by ``grow`` (size of a work buffer)."""
    maxn = 0
    for k in range(box.shape[0]):
        n = (box[k, 2] + grow) * (box[k, 3] + grow)
        if n > maxn:
            maxn = n
    return maxn


@njit(cache=True)
def _brightest_band(spec, k):
    """Largest spectrum entry of component k (0 if none is positive): a dead
    component (all zero) is skipped by the optimiser steps."""
    smax = 0.0
    for b in range(spec.shape[1]):
        if spec[k, b] > smax:
            smax = spec[k, b]
    return smax


@njit(cache=True)
def adaprox_step(spec, morph, box, off, ctr, sym, shift, G, it, b1, b2, step_m, rel_m, step_s,
                 inv_var, bg_thresh, wing, mom_s, mom_m, monotonic, weighted, sym_strength, order, nbr,
                 tsum, contest, spec_sum, sib):
    """One proximal AMSGrad step for every component (in place).

    Implements the adaptive proximal update of Melchior, Joseph & Moolekamp
    (2019): bias-corrected first moment m, second moment v, AMSGrad keeps the
    running maximum v_hat of the bias-corrected v, then
    x <- prox(x - alpha * m_hat / sqrt(v_hat)). The prox is taken in the
    Euclidean metric (one pass, no inner loop), as in the paper's practical
    variant. Per-parameter step sizes alpha: for a morphology pixel
    ``max(step_m * mean(morph_k), rel_m * pixel)`` -- a fraction of the
    typical pixel of the box, so faint pixels are not kicked by a sizeable
    part of the peak on Adam's first, sign-like steps, and a fraction of the
    pixel itself so bright cores adapt quickly; for spectra
    ``step_s * spec_kb`` (relative, floored at 1 % of the component's
    brightest band so a band at zero can come back).

    mom_s: (3, K, B) and mom_m: (3, P) hold m, v, v_hat.
    Returns the number of components that still have flux.
    """
    K, B = spec.shape
    bc1 = 1.0 - b1 ** it
    bc2 = 1.0 - b2 ** it
    eps = 1e-30
    gm = np.empty(_largest_box(box), np.float64)
    work = np.empty(2 * _largest_box(box, 1), np.float64)
    gs = np.empty(B, np.float64)
    alive = 0
    for k in range(K):
        y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
        o = off[k]
        n = h * w
        smax = _brightest_band(spec, k)
        if smax <= 0.0:
            continue
        # both gradients at the current point (the spectrum is updated after
        # the morphology, from the gradient taken before either moved)
        _component_gradient(spec, morph, k, y0, x0, h, w, o, G, gm, gs, shift[k, 0], shift[k, 1], work)
        # morphology pixels (step sizes: see docstring)
        msum = 0.0
        for i in range(n):
            msum += morph[o + i]
        mstep = step_m * msum / n
        for i in range(n):
            p = o + i
            mv = morph[p]
            g = gm[i]
            a = b1 * mom_m[0, p] + (1.0 - b1) * g
            v = b2 * mom_m[1, p] + (1.0 - b2) * g * g
            mom_m[0, p] = a
            mom_m[1, p] = v
            vh = mom_m[2, p]
            vb = v / bc2
            if vb > vh:
                vh = vb
                mom_m[2, p] = vh
            alpha = mstep
            if rel_m * mv > alpha:
                alpha = rel_m * mv
            x = mv - alpha * (a / bc1) / (math.sqrt(vh) + eps)
            morph[p] = x if x > 0.0 else 0.0
        # spectrum
        floor = 0.01 * smax
        for b in range(B):
            g = gs[b]
            a = b1 * mom_s[0, k, b] + (1.0 - b1) * g
            v = b2 * mom_s[1, k, b] + (1.0 - b2) * g * g
            mom_s[0, k, b] = a
            mom_s[1, k, b] = v
            vh = mom_s[2, k, b]
            vb = v / bc2
            if vb > vh:
                vh = vb
                mom_s[2, k, b] = vh
            s = spec[k, b]
            alpha = step_s * (s if s > floor else floor)
            x = s - alpha * (a / bc1) / (math.sqrt(vh) + eps)
            spec[k, b] = x if x > 0.0 else 0.0
        _prox_component(spec, morph, k, y0, x0, h, w, o, ctr[k, 0], ctr[k, 1], sym[k, 0], sym[k, 1],
                        G.shape[1], G.shape[2],
                        inv_var, bg_thresh, wing, monotonic, weighted, sym_strength, order, nbr, tsum, contest,
                        box, off, spec_sum, sib, work)
        if _normalise_component(spec, morph, k, o, n, mom_s, mom_m, True):
            alive += 1
    return alive


@njit(cache=True)
def fista_step(spec, morph, box, off, ctr, sym, shift, G, beta, kappa, nover, inv_var, bg_thresh, wing,
               prev_s, prev_m, monotonic, weighted, sym_strength, order, nbr, tsum, contest,
               spec_sum, sib):
    """One accelerated proximal gradient (FISTA) step for every component.

    ``spec``/``morph`` hold the extrapolated point y at which G was computed;
    ``prev_s``/``prev_m`` (shape (1, ...)) the previous iterate x_{t-1}. Step
    sizes are 1/L per block from Lipschitz bounds of the block gradient:
    L_morph,k = sum_b spec_kb^2 kappa_b and L_spec,kb = kappa_b sum morph_k^2,
    kappa_b = max(weight_b) * max|K_hat_b|^2 (the operator norm of the
    weighted, convolved model). On exit spec/morph hold the next extrapolated
    point x_t + beta (x_t - x_{t-1}) and prev_* hold x_t.

    All blocks move at once from the same gradient, so the joint Hessian can
    exceed the block bounds by the coupling to overlapping components and the
    spectrum-morphology cross terms; each block's L is multiplied by
    ``2 * nover[k]`` (components whose boxes overlap k's, itself included), a
    Gershgorin-style bound that keeps the joint step stable.
    """
    K, B = spec.shape
    gm = np.empty(_largest_box(box), np.float64)
    work = np.empty(2 * _largest_box(box, 1), np.float64)
    gs = np.empty(B, np.float64)
    alive = 0
    for k in range(K):
        y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
        o = off[k]
        n = h * w
        smax = _brightest_band(spec, k)
        if smax <= 0.0:
            continue
        _component_gradient(spec, morph, k, y0, x0, h, w, o, G, gm, gs, shift[k, 0], shift[k, 1], work)
        fac = 2.0 * nover[k]
        lm = 0.0
        for b in range(B):
            lm += spec[k, b] * spec[k, b] * kappa[b]
        lm *= fac
        m2 = 0.0
        for i in range(n):
            m2 += morph[o + i] * morph[o + i]
        if lm > 0:
            for i in range(n):
                x = morph[o + i] - gm[i] / lm
                morph[o + i] = x if x > 0.0 else 0.0
        for b in range(B):
            ls = kappa[b] * m2 * fac
            if ls > 0:
                x = spec[k, b] - gs[b] / ls
                spec[k, b] = x if x > 0.0 else 0.0
        _prox_component(spec, morph, k, y0, x0, h, w, o, ctr[k, 0], ctr[k, 1], sym[k, 0], sym[k, 1],
                        G.shape[1], G.shape[2],
                        inv_var, bg_thresh, wing, monotonic, weighted, sym_strength, order, nbr, tsum, contest,
                        box, off, spec_sum, sib, work)
        # normalise x_t; rescale x_{t-1} the same way so the momentum term
        # x_t - x_{t-1} compares like with like.
        ok = _normalise_component(spec, morph, k, o, n, prev_s, prev_m, False)
        if ok:
            alive += 1
        for i in range(n):
            p = o + i
            x = morph[p]
            y = x + beta * (x - prev_m[0, p])
            prev_m[0, p] = x
            morph[p] = y if y > 0.0 else 0.0
        for b in range(B):
            x = spec[k, b]
            y = x + beta * (x - prev_s[0, k, b])
            prev_s[0, k, b] = x
            spec[k, b] = y if y > 0.0 else 0.0
    return alive


@njit(cache=True)
def remap_flat(old, box_old, off_old, box_new, off_new, total_new, fill_max):
    """Copy per-component data of shape (S, P_old) into new boxes.

    ``old`` is (S, P_old) so optimiser states travel with the morphologies.
    Pixels new to a box get 0, except in rows s with ``fill_max[s]``, where
    they get the maximum of that row over the component's old box: for Adam's
    second moments this makes the first steps of freshly added pixels small
    (a zero second moment would turn their first step into a full-size
    sign step and kick the fit at every box growth).
    """
    S = old.shape[0]
    K = box_old.shape[0]
    new = np.zeros((S, total_new), old.dtype)
    for k in range(K):
        oy0, ox0, oh, ow = box_old[k, 0], box_old[k, 1], box_old[k, 2], box_old[k, 3]
        ny0, nx0, nh, nw = box_new[k, 0], box_new[k, 1], box_new[k, 2], box_new[k, 3]
        ya = max(oy0, ny0)
        yb = min(oy0 + oh, ny0 + nh)
        xa = max(ox0, nx0)
        xb = min(ox0 + ow, nx0 + nw)
        for s in range(S):
            if fill_max[s]:
                mx = 0.0
                for p in range(off_old[k], off_old[k] + oh * ow):
                    if old[s, p] > mx:
                        mx = old[s, p]
                for p in range(off_new[k], off_new[k] + nh * nw):
                    new[s, p] = mx
            for y in range(ya, yb):
                for x in range(xa, xb):
                    new[s, off_new[k] + (y - ny0) * nw + (x - nx0)] = \
                        old[s, off_old[k] + (y - oy0) * ow + (x - ox0)]
    return new


@njit(cache=True)
def resized_boxes(morph, box, off, ctr, sym, symmetric, H, W, margin, grow_min, grow_frac):
    """New component boxes: shrink to the non-zero pixels, grow edges with flux.

    A side whose edge row/column carries flux moves out by
    ``max(grow_min, grow_frac * side)`` pixels; any other side moves to the
    non-zero region plus ``margin`` zero pixels (so the next check does not
    see flux on the edge and grow again). Boxes always contain the peak pixel
    and stay inside the (H, W) blend; a component without flux keeps only its
    peak pixel. With ``symmetric`` each box is widened to be symmetric about
    its component's symmetry centre (``sym`` / 2) before clipping, so the
    symmetry operator never cuts a source whose box grew on one side only.
    Returns (new_box, changed).
    """
    K = box.shape[0]
    new = np.empty_like(box)
    changed = False
    for k in range(K):
        y0, x0, h, w = box[k, 0], box[k, 1], box[k, 2], box[k, 3]
        m = morph[off[k]:off[k] + h * w].reshape(h, w)
        a, b, c, d = nonzero_bounds(m)
        cy, cx = ctr[k, 0], ctr[k, 1]
        if b < 0:
            top, bot, left, right = cy, cy, cx, cx
        else:
            gy = max(grow_min, int(grow_frac * h))
            gx = max(grow_min, int(grow_frac * w))
            top = y0 - gy if a == 0 else y0 + a - margin
            bot = y0 + h - 1 + gy if b == h - 1 else y0 + b + margin
            left = x0 - gx if c == 0 else x0 + c - margin
            right = x0 + w - 1 + gx if d == w - 1 else x0 + d + margin
            top = min(top, cy)
            bot = max(bot, cy)
            left = min(left, cx)
            right = max(right, cx)
            if symmetric:
                top, bot = min(top, sym[k, 0] - bot), max(bot, sym[k, 0] - top)
                left, right = min(left, sym[k, 1] - right), max(right, sym[k, 1] - left)
        top = min(max(top, 0), H - 1)
        left = min(max(left, 0), W - 1)
        bot = min(max(bot, 0), H - 1)
        right = min(max(right, 0), W - 1)
        new[k, 0] = top
        new[k, 1] = left
        new[k, 2] = bot - top + 1
        new[k, 3] = right - left + 1
        for i in range(4):
            if new[k, i] != box[k, i]:
                changed = True
    return new, changed


# --------------------------------------------------------------------------
# Least-squares spectra: normal equations from overlapping boxes
# --------------------------------------------------------------------------


@njit(cache=True)
def place_boxes(morph, box, off, idx, origin, out):
    """Zero ``out`` (n, Fy, Fx); put morphology idx[i] into frame i.

    Frame pixel (0, 0) is blend pixel ``origin[k]`` (all zeros: the blend's own
    grid; box corner minus half a kernel: a component's local frame).
    """
    out[:] = 0.0
    for i in range(idx.shape[0]):
        k = idx[i]
        y0, x0 = box[k, 0] - origin[k, 0], box[k, 1] - origin[k, 1]
        h, w = box[k, 2], box[k, 3]
        for yy in range(h):
            for xx in range(w):
                out[i, y0 + yy, x0 + xx] = morph[off[k] + yy * w + xx]


@njit(cache=True)
def extract_boxes(frames, idx, origin, cbox, coff, flats):
    """Copy component idx[i]'s box ``cbox`` out of frame (b, i) into ``flats[b]`` (zero off-frame).

    frames: (B, n, Fy, Fx), one convolved frame per band and component;
    flats: (B, total). ``origin`` as for :func:`place_boxes`.
    """
    B, Fy, Fx = frames.shape[0], frames.shape[2], frames.shape[3]
    for i in range(idx.shape[0]):
        k = idx[i]
        y0, x0 = cbox[k, 0] - origin[k, 0], cbox[k, 1] - origin[k, 1]
        h, w = cbox[k, 2], cbox[k, 3]
        for b in range(B):
            for yy in range(h):
                y = y0 + yy
                for xx in range(w):
                    x = x0 + xx
                    v = 0.0
                    if 0 <= y < Fy and 0 <= x < Fx:
                        v = frames[b, i, y, x]
                    flats[b, coff[k] + yy * w + xx] = v


@njit(cache=True)
def normal_equations(conv, cbox, coff, data, weight, group):
    """Weighted normal equations of every band for the component amplitudes.

    conv: (B, total) flat convolved component images, component k occupying
    ``cbox[k]`` (y0, x0, h, w; may extend past the blend box, the excess is
    ignored) at offset ``coff[k]``. Only overlapping pairs are visited, so
    memory and time scale with the summed box areas, never with K x H x W.
    Only pairs with equal ``group`` labels are coupled (all zeros: the joint
    system; source ids: independent per-source blocks for very large blends).

    Returns A (B, K, K) with A_bkl = sum w_b c_bk c_bl and r (B, K) with
    r_bk = sum w_b d_b c_bk.
    """
    K = cbox.shape[0]
    B, H, W = data.shape
    A = np.zeros((B, K, K))
    r = np.zeros((B, K))
    for k in range(K):
        ky0, kx0, kh, kw = cbox[k, 0], cbox[k, 1], cbox[k, 2], cbox[k, 3]
        ya = max(ky0, 0)
        yb = min(ky0 + kh, H)
        xa = max(kx0, 0)
        xb = min(kx0 + kw, W)
        for b in range(B):
            acc = 0.0
            acd = 0.0
            for y in range(ya, yb):
                for x in range(xa, xb):
                    c = conv[b, coff[k] + (y - ky0) * kw + (x - kx0)]
                    wc = weight[b, y, x] * c
                    acc += wc * c
                    acd += wc * data[b, y, x]
            A[b, k, k] = acc
            r[b, k] = acd
        for l in range(k + 1, K):
            if group[l] != group[k]:
                continue
            ly0, lx0, lh, lw = cbox[l, 0], cbox[l, 1], cbox[l, 2], cbox[l, 3]
            y1 = max(ya, ly0)
            y2 = min(yb, ly0 + lh)
            x1 = max(xa, lx0)
            x2 = min(xb, lx0 + lw)
            if y1 >= y2 or x1 >= x2:
                continue
            for b in range(B):
                acc = 0.0
                for y in range(y1, y2):
                    for x in range(x1, x2):
                        acc += (weight[b, y, x] * conv[b, coff[k] + (y - ky0) * kw + (x - kx0)]
                                * conv[b, coff[l] + (y - ly0) * lw + (x - lx0)])
                A[b, k, l] = acc
                A[b, l, k] = acc
    return A, r


@njit(cache=True)
def _ridge_solve(A, r, idx, out):
    """Solve (A[idx, idx] + ridge I) x = r[idx] by Cholesky into ``out[:n]``.

    A is a weighted Gram matrix (positive semi-definite); the ridge, 1e-12 of
    the mean diagonal, keeps nearly identical components solvable without
    moving an exact solution. Should a pivot still vanish in rounding, the
    diagonal solve r / diag is taken instead.
    """
    n = idx.shape[0]
    tr = 0.0
    for i in range(n):
        tr += A[idx[i], idx[i]]
    ridge = 1e-12 * tr / n
    L = np.zeros((n, n))
    ok = True
    for j in range(n):
        s = A[idx[j], idx[j]] + ridge
        for q in range(j):
            s -= L[j, q] * L[j, q]
        if not s > 0.0:
            ok = False
            break
        d = math.sqrt(s)
        L[j, j] = d
        for i in range(j + 1, n):
            t = A[idx[i], idx[j]]
            for q in range(j):
                t -= L[i, q] * L[j, q]
            L[i, j] = t / d
    if not ok:
        for i in range(n):
            out[i] = r[idx[i]] / A[idx[i], idx[i]]
        return
    for i in range(n):  # L y = r
        t = r[idx[i]]
        for q in range(i):
            t -= L[i, q] * out[q]
        out[i] = t / L[i, i]
    for i in range(n - 1, -1, -1):  # L^T x = y
        t = out[i]
        for q in range(i + 1, n):
            t -= L[q, i] * out[q]
        out[i] = t / L[i, i]


@njit(cache=True)
def solve_spectra(A, r, group):
    """Non-negative least-squares amplitudes from :func:`normal_equations`.

    Per band and per ``group`` label (the coupled blocks), components with a
    non-positive diagonal (no weighted pixels) get 0; the rest are solved,
    those that come out negative are fixed at zero and the others re-solved,
    for at most five passes -- enough for the near-diagonal systems of
    deblending, and an exact solution stays exact. Returns (K, B) float32.
    """
    B, K = r.shape
    spec = np.zeros((K, B), np.float32)
    labels = np.unique(group)
    members = np.empty(K, np.int64)
    active = np.empty(K, np.bool_)
    sol = np.empty(K)
    for b in range(B):
        for lab in labels:
            m = 0
            for k in range(K):
                if group[k] == lab:
                    members[m] = k
                    active[m] = A[b, k, k] > 0.0
                    m += 1
            idx = np.empty(0, np.int64)
            n = 0
            for _ in range(5):
                idx = np.empty(m, np.int64)
                n = 0
                for i in range(m):
                    if active[i]:
                        idx[n] = members[i]
                        n += 1
                if n == 0:
                    break
                idx = idx[:n]
                _ridge_solve(A[b], r[b], idx, sol)
                neg = False
                j = 0
                for i in range(m):
                    if active[i]:
                        if sol[j] < 0.0:
                            active[i] = False
                            neg = True
                        j += 1
                if not neg:
                    break
            # the last solve's values, negatives clipped (the rest stay 0)
            for i in range(n):
                v = sol[i]
                spec[idx[i], b] = v if v > 0.0 else 0.0
    return spec


@njit(cache=True)
def spectra_objective(A, r, spec, b):
    """``1/2 s^T A_b s - r_b^T s`` of band b's amplitudes ``spec[:, b]``: the
    weighted squared residual up to a constant (so two candidate spectra for
    the same morphologies compare by it)."""
    K = r.shape[1]
    f = 0.0
    for k in range(K):
        sk = float(spec[k, b])
        if sk == 0.0:
            continue
        q = 0.0
        for l in range(K):
            q += A[b, k, l] * spec[l, b]
        f += sk * (0.5 * q - r[b, k])
    return f


@njit(cache=True)
def keep_better_spectra(A, r, new, old):
    """Per band, ``old``'s amplitudes wherever they fit better than ``new``'s (in place).

    The active-set solve stops after a few passes and clips what is still
    negative, which on a large coupled system can leave a worse fit than the
    spectra the optimiser already had; a spectrum update must never raise
    the loss. Returns the number of bands kept from ``old``.
    """
    kept = 0
    for b in range(r.shape[0]):
        if spectra_objective(A, r, old, b) < spectra_objective(A, r, new, b):
            new[:, b] = old[:, b]
            kept += 1
    return kept


@njit(cache=True)
def solve_spectra_blocks(A, r, group, start, sweeps, tol):
    """Non-negative amplitudes of the coupled system by block Gauss-Seidel.

    For blends too large for the joint active-set solve: starting from
    ``start`` (K, B), each ``group`` (a source: its bulge and disk are
    nearly collinear, so they are solved together) is in turn solved
    exactly (the active-set rule of :func:`solve_spectra` on its own block)
    against the data minus every other component's current model. Each
    block solve minimises the loss over its block with the rest fixed, so
    the loss never rises -- unlike solving each source against the whole
    data, which lets every source of a shared region claim all of its light
    (a 64-peak low-surface-brightness blend ended with 1.4x the image flux).
    Sweeps stop when no amplitude moves by more than ``tol`` of the band's
    largest, or after ``sweeps``. Cost per sweep: K^2 per band.
    Returns (K, B) float32.
    """
    B, K = r.shape
    spec = np.zeros((K, B), np.float32)
    labels = np.unique(group)
    G = labels.shape[0]
    # members of each group, contiguous
    order = np.argsort(group, kind="mergesort")
    start_of = np.zeros(G + 1, np.int64)
    gi = 0
    for j in range(K):
        while group[order[j]] != labels[gi]:
            gi += 1
            start_of[gi] = j
    for g in range(gi + 1, G + 1):
        start_of[g] = K
    s = np.empty(K)
    q = np.empty(K)        # A s
    rhs = np.empty(K)
    sub = np.empty(K)
    active = np.empty(K, np.bool_)
    loc = np.empty(K, np.int64)
    for b in range(B):
        for k in range(K):
            s[k] = max(float(start[k, b]), 0.0) if A[b, k, k] > 0.0 else 0.0
        for k in range(K):
            t = 0.0
            for l in range(K):
                t += A[b, k, l] * s[l]
            q[k] = t
        for _ in range(sweeps):
            moved = 0.0
            smax = 0.0
            for g in range(G):
                lo, hi = start_of[g], start_of[g + 1]
                m = hi - lo
                # block right-hand side: r_g - sum_{l outside g} A_gl s_l
                for i in range(m):
                    k = order[lo + i]
                    t = q[k]
                    for j in range(m):
                        t -= A[b, k, order[lo + j]] * s[order[lo + j]]
                    rhs[k] = r[b, k] - t
                    active[i] = A[b, k, k] > 0.0
                n = 0
                for _p in range(m + 1):
                    n = 0
                    for i in range(m):
                        if active[i]:
                            loc[n] = order[lo + i]
                            n += 1
                    if n == 0:
                        break
                    _ridge_solve(A[b], rhs, loc[:n], sub)
                    neg = False
                    j = 0
                    for i in range(m):
                        if active[i]:
                            if sub[j] < 0.0:
                                active[i] = False
                                neg = True
                            j += 1
                    if not neg:
                        break
                # new block values (inactive ones 0), update q = A s
                j = 0
                for i in range(m):
                    k = order[lo + i]
                    v = 0.0
                    if active[i] and n > 0:
                        v = sub[j] if sub[j] > 0.0 else 0.0
                        j += 1
                    d = v - s[k]
                    if d != 0.0:
                        s[k] = v
                        for l in range(K):
                            q[l] += A[b, l, k] * d
                        if abs(d) > moved:
                            moved = abs(d)
                    if v > smax:
                        smax = v
            if moved <= tol * smax:
                break
        for k in range(K):
            spec[k, b] = s[k]
    return spec
