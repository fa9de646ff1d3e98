"""Sources the detection missed, found in a fitted blend's residual.

Detection cannot separate a faint source with no maximum of its own (on the
slope of a brighter neighbour, in a blend of three or more) from the
asymmetry of its neighbours (docs/design.md, "Detection recall"). The
deblender's model of the neighbours can: after a fit, the residual
``data - model`` is PSF-matched-filtered in significance units,

    S = sum_b P_b (x) (w_b r_b) / sqrt(sum_b P_b^2 (x) w_b)

(``(x)`` correlation, ``w_b`` the fit's inverse-variance weights, a flat
spectrum in the data's units: the detection's flat band sum), and a local
maximum of S that stands above both a fixed threshold and a fraction of the
model at that position (a bright core's model residual grows with its
flux) becomes a new source, started as the PSF, and the blend is refitted.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .psf import Convolver, memoised

_CACHE: dict = {}
_CACHE_SIZE = 16
PSF_KEEP = 0.998  # the filter is cut to the centred square holding this of sum(P^2)


def _core_size(psfs, keep=PSF_KEEP):
    """Half-size of the smallest centred square holding ``keep`` of every band's sum(P^2)."""
    B, py, px = psfs.shape
    c = min(py, px) // 2
    p2 = psfs.astype(np.float64) ** 2
    total = p2.sum(axis=(1, 2))
    for h in range(1, c + 1):
        box = p2[:, py // 2 - h:py // 2 + h + 1, px // 2 - h:px // 2 + h + 1].sum(axis=(1, 2))
        if np.all(box >= keep * total):
            return h
    return c


def _filters(psfs, shape, key):
    """(P, P^2) convolvers of the (cut) observed PSFs on a blend of ``shape``, memoised."""
    def make():
        h = _core_size(psfs)
        py, px = psfs.shape[1] // 2, psfs.shape[2] // 2
        core = np.ascontiguousarray(psfs[:, py - h:py + h + 1, px - h:px + h + 1], np.float32)
        return Convolver(core, shape), Convolver(core * core, shape)

    return memoised(_CACHE, (key, tuple(shape)), make, _CACHE_SIZE)


def significance(data, model, w, psfs, key):
    """PSF-matched significance of the residual and of the model (both (H, W)).

    ``key`` identifies the PSF set (for the memoised filters). Zero where no
    weighted pixel contributes.
    """
    H, W = data.shape[1:]
    filt, filt2 = _filters(psfs, (H, W), key)
    den = filt2.adjoint(w).sum(axis=0)
    num = filt.adjoint(w * (data - model)).sum(axis=0)
    mod = filt.adjoint(w * model).sum(axis=0)
    ok = den > 1e-12 * max(float(den.max()), 1e-30)
    sd = np.sqrt(np.where(ok, den, 1.0))
    return np.where(ok, num / sd, 0.0), np.where(ok, mod / sd, 0.0)


@njit(cache=True)
def residual_maxima(sig, mod, allowed, t2, frac2):
    """Pixels (n, 2) that are strict-or-equal 8-neighbour maxima of ``sig`` with
    ``sig^2 > t2 + frac2 * mod^2`` and ``sig > 0``, where ``allowed``; not on the border."""
    H, W = sig.shape
    out = np.empty((H * W if H * W < 4096 else 4096, 2), np.int64)
    n = 0
    for y in range(1, H - 1):
        for x in range(1, W - 1):
            s = sig[y, x]
            if s <= 0 or not allowed[y, x] or s * s <= t2 + frac2 * mod[y, x] * mod[y, x]:
                continue
            top = True
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if (dy != 0 or dx != 0) and sig[y + dy, x + dx] > s:
                        top = False
            if top and n < out.shape[0]:
                out[n, 0] = y
                out[n, 1] = x
                n += 1
    return out[:n]


def subpixel(sig, y, x):
    """Position of the maximum of the quadratic through the 3 x 3 neighbourhood
    (per axis), within half a pixel of (y, x)."""
    def off(a, b, c):
        d = a - 2 * b + c
        return 0.0 if d >= 0 else float(np.clip(0.5 * (a - c) / d, -0.5, 0.5))

    return (y + off(sig[y - 1, x], sig[y, x], sig[y + 1, x]),
            x + off(sig[y, x - 1], sig[y, x], sig[y, x + 1]))


def window_maximum(sig, cy, cx, r):
    """Sub-pixel position of the highest pixel of ``sig`` within ``r`` px
    (a square) of (cy, cx), not on the border; (None, None) if there is none."""
    H, W = sig.shape
    ya, yb = max(int(cy) - r, 1), min(int(cy) + r + 1, H - 1)
    xa, xb = max(int(cx) - r, 1), min(int(cx) + r + 1, W - 1)
    if ya >= yb or xa >= xb:
        return None, None
    k = int(np.argmax(sig[ya:yb, xa:xb]))
    y, x = ya + k // (xb - xa), xa + k % (xb - xa)
    return subpixel(sig, y, x)


def find(data, model, w, psfs, key, peaks, thresh, frac, min_sep, limit):
    """New source positions (n, 2) from the residual of a fitted blend.

    Local maxima of the residual significance with ``S^2 > thresh^2 +
    (frac * M)^2`` (M: the model's significance at that pixel), on pixels
    with data, at least ``min_sep`` px from every position in ``peaks`` and
    from each other (the higher kept), at most one per nearest position of
    ``peaks`` and ``limit`` in all, highest S first. Returns also their S.
    """
    sig, mod = significance(data, model, w, psfs, key)
    allowed = (w > 0).any(axis=0)
    cand = residual_maxima(sig, mod, allowed, float(thresh) ** 2, float(frac) ** 2)
    if not len(cand):
        return np.zeros((0, 2)), np.zeros(0)
    s = sig[cand[:, 0], cand[:, 1]]
    order = np.argsort(-s, kind="stable")
    pk = np.asarray(peaks, np.float64).reshape(-1, 2)
    taken = [tuple(p) for p in pk]
    n_old = len(taken)
    out_s = []
    claimed = set()
    for k in order:
        if len(taken) - n_old >= limit:
            break
        y, x = subpixel(sig, int(cand[k, 0]), int(cand[k, 1]))
        if taken and min(np.hypot(y - py, x - px) for py, px in taken) < min_sep:
            continue
        # one per nearest peak and round: the light a source absorbed also
        # displaces its model, which leaves lesser maxima about it that the
        # refit with the first one removes
        near = int(np.argmin(np.hypot(pk[:, 0] - y, pk[:, 1] - x))) if len(pk) else -1
        if near in claimed:
            continue
        claimed.add(near)
        taken.append((y, x))
        out_s.append(float(s[k]))
    return np.asarray(taken[n_old:], np.float64).reshape(-1, 2), np.asarray(out_s)


@njit(cache=True)
def _bilinear(morph, o, h, w, y, x):
    """Bilinear value of an (h, w) box at fractional box pixel (y, x); zero outside it."""
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    fy, fx = y - y0, x - x0
    v = 0.0
    for dy in range(2):
        yy = y0 + dy
        if yy < 0 or yy >= h:
            continue
        wy = fy if dy else 1.0 - fy
        for dx in range(2):
            xx = x0 + dx
            if xx < 0 or xx >= w:
                continue
            v += wy * (fx if dx else 1.0 - fx) * morph[o + yy * w + xx]
    return v


@njit(cache=True)
def _light_centre(L, uy0, ux0, sy, sx):
    """Centre of a source's light L (box origin (uy0, ux0)) for its mirror:
    the quadratic maximum through the 3 x 3 about its brightest pixel within
    a pixel of the start (sy, sx), at most half a pixel from the start. The
    observed light is smooth on the PSF's scale, where the quadratic is close."""
    uh, uw = L.shape
    by, bx, best = -1, -1, -np.inf
    for y in range(max(int(np.floor(sy)) - uy0 - 1, 1), min(int(np.floor(sy)) - uy0 + 3, uh - 1)):
        for x in range(max(int(np.floor(sx)) - ux0 - 1, 1), min(int(np.floor(sx)) - ux0 + 3, uw - 1)):
            if L[y, x] > best:
                by, bx, best = y, x, L[y, x]
    if by < 0:
        return sy, sx
    cy, cx = float(uy0 + by), float(ux0 + bx)
    d = L[by - 1, bx] - 2 * L[by, bx] + L[by + 1, bx]
    if d < 0:
        cy += min(max(0.5 * (L[by - 1, bx] - L[by + 1, bx]) / d, -0.5), 0.5)
    d = L[by, bx - 1] - 2 * L[by, bx] + L[by, bx + 1]
    if d < 0:
        cx += min(max(0.5 * (L[by, bx - 1] - L[by, bx + 1]) / d, -0.5), 0.5)
    return min(max(cy, sy - 0.5), sy + 0.5), min(max(cx, sx - 0.5), sx + 0.5)


@njit(cache=True)
def symmetric_part(morph, box, off, spec_sum, runs, centre, H, W, core, out):
    """``out``: the components' morphologies scaled to their source's symmetric minimum.

    Flat layout (see :mod:`.kernels`); ``spec_sum`` (K,) band-summed spectra,
    ``runs`` (K, 2) each component's source's run of components
    (``_source_runs``), ``centre`` (K, 2) float start centres in blend
    pixels (the peaks). Per source, its band-summed light L (all its
    components) is compared with L mirrored about its own centre (see
    :func:`_light_centre`; bilinear) and each component is scaled by
    min(L, L') / L.
    The centre matters: mirrored about its peak rounded to half a pixel, a
    round galaxy 0.2 px from it left a 38 sigma residual on its slope. Per source,
    not per component: a bulge pulled one way and its disk the other cancel
    in L but not apart (they left 20 sigma residuals either side of a round
    galaxy). A pixel whose mirror leaves the source's boxes gets zero, one
    whose mirror leaves the blend, or within ``core`` px of the centre,
    keeps its value. What the minimum removes is light on one side only: a
    neighbour the source absorbed (or real asymmetry).
    """
    K = box.shape[0]
    for k in range(K):
        lo, hi = runs[k, 0], runs[k, 1]
        if lo != k:
            continue
        uy0, ux0 = box[lo, 0], box[lo, 1]
        uy1, ux1 = uy0 + box[lo, 2], ux0 + box[lo, 3]
        for j in range(lo + 1, hi):
            uy0, ux0 = min(uy0, box[j, 0]), min(ux0, box[j, 1])
            uy1, ux1 = max(uy1, box[j, 0] + box[j, 2]), max(ux1, box[j, 1] + box[j, 3])
        uh, uw = uy1 - uy0, ux1 - ux0
        L = np.zeros((uh, uw))
        for j in range(lo, hi):
            y0, x0, h, w, o = box[j, 0], box[j, 1], box[j, 2], box[j, 3], off[j]
            for y in range(h):
                for x in range(w):
                    L[y0 - uy0 + y, x0 - ux0 + x] += spec_sum[j] * morph[o + y * w + x]
        sy, sx = centre[lo, 0], centre[lo, 1]
        cy, cx = _light_centre(L, uy0, ux0, sy, sx)
        ratio = np.ones((uh, uw))
        for y in range(uh):
            for x in range(uw):
                v = L[y, x]
                gy, gx = uy0 + y, ux0 + x
                yy, xx = 2 * cy - gy, 2 * cx - gx  # mirror, blend pixels
                if v <= 0 or (gy - cy) ** 2 + (gx - cx) ** 2 <= core * core:
                    continue
                if not (0 <= yy <= H - 1 and 0 <= xx <= W - 1):
                    continue
                fy, fx = yy - uy0, xx - ux0
                iy, ix = int(np.floor(fy)), int(np.floor(fx))
                ay, ax = fy - iy, fx - ix
                mv = 0.0
                for dy in range(2):
                    for dx in range(2):
                        py, px = iy + dy, ix + dx
                        if 0 <= py < uh and 0 <= px < uw:
                            mv += (ay if dy else 1.0 - ay) * (ax if dx else 1.0 - ax) * L[py, px]
                if mv < v:
                    ratio[y, x] = mv / v
        for j in range(lo, hi):
            y0, x0, h, w, o = box[j, 0], box[j, 1], box[j, 2], box[j, 3], off[j]
            for y in range(h):
                for x in range(w):
                    out[o + y * w + x] = morph[o + y * w + x] * ratio[y0 - uy0 + y, x0 - ux0 + x]
