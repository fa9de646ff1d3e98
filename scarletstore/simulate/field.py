"""Simulated LSST-like multi-band coadd patches with a full truth record.

:func:`simulate_field` renders a square patch of bulge + disk galaxies and
stars with GalSim, adds Gaussian noise at LSST ten-year coadd depth, and
writes:

* ``<band>.fits`` per band in the Rubin/HSC coadd cut-out layout read by the
  ingest (primary HDU, then ``IMAGE``, ``MASK``, ``VARIANCE``, ``PSF``);
* ``truth.fits``: one row per source (position, sky position, flux per band,
  star flag, i magnitude, bulge fraction, sizes and shapes);
* ``truth_images.npz``: the noise-free PSF-convolved image of every source in
  every band as postage stamps that add up exactly to the noise-free field.

Model choices (all stated so that benchmarks can quote them):

* Pixel scale 0.2 arcsec; TAN WCS centred on RA 150.1, Dec 2.2 (COSMOS).
* Image units are nJy: ``MAGZERO = 31.4`` (AB), ``FLUXMAG0 = 10**(0.4*31.4)``.
* PSF per band: Moffat, beta 3.5, truncated at 4 arcsec (so the 41 x 41 PSF
  image holds the whole PSF), with a small common ellipticity, FWHM (arcsec)
  u 0.95, g 0.88, r 0.80, i 0.75, z 0.72, y 0.70.
* 5-sigma point-source depths (AB) u 25.6, g 26.9, r 26.9, i 26.4, z 25.6,
  y 24.8. The per-pixel noise is set so that a PSF-weighted point-source flux
  measurement reaches these depths; the variance varies smoothly by +-5 %
  across the patch, as coadd depth does with the dither pattern.
* Sources: ``density`` per arcmin^2 (Poisson), 12 % stars. Galaxies have
  i in [20, 26.5] with log-slope 0.31 per mag, an exponential disk (blue SED)
  plus a de Vaucouleurs bulge (red SED) sharing one position angle; stars
  have i in [18, 25.5] and colours along a main-sequence stellar locus.
  Profiles are truncated (disk at 4.5, bulge at 8 nominal half-light radii)
  so every stamp holds the whole profile and sums to the truth flux.

Options make fields unlike the default (each off by default, and the default
output does not change when they are off; their random draws come from
generators of their own):

* ``psf_beta``: the Moffat beta of every band's PSF (2.5-3 gives strong
  wings, as in poor seeing with a bright halo).
* ``bright_stars``: that many extra stars with i in [14.5, 18] on the same
  stellar locus; with ``saturation`` (nJy per pixel) the pixels of the
  observed image above it are clipped to it and flagged SAT.
* ``cosmic_rays``: per band, that many raw cosmic-ray tracks (1-8 px long,
  20-300 sigma per pixel) added to the image and flagged CR.
* ``bad_columns``: per band, that many hot columns (half to full height,
  +5 to +50 sigma) kept at their raw value and flagged BAD.
* ``density`` near zero gives mostly-sky fields.

When any artifact is made, ``truth_artifacts.fits`` lists each one (kind,
band, the source a saturated core belongs to, centre, bounding box, pixels).
"""

from __future__ import annotations

import io
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["simulate_field", "load_truth", "load_artifacts", "truth_image", "ALL_BANDS"]

ALL_BANDS = "ugrizy"
PIXEL_SCALE = 0.2  # arcsec per pixel
RA_CENTER, DEC_CENTER = 150.1, 2.2  # deg, COSMOS field
MAGZERO = 31.4  # AB magnitude of 1 nJy, so pixel values are nJy
PSF_FWHM = {"u": 0.95, "g": 0.88, "r": 0.80, "i": 0.75, "z": 0.72, "y": 0.70}  # arcsec
PSF_BETA = 3.5
PSF_TRUNC = 4.0  # arcsec; inside the 41 x 41 PSF image (radius 20.5 px)
PSF_SHEAR = (0.01, -0.015)  # (g1, g2), small common optical ellipticity
PSF_SIZE = 41
DEPTH_5SIGMA = {"u": 25.6, "g": 26.9, "r": 26.9, "i": 26.4, "z": 25.6, "y": 24.8}
VARIANCE_RIPPLE = 0.05  # peak fractional variance variation across the patch
STAR_FRACTION = 0.12
GALAXY_MAG_RANGE = (20.0, 26.5)
GALAXY_COUNT_SLOPE = 0.31  # d log10 N / d mag
STAR_MAG_RANGE = (18.0, 25.5)
STAR_COUNT_SLOPE = 0.10
DISK_TRUNC = 4.5  # in nominal half-light radii
BULGE_TRUNC = 8.0
MAX_DISK_HLR = 2.0  # arcsec; bounds the largest stamp
BRIGHT_STAR_MAG_RANGE = (14.5, 18.0)  # i band, the ``bright_stars`` option
COSMIC_RAY_LENGTH = (1, 8)  # pixels
COSMIC_RAY_SIGMA = (20.0, 300.0)  # per-pixel amplitude in units of the noise
BAD_COLUMN_SIGMA = (5.0, 50.0)  # hot-column offset in units of the noise

# Colours m_band - m_i of the two galaxy components: an old red bulge and a
# star-forming blue disk (rough z ~ 0.5 templates).
BULGE_COLOUR = {"u": 3.2, "g": 1.9, "r": 0.75, "i": 0.0, "z": -0.35, "y": -0.55}
DISK_COLOUR = {"u": 1.1, "g": 0.65, "r": 0.25, "i": 0.0, "z": -0.12, "y": -0.18}

# Approximate main-sequence stellar locus indexed by g - r (AB).
_LOCUS_GR = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.5])
_LOCUS_UG = np.array([0.9, 1.05, 1.3, 1.7, 2.2, 2.5, 2.6, 2.6])
_LOCUS_RI = np.array([0.05, 0.12, 0.2, 0.3, 0.45, 0.7, 1.1, 1.5])
_LOCUS_IZ = np.array([0.0, 0.05, 0.1, 0.15, 0.22, 0.35, 0.55, 0.8])
_LOCUS_ZY = np.array([0.0, 0.02, 0.05, 0.08, 0.1, 0.17, 0.27, 0.4])

# Bit numbers of the mask planes, as in Rubin coadds.
MASK_PLANES = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "NO_DATA": 8,
}

TRUTH_VERSION = 1

#: Settings of :func:`simulate_field` that make fields unlike the default.
DEFAULT_OPTIONS = {
    "psf_beta": PSF_BETA,
    "bright_stars": 0,
    "saturation": None,
    "cosmic_rays": 0,
    "bad_columns": 0,
}


# ----------------------------------------------------------------------------
# argument checks


def _parse_bands(bands) -> list[str]:
    """Band names as a list of one-letter strings, validated."""
    if isinstance(bands, str):
        names = list(bands)
    else:
        try:
            names = [str(b) for b in bands]
        except TypeError:
            raise InputError(f"bands must be a string like 'gri' or a list, not {bands!r}") from None
    if not names:
        raise InputError("bands must name at least one band")
    unknown = [b for b in names if b not in ALL_BANDS]
    if unknown:
        raise InputError(f"unknown band(s) {unknown}: the simulator knows {', '.join(ALL_BANDS)}")
    if len(set(names)) != len(names):
        raise InputError(f"bands listed twice in {names}")
    return names


def _import_galsim():
    try:
        import galsim
    except ImportError:
        raise InputError("the simulator needs galsim: pip install 'scarletstore[sim]'") from None
    return galsim


# ----------------------------------------------------------------------------
# catalogue


def _power_law_mags(rng, n, lo, hi, slope):
    """Magnitudes in [lo, hi) with dN/dm proportional to 10**(slope * m)."""
    u = rng.random(n)
    span = 10.0 ** (slope * (hi - lo)) - 1.0
    return lo + np.log10(1.0 + u * span) / slope


def _mag_to_flux(mag):
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - MAGZERO))


def _shear_from_axis_ratio(q):
    # GalSim's reduced shear |g| = (a - b) / (a + b) = (1 - q) / (1 + q).
    return (1.0 - q) / (1.0 + q)


def _draw_catalogue(rng, size, density) -> dict:
    """Random source parameters; independent of which bands are rendered."""
    area = (size * PIXEL_SCALE / 60.0) ** 2  # arcmin^2
    n = int(rng.poisson(density * area))
    cat = {
        "x": rng.uniform(-0.5, size - 0.5, n),
        "y": rng.uniform(-0.5, size - 0.5, n),
        "is_star": rng.random(n) < STAR_FRACTION,
    }
    star = cat["is_star"]
    mag_i = np.empty(n)
    mag_i[~star] = _power_law_mags(rng, int((~star).sum()), *GALAXY_MAG_RANGE, GALAXY_COUNT_SLOPE)
    mag_i[star] = _power_law_mags(rng, int(star.sum()), *STAR_MAG_RANGE, STAR_COUNT_SLOPE)
    cat["mag_i"] = mag_i

    # Bulge fraction (i band): 30 % pure disks, 10 % bulge-dominated, the rest
    # intermediate.
    kind = rng.random(n)
    bt = rng.beta(1.2, 2.5, n)
    bt = np.where(kind < 0.3, 0.0, bt)
    bt = np.where(kind > 0.9, rng.uniform(0.8, 1.0, n), bt)
    bt[star] = 0.0
    cat["bulge_fraction"] = bt

    # Sizes shrink with magnitude; log-normal scatter of 0.2 dex.
    median_hlr = 0.75 * 10.0 ** (-0.1 * (mag_i - 21.0))
    hlr_d = np.clip(median_hlr * 10.0 ** (0.2 * rng.standard_normal(n)), 0.08, MAX_DISK_HLR)
    hlr_b = np.clip(hlr_d * rng.uniform(0.2, 0.6, n), 0.05, None)
    # Thick disks seen at random inclination (intrinsic thickness 0.2); bulges
    # are nearly round.
    cos_i = rng.random(n)
    q_d = np.sqrt(cos_i**2 + 0.2**2 * (1.0 - cos_i**2))
    q_b = np.clip(rng.normal(0.8, 0.15, n), 0.4, 1.0)
    cat["hlr_disk_nominal"] = hlr_d
    cat["hlr_bulge_nominal"] = hlr_b
    cat["g_disk"] = _shear_from_axis_ratio(q_d)
    cat["g_bulge"] = _shear_from_axis_ratio(q_b)
    cat["pa"] = rng.uniform(0.0, np.pi, n)  # radians, from +x towards +y

    # Component colours: a per-galaxy stretch of the template (a crude
    # redshift / age spread) plus small independent per-band scatter.
    stretch_b = 1.0 + 0.1 * rng.standard_normal(n)
    stretch_d = 1.0 + 0.25 * rng.standard_normal(n)
    gr = rng.uniform(_LOCUS_GR[0], _LOCUS_GR[-1], n)
    star_colour = _star_colours(gr)

    flux_i = _mag_to_flux(mag_i)
    for band in ALL_BANDS:
        # Always draw the scatter so the catalogue does not depend on bands.
        scatter_b = 0.05 * rng.standard_normal(n)
        scatter_d = 0.08 * rng.standard_normal(n)
        if band == "i":  # i is the reference: mag_i stays exact
            scatter_b[:] = 0.0
            scatter_d[:] = 0.0
        col_b = BULGE_COLOUR[band] * stretch_b + scatter_b
        col_d = DISK_COLOUR[band] * stretch_d + scatter_d
        fb = bt * flux_i * 10.0 ** (-0.4 * col_b)
        fd = (1.0 - bt) * flux_i * 10.0 ** (-0.4 * col_d)
        fs = flux_i * 10.0 ** (-0.4 * star_colour[band])
        cat[f"flux_bulge_{band}"] = np.where(star, 0.0, fb)
        cat[f"flux_disk_{band}"] = np.where(star, 0.0, fd)
        cat[f"flux_{band}"] = np.where(star, fs, fb + fd)
    return cat


def _star_colours(gr):
    """Colours m_band - m_i along the stellar locus for stars of colour g - r."""
    col = {
        "r": np.interp(gr, _LOCUS_GR, _LOCUS_RI),
        "z": -np.interp(gr, _LOCUS_GR, _LOCUS_IZ),
    }
    col["g"] = col["r"] + gr
    col["u"] = col["g"] + np.interp(gr, _LOCUS_GR, _LOCUS_UG)
    col["y"] = col["z"] - np.interp(gr, _LOCUS_GR, _LOCUS_ZY)
    col["i"] = np.zeros(np.shape(gr))
    return col


def _add_bright_stars(cat, rng, size, n):
    """Append ``n`` bright stars (i in BRIGHT_STAR_MAG_RANGE) to the catalogue in place."""
    if n <= 0:
        return
    gr = rng.uniform(_LOCUS_GR[0], _LOCUS_GR[-1], n)
    col = _star_colours(gr)
    mag_i = rng.uniform(*BRIGHT_STAR_MAG_RANGE, n)
    new = {k: np.zeros(n, dtype=np.asarray(v).dtype) for k, v in cat.items()}
    new["x"] = rng.uniform(-0.5, size - 0.5, n)
    new["y"] = rng.uniform(-0.5, size - 0.5, n)
    new["is_star"] = np.ones(n, bool)
    new["mag_i"] = mag_i
    new["hlr_disk_nominal"] = np.full(n, 0.08)
    new["hlr_bulge_nominal"] = np.full(n, 0.05)
    for band in ALL_BANDS:
        new[f"flux_{band}"] = _mag_to_flux(mag_i) * 10.0 ** (-0.4 * col[band])
    for k in cat:
        cat[k] = np.concatenate([cat[k], new[k]])


# ----------------------------------------------------------------------------
# rendering


def _make_wcs(size):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [RA_CENTER, DEC_CENTER]
    # FITS pixels are 1-indexed: the patch centre (size-1)/2 is (size+1)/2.
    wcs.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    # East to the left, as on the sky.
    wcs.wcs.cdelt = [-PIXEL_SCALE / 3600.0, PIXEL_SCALE / 3600.0]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    return wcs


def _psf_profile(galsim, band, beta=PSF_BETA):
    return galsim.Moffat(beta=beta, fwhm=PSF_FWHM[band], trunc=PSF_TRUNC).shear(
        g1=PSF_SHEAR[0], g2=PSF_SHEAR[1]
    )


def _stretch(g):
    # Shearing by |g| stretches the major axis by sqrt((1 + g) / (1 - g)).
    return np.sqrt((1.0 + g) / (1.0 - g))


def _stamp_half_size(cat, k):
    """Half-width (pixels) of a stamp that holds the whole truncated profile."""
    psf_r = PSF_TRUNC / PIXEL_SCALE
    if cat["is_star"][k]:
        r = 0.0
    else:
        bt = cat["bulge_fraction"][k]
        r_d = DISK_TRUNC * cat["hlr_disk_nominal"][k] * _stretch(cat["g_disk"][k]) if bt < 1 else 0.0
        r_b = BULGE_TRUNC * cat["hlr_bulge_nominal"][k] * _stretch(cat["g_bulge"][k]) if bt > 0 else 0.0
        r = max(r_d, r_b) / PIXEL_SCALE
    # +1 for the sub-pixel offset and the pixel response.
    return int(np.ceil(r + psf_r + 1.0))


def _noise_sigma(psf_image, band):
    """Per-pixel noise giving the band's 5-sigma point-source depth.

    A PSF-weighted flux of a point source on uniform noise sigma has
    error sigma * sqrt(n_eff), with n_eff = 1 / sum(psf**2).
    """
    n_eff = 1.0 / np.sum(psf_image.astype(float) ** 2)
    return float(_mag_to_flux(DEPTH_5SIGMA[band]) / (5.0 * np.sqrt(n_eff)))


def _variance_ripple(rng, size):
    """Smooth pattern in [-1, 1] with mean ~0: a few long-wavelength waves."""
    yy, xx = np.mgrid[0:size, 0:size] / float(size)
    pattern = np.zeros((size, size))
    for _ in range(3):
        kx, ky = rng.uniform(-2.0, 2.0, 2) * np.pi
        pattern += np.cos(kx * xx + ky * yy + rng.uniform(0, 2 * np.pi))
    pattern -= pattern.mean()
    return pattern / max(np.abs(pattern).max(), 1e-12)


def _bad_pixels(rng, size):
    """Boolean map of a few isolated bad pixels and one short bad column."""
    bad = np.zeros((size, size), dtype=bool)
    n_hot = max(3, int(round(size * size * 5e-5)))
    bad[rng.integers(0, size, n_hot), rng.integers(0, size, n_hot)] = True
    length = max(4, size // 8)
    col = int(rng.integers(0, size))
    start = int(rng.integers(0, size - length + 1))
    bad[start:start + length, col] = True
    return bad


def _simulate(size, seed, bands, density, progress=False, options=None) -> dict:
    """Render everything in memory; :func:`simulate_field` writes it out.

    ``options`` holds the checked settings of :func:`simulate_field` that
    make fields unlike the default (see :data:`DEFAULT_OPTIONS`).

    Returns a dict with the catalogue, WCS, per-band PSF images, noise-free
    fields, images, variances, masks, the clipped stamps of every source, and
    the list of artifacts made.
    """
    opts = dict(DEFAULT_OPTIONS)
    opts.update(options or {})
    with warnings.catch_warnings():
        # Truncated PSF and profiles have hard edges: GalSim advises real-space
        # convolution, which is far slower; FFT is accurate enough here.
        warnings.filterwarnings("ignore", message="Doing convolution of 2 objects, both with hard edges")
        return _render(size, seed, bands, density, progress, opts)


def _render(size, seed, bands, density, progress, opts):
    """The steps of :func:`_simulate`: catalogue, PSFs, noise-free field, observed bands."""
    galsim = _import_galsim()
    rng = np.random.default_rng(seed)
    cat = _draw_catalogue(rng, size, density)
    # Extra draws use generators of their own so the default field is unchanged.
    _add_bright_stars(cat, np.random.default_rng([seed, 101]), size, opts["bright_stars"])
    psfs = {b: _psf_profile(galsim, b, opts["psf_beta"]) for b in bands}
    psf_images = {b: _psf_image(psfs[b]) for b in bands}
    unit = _sersic_units(galsim, cat)
    noise_free, bboxes, stamps = _render_sources(galsim, cat, psfs, bands, size, unit, progress)
    images, variances, masks, sigmas = {}, {}, {}, {}
    artifacts = []
    for j, b in enumerate(bands):
        image, var, mask, sigma, made = _observe_band(seed, size, b, j, psf_images[b], opts,
                                                      noise_free, bboxes, stamps)
        artifacts += made
        images[b] = image
        variances[b] = var
        masks[b] = mask
        sigmas[b] = sigma

    wcs = _make_wcs(size)
    ra, dec = wcs.wcs_pix2world(cat["x"], cat["y"], 0)
    cat["ra"], cat["dec"] = np.asarray(ra, float), np.asarray(dec, float)
    return {
        "catalogue": cat,
        "bands": list(bands),
        "wcs": wcs,
        "psf": psf_images,
        "noise_free": noise_free,
        "image": images,
        "variance": variances,
        "mask": masks,
        "sigma": sigmas,
        "bbox": bboxes,
        "stamps": stamps,
        "artifacts": artifacts,
        "options": opts,
    }


def _psf_image(psf):
    """The PSF drawn on a PSF_SIZE stamp, normalised to unit sum in float64, stored float32."""
    img = psf.drawImage(nx=PSF_SIZE, ny=PSF_SIZE, scale=PIXEL_SCALE, method="fft").array
    img = img.astype(np.float64)
    return (img / img.sum()).astype(np.float32)


def _sersic_units(galsim, cat):
    """Scale radius per unit nominal hlr of each Sersic index; sets the true radii in ``cat``.

    Fixing trunc / scale_radius lets GalSim reuse one profile table per
    index. The truth's ``hlr_disk`` / ``hlr_bulge`` are the half-light radii
    of the truncated profiles, which differ from the nominal ones by a
    fixed ratio per index (0 where the component is absent).
    """
    unit = {nn: galsim.Sersic(nn, half_light_radius=1.0).scale_radius for nn in (1, 4)}
    trunc_of = {1: DISK_TRUNC, 4: BULGE_TRUNC}
    hlr_ratio = {
        nn: galsim.Sersic(nn, scale_radius=unit[nn], trunc=trunc_of[nn]).half_light_radius
        for nn in (1, 4)
    }
    star = cat["is_star"]
    no_disk = star | (cat["bulge_fraction"] >= 1)
    no_bulge = star | (cat["bulge_fraction"] <= 0)
    cat["hlr_disk"] = np.where(no_disk, 0.0, cat["hlr_disk_nominal"] * hlr_ratio[1])
    cat["hlr_bulge"] = np.where(no_bulge, 0.0, cat["hlr_bulge_nominal"] * hlr_ratio[4])
    return unit


def _galaxy_shapes(galsim, cat, k, unit):
    """Unit-flux sheared bulge and disk profiles of source ``k``, or None for a star.

    A list of ("bulge" | "disk", profile) for the components it has; their
    per-band fluxes are set when they are drawn.
    """
    if cat["is_star"][k]:
        return None
    beta = cat["pa"][k] * galsim.radians
    shapes = []
    if cat["bulge_fraction"][k] > 0:
        hb = cat["hlr_bulge_nominal"][k]
        bulge = galsim.Sersic(4, scale_radius=unit[4] * hb, trunc=BULGE_TRUNC * hb)
        shapes.append(("bulge", bulge.shear(g=cat["g_bulge"][k], beta=beta)))
    if cat["bulge_fraction"][k] < 1:
        hd = cat["hlr_disk_nominal"][k]
        disk = galsim.Sersic(1, scale_radius=unit[1] * hd, trunc=DISK_TRUNC * hd)
        shapes.append(("disk", disk.shear(g=cat["g_disk"][k], beta=beta)))
    return shapes


def _render_sources(galsim, cat, psfs, bands, size, unit, progress):
    """Draw every source into its clipped stamp and sum the stamps into the field.

    Returns
    -------
    noise_free : (band, size, size) float64
    bboxes : (n, 4) int64
        Each stamp's (y0, x0, height, width), clipped to the field.
    stamps : list of (band, h, w) float32
    """
    n = len(cat["x"])
    nb = len(bands)
    noise_free = np.zeros((nb, size, size), dtype=np.float64)
    bboxes = np.zeros((n, 4), dtype=np.int64)
    stamps = []

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=n, desc="simulate", unit="src", file=sys.stderr)
    try:
        for k in range(n):
            stamp, box = _draw_source(galsim, cat, k, psfs, bands, size, unit)
            y0, x0, h, w = box
            bboxes[k] = box
            noise_free[:, y0:y0 + h, x0:x0 + w] += stamp
            stamps.append(stamp)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return noise_free, bboxes, stamps


def _draw_source(galsim, cat, k, psfs, bands, size, unit):
    """Source ``k`` drawn in every band, clipped to the field; (stamp, (y0, x0, h, w))."""
    x, y = cat["x"][k], cat["y"][k]
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    # GalSim centres the profile on the central pixel of an odd stamp
    # plus this offset, so 0-indexed pixel centres line up exactly.
    offset = galsim.PositionD(x - ix, y - iy)
    h = _stamp_half_size(cat, k)
    y0, y1 = max(0, iy - h), min(size, iy + h + 1)
    x0, x1 = max(0, ix - h), min(size, ix + h + 1)
    sy, sx = slice(y0 - (iy - h), y1 - (iy - h)), slice(x0 - (ix - h), x1 - (ix - h))
    shapes = _galaxy_shapes(galsim, cat, k, unit)
    stamp = np.empty((len(bands), y1 - y0, x1 - x0), dtype=np.float32)
    for j, b in enumerate(bands):
        if shapes is None:
            obj = psfs[b].withFlux(cat[f"flux_{b}"][k])
        else:
            parts = [s.withFlux(cat[f"flux_{name}_{b}"][k]) for name, s in shapes]
            gal = parts[0] if len(parts) == 1 else galsim.Add(parts)
            obj = galsim.Convolve(gal, psfs[b], real_space=False)
        img = obj.drawImage(
            nx=2 * h + 1, ny=2 * h + 1, scale=PIXEL_SCALE, offset=offset, method="fft"
        )
        stamp[j] = img.array[sy, sx]
    return stamp, (y0, x0, y1 - y0, x1 - x0)


def _observe_band(seed, size, band, j, psf_image, opts, noise_free, bboxes, stamps):
    """Band ``band`` (index ``j``) as observed: noise, variance, bad pixels and artifacts.

    One generator per band, keyed by the band's place in ugrizy, so the
    r-band noise is the same whichever other bands are simulated; the
    artifacts draw from generators of their own, so asking for them leaves
    the noise unchanged.

    Returns
    -------
    image, variance : (size, size) float32
    mask : (size, size) int32
    sigma : float
        The band's nominal noise per pixel.
    artifacts : list
        The artifacts made in this band.
    """
    brng = np.random.default_rng([seed, 1 + ALL_BANDS.index(band)])
    sigma = _noise_sigma(psf_image, band)
    var = sigma**2 * (1.0 + VARIANCE_RIPPLE * _variance_ripple(brng, size))
    var = var.astype(np.float32)
    image = noise_free[j] + brng.standard_normal((size, size)) * np.sqrt(var.astype(np.float64))
    bad = _bad_pixels(brng, size)
    image[bad] = 0.0  # garbage, as a dead pixel would read
    mask = np.zeros((size, size), dtype=np.int32)
    mask[bad] |= np.int32(1 << MASK_PLANES["BAD"])
    arng = np.random.default_rng([seed, 201 + ALL_BANDS.index(band)])
    made = _add_artifacts(arng, image, mask, var, band, opts, noise_free[j], bboxes, stamps, j)
    return image.astype(np.float32), var, mask, sigma, made


def _line_pixels(rng, size, length):
    """Pixels (y, x) of a straight track of ``length`` pixels at a random angle."""
    y0, x0 = rng.uniform(0, size - 1, 2)
    ang = rng.uniform(0, np.pi)
    t = np.arange(length)
    ys = np.clip(np.round(y0 + t * np.sin(ang)).astype(int), 0, size - 1)
    xs = np.clip(np.round(x0 + t * np.cos(ang)).astype(int), 0, size - 1)
    keep = np.unique(ys * size + xs)
    return keep // size, keep % size


def _artifact(kind, band, ys, xs, added, source_id=0):
    return {"kind": kind, "band": band, "source_id": int(source_id),
            "y": float(np.mean(ys)), "x": float(np.mean(xs)),
            "y0": int(ys.min()), "x0": int(xs.min()), "y1": int(ys.max()), "x1": int(xs.max()),
            "n_pixels": int(ys.size), "max_added": float(added)}


def _add_artifacts(rng, image, mask, var, band, opts, noise_free, bboxes, stamps, j):
    """Saturation, raw cosmic rays and hot bad columns of one band, in place.

    Returns one truth record per artifact. Draws come from ``rng`` only when
    an option asks for them, so the default field does not change.
    """
    size = image.shape[0]
    sigma = np.sqrt(var.astype(np.float64))
    out = []
    level = opts["saturation"]
    if level is not None:
        from scipy import ndimage

        sat = image > level
        labels, nlab = ndimage.label(sat, structure=np.ones((3, 3), bool))
        image[sat] = level
        mask[sat] |= np.int32(1 << MASK_PLANES["SAT"])
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = np.nonzero(labels[sl] == lab)
            ys, xs = ys + sl[0].start, xs + sl[1].start
            # the source that puts the most light on the core's brightest pixel
            k = int(np.argmax(noise_free[ys, xs]))
            out.append(_artifact("SAT", band, ys, xs, 0.0,
                                 _dominant_source(bboxes, stamps, j, ys[k], xs[k])))
    for _ in range(int(opts["cosmic_rays"])):
        ys, xs = _line_pixels(rng, size, int(rng.integers(COSMIC_RAY_LENGTH[0], COSMIC_RAY_LENGTH[1] + 1)))
        amp = np.exp(rng.uniform(*np.log(COSMIC_RAY_SIGMA))) * rng.uniform(0.5, 1.0, ys.size)
        image[ys, xs] += amp * sigma[ys, xs]  # raw: the value stays in the image
        mask[ys, xs] |= np.int32(1 << MASK_PLANES["CR"])
        out.append(_artifact("CR", band, ys, xs, float((amp * sigma[ys, xs]).max())))
    for _ in range(int(opts["bad_columns"])):
        length = int(rng.integers(size // 2, size + 1))
        col = int(rng.integers(0, size))
        start = int(rng.integers(0, size - length + 1))
        ys = np.arange(start, start + length)
        xs = np.full(length, col)
        add = rng.uniform(*BAD_COLUMN_SIGMA) * sigma[ys, xs]
        image[ys, xs] += add
        mask[ys, xs] |= np.int32(1 << MASK_PLANES["BAD"])
        out.append(_artifact("BAD_COLUMN", band, ys, xs, float(add.max())))
    return out


def _dominant_source(bboxes, stamps, j, y, x):
    """Truth id (from 1) of the source with the most band-``j`` light at pixel (y, x)."""
    best, best_v = 0, 0.0
    for k, (y0, x0, h, w) in enumerate(bboxes):
        if y0 <= y < y0 + h and x0 <= x < x0 + w:
            v = float(stamps[k][j, y - y0, x - x0])
            if v > best_v:
                best, best_v = k + 1, v
    return best


# ----------------------------------------------------------------------------
# writing


def _write_band(path, band, sim, seed, size):
    from astropy.io import fits

    primary = fits.PrimaryHDU()
    primary.header["BAND"] = (band, "filter name")
    primary.header["ORIGIN"] = ("scarletstore.simulate.field", "simulated LSST-like coadd patch")
    primary.header["SIMSEED"] = (int(seed), "simulator seed")

    hdr = sim["wcs"].to_header()
    hdr["BAND"] = (band, "filter name")
    hdr["BUNIT"] = ("nJy", "pixel values")
    hdr["MAGZERO"] = (MAGZERO, "AB mag of unit pixel flux")
    hdr["FLUXMAG0"] = (float(10.0 ** (0.4 * MAGZERO)), "flux of a mag 0 source")
    hdr["PIXSCALE"] = (PIXEL_SCALE, "[arcsec] pixel scale")
    hdr["PSFFWHM"] = (PSF_FWHM[band], "[arcsec] PSF FWHM")
    hdr["DEPTH5"] = (DEPTH_5SIGMA[band], "5-sigma point-source depth (AB)")
    hdr["NOISESIG"] = (sim["sigma"][band], "median per-pixel noise sigma")
    image = fits.ImageHDU(sim["image"][band], header=hdr, name="IMAGE")

    mask = fits.ImageHDU(sim["mask"][band], name="MASK")
    for plane, bit in MASK_PLANES.items():
        key = f"MP_{plane}"
        # Rubin writes long keys as HIERARCH cards; saying so avoids a warning.
        mask.header[key if len(key) <= 8 else f"HIERARCH {key}"] = bit
    mask.header["BAND"] = band

    variance = fits.ImageHDU(sim["variance"][band], name="VARIANCE")
    variance.header["BAND"] = band
    psf = fits.ImageHDU(sim["psf"][band], name="PSF")
    psf.header["BAND"] = band
    psf.header["FWHM"] = (PSF_FWHM[band], "[arcsec] Moffat FWHM")
    psf.header["BETA"] = (float(sim["options"]["psf_beta"]), "Moffat beta")
    fits.HDUList([primary, image, mask, variance, psf]).writeto(path, overwrite=True)


def _write_truth_table(path, sim, seed, size):
    from astropy.table import Table

    cat = sim["catalogue"]
    n = len(cat["x"])
    t = Table()
    t["id"] = np.arange(1, n + 1, dtype=np.int64)
    t["x"] = cat["x"].astype(np.float64)
    t["y"] = cat["y"].astype(np.float64)
    t["ra"] = cat["ra"]
    t["dec"] = cat["dec"]
    for b in sim["bands"]:
        t[f"flux_{b}"] = cat[f"flux_{b}"]
        t[f"flux_{b}"].unit = "nJy"
    t["is_star"] = cat["is_star"].astype(bool)
    t["mag_i"] = cat["mag_i"]
    t["bulge_fraction"] = cat["bulge_fraction"]
    t["hlr_disk"] = cat["hlr_disk"]
    t["hlr_bulge"] = cat["hlr_bulge"]
    t["g_disk"] = np.where(cat["is_star"], 0.0, cat["g_disk"])
    t["g_bulge"] = np.where(cat["is_star"], 0.0, cat["g_bulge"])
    t["pa"] = np.where(cat["is_star"], 0.0, np.degrees(cat["pa"]))
    for col in ("ra", "dec", "pa"):
        t[col].unit = "deg"
    for col in ("hlr_disk", "hlr_bulge"):
        t[col].unit = "arcsec"
    t.meta["TRUTHVER"] = TRUTH_VERSION
    t.meta["SIMSEED"] = int(seed)
    t.meta["SIZE"] = int(size)
    t.meta["BANDS"] = "".join(sim["bands"])
    t.meta["MAGZERO"] = MAGZERO
    t.write(path, format="fits", overwrite=True)


def _write_npz(path, arrays: dict):
    """np.savez_compressed without the wall-clock timestamps, so equal inputs
    give byte-identical files."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def _write_truth_images(path, sim):
    stamps = sim["stamps"]
    sizes = np.array([s.size for s in stamps], dtype=np.int64)
    offset = np.zeros(len(stamps), dtype=np.int64)
    if len(stamps):
        offset[1:] = np.cumsum(sizes)[:-1]
        pixels = np.concatenate([s.ravel() for s in stamps]).astype(np.float32)
    else:
        pixels = np.zeros(0, dtype=np.float32)
    _write_npz(
        path,
        {
            "id": np.arange(1, len(stamps) + 1, dtype=np.int64),
            "bbox": sim["bbox"].astype(np.int64),
            "offset": offset,
            "pixels": pixels,
            "bands": np.array(sim["bands"], dtype="<U1"),
        },
    )


def _write_artifacts(path, sim, seed):
    from astropy.table import Table

    rows = sim["artifacts"]
    cols = ["kind", "band", "source_id", "y", "x", "y0", "x0", "y1", "x1", "n_pixels", "max_added"]
    t = Table(rows=[[r[c] for c in cols] for r in rows], names=cols) if rows else Table(
        names=cols, dtype=["U10", "U1", "i8", "f8", "f8", "i8", "i8", "i8", "i8", "i8", "f8"])
    t.meta["TRUTHVER"] = TRUTH_VERSION
    t.meta["SIMSEED"] = int(seed)
    for k, v in sim["options"].items():
        t.meta[k.upper()[:8]] = -1.0 if v is None else float(v)
    t.write(path, format="fits", overwrite=True)


def _check_options(psf_beta, bright_stars, saturation, cosmic_rays, bad_columns):
    try:
        psf_beta = float(psf_beta)
        bright_stars, cosmic_rays, bad_columns = int(bright_stars), int(cosmic_rays), int(bad_columns)
        saturation = None if saturation is None else float(saturation)
    except (TypeError, ValueError):
        raise InputError("psf_beta and saturation must be numbers; bright_stars, cosmic_rays "
                         "and bad_columns integers") from None
    if not np.isfinite(psf_beta) or psf_beta <= 1.5:
        # beta <= 1.5 has no finite second moment and GalSim refuses beta <= 1.1.
        raise InputError(f"psf_beta must be > 1.5, got {psf_beta}")
    if min(bright_stars, cosmic_rays, bad_columns) < 0:
        raise InputError("bright_stars, cosmic_rays and bad_columns must be non-negative")
    if saturation is not None and not (np.isfinite(saturation) and saturation > 0):
        raise InputError(f"saturation must be a positive level in nJy, got {saturation}")
    return {"psf_beta": psf_beta, "bright_stars": bright_stars, "saturation": saturation,
            "cosmic_rays": cosmic_rays, "bad_columns": bad_columns}


def simulate_field(out_dir, size=512, seed=1, bands="ugrizy", density=90.0, progress=False, *,
                   psf_beta=PSF_BETA, bright_stars=0, saturation=None, cosmic_rays=0,
                   bad_columns=0) -> dict:
    """Simulate an LSST-like multi-band coadd patch with its truth.

    Parameters
    ----------
    out_dir : str or path-like
        Directory to write into; created if missing. Existing outputs with the
        same names are overwritten.
    size : int
        Side of the square patch in pixels (0.2 arcsec each).
    seed : int
        Random seed; the same seed and arguments give byte-identical files.
    bands : str or list of str
        One-letter band names from ``ugrizy``, e.g. ``"gri"``. The source
        catalogue does not depend on which bands are rendered.
    density : float
        Mean number of sources (galaxies and stars) per square arcminute.
    progress : bool
        Show a progress bar on stderr when it is a terminal.
    psf_beta : float
        Moffat beta of the PSF (default 3.5; 2.5-3 gives strong wings).
    bright_stars : int
        Extra stars with i in [14.5, 18] (appended after the other sources).
    saturation : float, optional
        Level (nJy per pixel) above which observed pixels are clipped to it
        and flagged SAT.
    cosmic_rays : int
        Raw cosmic-ray tracks per band, kept in the image and flagged CR.
    bad_columns : int
        Hot bad columns per band, kept at their raw value and flagged BAD.

    Returns
    -------
    dict
        ``{"bands": {band: path}, "truth": path, "truth_images": path}``, and
        ``"artifacts": path`` of ``truth_artifacts.fits`` when any
        saturation, cosmic ray or bad column was asked for.

    Raises
    ------
    InputError
        On bad arguments, or if galsim is not installed.

    Notes
    -----
    ``truth.fits`` columns: ``id`` (int64, from 1), ``x``, ``y`` (0-indexed
    pixel coordinates; pixel (0, 0) is centred on (0.0, 0.0)), ``ra``,
    ``dec`` (deg), ``flux_<band>`` (nJy, whole profile), ``is_star``,
    ``mag_i`` (AB), ``bulge_fraction`` (i-band B/T, 0 for stars),
    ``hlr_disk``, ``hlr_bulge`` (arcsec, of the truncated profiles, 0 if
    absent), ``g_disk``, ``g_bulge`` (reduced shear |g| = (1-q)/(1+q)) and
    ``pa`` (deg, from +x towards +y).

    ``truth_images.npz`` holds ``id`` (n,), ``bbox`` (n, 4) int64 as
    (y0, x0, height, width) clipped to the field, ``offset`` (n,) int64 into
    ``pixels`` (float32, each source's (band, height, width) stamp flattened)
    and ``bands``. The stamps sum exactly to the noise-free field.
    """
    size, seed, density = _check_field(size, seed, density)
    names = _parse_bands(bands)
    opts = _check_options(psf_beta, bright_stars, saturation, cosmic_rays, bad_columns)
    _import_galsim()  # fail before creating anything

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sim = _simulate(size, seed, names, density, progress=progress, options=opts)
    return _write_field(out, sim, names, seed, size, opts)


def _check_field(size, seed, density):
    """``(size, seed, density)`` of :func:`simulate_field` as int, int, float.

    Raises
    ------
    InputError
        On values that are not numbers, a field under 16 pixels, a negative
        seed or a negative or non-finite density.
    """
    try:
        size = int(size)
        seed = int(seed)
        density = float(density)
    except (TypeError, ValueError):
        raise InputError("size and seed must be integers and density a number") from None
    if size < 16:
        raise InputError(f"size must be at least 16 pixels, got {size}")
    if seed < 0:
        raise InputError(f"seed must be non-negative, got {seed}")
    if not np.isfinite(density) or density < 0:
        raise InputError(f"density must be a non-negative number, got {density}")
    return size, seed, density


def _write_field(out, sim, names, seed, size, opts):
    """Write a rendered field into ``out``; the paths :func:`simulate_field` returns.

    One FITS file per band, the truth table and stamps, and the artifact
    truth only when an option asked for artifacts.
    """
    paths = {"bands": {}, "truth": out / "truth.fits", "truth_images": out / "truth_images.npz"}
    for b in names:
        p = out / f"{b}.fits"
        _write_band(p, b, sim, seed, size)
        paths["bands"][b] = p
    _write_truth_table(paths["truth"], sim, seed, size)
    _write_truth_images(paths["truth_images"], sim)
    if opts["saturation"] is not None or opts["cosmic_rays"] or opts["bad_columns"]:
        paths["artifacts"] = out / "truth_artifacts.fits"
        _write_artifacts(paths["artifacts"], sim, seed)
    return paths


# ----------------------------------------------------------------------------
# reading the truth back


def load_truth(out_dir):
    """Read the truth written by :func:`simulate_field`.

    Parameters
    ----------
    out_dir : str or path-like
        Directory holding ``truth.fits`` and ``truth_images.npz``.

    Returns
    -------
    table : astropy.table.Table
        The truth catalogue.
    images : dict
        ``id -> (bbox, stamp)`` with ``bbox = (y0, x0, height, width)`` in
        field pixels and ``stamp`` a float32 array (band, height, width) in
        the band order of ``table.meta["BANDS"]``.
    """
    from astropy.table import Table

    out = Path(out_dir)
    try:
        table = Table.read(out / "truth.fits", format="fits")
        with np.load(out / "truth_images.npz", allow_pickle=False) as z:
            ids, bbox, offset, pixels = z["id"], z["bbox"], z["offset"], z["pixels"]
            nb = len(z["bands"])
    except (OSError, KeyError) as exc:
        raise InputError(f"cannot read simulator truth in {out}: {exc}") from None
    # FITS is big-endian; numba kernels and dtype checks want native order.
    for name in table.colnames:
        dt = table[name].dtype
        if dt.byteorder not in ("=", "|"):
            table[name] = table[name].astype(dt.newbyteorder("="))
    images = {}
    for sid, bb, off in zip(ids, bbox, offset):
        h, w = int(bb[2]), int(bb[3])
        stamp = pixels[off:off + nb * h * w].reshape(nb, h, w)
        images[int(sid)] = (tuple(int(v) for v in bb), stamp)
    return table, images


def load_artifacts(out_dir):
    """The artifact truth (``truth_artifacts.fits``) of a field, or None when it has none.

    Returns
    -------
    astropy.table.Table or None
        One row per artifact: ``kind`` (``SAT``, ``CR`` or ``BAD_COLUMN``),
        ``band``, ``source_id`` (truth id of a saturated star, else 0),
        centre ``y``, ``x``, inclusive bbox ``y0, x0, y1, x1``, ``n_pixels``
        and ``max_added`` (largest value added to a pixel, nJy; 0 for SAT).
    """
    from astropy.table import Table

    path = Path(out_dir) / "truth_artifacts.fits"
    if not path.is_file():
        return None
    try:
        return Table.read(path, format="fits")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from None


def truth_image(truth_images, source_id, shape):
    """The noise-free image of one source on the full field.

    Parameters
    ----------
    truth_images : dict
        The second value returned by :func:`load_truth`.
    source_id : int
        Truth ``id`` of the source.
    shape : tuple of int
        ``(height, width)`` of the field.

    Returns
    -------
    numpy.ndarray
        float32 array (band, height, width), zero outside the source's stamp.
    """
    (y0, x0, h, w), stamp = truth_images[int(source_id)]
    out = np.zeros((stamp.shape[0],) + tuple(shape), dtype=np.float32)
    out[:, y0:y0 + h, x0:x0 + w] = stamp
    return out
