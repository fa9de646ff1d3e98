"""A second scene generator, independent of :mod:`.field` and deliberately unlike it.

:mod:`.field` renders galsim bulge + disk galaxies under a Moffat PSF with
white noise: the deblender's own assumptions. This module (numpy only, no
galsim, nothing shared with :mod:`.field`) makes blended scenes that break
them, so that the deblender can be judged on fields our simulator did not make:

* Sersic profiles with ``n`` from 0.5 to 4, elliptical, truncated at
  ``TRUNCATE`` half-light radii, rendered with 5 x 5 sub-pixels;
* galaxy kinds: single Sersic; bulge + disk with the bulge off the disk centre
  (up to 1.5 px) and a colour gradient (the disk's half-light radius grows
  towards blue bands); clumpy star-forming disks with 2-6 compact knots of a
  much bluer colour; stars, a few of them bright enough to show the PSF wings;
* a PSF per band made of a Gaussian core, a wider Gaussian and Moffat wings
  (beta 2.5), each band with its own width and ellipticity;
* noise correlated between neighbouring pixels, as a warp leaves it: white
  noise smoothed by a 3 x 3 kernel scaled so that the per-pixel variance is
  still the stated one (the variance plane, like a warp's, ignores the
  covariance);
* sources placed in groups of 1-5 within a few pixels of each other.

Truth is every source's noise-free PSF-convolved image per band, a stamp that
sums to the source's stated flux in that band (the PSF convolution keeps the
whole profile; a stamp cut by the scene's edge states the flux left inside).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BANDS = ("g", "r", "i", "z")
TRUNCATE = 5.0          # profiles end at this many half-light radii (n = 4 carries ~8 % beyond)
OVERSAMPLE = 5          # sub-pixels per pixel side when rendering profiles
PSF_SIZE = 41
# per band: core Gaussian sigma (px), ellipticity (e1, e2); wings are shared in kind, not in size
PSF_CORE = {"g": 1.45, "r": 1.25, "i": 1.1, "z": 1.2}
PSF_ELL = {"g": (0.04, 0.0), "r": (0.0, 0.05), "i": (-0.03, 0.02), "z": (0.06, -0.04)}
NOISE_SIGMA = {"g": 0.8, "r": 1.0, "i": 1.2, "z": 1.6}
# warp-like smoothing of the noise; normalised to unit sum of squares below
NOISE_KERNEL_1D = np.array([0.08, 0.84, 0.08])
KINDS = {"sersic": 0.4, "bulge_disk": 0.35, "clumpy": 0.25}  # galaxy kinds and their shares


@dataclass
class Scene:
    """A generated scene: noise-free and observed images, variance, PSFs, truth."""

    bands: tuple
    image: np.ndarray            # (band, y, x) observed
    model: np.ndarray            # (band, y, x) noise-free: the sum of the stamps
    variance: np.ndarray         # (band, y, x) per-pixel noise variance
    psfs: np.ndarray             # (band, PSF_SIZE, PSF_SIZE), each sums to 1
    truth: dict = field(default_factory=dict)   # column -> array: id, y, x, kind, flux_<band>
    stamps: dict = field(default_factory=dict)  # id -> ((y0, x0, h, w), (band, h, w) float64)


def sersic_b(n):
    """b_n of the Sersic profile exp(-b_n (r / r_e)^(1/n)) (Ciotti & Bertin 1999 expansion)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n * n)


def _grid(shape, cy, cx, over):
    """Sub-pixel centre coordinates (relative to cy, cx) of an (h, w) grid, over x over per pixel."""
    h, w = shape
    off = (np.arange(over) + 0.5) / over - 0.5
    y = (np.arange(h)[:, None] + off[None]).ravel() - cy
    x = (np.arange(w)[:, None] + off[None]).ravel() - cx
    return y[:, None], x[None]


def _binned(img, over):
    """Sum over-sampled pixels back into pixels."""
    h, w = img.shape[0] // over, img.shape[1] // over
    return img.reshape(h, over, w, over).sum(axis=(1, 3))


def sersic_image(shape, cy, cx, re, n, q, theta, over=OVERSAMPLE):
    """Unit-sum Sersic profile on an (h, w) pixel grid, centred at (cy, cx) in pixels.

    ``q`` is the axis ratio, ``theta`` the position angle (radians, from x);
    truncated at ``TRUNCATE`` half-light radii and normalised to sum 1 after
    the truncation, so the stated flux is what the stamp holds.
    """
    y, x = _grid(shape, cy, cx, over)
    c, s = np.cos(theta), np.sin(theta)
    u, v = x * c + y * s, -x * s + y * c
    r = np.sqrt(u * u + (v / q) ** 2)
    prof = np.exp(-sersic_b(n) * (r / re) ** (1.0 / n))
    prof[r > TRUNCATE * re] = 0.0
    img = _binned(prof, over)
    return img / img.sum()


def psf_image(band, size=PSF_SIZE, wings=True):
    """The band's PSF: 0.75 Gaussian core, 0.15 Gaussian of twice its width, 0.10
    Moffat wings (beta 2.5, FWHM 2.5 x the core's); sheared by the band's
    ellipticity, 5 x 5 sub-pixels, centred on the central pixel, unit sum.
    ``wings=False``: the Gaussian core alone (for ablations)."""
    s = PSF_CORE[band]
    e1, e2 = PSF_ELL[band]
    c = (size - 1) / 2
    y, x = _grid((size, size), c, c, OVERSAMPLE)
    # a small shear: r^2 of the sheared coordinates
    r2 = (1 - e1) * x * x + (1 + e1) * y * y - 2 * e2 * x * y
    fwhm_w = 2.5 * 2.3548 * s
    alpha = fwhm_w / (2 * np.sqrt(2 ** (1 / 2.5) - 1))
    parts = 0.75 * np.exp(-r2 / (2 * s * s)) / (2 * np.pi * s * s)
    if wings:
        parts = parts + (0.15 * np.exp(-r2 / (8 * s * s)) / (8 * np.pi * s * s)
                         + 0.10 * (1.5 / (np.pi * alpha * alpha)) * (1 + r2 / alpha ** 2) ** -2.5)
    img = _binned(parts, OVERSAMPLE)
    return img / img.sum()


def convolve_full(img, psf):
    """Full linear convolution (h + p - 1, w + p - 1) by FFT: keeps the whole sum."""
    h, w = img.shape
    p = psf.shape[0]
    shape = (h + p - 1, w + p - 1)
    return np.fft.irfft2(np.fft.rfft2(img, shape) * np.fft.rfft2(psf, shape), shape)


def _seds(rng, kind):
    """Flux fractions per band (sum 1) of a component kind: red, blue, knot (bluer) or star."""
    slope = {"red": rng.uniform(0.25, 0.5), "blue": rng.uniform(-0.15, 0.1),
             "knot": rng.uniform(-0.6, -0.35), "star": rng.uniform(-0.4, 0.6)}[kind]
    f = np.exp(slope * np.arange(len(BANDS)))
    return f / f.sum()


def _galaxy_components(rng, flux, kinds=KINDS, n_range=(0.5, 4.0)):
    """Intrinsic components of one galaxy, relative to its centre: a list of
    (dy, dx, re, n, q, theta, flux per band, radius scale per band)."""
    kind = rng.choice(list(kinds), p=list(kinds.values()))
    re = float(np.exp(rng.uniform(np.log(1.0), np.log(5.0))))
    q, theta = rng.uniform(0.3, 1.0), rng.uniform(0, np.pi)
    no_gradient = np.ones(len(BANDS))
    if kind == "sersic":
        sed = _seds(rng, rng.choice(["red", "blue"]))
        return kind, [(0.0, 0.0, re, rng.uniform(*n_range), q, theta, flux * sed, no_gradient)]
    if kind == "bulge_disk":
        fb = rng.uniform(0.2, 0.6)
        off = rng.uniform(0, 1.5) * np.array([np.sin(a := rng.uniform(0, 2 * np.pi)), np.cos(a)])
        gradient = 1 + 0.12 * (len(BANDS) - 1 - np.arange(len(BANDS)))  # bluer bands wider
        return kind, [(0.0, 0.0, 1.5 * re, 1.0, q, theta, (1 - fb) * flux * _seds(rng, "blue"), gradient),
                      (off[0], off[1], max(0.4 * re, 0.5), rng.uniform(2.5, 4.0), rng.uniform(0.6, 1.0),
                       theta, fb * flux * _seds(rng, "red"), no_gradient)]
    comps = [(0.0, 0.0, 1.3 * re, rng.uniform(0.5, 1.2), q, theta, 0.6 * flux * _seds(rng, "blue"),
              no_gradient)]
    nk = int(rng.integers(2, 7))
    share = rng.dirichlet(np.ones(nk)) * 0.4 * flux
    for k in range(nk):
        r, a = 1.3 * re * np.sqrt(rng.uniform(0.05, 1.0)), rng.uniform(0, 2 * np.pi)
        comps.append((r * np.sin(a), r * np.cos(a), rng.uniform(0.3, 0.7), 0.5, 1.0, 0.0,
                      share[k] * _seds(rng, "knot"), no_gradient))
    return kind, comps


def _render_galaxy(comps, cy, cx, psfs):
    """Stamp (bbox in scene pixels relative to an unclipped origin, (band, h, w)) of one galaxy."""
    extent = max(abs(dy) + abs(dx) + TRUNCATE * re * g.max() for dy, dx, re, *_, g in comps)
    half = int(np.ceil(extent)) + 1
    y0, x0 = int(np.floor(cy)) - half, int(np.floor(cx)) - half
    size = 2 * half + 1
    intrinsic = np.zeros((len(BANDS), size, size))
    for dy, dx, re, n, q, theta, flux, grad in comps:
        for b in range(len(BANDS)):
            if flux[b] > 0:
                intrinsic[b] += flux[b] * sersic_image((size, size), cy + dy - y0, cx + dx - x0,
                                                       re * grad[b], n, q, theta)
    p = psfs.shape[1] // 2
    stamp = np.stack([convolve_full(intrinsic[b], psfs[b]) for b in range(len(BANDS))])
    return (y0 - p, x0 - p), stamp


def fourier_shift(img, dy, dx):
    """``img`` moved by (dy, dx) pixels by a Fourier phase (circular), ringing clipped at zero."""
    h, w = img.shape
    phase = np.exp(-2j * np.pi * (np.fft.fftfreq(h)[:, None] * dy + np.fft.rfftfreq(w)[None] * dx))
    return np.clip(np.fft.irfft2(np.fft.rfft2(img) * phase, (h, w)), 0, None)


def render_star(flux, cy, cx, psfs):
    """A star: each band's PSF moved to (cy, cx) by :func:`fourier_shift` (the PSFs
    are wide enough to be nearly band-limited), scaled to ``flux[b]``. Returns
    the (y0, x0) of the stamp and the (band, p, p) stamp."""
    p = psfs.shape[1]
    iy, ix = int(np.floor(cy)), int(np.floor(cx))
    stamp = np.empty((len(flux), p, p))
    for b in range(len(flux)):
        img = fourier_shift(psfs[b], cy - iy, cx - ix)
        stamp[b] = flux[b] * img / img.sum()
    return (iy - p // 2, ix - p // 2), stamp


def _positions(rng, size, n_groups, margin, spacing=(2.5, 9.0)):
    """Source centres in groups of 1-5: the first at random, the others ``spacing`` px from a member."""
    pos = []
    for _ in range(n_groups):
        members = [rng.uniform(margin, size - margin, 2)]
        for _ in range(int(rng.choice([0, 1, 1, 2, 2, 3, 4]))):
            base = members[int(rng.integers(len(members)))]
            d, a = rng.uniform(*spacing), rng.uniform(0, 2 * np.pi)
            members.append(np.clip(base + d * np.array([np.sin(a), np.cos(a)]), margin, size - margin))
        pos.extend(members)
    return np.array(pos)


def correlated_noise(rng, shape, sigma, kernel_1d=NOISE_KERNEL_1D):
    """Gaussian noise of per-pixel standard deviation ``sigma`` with warp-like
    correlation between neighbours (white noise smoothed by a 3 x 3 kernel of
    unit sum of squares, so the variance is unchanged)."""
    k = np.outer(kernel_1d, kernel_1d)
    k /= np.sqrt((k * k).sum())
    white = rng.standard_normal((shape[0] + 2, shape[1] + 2))
    out = np.zeros(shape)
    for i in range(3):
        for j in range(3):
            out += k[i, j] * white[i:i + shape[0], j:j + shape[1]]
    return sigma * out


def make_scene(seed, size=300, n_groups=40, star_fraction=0.12, bright_stars=2, *, kinds=KINDS,
               n_range=(0.5, 4.0), spacing=(2.5, 9.0), psf_wings=True, correlated=True):
    """Generate one scene (see the module docstring); deterministic in ``seed``.

    The keywords turn the generator's features down one at a time (ablations):
    ``kinds`` (galaxy kind -> probability), the Sersic ``n_range`` of single
    profiles, the ``spacing`` range within groups, ``psf_wings=False`` (the
    Gaussian core alone) and ``correlated=False`` (white noise).

    Fluxes (summed over the bands): galaxies log-uniform over 300-12000
    counts, stars 300-6000 and the
    ``bright_stars`` 3e4-1.5e5 (wings visible over tens of pixels), for
    per-pixel noise sigmas of ``NOISE_SIGMA`` (S/N of ~10 to several hundred).
    """
    rng = np.random.default_rng(seed)
    psfs = np.stack([psf_image(b, wings=psf_wings) for b in BANDS])
    pos = _positions(rng, size, n_groups, margin=8, spacing=spacing)
    nb = len(BANDS)
    model = np.zeros((nb, size, size))
    cols = {k: [] for k in ("id", "y", "x", "kind")}
    flux_cols = {b: [] for b in BANDS}
    stamps = {}
    bright = set(rng.choice(len(pos), size=min(bright_stars, len(pos)), replace=False).tolist())
    for k, (cy, cx) in enumerate(pos):
        if k in bright or rng.uniform() < star_fraction:
            lo, hi = (3e4, 1.5e5) if k in bright else (300, 6000)
            flux = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            kind, (origin, stamp) = "star", render_star(flux * _seds(rng, "star"), cy, cx, psfs)
        else:
            flux = float(np.exp(rng.uniform(np.log(300), np.log(12000))))
            kind, comps = _galaxy_components(rng, flux, kinds, n_range)
            origin, stamp = _render_galaxy(comps, cy, cx, psfs)
        # clip to the scene; the stated flux is what lies inside it
        y0, x0 = origin
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + stamp.shape[1], size), min(x0 + stamp.shape[2], size)
        cut = stamp[:, ya - y0:yb - y0, xa - x0:xb - x0]
        model[:, ya:yb, xa:xb] += cut
        sid = k + 1
        stamps[sid] = ((ya, xa, yb - ya, xb - xa), cut)
        for name, v in zip(("id", "y", "x", "kind"), (sid, cy, cx, kind)):
            cols[name].append(v)
        for b, band in enumerate(BANDS):
            flux_cols[band].append(float(cut[b].sum()))
    variance = np.stack([np.full((size, size), NOISE_SIGMA[b] ** 2) for b in BANDS])
    kern = NOISE_KERNEL_1D if correlated else np.array([0.0, 1.0, 0.0])
    noise = np.stack([correlated_noise(rng, (size, size), NOISE_SIGMA[b], kern) for b in BANDS])
    truth = {k: np.asarray(v) for k, v in cols.items()}
    truth.update({f"flux_{b}": np.asarray(v) for b, v in flux_cols.items()})
    return Scene(bands=BANDS, image=model + noise, model=model, variance=variance, psfs=psfs,
                 truth=truth, stamps=stamps)
