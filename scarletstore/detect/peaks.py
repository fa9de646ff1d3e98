"""Peaks in a detection footprint: the prominence flood, sub-pixel centres, companions on a bright
neighbour's slope (symmetric residual) and the re-centring of isolated peaks.

See :mod:`scarletstore.detect.detect` for the method.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy.spatial import cKDTree

from .filters import _gauss1d

#: peak_flags bit 0: the peak comes from a known (external) position.
PEAK_EXTERNAL = 1
#: peak_flags bit 1: found in the symmetric residual of a brighter peak (a companion).
PEAK_RESIDUAL = 2
#: peak_flags bit 2: a known position on no detected footprint (it got a PSF-sized one).
PEAK_NO_FOOTPRINT = 4


# ------------------------------------------------------------------ peaks
@numba.njit(cache=True)
def _find(uf, i):
    root = i
    while uf[root] != root:
        root = uf[root]
    while uf[i] != root:  # path compression
        nxt = uf[i]
        uf[i] = root
        i = nxt
    return root


@numba.njit(cache=True)
def _flood_peaks(img, mask, level, min_prominence):
    # Topographic prominence by a descending flood with union-find: pixels
    # >= level are visited from the highest; a pixel with no visited
    # neighbour starts a region (a local maximum). When regions meet at a
    # pixel, all but the highest end there: their maximum's prominence is its
    # height minus this saddle. Roots are always the highest pixel of their
    # region because a region's first pixel is its maximum and merges keep
    # the older (higher) root. A numba kernel: the loop is sequential and
    # data-dependent, nothing in scipy does it.
    ny, nx = img.shape
    n = 0
    for y in range(ny):
        for x in range(nx):
            if mask[y, x] and img[y, x] >= level:
                n += 1
    flat = np.empty(n, np.int64)
    vals = np.empty(n, np.float32)
    k = 0
    for y in range(ny):
        for x in range(nx):
            v = img[y, x]
            if mask[y, x] and v >= level:
                flat[k] = y * nx + x
                vals[k] = -v
                k += 1
    order = np.argsort(vals, kind="mergesort")  # stable: ties resolved in raster order
    rank = np.full(ny * nx, -1, np.int32)
    for r in range(n):
        rank[flat[order[r]]] = r
    uf = np.arange(n).astype(np.int32)
    prom = np.full(n, -1.0, np.float32)  # -1: not (yet) a peak; inf: never merged
    saddle_at = np.full(n, -1, np.int64)  # flat pixel where a peak's region met a higher one
    higher_at = np.full(n, -1, np.int64)  # flat pixel of that higher region's maximum
    roots = np.empty(8, np.int32)
    for r in range(n):
        p = flat[order[r]]
        y = p // nx
        x = p - y * nx
        v = -vals[order[r]]
        nroots = 0
        for dy in range(-1, 2):
            yy = y + dy
            if yy < 0 or yy >= ny:
                continue
            for dx in range(-1, 2):
                xx = x + dx
                if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                    continue
                q = rank[yy * nx + xx]
                if q < 0 or q >= r:
                    continue
                root = _find(uf, q)
                dup = False
                for j in range(nroots):
                    if roots[j] == root:
                        dup = True
                        break
                if not dup:
                    roots[nroots] = root
                    nroots += 1
        if nroots == 0:
            prom[r] = np.inf
            continue
        best = roots[0]
        for j in range(1, nroots):
            if roots[j] < best:
                best = roots[j]
        for j in range(nroots):
            o = roots[j]
            if o != best:
                height = -vals[order[o]]
                prom[o] = height - v
                saddle_at[o] = p
                higher_at[o] = flat[order[best]]
                uf[o] = best
        uf[r] = best
    # Surviving maxima; a region that never met a higher one keeps inf.
    count = 0
    for r in range(n):
        if prom[r] >= min_prominence:
            count += 1
    py = np.empty(count, np.int32)
    px = np.empty(count, np.int32)
    pp = np.empty(count, np.float32)
    ps = np.empty(count, np.int64)
    ph = np.empty(count, np.int64)
    k = 0
    for r in range(n):
        if prom[r] >= min_prominence:
            p = flat[order[r]]
            py[k] = p // nx
            px[k] = p - (p // nx) * nx
            pp[k] = prom[r]
            ps[k] = saddle_at[r]
            ph[k] = higher_at[r]
            k += 1
    return py, px, pp, ps, ph


@numba.njit(cache=True)
def _subpixel(img, py, px):
    # Vertex of the parabola through the peak and its two neighbours, per axis.
    ny, nx = img.shape
    n = py.shape[0]
    oy = np.zeros(n)
    ox = np.zeros(n)
    for k in range(n):
        y = py[k]
        x = px[k]
        c = img[y, x]
        if 0 < y < ny - 1:
            a = img[y - 1, x]
            b = img[y + 1, x]
            d = a - 2.0 * c + b
            if d < 0:
                oy[k] = min(max(0.5 * (a - b) / d, -0.5), 0.5)
        if 0 < x < nx - 1:
            a = img[y, x - 1]
            b = img[y, x + 1]
            d = a - 2.0 * c + b
            if d < 0:
                ox[k] = min(max(0.5 * (a - b) / d, -0.5), 0.5)
    return py + oy, px + ox


def _suppress_close(y, x, sig, radius):
    # Greedy: keep peaks in descending significance, dropping any closer than
    # radius to one already kept. Only the (few) close pairs are visited.
    order = np.argsort(-sig, kind="stable")
    if radius <= 0 or y.size < 2:
        return order
    pairs = cKDTree(np.column_stack([y, x])).query_pairs(radius, output_type="ndarray")
    if pairs.size == 0:
        return order
    rank = np.empty(y.size, np.int64)
    rank[order] = np.arange(y.size)
    # orient each pair (stronger, weaker) and visit by the stronger one's rank
    a, b = pairs[:, 0], pairs[:, 1]
    swap = rank[a] > rank[b]
    hi, lo = np.where(swap, b, a), np.where(swap, a, b)
    srt = np.argsort(rank[hi], kind="stable")
    alive = np.ones(y.size, bool)
    for h, l in zip(hi[srt], lo[srt]):
        if alive[h]:
            alive[l] = False
    return order[alive[order]]


def _ring_median(img, py, px, r0, r1):
    """Median of ``img`` over the annulus ``r0 <= r <= r1`` about each pixel (inside the image)."""
    ny, nx = img.shape
    h = int(np.ceil(r1))
    dy, dx = np.mgrid[-h:h + 1, -h:h + 1]
    rr = np.hypot(dy, dx)
    sel = (rr >= r0) & (rr <= r1)
    yy = np.asarray(py, np.int64)[:, None] + dy[sel][None]
    xx = np.asarray(px, np.int64)[:, None] + dx[sel][None]
    ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    vals = np.where(ok, img[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)], np.nan)
    out = np.zeros(len(vals))
    some = ok.any(axis=1)
    if some.any():
        out[some] = np.nanmedian(vals[some], axis=1)
    return out


def _own_significance(img, py, px, s_at, h_at, contrast=0.0, ring=None):
    """Significance of each peak above the light of the brighter neighbour it merges into.

    A peak on the wing of a brighter source (whose maximum is the flat pixel
    ``h_at``, met at the saddle pixel ``s_at`` of the peak image ``img``) is a
    detection only if it stands out of that wing by itself. Two estimates of
    the wing's light ``B`` at the peak ``q`` fail in different ways: the
    saddle level (a monotonic neighbour is at least that bright at the
    saddle, which lies between them, so it over-estimates ``B``) and the
    neighbour's 180-degree mirror ``L(2c - q)`` (brightest of its 3 x 3
    pixels, as ``c`` is a whole pixel; a point-symmetric
    neighbour's light is the same there; the template of the SDSS
    deblender, spoilt when the mirror lands on a third source). The lower of
    the two is taken. The excess ``L(q) - B`` is compared with the pixel
    noise (1 in the unit-noise peak image) and a model uncertainty
    ``contrast * B`` of the wing added in quadrature: at hundreds of sigma, a
    few per cent of structure in a bright profile (PSF mismatch, the edge of
    a saturated core) is not a source. A peak that met no higher one keeps
    its height, or with ``ring = (r0, r1)`` its height above the median of
    the annulus ``r0 <= r <= r1`` about it: inside its own footprint island
    on the far wing of a bright star (where that wing lifts the PSF-matched
    significance over the threshold in patches) a noise maximum meets no
    higher one, yet the wing lifts the peak image too.

    Returns
    -------
    (n,) float64, ``(L(q) - B) / sqrt(1 + (contrast B)^2)``.
    """
    ny, nx = img.shape
    own = img[py, px].astype(np.float64)
    has = s_at >= 0
    if ring is not None and not has.all():
        lone = np.flatnonzero(~has)
        b = np.maximum(_ring_median(img, py[lone], px[lone], ring[0], ring[1]), 0.0)
        own[lone] = (own[lone] - b) / np.sqrt(1.0 + (contrast * b) ** 2)
    if not has.any():
        return own
    qy, qx = py[has].astype(np.int64), px[has].astype(np.int64)
    sy, sx = s_at[has] // nx, s_at[has] % nx
    cy, cx = h_at[has] // nx, h_at[has] % nx
    wing = img[sy, sx].astype(np.float64)
    # The neighbour's centre is only known to a pixel: the brightest of the
    # 3 x 3 pixels about the mirror point bounds its light there.
    my, mx = 2 * cy - qy, 2 * cx - qx
    mirror = np.full(wing.shape, -np.inf)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy, xx = my + dy, mx + dx
            ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            mirror[ok] = np.maximum(mirror[ok], img[yy[ok], xx[ok]])
    mirror[~np.isfinite(mirror)] = np.inf  # mirror off the image: the saddle alone
    b = np.maximum(np.minimum(wing, mirror), 0.0)
    own[has] = (own[has] - b) / np.sqrt(1.0 + (contrast * b) ** 2)
    return own


def find_peaks(peak_image, footprint_mask, min_prominence, level=0.0, significance=None,
               floor=0.0, min_separation=0.0, contrast=0.0, return_own=False, ring=None):
    """Peaks of one detection image inside a footprint mask.

    Parameters
    ----------
    peak_image : (ny, nx) float32
        Image whose local maxima are the peaks, in units of its noise.
    footprint_mask : (ny, nx) bool
        Only pixels inside take part in the flood.
    min_prominence : float
        Minimum height of a peak above the saddle joining it to a higher peak.
    level : float
        Pixels below it are ignored; a maximum that meets no higher one above
        ``level`` has prominence ``height - level``.
    significance : (ny, nx) float32, optional
        Detection significance (default ``peak_image``); a peak needs
        ``significance >= floor`` at its pixel, and that value is returned.
    floor : float
        Minimum significance of a peak.
    min_separation : float
        Of two peaks closer than this (pixels) only the more significant is kept.
    contrast : float
        Fractional uncertainty of the brighter neighbour's light, for the
        significance returned with ``return_own``.
    return_own : bool
        Also return each peak's significance above the light of the
        brighter neighbour it merges into (see :func:`_own_significance`).
    ring : (float, float), optional
        Annulus (pixels) whose median is the light under a peak that meets no
        higher one, for that significance.

    Returns
    -------
    y, x : float64 sub-pixel positions (parabola through the peak image)
    iy, ix : int32 integer pixels
    value : float32 significance at the integer pixel
    """
    img = np.ascontiguousarray(peak_image, dtype=np.float32)
    mask = np.ascontiguousarray(footprint_mask, dtype=np.bool_)
    py, px, prom, s_at, h_at = _flood_peaks(img, mask, np.float32(level), np.float32(min_prominence))
    sig = img if significance is None else significance
    own = _own_significance(img, py, px, s_at, h_at, contrast, ring)
    val = sig[py, px]
    sel = val >= floor
    py, px, val, own = py[sel], px[sel], val[sel], own[sel]
    keep = _suppress_close(py.astype(float), px.astype(float), val, min_separation)
    py, px, val, own = py[keep], px[keep], val[keep], own[keep]
    y, x = _subpixel(img, py, px)
    if return_own:
        return y, x, py, px, val, own.astype(np.float32)
    return y, x, py, px, val


@numba.njit(cache=True)
def _bilinear(img, y, x):
    ny, nx = img.shape
    y0 = int(np.floor(y))
    x0 = int(np.floor(x))
    if y0 < 0 or x0 < 0 or y0 + 1 >= ny or x0 + 1 >= nx:
        return np.nan
    fy = y - y0
    fx = x - x0
    return ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
            + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))


@numba.njit(cache=True)
def _residual_peaks(img, mask, cy, cx, radii, exclusion, r_min, frac, min_prominence):
    # Companion search on the symmetric residual (Lupton's SDSS template
    # idea applied to detection): about each peak c, r(p) = L(p) - L(2c - p)
    # is ~0 for a point-symmetric source and positive where a neighbour adds
    # light, even where that neighbour makes no local maximum of L (a faint
    # source on a bright one's slope). Candidates are the maxima of r inside
    # the footprint mask and the window of radius radii[k] that rise at least
    # min_prominence above the saddle to a higher maximum of r (the flood of
    # _flood_peaks, so a noise bump on the flank of a neighbour's residual
    # does not count), at least `exclusion` from c, with r >= r_min and
    # r >= frac * L(p) (so centring errors on bright cores, which leave a
    # dipole ~ gradient, do not qualify). A numba kernel: a small window
    # per peak.
    ny, nx = img.shape
    out_y = []
    out_x = []
    out_r = []
    for k in range(cy.shape[0]):
        yc = cy[k]
        xc = cx[k]
        radius = radii[k]
        iy = int(np.round(yc))
        ix = int(np.round(xc))
        h = int(np.ceil(radius))
        w = 2 * h + 1
        buf = np.zeros((w, w), np.float32)
        inside = np.zeros((w, w), np.bool_)
        unknown = np.zeros((w, w), np.bool_)  # in the footprint, but the mirror is off the image
        for a in range(w):
            for b in range(w):
                y = iy - h + a
                x = ix - h + b
                if y < 0 or y >= ny or x < 0 or x >= nx or not mask[y, x]:
                    continue
                m = _bilinear(img, 2 * yc - y, 2 * xc - x)
                if np.isnan(m):
                    unknown[a, b] = True
                    continue
                buf[a, b] = img[y, x] - m
                inside[a, b] = True
        fy, fx, _, _, _ = _flood_peaks(buf, inside, np.float32(r_min), np.float32(min_prominence))
        for j in range(fy.shape[0]):
            a = fy[j]
            b = fx[j]
            if a == 0 or b == 0 or a == w - 1 or b == w - 1:
                continue  # on the window's edge: not known to be a maximum
            # Next to pixels whose mirror leaves the image the residual is
            # cut off, not falling: a rising slope (a third source's light)
            # would end there in a false maximum.
            edge = False
            for da in range(-1, 2):
                for db in range(-1, 2):
                    if unknown[a + da, b + db]:
                        edge = True
            if edge:
                continue
            v = buf[a, b]
            y = iy - h + a
            x = ix - h + b
            d2 = (y - yc) ** 2 + (x - xc) ** 2
            if d2 < exclusion * exclusion or d2 > radius * radius:
                continue
            if v < frac * img[y, x]:
                continue
            # sub-pixel: parabola through the residual, where both neighbours are defined
            oy = 0.0
            ox = 0.0
            if inside[a - 1, b] and inside[a + 1, b]:
                p0 = buf[a - 1, b]
                p1 = buf[a + 1, b]
                dd = p0 - 2.0 * v + p1
                if dd < 0:
                    oy = min(max(0.5 * (p0 - p1) / dd, -0.5), 0.5)
            if inside[a, b - 1] and inside[a, b + 1]:
                p0 = buf[a, b - 1]
                p1 = buf[a, b + 1]
                dd = p0 - 2.0 * v + p1
                if dd < 0:
                    ox = min(max(0.5 * (p0 - p1) / dd, -0.5), 0.5)
            out_y.append(y + oy)
            out_x.append(x + ox)
            out_r.append(v)
    return np.array(out_y), np.array(out_x), np.array(out_r)


def _point_profile(psfs, sigma):
    """Relative radial profile of a point source in the peak image, widest over bands.

    The peak image of band b sees a point source as ``P_b * G(sigma)``; its
    maximum over each 1-pixel annulus, divided by the centre value, is the
    fraction of a source's central peak-image height that reaches radius r.

    Returns
    -------
    (n,) float64, index = radius in pixels.
    """
    from scipy import ndimage

    k = _gauss1d(sigma) if sigma > 0 else np.ones(1, np.float32)
    prof = None
    for p in psfs:
        q = np.asarray(p, np.float64)
        q = ndimage.correlate1d(ndimage.correlate1d(q, k, axis=0), k, axis=1)
        cy, cx = q.shape[0] // 2, q.shape[1] // 2
        yy, xx = np.indices(q.shape)
        ring = np.rint(np.hypot(yy - cy, xx - cx)).astype(np.int64).ravel()
        top = np.zeros(min(cy, cx) + 1)
        use = ring < top.size
        np.maximum.at(top, ring[use], q.ravel()[use])
        top /= max(q[cy, cx], 1e-300)
        prof = top if prof is None else np.maximum(prof, top)
    return prof


def _residual_radii(height, profile, r_min, base, cap):
    """Companion search radius per seed: as far as its own light can hide one.

    A companion of residual ``r_min`` on a seed's wing makes no maximum of
    its own only where the seed's light is comparable, i.e. out to the radius
    where the seed's peak-image height times its point-source profile falls
    below ``r_min``. A saturated star's Moffat wings hide companions well
    beyond a fixed few FWHM; a faint seed keeps the ``base`` radius (which also
    covers extended seeds, wider than a point source). At most ``cap``.
    """
    height = np.asarray(height, np.float64)
    radii = np.full(height.size, float(base))
    for k, hgt in enumerate(height):
        below = np.flatnonzero(hgt * profile < r_min)
        reach = float(below[0]) if below.size else float(profile.size)
        radii[k] = min(max(base, reach), cap)
    return radii


@numba.njit(cache=True)
def _climb(img, y, x, steps):
    # Steepest ascent over the 8 neighbours, at most `steps` moves; reports
    # whether it stopped at a local maximum.
    ny, nx = img.shape
    for _ in range(steps + 1):
        by, bx = y, x
        best = img[y, x]
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                yy, xx = y + dy, x + dx
                if 0 <= yy < ny and 0 <= xx < nx and img[yy, xx] > best:
                    best = img[yy, xx]
                    by, bx = yy, xx
        if by == y and bx == x:
            return y, x, True
        y, x = by, bx
    return y, x, False


def _refine_isolated(zsig, py, px, flags, keep, isolation, max_shift):
    """Move isolated peaks to the maximum of the multi-band PSF-matched image.

    The narrow peak image splits neighbours but, being noisier, places a
    faint source's maximum a pixel or two off; for a point source alone the
    maximum of the matched-filter (likelihood) image is the best position
    estimate (Kaiser 2001). Peaks with no other kept peak within
    ``isolation`` pixels climb ``zsig`` from their pixel (sub-pixel by a
    parabola) and move there if that is a local maximum within
    ``max_shift`` pixels (on a neighbour's wing the climb finds none); peaks
    near others keep the narrow image's position, where a neighbour's slope
    would pull the smooth image's maximum. Residual companions are left alone.
    """
    py, px = py.copy(), px.copy()
    sel = np.flatnonzero(keep & ((flags & PEAK_RESIDUAL) == 0))
    if sel.size == 0:
        return py, px
    pts = np.column_stack([py[keep], px[keep]])
    d, _ = cKDTree(pts).query(np.column_stack([py[sel], px[sel]]), k=2)
    alone = sel[d[:, 1] > isolation] if pts.shape[0] > 1 else sel
    img = np.ascontiguousarray(zsig, dtype=np.float32)
    steps = int(np.ceil(max_shift)) + 1
    for k in alone:
        iy = min(max(int(round(py[k])), 0), img.shape[0] - 1)
        ix = min(max(int(round(px[k])), 0), img.shape[1] - 1)
        cy, cx, top = _climb(img, iy, ix, steps)
        if not top:  # on a slope (a neighbour's wing): no maximum of its own nearby
            continue
        y, x = _subpixel(img, np.array([cy], np.int32), np.array([cx], np.int32))
        if np.hypot(y[0] - py[k], x[0] - px[k]) <= max_shift:
            py[k], px[k] = y[0], x[0]
    return py, px
