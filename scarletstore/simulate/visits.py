"""Simulated calibrated visits of one field, with the truth, for the coadd.

:func:`simulate_visits` draws one source catalogue on a coadd grid (the
catalogue model of :mod:`scarletstore.simulate.field`) and renders it with GalSim
into ``n_visits`` visits per band, each through its own WCS and PSF, and
writes:

* ``visit_<band>_<k>.fits``: one visit each (HDUs ``IMAGE`` with WCS and
  ``BAND``/``MAGZERO``/``MJD-OBS``/``EXPTIME``, ``MASK``, ``VARIANCE``, ``PSF``);
* ``grid.fits``: an ``IMAGE`` HDU whose WCS and shape define the coadd grid;
* ``truth.fits``: the sources (grid position, sky position, flux per band in
  nJy and at zero point 27, star flag);
* ``truth_visits.fits``: one row per visit (pointing, rotation, seeing, zero
  point, background plane, sky noise, trail);
* ``truth_visit_fluxes.fits``: per-visit flux of the variable star and the
  transient (nJy), and ``truth_artifacts.fits``: cosmic rays per visit.

Model choices:

* Grid: 0.2 arcsec pixels, TAN at RA 150.1, Dec 2.2 (the field simulator's).
* Visits: 25 % larger than the grid on a side, random rotation (0-360 deg),
  dithers of up to 8 % of the grid side, pixel scale 0.2 arcsec +- 3 %.
* PSF: Moffat beta 3.5 truncated at 4 arcsec, FWHM uniform in 0.5-1.2 arcsec,
  ellipticity up to 0.05 in a random direction, drawn through the visit's
  local WCS; the ``PSF`` HDU is the PSF at the visit centre.
* Zero points MAGZERO uniform in 27.6-28.4 (counts per nJy differ by 2x);
  sky noise from a single-visit 5-sigma point-source depth of 24.8 (g),
  24.6 (r), 24.2 (i) at 0.7 arcsec, scaled with the seeing, +- 0.4 mag
  per visit (sky brightness); Gaussian,
  constant variance plane (no source Poisson noise).
* Residual background: a plane a + b x + c y per visit, |a| up to 0.3 sigma,
  gradient up to 0.3 sigma across the visit (in ``truth_visits``).
* Artifacts: about 20 cosmic rays per visit (1-3 pixel tracks of 20-200
  sigma, flagged CR); one unflagged satellite trail per band (one visit, a
  2-pixel wide line at 8 sigma per pixel); one variable star (sinusoid of
  30 % amplitude in MJD); one transient that appears only in the first visit
  of the first band.
* ``n_stars`` extra bright stars (i 19-21) on a jittered lattice, so PSF and
  photometry checks have isolated stars at any density.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError
from . import field as _sim

__all__ = ["simulate_visits", "VISIT_DEPTH"]

VISIT_DEPTH = {"u": 24.0, "g": 24.8, "r": 24.6, "i": 24.2, "z": 23.6, "y": 22.8}  # at 0.7"
SEEING_RANGE = (0.5, 1.2)  # arcsec FWHM
ZP_RANGE = (27.6, 28.4)
VISIT_PSF_SIZE = 47
VISIT_MARGIN = 1.25
DITHER = 0.08
SCALE_JITTER = 0.03
CR_PER_VISIT = 20
TRAIL_SIGMA = 8.0
VARIABLE_AMPLITUDE = 0.3
BACKGROUND_SIGMA = 0.3
DEPTH_JITTER = 0.4  # mag: sky brightness and transparency differ between visits
BRIGHT_STAR_MAGS = (19.0, 21.0)
MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5,
               "SUSPECT": 7, "NO_DATA": 8}


def _visit_wcs(grid_size, visit_size, rot_deg, dither_xy, scale):
    """TAN WCS of a visit whose centre is dithered by (dx, dy) grid pixels and rotated."""
    from astropy.wcs import WCS

    grid = _sim._make_wcs(grid_size)
    c = (grid_size - 1) / 2.0
    ra, dec = grid.pixel_to_world_values(c + dither_xy[0], c + dither_xy[1])
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra), float(dec)]
    w.wcs.crpix = [(visit_size + 1) / 2.0, (visit_size + 1) / 2.0]
    t = np.radians(rot_deg)
    s = scale / 3600.0
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.radesys = "ICRS"
    return w


def _jacobian_visit_to_grid(w_visit, w_grid, x, y, h=0.5):
    """d(grid x, y)/d(visit x, y) at visit pixel (x, y)."""
    xs = np.array([x + h, x - h, x, x])
    ys = np.array([y, y, y + h, y - h])
    ra, dec = w_visit.pixel_to_world_values(xs, ys)
    gx, gy = w_grid.world_to_pixel_values(ra, dec)
    return np.array([[(gx[0] - gx[1]) / (2 * h), (gx[2] - gx[3]) / (2 * h)],
                     [(gy[0] - gy[1]) / (2 * h), (gy[2] - gy[3]) / (2 * h)]])


def _galsim_wcs(galsim, jac):
    """Local JacobianWCS: world = the grid's pixel frame in arcsec (x right, y up)."""
    j = jac * _sim.PIXEL_SCALE
    return galsim.JacobianWCS(j[0, 0], j[0, 1], j[1, 0], j[1, 1])


def _profiles(galsim, cat, k, band):
    """GalSim profile (no PSF) of source k in ``band``, or None for a point source."""
    if cat["is_star"][k]:
        return None
    unit = {nn: galsim.Sersic(nn, half_light_radius=1.0).scale_radius for nn in (1, 4)}
    beta = cat["pa"][k] * galsim.radians
    parts = []
    if cat["bulge_fraction"][k] > 0:
        hb = cat["hlr_bulge_nominal"][k]
        b = galsim.Sersic(4, scale_radius=unit[4] * hb, trunc=_sim.BULGE_TRUNC * hb)
        parts.append(b.shear(g=cat["g_bulge"][k], beta=beta).withFlux(cat[f"flux_bulge_{band}"][k]))
    if cat["bulge_fraction"][k] < 1:
        hd = cat["hlr_disk_nominal"][k]
        d = galsim.Sersic(1, scale_radius=unit[1] * hd, trunc=_sim.DISK_TRUNC * hd)
        parts.append(d.shear(g=cat["g_disk"][k], beta=beta).withFlux(cat[f"flux_disk_{band}"][k]))
    return parts[0] if len(parts) == 1 else galsim.Add(parts)


def _plan_visits(rng, bands, n_visits, size):
    """Pointing, PSF, zero point, background and epoch of every visit."""
    plans = []
    mjd0 = 60400.0
    for b in bands:
        for k in range(n_visits):
            e = rng.uniform(0.0, 0.05)
            phi = rng.uniform(0, np.pi)
            plans.append({
                "band": b, "index": k,
                "rotation": float(rng.uniform(0.0, 360.0)),
                "dither_x": float(rng.uniform(-DITHER, DITHER) * size),
                "dither_y": float(rng.uniform(-DITHER, DITHER) * size),
                "scale": float(_sim.PIXEL_SCALE * (1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER))),
                "fwhm": float(rng.uniform(*SEEING_RANGE)),
                "psf_e1": float(e * np.cos(2 * phi)), "psf_e2": float(e * np.sin(2 * phi)),
                "magzero": float(rng.uniform(*ZP_RANGE)),
                "mjd": float(mjd0 + rng.uniform(0, 120)),
                "exptime": 30.0,
                "depth_offset": float(rng.uniform(-DEPTH_JITTER, DEPTH_JITTER)),
                "bg": rng.uniform(-1, 1, 3) * BACKGROUND_SIGMA,
            })
    return plans


def _add_bright_stars(rng, cat, size, n_stars):
    """Append ``n_stars`` bright stars on a jittered lattice inside the grid (away from its edge)."""
    if n_stars <= 0:
        return
    side = int(np.ceil(np.sqrt(n_stars)))
    step = (size - 40) / side
    cells = [(i, j) for i in range(side) for j in range(side)][:n_stars]
    n = len(cat["x"])
    for key in list(cat):
        arr = np.asarray(cat[key])
        fill = True if key == "is_star" else 0.0
        cat[key] = np.concatenate([arr, np.full(len(cells), fill, dtype=arr.dtype)])
    mags = rng.uniform(*BRIGHT_STAR_MAGS, len(cells))
    for m, (i, j) in enumerate(cells):
        k = n + m
        cat["x"][k] = 20 + (j + 0.5 + rng.uniform(-0.2, 0.2)) * step
        cat["y"][k] = 20 + (i + 0.5 + rng.uniform(-0.2, 0.2)) * step
        cat["mag_i"][k] = mags[m]
        for b in _sim.ALL_BANDS:
            cat[f"flux_{b}"][k] = _sim._mag_to_flux(mags[m])


def _extra_sources(rng, cat, size, bands, plans):
    """Append a variable star and a transient to the catalogue; their per-visit fluxes."""
    n = len(cat["x"])
    c = size / 2.0
    pos = [(c + rng.uniform(-0.25, 0.25) * size, c + rng.uniform(-0.25, 0.25) * size) for _ in range(2)]
    for key in list(cat):
        arr = np.asarray(cat[key])
        fill = True if key == "is_star" else 0.0
        cat[key] = np.concatenate([arr, np.array([fill, fill], dtype=arr.dtype)])
    for j, (x, y) in enumerate(pos):
        cat["x"][n + j], cat["y"][n + j] = x, y
        for b in _sim.ALL_BANDS:
            cat[f"flux_{b}"][n + j] = _sim._mag_to_flux(21.5 if j == 0 else 22.0)
    per_visit = np.zeros((len(plans), 2))
    period = 37.0
    for v, p in enumerate(plans):
        base = cat[f"flux_{p['band']}"]
        per_visit[v, 0] = base[n] * (1 + VARIABLE_AMPLITUDE * np.sin(2 * np.pi * p["mjd"] / period))
        per_visit[v, 1] = base[n + 1] if (p["band"] == bands[0] and p["index"] == 0) else 0.0
    return n, n + 1, per_visit


def _render_visit(galsim, cat, plan, size, visit_size, flux_override, rng):
    """Noise-free image (counts), PSF image and sky sigma (counts) of one visit."""
    w_grid = _sim._make_wcs(size)
    w = _visit_wcs(size, visit_size, plan["rotation"], (plan["dither_x"], plan["dither_y"]), plan["scale"])
    band = plan["band"]
    psf = galsim.Moffat(beta=_sim.PSF_BETA, fwhm=plan["fwhm"], trunc=_sim.PSF_TRUNC).shear(
        e1=plan["psf_e1"], e2=plan["psf_e2"])
    to_counts = 10.0 ** (0.4 * (plan["magzero"] - _sim.MAGZERO))  # counts per nJy
    c = (visit_size - 1) / 2.0
    jc = _jacobian_visit_to_grid(w, w_grid, c, c)
    psf_img = psf.drawImage(nx=VISIT_PSF_SIZE, ny=VISIT_PSF_SIZE, wcs=_galsim_wcs(galsim, jc)).array
    psf_img = psf_img.astype(np.float64) / psf_img.sum()
    # Sky noise: depth at 0.7" scaled with seeing (background-limited: flux ~ FWHM).
    n_eff = 1.0 / np.sum(psf_img**2)
    depth = VISIT_DEPTH[band] - 2.5 * np.log10(plan["fwhm"] / 0.7) + plan["depth_offset"]
    sigma = float(_sim._mag_to_flux(depth) / (5.0 * np.sqrt(n_eff))) * to_counts

    image = np.zeros((visit_size, visit_size))
    ra, dec = w_grid.pixel_to_world_values(cat["x"], cat["y"])
    xs, ys = w.world_to_pixel_values(ra, dec)
    half_base = int(np.ceil((_sim.PSF_TRUNC / plan["scale"]) + 2))
    for k in range(len(cat["x"])):
        flux = flux_override.get(k, cat[f"flux_{band}"][k])
        if flux <= 0:
            continue
        x, y = float(xs[k]), float(ys[k])
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        h = _sim._stamp_half_size(cat, k) + half_base - int(np.ceil(_sim.PSF_TRUNC / _sim.PIXEL_SCALE))
        if ix + h < 0 or iy + h < 0 or ix - h >= visit_size or iy - h >= visit_size:
            continue
        gal = _profiles(galsim, cat, k, band)
        if gal is None:
            obj = psf.withFlux(flux * to_counts)
        else:
            obj = galsim.Convolve(gal.withFlux(gal.flux * flux / max(cat[f"flux_{band}"][k], 1e-30)
                                               * to_counts), psf)
        jac = _jacobian_visit_to_grid(w, w_grid, x, y)
        stamp = obj.drawImage(nx=2 * h + 1, ny=2 * h + 1, wcs=_galsim_wcs(galsim, jac),
                              offset=galsim.PositionD(x - ix, y - iy)).array
        y0, x0 = iy - h, ix - h
        sy0, sx0 = max(0, -y0), max(0, -x0)
        y1, x1 = min(visit_size, y0 + 2 * h + 1), min(visit_size, x0 + 2 * h + 1)
        image[max(0, y0):y1, max(0, x0):x1] += stamp[sy0:sy0 + y1 - max(0, y0), sx0:sx0 + x1 - max(0, x0)]
    return w, image, psf_img, sigma


def _background(plan, visit_size, sigma):
    yy, xx = np.mgrid[0:visit_size, 0:visit_size] / float(visit_size) - 0.5
    a, b, c = plan["bg"] * sigma
    return a + b * xx + c * yy


def _cosmic_rays(rng, visit_size, sigma):
    """Additive CR image and its mask; list of (y, x, peak) hits."""
    add = np.zeros((visit_size, visit_size))
    hits = []
    for _ in range(int(rng.poisson(CR_PER_VISIT))):
        y, x = int(rng.integers(0, visit_size)), int(rng.integers(0, visit_size))
        length = int(rng.integers(1, 4))
        d = [(0, 1), (1, 0), (1, 1)][int(rng.integers(0, 3))]
        amp = float(rng.uniform(20, 200) * sigma)
        for s in range(length):
            yy, xx = y + s * d[0], x + s * d[1]
            if yy < visit_size and xx < visit_size:
                add[yy, xx] += amp
        hits.append((y, x, length, amp))
    return add, add > 0, hits


def _trail(rng, visit_size, sigma):
    """An unflagged satellite trail: a 2-pixel wide line across the visit."""
    yy, xx = np.mgrid[0:visit_size, 0:visit_size].astype(float)
    theta = rng.uniform(0, np.pi)
    c = (visit_size - 1) / 2.0
    offset = rng.uniform(-0.2, 0.2) * visit_size
    dist = (xx - c) * np.sin(theta) - (yy - c) * np.cos(theta) - offset
    return TRAIL_SIGMA * sigma * (np.abs(dist) < 1.0), float(theta), float(offset)


def simulate_visits(out_dir, n_visits: int = 6, size: int = 200, seed: int = 1, bands="gri",
                    density: float = 60.0, background: bool = True, artifacts: bool = True,
                    n_stars: int = 0, noise: bool = True, progress: bool = False) -> dict:
    """Write ``n_visits`` visits per band of one simulated field, the grid and the truth.

    ``noise`` False writes noise-free images (the variance plane is still the
    sky variance), to measure systematic errors without noise.
    Returns ``{"visits": [paths], "grid": path, "truth": path}``.
    """
    if n_visits < 1:
        raise InputError("--visits must be at least 1")
    if size < 32:
        raise InputError("--size must be at least 32 pixels for visits")
    if not density >= 0:
        raise InputError(f"--density must not be negative, got {density:g}")
    bands = _sim._parse_bands(bands)
    galsim = _sim._import_galsim()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    cat = _sim._draw_catalogue(rng, size, density)
    _add_bright_stars(rng, cat, size, n_stars)
    plans = _plan_visits(rng, bands, n_visits, size)
    i_var, i_tr, per_visit = _extra_sources(rng, cat, size, bands, plans)
    trail_visit = {b: int(rng.integers(0, n_visits)) for b in bands}
    visit_size = int(np.ceil(size * VISIT_MARGIN)) | 1
    paths, cr_rows = [], []
    from tqdm import tqdm

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Doing convolution of 2 objects, both with hard edges")
        for v, plan in enumerate(tqdm(plans, desc="visits", disable=not progress)):
            vrng = np.random.default_rng([seed, 11, v])
            override = {i_var: per_visit[v, 0], i_tr: per_visit[v, 1]}
            w, clean, psf_img, sigma = _render_visit(galsim, cat, plan, size, visit_size, override, vrng)
            image = clean + vrng.standard_normal(clean.shape) * sigma * float(noise)
            mask = np.zeros(clean.shape, np.int32)
            plan["sigma"] = sigma
            plan["trail_theta"] = plan["trail_offset"] = np.nan
            if background:
                image += _background(plan, visit_size, sigma)
            if artifacts:
                add, hit, hits = _cosmic_rays(vrng, visit_size, sigma)
                image += add
                mask[hit] |= 1 << MASK_PLANES["CR"]
                cr_rows += [(v, *h) for h in hits]
                if plan["index"] == trail_visit[plan["band"]]:
                    tr, plan["trail_theta"], plan["trail_offset"] = _trail(vrng, visit_size, sigma)
                    image += tr
            path = out / f"visit_{plan['band']}_{plan['index']:02d}.fits"
            _write_visit(path, plan, w, image, np.full(clean.shape, sigma**2), mask, psf_img)
            paths.append(path)
    grid_path = out / "grid.fits"
    _write_grid(grid_path, size)
    truth_path = out / "truth.fits"
    _write_truth(out, cat, bands, plans, per_visit, (i_var, i_tr), cr_rows, seed, size)
    return {"visits": paths, "grid": grid_path, "truth": truth_path}


def _write_visit(path, plan, w, image, variance, mask, psf):
    from astropy.io import fits

    hdr = w.to_header()
    hdr["BAND"] = plan["band"]
    hdr["MAGZERO"] = (plan["magzero"], "AB magnitude of one count")
    hdr["MJD-OBS"] = plan["mjd"]
    hdr["EXPTIME"] = plan["exptime"]
    hdr["SEEING"] = (plan["fwhm"], "[arcsec] PSF FWHM")
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "scarletstore.simulate.visits"
    m = fits.ImageHDU(mask.astype(np.int32), name="MASK")
    for name, bit in MASK_PLANES.items():
        key = f"MP_{name}"
        m.header[key if len(key) <= 8 else f"HIERARCH {key}"] = bit
    fits.HDUList([primary, fits.ImageHDU(image.astype(np.float32), header=hdr, name="IMAGE"), m,
                  fits.ImageHDU(variance.astype(np.float32), name="VARIANCE"),
                  fits.ImageHDU(psf.astype(np.float64), name="PSF")]).writeto(path, overwrite=True)


def _write_grid(path, size):
    from astropy.io import fits

    hdr = _sim._make_wcs(size).to_header()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((size, size), np.uint8), header=hdr,
                                                    name="IMAGE")]).writeto(path, overwrite=True)


def _write_truth(out, cat, bands, plans, per_visit, special, cr_rows, seed, size):
    from astropy.table import Table

    n = len(cat["x"])
    t = Table()
    t["id"] = np.arange(1, n + 1, dtype=np.int64)
    t["x"], t["y"] = cat["x"].astype(float), cat["y"].astype(float)
    ra, dec = _sim._make_wcs(size).pixel_to_world_values(cat["x"], cat["y"])
    t["ra"], t["dec"] = ra, dec
    for b in bands:
        t[f"flux_{b}"] = cat[f"flux_{b}"]
        t[f"flux27_{b}"] = cat[f"flux_{b}"] * 10 ** (0.4 * (27.0 - _sim.MAGZERO))
    t["is_star"] = cat["is_star"].astype(bool)
    t["mag_i"] = cat["mag_i"]
    kind = np.array(["static"] * n, dtype="U9")
    kind[special[0]], kind[special[1]] = "variable", "transient"
    t["kind"] = kind
    t.meta.update({"SIMSEED": int(seed), "SIZE": int(size), "BANDS": "".join(bands)})
    t.write(out / "truth.fits", overwrite=True)
    tv = Table()
    tv["file"] = [f"visit_{p['band']}_{p['index']:02d}.fits" for p in plans]
    for key in ("band", "index", "depth_offset", "rotation", "dither_x", "dither_y", "scale", "fwhm", "psf_e1",
                "psf_e2", "magzero", "mjd", "sigma", "trail_theta", "trail_offset"):
        tv[key] = [p[key] for p in plans]
    tv["bg"] = np.array([p["bg"] * p["sigma"] for p in plans])
    tv.write(out / "truth_visits.fits", overwrite=True)
    tf = Table()
    tf["file"] = tv["file"]
    tf["id_variable"] = np.full(len(plans), special[0] + 1)
    tf["flux_variable"] = per_visit[:, 0]
    tf["id_transient"] = np.full(len(plans), special[1] + 1)
    tf["flux_transient"] = per_visit[:, 1]
    tf.write(out / "truth_visit_fluxes.fits", overwrite=True)
    tc = Table(rows=cr_rows or None, names=("visit", "y", "x", "length", "amplitude"),
               dtype=(int, int, int, int, float))
    tc.write(out / "truth_artifacts.fits", overwrite=True)
