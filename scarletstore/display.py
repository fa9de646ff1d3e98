"""Pictures: asinh colour composites after Lupton et al. (2004, PASP 116, 133).

The stretch acts on the total intensity I = (r + g + b) / 3 and every channel
is scaled by the same factor asinh(Q I / stretch) / (Q I), so colours are kept
even where bright cores saturate; a pixel whose largest channel exceeds 1 is
scaled down as a whole rather than clipped per channel.

The module is split in two: functions that build the arrays a picture shows
(composites, residuals in sigma, footprint outlines, layouts, the field's box
list) need only numpy and are what the tests check; the renderers
:func:`show_blend` and :func:`show_field` import matplotlib (Agg) only when
called, so the command line starts without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

# ---------------------------------------------------------------- composites


def lupton_rgb(rgb, stretch: float = 0.5, q: float = 8.0, minimum=0.0) -> np.ndarray:
    """(3, H, W) red, green, blue images -> (H, W, 3) uint8 asinh composite.

    Parameters
    ----------
    rgb : (3, H, W) array, channels ordered red, green, blue
    stretch : linear range of the stretch (in image units)
    q : asinh softening; large q is closer to logarithmic
    minimum : black level, per channel or scalar
    """
    img = np.asarray(rgb, dtype=np.float64) - np.reshape(np.broadcast_to(minimum, (3,)), (3, 1, 1))
    img = np.clip(np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0), 0, None)
    intensity = img.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(intensity > 0, np.arcsinh(q * intensity / stretch) / (q * intensity), 0.0)
    out = img * scale[None]
    peak = out.max(axis=0)
    over = peak > 1
    out[:, over] /= peak[over]
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)


# approximate effective wavelengths (nm) of common broad-band filter names
_WAVELENGTH = {"u": 365, "g": 480, "r": 620, "r2": 620, "i": 760, "i2": 760, "z": 870, "y": 980,
               "vis": 700, "j": 1250, "h": 1650, "ks": 2150, "k": 2200}


def band_wavelength(name: str):
    """Effective wavelength (nm) of a band name such as 'r', 'HSC-R' or 'LSST_i'; None if unknown."""
    token = [t for t in "".join(c if c.isalnum() else " " for c in str(name).lower()).split() if t]
    return _WAVELENGTH.get(token[-1]) if token else None


def rgb_bands(bands) -> list[int]:
    """Indices of three bands (reddest first) used as R, G, B.

    Bands are taken in wavelength order when every name is a known filter
    (runs imported from other pipelines list them alphabetically: g, i, r, y,
    z), else in the order given. Of five or more, the noisiest bluest and
    reddest ends are skipped.
    """
    bands = list(bands)
    n = len(bands)
    waves = [band_wavelength(b) for b in bands]
    order = sorted(range(n), key=lambda k: waves[k]) if None not in waves else list(range(n))
    if n >= 3:
        pick = [n - 1, n // 2, 0] if n < 5 else [n - 2, n // 2, 1]
        return [order[k] for k in pick]
    return [order[-1]] * 3 if n == 1 else [order[1], order[0], order[0]]


def auto_stretch(images: np.ndarray) -> float:
    """A stretch about five times the robust noise of the composite."""
    mean = np.nan_to_num(np.mean(images, axis=0))
    mad = np.median(np.abs(mean - np.median(mean)))
    # the floor keeps noise-free images from stretching float round-off into view
    return float(max(5 * 1.4826 * mad, 1e-3 * np.abs(mean).max(), 1e-12))


def saturating_stretch(level: float, q: float = 8.0) -> float:
    """The stretch at which intensity ``level`` just reaches full brightness.

    With the composite's mapping asinh(q I / stretch) / q, full scale (1) is
    reached at I = stretch sinh(q) / q.
    """
    return float(level) * q / np.sinh(q)


def source_stretch(rgb, q: float = 5.0, percentile: float = 99.9):
    """Stretch for one source's (3, h, w) model from its own intensity range.

    The pixel at the ``percentile`` of the source's positive intensities is
    put just at full brightness in its brightest channel, so a faint source
    fills the same grey levels as a bright one, its core keeps its profile
    instead of a flat saturated top, and its asinh wings stay visible down to
    about 1 % of the peak. None when no pixel is positive.

    With the composite's mapping, channel c of a pixel of intensity I shows as
    (c / I) asinh(q I / stretch) / q; that is 1 for the brightest channel m when
    stretch = q I / sinh(q I / m).
    """
    img = np.clip(np.nan_to_num(np.asarray(rgb, np.float64)), 0, None)
    intensity = img.mean(axis=0)
    positive = intensity > 0
    if not positive.any():
        return None
    level = np.percentile(intensity[positive], percentile)
    near = positive & (intensity >= level)  # the pixels at (or just above) that level
    k = np.flatnonzero(near.ravel())[np.argmin(intensity.ravel()[near.ravel()])]
    i_level, brightest = intensity.ravel()[k], img.reshape(3, -1)[:, k].max()
    return float(q * i_level / np.sinh(q * i_level / brightest))


@dataclass
class SourcePanel:
    """What one source's panel shows.

    kind is "rgb" (``image`` (h, w, 3) uint8 on the source's own stretch),
    "signed" (``image`` (h, w) float: the band sum of a model without positive
    flux in the colour bands, shown on a diverging map within +-``limit``) or
    "empty" (the model is zero everywhere; ``image`` is None).
    """

    kind: str
    image: np.ndarray | None
    limit: float = 0.0


def source_panel(model, idx, q: float = 5.0) -> SourcePanel:
    """The picture of one source's (B, h, w) model (never an all-black image).

    A source with positive flux in the R, G, B bands gets its own asinh stretch
    (:func:`source_stretch`); one with flux only in other bands, or negative
    flux, shows its signed band sum; an all-zero model is reported as empty.
    """
    model = np.nan_to_num(np.asarray(model, np.float64))
    rgb = model[list(idx)]
    stretch = source_stretch(rgb, q)
    if stretch is not None:
        return SourcePanel("rgb", lupton_rgb(rgb, stretch=stretch, q=q))
    total = model.sum(axis=0)
    limit = float(np.abs(total).max())
    if limit > 0:
        return SourcePanel("signed", total, limit)
    return SourcePanel("empty", None)


# ---------------------------------------------------------------- residuals


def residual_sigma(data, model, variance, bad=None) -> np.ndarray:
    """Per-band residual in units of the noise, (data - model) / sqrt(variance).

    Parameters
    ----------
    data, model, variance : (B, h, w) arrays
    bad : (B, h, w) bool, optional
        Pixels to leave out (bad mask planes).

    Returns
    -------
    (B, h, w) float64, NaN where the variance is not positive and finite or the
    pixel is bad.
    """
    data = np.asarray(data, np.float64)
    variance = np.asarray(variance, np.float64)
    usable = np.isfinite(variance) & (variance > 0) & np.isfinite(data)
    if bad is not None:
        usable &= ~np.asarray(bad, bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        chi = (data - np.asarray(model, np.float64)) / np.sqrt(np.where(usable, variance, 1.0))
    return np.where(usable, chi, np.nan)


def combined_residual(chi) -> np.ndarray:
    """Bands of a (B, h, w) sigma residual combined into one unit-variance map.

    sum_b chi_b / sqrt(N) over the N bands usable at each pixel: pure noise
    stays N(0, 1), while a residual common to all bands adds up. NaN where no
    band is usable.
    """
    chi = np.asarray(chi, np.float64)
    n = np.isfinite(chi).sum(axis=0)
    total = np.nansum(chi, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.sqrt(np.maximum(n, 1)), np.nan)


def symmetric_limit(values, percentile: float = 99.5, floor: float = 3.0) -> float:
    """Colour limit +-L of a residual map: its ``percentile`` of |value|, at least ``floor``."""
    finite = np.abs(np.asarray(values, np.float64))
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return floor
    return float(max(np.percentile(finite, percentile), floor))


def footprint_edges(mask) -> np.ndarray:
    """Boundary of a footprint mask as pixel-edge segments.

    Pixel (y, x) covers [x - 0.5, x + 0.5] x [y - 0.5, y + 0.5] (pixel centres on
    integers, as ``imshow`` draws them). An edge is kept where a footprint pixel
    meets a pixel outside (or the mask border).

    Returns
    -------
    (n, 2, 2) float array of segments ((x_a, y_a), (x_b, y_b)).
    """
    m = np.pad(np.asarray(mask, bool), 1)
    segs = []
    # horizontal edges: between rows y-1 and y of the unpadded mask
    ys, xs = np.nonzero(m[1:, 1:-1] != m[:-1, 1:-1])
    for y, x in zip(ys, xs):
        segs.append(((x - 0.5, y - 0.5), (x + 0.5, y - 0.5)))
    ys, xs = np.nonzero(m[1:-1, 1:] != m[1:-1, :-1])
    for y, x in zip(ys, xs):
        segs.append(((x - 0.5, y - 0.5), (x - 0.5, y + 0.5)))
    return np.asarray(segs, np.float64).reshape(-1, 2, 2)


def format_flux(value: float) -> str:
    """A flux in at most about five characters (3 significant digits)."""
    v = float(value)
    if not np.isfinite(v):
        return "nan"
    a = abs(v)
    if a >= 1e5:
        mant, exp = f"{v:.1e}".split("e")
        return f"{mant}e{int(exp)}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 0.01 or a == 0:
        return f"{v:.3g}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def label_band(bands) -> int:
    """Index of the band quoted next to each peak: r when present, else the middle band."""
    bands = list(bands)
    return bands.index("r") if "r" in bands else len(bands) // 2


def place_labels(positions, sizes, shape, pad: float = 1.0) -> list[tuple[int, int]]:
    """Which corner of each peak its label goes to, so labels avoid each other and the edges.

    Greedy, in the given order: of the four placements (up-right, up-left,
    down-right, down-left of the peak) each label takes the one that overlaps
    least with the labels already placed, the other peaks' markers and the
    outside of the panel (ties keep that order).

    Parameters
    ----------
    positions : (n, 2) y, x of the peaks, panel coordinates (0 .. h, 0 .. w)
    sizes : (n, 2) height, width of each label, same units
    shape : (h, w) of the panel
    pad : gap between a peak and its label

    Returns
    -------
    list of (sx, sy), each +1 or -1: the label is right of the peak when sx > 0
    and above it (larger y) when sy > 0.
    """
    h, w = shape
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    marker = 1.5 * pad

    def overlap(a, b):  # boxes (x0, y0, x1, y1)
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    markers = [(x - marker, y - marker, x + marker, y + marker) for y, x in pos]
    placed, out = [], []
    for k, ((y, x), (th, tw)) in enumerate(zip(pos, sizes)):
        best = None
        for sx, sy in ((1, 1), (-1, 1), (1, -1), (-1, -1)):
            x0 = x + pad if sx > 0 else x - pad - tw
            y0 = y + pad if sy > 0 else y - pad - th
            cand = (x0, y0, x0 + tw, y0 + th)
            inside = overlap(cand, (0.0, 0.0, w, h))
            cost = 4 * (tw * th - inside) + sum(overlap(cand, p) for p in placed) \
                + sum(overlap(cand, m) for j, m in enumerate(markers) if j != k)
            if best is None or cost < best[0] - 1e-12:
                best = (cost, (sx, sy), cand)
        placed.append(best[2])
        out.append(best[1])
    return out


def fit_lines(text: str, width_in: float, fontsize: float = 8.0, max_lines: int = 4) -> list[str]:
    """``text`` wrapped to lines that fit ``width_in`` inches at ``fontsize`` (at most ``max_lines``)."""
    import textwrap

    chars = max(int(width_in * 72 / (0.55 * fontsize)), 10)
    lines = [w for part in str(text).splitlines() for w in (textwrap.wrap(part, chars) or [""])]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:chars - 3] + "..."
    return lines


# ---------------------------------------------------------------- layout


@dataclass
class BlendLayout:
    """Figure size (inches) and axes rectangles (figure fractions) of a blend picture."""

    figsize: tuple
    data: tuple
    model: tuple
    residual: tuple
    colorbar: tuple
    sources: list = field(default_factory=list)
    main_inches: tuple = (0.0, 0.0)  # width, height of a main panel
    source_inches: tuple = (0.0, 0.0)


def blend_layout(h: int, w: int, n_sources: int, with_data: bool = True,
                 with_model: bool = True, title_lines: int = 2) -> BlendLayout:
    """Panel sizes and positions for an ``h`` x ``w`` blend with ``n_sources`` sources.

    Panels keep the blend's aspect: the long side of the data/model/residual
    panels grows with the blend (0.045 inch per pixel, between 2.4 and 6 inches,
    and the row at most 16 inches wide); source panels are half as large (at
    least 1.4 inches on the long side, and 1.4 inches when that would need more
    than four rows), grown up to the main size so that they fill a grid as
    wide as the main row. The margins are fixed in inches, so
    the figure has no white space beyond the titles and labels. Without data
    only the model panel is drawn; without a model (a parent the run did not
    fit) only the data panel. ``title_lines`` lines of 8-point text fit above.
    """
    h, w = max(int(h), 1), max(int(w), 1)
    long_side = min(max(max(h, w) * 0.045, 2.4), 6.0)
    pw, ph = long_side * w / max(h, w), long_side * h / max(h, w)
    gap, title, left, right, cbar, cbar_pad = 0.12, 0.22, 0.08, 0.08, 0.12, 0.05
    top = 0.1 + 0.16 * max(int(title_lines), 1)  # the figure title's lines
    cbar_labels = 0.42
    n_main = 3 if with_data and with_model else 1
    if n_main == 1:  # a lone panel may be larger
        long_side = min(max(long_side, 3.6), 6.0)
        pw, ph = long_side * w / max(h, w), long_side * h / max(h, w)
    row = n_main * pw + (n_main - 1) * gap + (cbar + cbar_pad + cbar_labels if n_main == 3 else 0)
    if row > 16.0:  # very wide blends: shrink everything to keep the figure on a screen
        f = (16.0 - (row - n_main * pw)) / (n_main * pw)
        pw, ph = pw * f, ph * f
        row = 16.0
    if not with_data:  # the sources' grid spans up to three main panels, as with data
        k = min(max(n_sources, 1), 3)
        row = max(row, k * pw + (k - 1) * gap)
    # source panels: half the main size (at least 1.4 inch; just that when it would take
    # over four rows), then grown to fill the row with as few rows as that size needs
    def grid(s_long):
        sw = s_long * w / max(h, w)
        ncol = max(1, min(n_sources, int((row + gap) // (sw + gap)))) if n_sources else 1
        return sw, ncol, (-(-n_sources // ncol) if n_sources else 0)

    sw, ncol, nrow = grid(max(max(pw, ph) / 2, 1.4))
    if nrow > 4:
        sw, ncol, nrow = grid(1.4)
    if n_sources:
        ncol = -(-n_sources // nrow)
        sw = max(sw, min(pw, (row + gap) / ncol - gap))
    sh = sw * h / w
    s_title = 0.36  # two lines: id and band fluxes
    width = left + max(row, ncol * sw + (ncol - 1) * gap) + right
    height = top + title + ph + nrow * (s_title + sh + gap) + 0.1
    W, H = width, height

    def rect(x_in, y_top_in, wi, hi):  # inches from the top-left -> figure fraction
        return (x_in / W, 1 - (y_top_in + hi) / H, wi / W, hi / H)

    y_main = top + title
    panels = [rect(left + k * (pw + gap), y_main, pw, ph) for k in range(n_main)]
    data = model = resid = cb = None
    if n_main == 3:
        data, model, resid = panels
        cb = rect(left + 3 * pw + 2 * gap + cbar_pad, y_main, cbar, ph)
    elif with_model:
        model = panels[0]
    else:
        data = panels[0]
    sources = []
    for i in range(n_sources):
        r, c = divmod(i, ncol)
        y = y_main + ph + gap + r * (s_title + sh + gap) + s_title
        sources.append(rect(left + c * (sw + gap), y, sw, sh))
    return BlendLayout(figsize=(W, H), data=data, model=model, residual=resid, colorbar=cb,
                       sources=sources, main_inches=(pw, ph), source_inches=(sw, sh))


# ---------------------------------------------------------------- field boxes

FIELD_STYLES = {
    # status: (colour, line style, legend text)
    "parent": ("#d9d9d9", "-", "parent"),
    "deblended": ("#d9d9d9", "-", "deblended"),
    "skipped": ("#ff9f1c", "-", "skipped"),
    "failed": ("#ff2e63", "-", "failed"),
    "absent": ("#8c8c8c", ":", "not in run"),
}


@dataclass
class FieldBox:
    """One parent's box on the field picture."""

    parent_id: int
    y0: int
    x0: int
    height: int
    width: int
    status: str  # a key of FIELD_STYLES
    reason: str = ""

    @property
    def colour(self) -> str:
        return FIELD_STYLES[self.status][0]

    @property
    def linestyle(self) -> str:
        return FIELD_STYLES[self.status][1]


def blend_status(reason: str) -> str:
    """Status of a run's blend from its stored reason ('' fitted, 'isolated', 'failed: ...', else skipped)."""
    reason = str(reason)
    if reason in ("", "isolated"):
        return "deblended"
    if reason.startswith("failed"):
        return "failed"
    return "skipped"


def field_boxes(parent_ids, bboxes, run_parent_ids=None, run_reasons=None) -> list[FieldBox]:
    """One box per parent, coloured by what the run did with it.

    Parameters
    ----------
    parent_ids : (n,) int
    bboxes : (n, 4) int, (y0, x0, height, width) per parent
    run_parent_ids, run_reasons : per-blend parent id and reason of a run, or
        None for no run (every box is a plain "parent").

    Returns
    -------
    list of :class:`FieldBox` in parent order; a parent the run does not hold
    (a run of selected blends) has status "absent".
    """
    bboxes = np.asarray(bboxes, np.int64).reshape(-1, 4)
    by_parent = None
    if run_parent_ids is not None:
        by_parent = {int(p): str(r) for p, r in zip(run_parent_ids, run_reasons)}
    boxes = []
    for pid, (y0, x0, h, w) in zip(np.asarray(parent_ids).tolist(), bboxes.tolist()):
        if by_parent is None:
            status, reason = "parent", ""
        elif pid in by_parent:
            reason = by_parent[pid]
            status = blend_status(reason)
        else:
            status, reason = "absent", ""
        boxes.append(FieldBox(int(pid), y0, x0, h, w, status, reason))
    return boxes


def legend_entries(boxes) -> list[tuple[str, str, str]]:
    """(status, colour, text) of each status present, with counts and skip reasons."""
    out = []
    for status, (colour, _, text) in FIELD_STYLES.items():
        these = [b for b in boxes if b.status == status]
        if not these:
            continue
        label = f"{text}: {len(these)}"
        if status in ("skipped", "failed"):
            reasons = {}
            for b in these:
                key = b.reason.split(":")[1].strip() if status == "failed" and ":" in b.reason else b.reason
                reasons[key] = reasons.get(key, 0) + 1
            label += " (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ")"
        out.append((status, colour, label))
    return out


def bin_image(img, factor: int) -> np.ndarray:
    """Block-average the last two axes of ``img`` by ``factor`` (edges trimmed)."""
    if factor <= 1:
        return np.asarray(img)
    h, w = img.shape[-2] // factor * factor, img.shape[-1] // factor * factor
    cut = np.asarray(img)[..., :h, :w]
    shape = cut.shape[:-2] + (h // factor, factor, w // factor, factor)
    return np.nanmean(cut.reshape(shape), axis=(-3, -1))


# ---------------------------------------------------------------- store readers


@dataclass
class BlendPicture:
    """Everything the blend picture draws, in blend-local pixels."""

    parent_id: int
    run: str
    bands: list
    bbox: tuple
    models: np.ndarray  # (n, B, h, w)
    source_ids: np.ndarray
    positions: np.ndarray  # (n, 2) y, x of each source's first component peak
    data: np.ndarray | None = None
    variance: np.ndarray | None = None
    bad: np.ndarray | None = None
    footprint: np.ndarray | None = None
    summary: str = ""
    fluxes: np.ndarray | None = None  # (n, B) the catalog's model fluxes (None: the pixels' sums)


def _run_row(store, parent_id: int, run: str) -> dict:
    """A run's per-blend columns for one parent (InputError when the run does not hold it)."""
    from .errors import InputError
    from .store.runs import RunIndex

    tables = store.run_tables(run)
    try:
        try:
            b = RunIndex(tables).blend_of_parent(parent_id)
        except KeyError:
            raise InputError(f"{store.path}: no blend for parent {parent_id} in run {run}") from None
        row = {k: tables.col(f"blend_{k}")[b] for k in
               ("n_sources", "iterations", "log_likelihood", "converged", "reason", "y0", "x0",
                "height", "width")}
        row["bands"] = list(tables.bands)
        return row
    finally:
        tables.close()


def _exposure_box(store, bbox):
    """(image, variance, bad) of the exposure in ``bbox``; bad from the exposure's bad planes."""
    from .ingest.exposure import DEFAULT_BAD_PLANES, bad_bits

    y0, x0, h, w = bbox
    with store.open("exposure") as ex:
        box = dict(y=slice(y0, y0 + h), x=slice(x0, x0 + w))
        image = np.asarray(ex["image"].isel(**box).values)
        variance = np.asarray(ex["variance"].isel(**box).values)
        planes = json.loads(ex.attrs.get("mask_planes", "{}"))
        bad_planes = json.loads(ex.attrs.get("bad_mask_planes", json.dumps(DEFAULT_BAD_PLANES)))
        bad = (np.asarray(ex["mask"].isel(**box).values) & bad_bits(planes, bad_planes)) != 0
    return image, variance, bad


def _parent_footprint(store, parent_id: int, bbox):
    """(footprint mask in ``bbox``, peak ids, (n, 2) peak y, x in ``bbox``) from the parents, or Nones."""
    from .detect.footprint import counts_to_offsets, spans_to_mask

    if not store.has("parents"):
        return None, None, None
    with store.open("parents") as p:
        hit = np.flatnonzero(p["parent_id"].values == int(parent_id))
        if not hit.size:
            return None, None, None
        off = counts_to_offsets(p["span_count"].values)
        sl = slice(off[hit[0]], off[hit[0] + 1])
        mask = spans_to_mask(p["span_y"].values[sl], p["span_x0"].values[sl], p["span_x1"].values[sl], bbox)
        mine = p["peak_parent"].values == int(parent_id)
        ids = np.asarray(p["peak_id"].values[mine])
        peaks = np.stack([p["peak_y"].values[mine] - bbox[0], p["peak_x"].values[mine] - bbox[1]], axis=1)
    return mask, ids, peaks


def read_blend_picture(store, parent_id: int, run: str) -> BlendPicture:
    """Read one blend's data, variance, bad pixels, footprint and models from a store.

    A parent the run holds without models (skipped or failed) gives a picture
    of its data with the parent's peaks (``source_ids`` are then peak ids and
    ``models`` has no rows); it needs the exposure.
    """
    from .errors import InputError
    from .measure.catalog import blend_views
    from .measure.photometry.blend import model_fluxes

    row = _run_row(store, parent_id, run)
    bbox = tuple(int(row[k]) for k in ("y0", "x0", "height", "width"))
    y0, x0, h, w = bbox
    footprint, peak_ids, peaks = _parent_footprint(store, parent_id, bbox)
    reason = str(row["reason"])
    if int(row["n_sources"]) == 0:
        if not store.has("exposure"):
            raise InputError(f"blend {parent_id} of run {run} has no models ({reason}) and the store "
                             "has no exposure to show")
        models = np.zeros((0, len(row["bands"]), h, w), np.float32)
        pic = BlendPicture(parent_id=int(parent_id), run=run, bands=row["bands"], bbox=bbox, models=models,
                           source_ids=peak_ids if peak_ids is not None else np.zeros(0, np.int64),
                           positions=peaks if peaks is not None else np.zeros((0, 2)), footprint=footprint)
        pic.data, pic.variance, pic.bad = _exposure_box(store, bbox)
        n_pk = 0 if peak_ids is None else len(peak_ids)
        pic.summary = f"blend {parent_id} (run {run}): {n_pk} peaks, {h}x{w} px\nnot deblended: {reason}"
        return pic
    data, models, bands, blend = blend_views(store, parent_id, run)
    positions = np.array([[s.components[0].peak[0] - y0, s.components[0].peak[1] - x0]
                          for s in blend.sources], np.float64).reshape(-1, 2)
    pic = BlendPicture(parent_id=int(parent_id), run=run, bands=list(bands), bbox=bbox, models=models,
                       source_ids=np.asarray(blend.source_ids), positions=positions, data=data,
                       footprint=footprint, fluxes=model_fluxes(blend.sources, len(bands)))
    if data is not None:
        _, pic.variance, pic.bad = _exposure_box(store, bbox)
    fit = reason or (f"{int(row['iterations'])} iterations, logL {float(row['log_likelihood']):.6g}, "
                     + ("converged" if bool(row["converged"]) else "NOT converged"))
    pic.summary = f"blend {parent_id} (run {run}): {len(models)} sources, {h}x{w} px, {fit}"
    return pic


def read_field(store, run: str | None = None):
    """(bands, rgb index, (3, H, W) image, boxes) of a store's whole exposure."""
    if not store.has("exposure"):
        from .errors import InputError
        raise InputError(f"{store.path}: no exposure group; run 'scarletstore ingest' first")
    if not store.has("parents"):
        from .errors import InputError
        raise InputError(f"{store.path}: no parents; run 'scarletstore detect' first")
    with store.open("exposure") as ex:
        bands = [str(b) for b in ex["band"].values]
        idx = rgb_bands(bands)
        image = np.stack([np.asarray(ex["image"].isel(band=k).values) for k in idx])
    with store.open("parents") as p:
        ids = np.asarray(p["parent_id"].values)
        bboxes = np.stack([np.asarray(p[v].values) for v in
                           ("bbox_y0", "bbox_x0", "bbox_height", "bbox_width")], axis=1)
    run_ids = run_reasons = None
    if run is not None:
        tables = store.run_tables(run)
        try:
            run_ids = np.asarray(tables.col("blend_parent_id"))
            run_reasons = np.asarray(tables.col("blend_reason"))
        finally:
            tables.close()
    return bands, idx, image, field_boxes(ids, bboxes, run_ids, run_reasons)


# ---------------------------------------------------------------- renderers


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import InputError
        raise InputError("pictures need matplotlib: pip install 'scarletstore[plot]'") from None
    return plt


def _mark_sources(ax, positions, labels, colour="#00e5ff", fontsize=6.5):
    """Peak markers with a text label each, legible on light and dark pixels and not overlapping."""
    import matplotlib.patheffects as pe

    halo = [pe.withStroke(linewidth=1.6, foreground="black")]
    fig = ax.figure
    box = ax.get_position()
    h = ax.get_ylim()[1] - ax.get_ylim()[0]
    w = ax.get_xlim()[1] - ax.get_xlim()[0]
    per_pt = w / (box.width * fig.get_figwidth() * 72)  # data pixels per typographic point
    pad = 2.5
    sizes = [(fontsize * 1.1 * per_pt, 0.6 * fontsize * len(t) * per_pt) for t in labels]
    local = np.asarray(positions, np.float64).reshape(-1, 2) + 0.5  # panel starts at -0.5
    signs = place_labels(local, sizes, (h, w), pad * per_pt)
    for (y, x), text, (sx, sy) in zip(positions, labels, signs):
        ax.plot([x], [y], marker="+", ms=5, mew=0.9, color=colour, path_effects=halo)
        ax.annotate(text, (x, y), xytext=(sx * pad, sy * pad), textcoords="offset points",
                    fontsize=fontsize, color=colour, path_effects=halo,
                    ha="left" if sx > 0 else "right", va="bottom" if sy > 0 else "top",
                    annotation_clip=False)


def _draw_outline(ax, footprint, colour="#ffd60a", lw=0.8):
    from matplotlib.collections import LineCollection

    if footprint is None:
        return
    segs = footprint_edges(footprint)
    if len(segs):
        ax.add_collection(LineCollection(segs, colors=colour, linewidths=lw, alpha=0.9))


def _bare(ax, h, w):
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(-0.5, h - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def show_blend(pic: BlendPicture, path, dpi: int = 110) -> tuple[int, int]:
    """Write the blend picture: data, model, residual in sigma, then each source.

    Data and model share one noise-based asinh stretch and carry the sources'
    peaks with ids (model: with the flux in :func:`label_band`); the residual
    is :func:`combined_residual` of :func:`residual_sigma` on a diverging map
    with symmetric limits and a colour bar; the parent footprint is outlined on
    all three. Every source panel has its own stretch (:func:`source_panel`)
    and is titled with the source's flux in each band.

    Returns
    -------
    (width, height) of the written image in pixels.
    """
    if len(pic.models) == 0:
        return _show_data_only(pic, path, dpi)
    plt = _pyplot()
    bands, models = pic.bands, pic.models
    n, _, h, w = models.shape
    idx = rgb_bands(bands)
    model = models.sum(axis=0)
    # the labels quote the catalog's flux (the whole model), not the part
    # inside the picture's box, so the two agree
    fluxes = pic.fluxes if pic.fluxes is not None else models.sum(axis=(2, 3))
    lb = label_band(bands)
    note = ("footprint outlined; data and model on one stretch, each source on its own"
            if pic.data is not None else "no exposure in the store: models only; each source on its own stretch")
    width = blend_layout(h, w, n, with_data=pic.data is not None).figsize[0]
    lines = fit_lines(pic.summary + "\n" + note, width - 0.16)
    lay = blend_layout(h, w, n, with_data=pic.data is not None, title_lines=len(lines))
    fig = plt.figure(figsize=lay.figsize, dpi=dpi)
    # without data there is no noise to set the stretch: the summed model's own range instead
    q = 8.0 if pic.data is not None else 5.0  # as the source panels when there is no noise
    stretch = auto_stretch(pic.data[idx]) if pic.data is not None else \
        (source_stretch(model[idx], q=q) or 1.0)
    ids = [str(int(s)) for s in pic.source_ids]
    # 64-bit pipeline ids do not fit next to a peak: their last digits there, in full on the panels
    marks = [i if len(i) <= 6 else "..." + i[-4:] for i in ids]
    main_font = 8
    if pic.data is not None:
        _draw_composite(fig.add_axes(lay.data), pic.data[idx], stretch, pic, marks,
                        f"data (R,G,B = {','.join(bands[i] for i in idx)})", main_font)
    _draw_composite(fig.add_axes(lay.model), model[idx], stretch, pic,
                    [f"{i}: {format_flux(f)}" for i, f in zip(marks, fluxes[:, lb])],
                    f"model (labels: id: {bands[lb]} flux)", main_font, q=q)
    if pic.data is not None:
        _draw_residual(fig, lay, pic, model, main_font)
    for i, rect in enumerate(lay.sources):
        _draw_source(fig, rect, models[i], idx, ids[i], fluxes[i], bands, pic.positions[i])
    fig.suptitle("\n".join(lines), fontsize=8, linespacing=1.3,
                 x=0.08 / lay.figsize[0], y=1 - 0.1 / lay.figsize[1], ha="left", va="top")
    return _save(fig, path, dpi)


def _save(fig, path, dpi) -> tuple[int, int]:
    """Write ``fig`` as PNG through a temporary file, so a failed write leaves no partial picture."""
    import os
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=dpi, facecolor="white", format="png")
        os.replace(tmp, path)
        return fig.canvas.get_width_height()
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def _draw_composite(ax, rgb, stretch, pic, labels, title, fontsize, q=8.0):
    """A data or model panel: asinh RGB, footprint outline, labelled peaks."""
    h, w = rgb.shape[-2:]
    ax.imshow(lupton_rgb(rgb, stretch=stretch, q=q), origin="lower", interpolation="nearest")
    _bare(ax, h, w)
    _draw_outline(ax, pic.footprint)
    _mark_sources(ax, pic.positions, labels)
    ax.set_title(title, fontsize=fontsize)


def _show_data_only(pic: BlendPicture, path, dpi: int) -> tuple[int, int]:
    """A parent the run did not fit: its data, footprint and peaks (labelled p<peak id>)."""
    plt = _pyplot()
    _, h, w = pic.data.shape
    idx = rgb_bands(pic.bands)
    # the reason of a failure can be long: wrap it to the picture's width
    lines = fit_lines(pic.summary, blend_layout(h, w, 0, with_model=False).figsize[0] - 0.16)
    lay = blend_layout(h, w, 0, with_model=False, title_lines=len(lines))
    fig = plt.figure(figsize=lay.figsize, dpi=dpi)
    ax = fig.add_axes(lay.data)
    ax.imshow(lupton_rgb(pic.data[idx], stretch=auto_stretch(pic.data[idx])), origin="lower",
              interpolation="nearest")
    _bare(ax, h, w)
    _draw_outline(ax, pic.footprint)
    _mark_sources(ax, pic.positions, [f"p{int(i)}" for i in pic.source_ids])
    ax.set_title(f"data (R,G,B = {','.join(pic.bands[i] for i in idx)})", fontsize=8)
    fig.text(0.08 / lay.figsize[0], 1 - 0.1 / lay.figsize[1], "\n".join(lines),
             fontsize=8, ha="left", va="top", linespacing=1.3)
    return _save(fig, path, dpi)


def _draw_residual(fig, lay, pic, model, fontsize):
    import matplotlib

    n_b, h, w = model.shape
    chi = combined_residual(residual_sigma(pic.data, model, pic.variance, pic.bad))
    lim = symmetric_limit(chi)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#7f7f7f")  # unusable pixels grey
    ax = fig.add_axes(lay.residual)
    im = ax.imshow(chi, origin="lower", interpolation="nearest", cmap=cmap, vmin=-lim, vmax=lim)
    _draw_outline(ax, pic.footprint, colour="black", lw=0.7)
    _bare(ax, h, w)
    inside = pic.footprint if pic.footprint is not None else np.ones((h, w), bool)
    vals = chi[inside & np.isfinite(chi)]
    rms = float(np.sqrt(np.mean(vals**2))) if vals.size else float("nan")
    ax.set_title(f"residual in sigma, rms {rms:.2f}", fontsize=fontsize)
    cax = fig.add_axes(lay.colorbar)
    cb = fig.colorbar(im, cax=cax)
    cb.ax.tick_params(labelsize=6.5)
    cb.set_label(r"$\sum_b (d-m)/\sigma_b\,/\sqrt{N_b}$", fontsize=7)


def _draw_source(fig, rect, model_i, idx, sid, flux, bands, pos):
    import matplotlib

    h, w = model_i.shape[-2:]
    ax = fig.add_axes(rect)
    panel = source_panel(model_i, idx)
    if panel.kind == "rgb":
        ax.imshow(panel.image, origin="lower", interpolation="nearest")
    elif panel.kind == "signed":
        ax.imshow(panel.image, origin="lower", interpolation="nearest",
                  cmap=matplotlib.colormaps["RdBu_r"], vmin=-panel.limit, vmax=panel.limit)
    else:
        ax.set_facecolor("#7f7f7f")
        ax.text(0.5, 0.5, "zero model", transform=ax.transAxes, ha="center", va="center",
                fontsize=7, color="white")
    ax.plot([pos[1]], [pos[0]], marker="+", ms=3, mew=0.6, color="#00e5ff", alpha=0.7)
    _bare(ax, h, w)
    per = [f"{b} {format_flux(f)}" for b, f in zip(bands, flux)]
    lines = [" ".join(per[k:k + 3]) for k in range(0, len(per), 3)]
    note = "" if panel.kind == "rgb" else ("  (band sum)" if panel.kind == "signed" else "")
    ax.set_title(f"source {sid}{note}\n" + "\n".join(lines[:2]), fontsize=6, linespacing=1.05, pad=2)


def _draw_boxes(ax, boxes):
    """Every parent's box; ids at the corners when they can be read, always on skipped/failed ones."""
    import matplotlib.patheffects as pe
    from matplotlib.patches import Rectangle

    lw = 0.5 if len(boxes) > 500 else 0.8
    label_ids = len(boxes) <= 400
    halo = [pe.withStroke(linewidth=1.2, foreground="black")]
    for b in boxes:
        marked = b.status in ("skipped", "failed")
        # the box encloses whole pixels: edges half a pixel outside the pixel centres
        ax.add_patch(Rectangle((b.x0 - 0.5, b.y0 - 0.5), b.width, b.height, fill=False,
                               edgecolor=b.colour, linestyle=b.linestyle, linewidth=lw * (1.6 if marked else 1)))
        if label_ids or marked:
            ax.text(b.x0 - 0.5, b.y0 + b.height - 0.5, str(b.parent_id), fontsize=5.5,
                    color=b.colour, ha="left", va="bottom", path_effects=halo, clip_on=True)


def show_field(bands, idx, image, boxes, path, title: str = "", dpi_max: int = 300) -> tuple[int, int]:
    """Write the whole exposure as an asinh RGB with every parent's box.

    Boxes are coloured by :data:`FIELD_STYLES` (skipped and failed parents
    stand out, with a legend giving counts and reasons); parent ids are written
    at the box corners when there are few enough boxes to read them. Fields over
    2000 pixels are block-averaged for display (boxes stay in exposure pixels).

    Returns
    -------
    (width, height) of the written image in pixels.
    """
    from matplotlib.lines import Line2D

    plt = _pyplot()
    _, H, W = image.shape
    factor = max(1, int(np.ceil(max(H, W) / 2000)))
    shown = bin_image(image, factor)
    # black at zero, the sky level the deblender assumes (a median would be biased high in a
    # crowded cut-out); twice the blend panels' stretch (about 10 sigma), because a whole field
    # is mostly sky and the noisiest (reddest) channel would otherwise tint it
    rgb = lupton_rgb(shown, stretch=2 * auto_stretch(shown))
    long_in = min(max(max(H, W) / 60, 6.0), 12.0)
    iw, ih = long_in * W / max(H, W), long_in * H / max(H, W)
    entries = legend_entries(boxes)
    ticks = 0.3  # room for the x tick labels under the image
    top, bottom, side = 0.32, ticks + 0.15 + 0.17 * len(entries), 0.4
    fig_w, fig_h = iw + side + 0.15, ih + top + bottom
    dpi = int(min(max(max(H, W) / long_in, 100), dpi_max))
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.add_axes((side / fig_w, bottom / fig_h, iw / fig_w, ih / fig_h))
    ax.imshow(rgb, origin="lower", interpolation="nearest",
              extent=(-0.5, shown.shape[-1] * factor - 0.5, -0.5, shown.shape[-2] * factor - 0.5))
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(-0.5, H - 0.5)
    ax.tick_params(labelsize=6.5)
    _draw_boxes(ax, boxes)
    handles = [Line2D([], [], color=c, lw=1.5, ls=FIELD_STYLES[s][1], label=t) for s, c, t in entries]
    if handles:
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(side / fig_w, 0.05 / fig_h),
                   fontsize=7, ncol=1, handlelength=2.0, borderaxespad=0.0,
                   # a dark key, as behind the boxes, so the light "deblended" line shows
                   frameon=True, facecolor="#1a1a1a", edgecolor="none", framealpha=1.0,
                   labelcolor="white")
    fig.text(side / fig_w, 1 - 0.08 / fig_h, f"{title}   R,G,B = {','.join(bands[i] for i in idx)}"
             + (f"   (shown binned {factor}x{factor})" if factor > 1 else ""),
             fontsize=8, ha="left", va="top")
    return _save(fig, path, dpi)
