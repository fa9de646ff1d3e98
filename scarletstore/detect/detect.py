"""Detection: background, detection images, footprints, peaks and their association.

:func:`detect` turns an exposure Dataset into the ``parents`` Dataset:

1. **Background** per band on a mesh (:mod:`scarletstore.detect.background`), in two
   passes: the second excludes pixels detected with the first.
2. **Detection images.** Per band the PSF-matched-filter significance
   ``nu_b = ((I - B) w) * P / sqrt((V w) * P^2)`` (``*`` = correlation, ``w`` =
   0 on unusable pixels), which has unit noise wherever data exist. Across
   bands the likelihood-ratio statistic of a point source with an unknown,
   non-negative SED, ``X = sum_b max(nu_b, 0)^2`` (the chi^2 image of Szalay,
   Connolly & Szokoly 1999 restricted to positive fluxes as in Kaiser 2001),
   whose null distribution is the mixture ``sum_k C(n,k) 2^-n chi2_k``; it is
   mapped through that distribution to a one-sided Gaussian-equivalent
   significance ``Z`` so one threshold (in sigma) applies to every image.
3. **Footprints.** In every detection image the connected regions (8-
   connected) above ``threshold`` with at least ``min_area`` pixels; their union
   is grown by ``grow_fwhm`` PSF FWHM and relabelled, so footprints seen in
   different images that overlap become one parent.
4. **Peaks.** Each detection image has a companion *peak image*: the same
   construction with a narrow Gaussian (``peak_sigma``, 0.2 FWHM) instead of
   the PSF, per band and as the unit-noise sum over bands. The PSF-matched
   images are too smooth to show two maxima for neighbours ~1.5 FWHM apart;
   the narrow ones do. Maxima are found by a descending flood (union-find)
   over the footprint that records where each maximum's region meets a
   higher one: a maximum is a peak when it rises at least ``min_prominence``
   sigma above that saddle (splits close pairs, rejects noise bumps) and the
   detection significance at its pixel is at least ``peak_floor``. Sub-pixel
   positions come from a parabola through the 3 x 3 neighbourhood. On a
   bright neighbour's wing the significance is above threshold everywhere,
   so a peak must also stand out of that wing by itself: its height above
   the lower of the saddle level and the neighbour's 180-degree mirror value
   must reach ``peak_own_floor`` (4) sigma of the pixel noise and of a
   ``peak_contrast`` (5 %) uncertainty of the wing, added in quadrature.
   4 sigma is where the prominence of pure-noise maxima of the peak image
   becomes rare (measured on 10^6 noise pixels: 1e-2 per pixel reach 1.5
   sigma, 6e-4 reach 3, 2e-5 reach 4); 5 % is the scale of PSF-model and
   saturation-edge structure in a bright profile. A peak that meets no
   higher one (alone in its footprint island, as on the far wing of a
   bright star where the wing lifts the significance over the threshold in
   patches) is judged above the median of the ring 1.5-2.5 FWHM about it.
5. **Association.** Peaks from different images closer than
   ``association_radius`` become one peak carrying the OR of the images that
   saw it (bit i = band i, bit 30 = the multi-band image). A peak only single
   bands saw needs ``band_only_floor`` sigma (single-band images are noisier).
6. **Companions.** Around every bright peak the symmetric residual
   ``L(p) - L(2c - p)`` of the multi-band peak image (the SDSS deblender's
   template idea) reveals faint neighbours on a bright source's slope that
   make no local maximum; its maxima that rise ``residual_prominence``
   (0.5 sigma) above the saddle to a higher one (the same flood: ripples on
   the flank of a detected neighbour's residual do not count; more than
   0.5 sigma also drops faint members of blends of extended sources) and
   pass the residual thresholds become peaks flagged RESIDUAL. A seed is searched as far as
   its light can hide a companion (its height along the point-source
   profile of the peak image, 3-8 FWHM), so a saturated star's wings do not
   hide sources beyond a fixed radius.
7. **Known positions** (``known`` argument and the exposure's
   ``known_y/known_x``) become peaks flagged EXTERNAL: merged (one-to-one,
   closest first) into a detected peak within the association radius, else
   added inside the parent they fall in, else given a new parent (a disk one
   growth radius wide).

Bad pixels (mask planes ``bad_mask_planes``, by default those of Rubin's
deblender: BAD, CR, NO_DATA, SAT, SUSPECT, EDGE) have zero weight in every
image, so they never seed, grow or peak a detection by their own values; a
footprint may still cover them when it grows from good neighbours. Around
bad regions of 9 pixels or more the significance is recomputed with the
whole PSF (:func:`refilter_holes`), and where bad pixels leave the narrow
peak kernel without support the peak image is filled from it
(:func:`fill_unsupported`): a saturated star is detected from its
unsaturated wings with one peak at its centre, and a cosmic ray or bad
column does not cut a source in two. Pixels of the planes in
:data:`NO_DATA_PLANES` (NO_DATA, EDGE) are not holes in data but its end:
a band is treated there as if off the image. It is not refiltered around
or filled into (the normalised filters would extrapolate the data beside a
wide border 10+ px into it, with maxima there), its significance and peak
image are 0 and it is not counted among the bands with data; no pixel
without data in a band counts as above threshold in that band's images, a
footprint's growth stops where no band has data, and a residual mirror
point there is unknown, as off the image. Only a known position there is
kept (with its disk).

Speed: PSF convolutions are full-frame single-precision FFTs with the kernel
cut to its S/N-bearing core, the peak images separable Gaussian filters, one
band at a time, so a 4000 x 4000 x 6 patch needs only a few
full-size temporaries. Labelling is :func:`scipy.ndimage.label` (compiled, and
faster than a numba version would be); span building, growth and the peak
flood are numba kernels (see :mod:`scarletstore.detect.footprint` and below).
"""

from __future__ import annotations

import json
import warnings

import numba
import numpy as np
import xarray as xr
from scipy.spatial import cKDTree

from ..errors import InputError
#: Mask planes whose pixels never enter detection: the default bad mask of
#: Rubin's deblender (its ``badMask`` setting), so detect and deblend agree.
from ..ingest.masks import DEFAULT_BAD_PLANES  # noqa: E402  (one definition for every stage)
from ..ingest.defects import SKY_LEVEL_SIGMA  # noqa: E402  (the same rule as ingest's sky check)
from ..store.schema import stamp, validate
from . import footprint as fp
from .background import estimate_background
from .filters import (_accumulate_positive_square, fill_unsupported, gaussian_significance,
                      given_significance, matched_filter, positive_chi2_significance, psf_fwhm,
                      refilter_holes)
from .known import read_peaks_table
from .peaks import (PEAK_EXTERNAL, PEAK_NO_FOOTPRINT, PEAK_RESIDUAL, _point_profile,
                    _refine_isolated, _residual_peaks, _residual_radii, find_peaks)

__all__ = [
    "detect",
    "read_peaks_table",
    "psf_fwhm",
    "matched_filter",
    "positive_chi2_significance",
    "find_peaks",
    "DEFAULTS",
    "PEAK_EXTERNAL",
    "PEAK_RESIDUAL",
    "PEAK_NO_FOOTPRINT",
    "PARENT_EDGE",
    "PARENT_HAS_EXTERNAL",
    "PARENT_EXTERNAL_ONLY",
    "CHI2_BIT",
]
#: parent_flags bits.
PARENT_EDGE = 1 << 0            # footprint touches the image border
PARENT_HAS_EXTERNAL = 1 << 1    # at least one peak is external
PARENT_EXTERNAL_ONLY = 1 << 2   # created for a known position, nothing detected
#: peak_bands bit of the multi-band (chi^2) detection image.
CHI2_BIT = 30
#: Bad planes that mean "no data here" (not a hole in data around it): such pixels are
#: treated as if off the image (see "Bad pixels" above).
NO_DATA_PLANES = ("NO_DATA", "EDGE")

#: Default configuration; ``None`` entries are derived from the PSF (see :func:`detect`).
DEFAULTS = {
    "threshold": 5.0,
    "min_area": None,            # -> max(5, 0.5 * pi * (FWHM / 2)^2)
    "grow_fwhm": 1.0,            # footprint growth, in FWHM
    "peak_floor": None,          # -> threshold
    "min_prominence": 1.5,       # sigma above the saddle to a higher peak
    "peak_contrast": 0.05,       # fractional model uncertainty of a brighter neighbour's light
    "peak_own_floor": 4.0,       # sigma above the brighter neighbour's wing (see _own_significance)
    "peak_ring": 1.5,            # FWHM: a peak meeting no higher one is judged above its ring r..r+1
    "peak_sigma": None,          # -> Gaussian sigma (px) of the peak-finding image
    "peak_sigma_wide": 0.0,      # > peak_sigma: difference-of-Gaussians peak image
    "peak_combine": "sum",       # multi-band peak image: "sum" (linear) or "chi2"
    "peak_level": 0.0,           # the peak flood ignores pixels below this
    "min_separation": None,      # -> max(2, 0.5 FWHM) pixels
    "association_radius": None,  # -> max(2, 1.0 FWHM) pixels
    "per_band": True,            # detect in each band as well as in the multi-band image
    "band_only_floor": 10.0,     # min significance of a peak no multi-band image saw
    "residual_peaks": True,      # search companions in symmetric residuals
    "residual_seed_min": 20.0,   # peaks at least this bright (peak image) are searched around
    "residual_radius": None,     # -> 3 FWHM, least search window radius
    "residual_radius_max": None, # -> 8 FWHM, search radius of the brightest seeds (see _residual_radii)
    "residual_exclusion": None,  # -> 0.6 FWHM, no companion closer to a peak than this
    "residual_min": 7.0,         # residual (units of the peak image noise) of a companion
    "residual_frac": 0.2,        # ... and at least this fraction of the local peak image
    "residual_prominence": 0.5,  # ... and this far above the saddle to a higher residual maximum
    "refine_isolated": True,     # isolated peaks: position from the PSF-matched image
    "bkg_cell": 128,
    "bkg_nsigma": 3.0,
    "bkg_passes": 2,
    "bkg_mask_threshold": 3.0,   # pass-2 background excludes nu > this (grown)
    "bad_mask_planes": None,     # -> DEFAULT_BAD_PLANES + the exposure's bad_mask_planes attr
}


@numba.njit(cache=True)
def _keep_large(labels, n, min_area):
    # Mask of the labelled regions with at least min_area pixels: two passes
    # over the label image instead of bincount + a fancy-indexed gather.
    area = np.zeros(n + 1, np.int64)
    ny, nx = labels.shape
    for y in range(ny):
        for x in range(nx):
            area[labels[y, x]] += 1
    out = np.zeros((ny, nx), np.bool_)
    for y in range(ny):
        for x in range(nx):
            v = labels[y, x]
            if v != 0 and area[v] >= min_area:
                out[y, x] = True
    return out


# ------------------------------------------------------------------ association
def _associate(ys, xs, sigs, images, radius):
    """Group peaks of different detection images closer than ``radius``.

    Peaks are taken as seeds in order (chi^2-image peaks first, then by
    significance); each seed gathers, from every other image, the nearest
    unassigned peak within the radius. Two peaks of one image never merge:
    that image already judged them separate.

    Returns
    -------
    group : int64 array, the group index of each input peak
    seeds : int64 array, the input index of each group's seed
    """
    n = ys.size
    group = np.full(n, -1, np.int64)
    if n == 0:
        return group, np.zeros(0, np.int64)
    chi_first = (images != CHI2_BIT).astype(np.int8)
    order = np.lexsort((-sigs, chi_first))
    tree = cKDTree(np.column_stack([ys, xs]))
    seeds = []
    for i in order:
        if group[i] >= 0:
            continue
        g = len(seeds)
        seeds.append(i)
        group[i] = g
        cand = tree.query_ball_point([ys[i], xs[i]], radius)
        if len(cand) <= 1:
            continue
        cand = np.asarray(cand)
        cand = cand[(group[cand] < 0) & (images[cand] != images[i])]
        if cand.size == 0:
            continue
        d2 = (ys[cand] - ys[i]) ** 2 + (xs[cand] - xs[i]) ** 2
        cand = cand[np.argsort(d2, kind="stable")]
        taken = {int(images[i])}
        for j in cand:
            if int(images[j]) not in taken:
                taken.add(int(images[j]))
                group[j] = g
    return group, np.asarray(seeds, dtype=np.int64)


# ------------------------------------------------------------------ main entry
def _bad_bits(exposure, planes):
    mask_planes = json.loads(exposure.attrs.get("mask_planes", "{}") or "{}")
    bits = 0
    for name in planes:
        if name in mask_planes:
            bits |= 1 << int(mask_planes[name])
    return bits


def _bad_planes(exposure, planes):
    """The mask planes detection ignores.

    ``None`` gives :data:`DEFAULT_BAD_PLANES` plus any further planes the
    exposure records as bad (``bad_mask_planes`` attr, written at ingest);
    an explicit list (or comma-separated string) is used as given, and every
    name in it must be a plane of the exposure's mask.
    """
    if planes is None:
        recorded = json.loads(exposure.attrs.get("bad_mask_planes", "null") or "null") or []
        return list(DEFAULT_BAD_PLANES) + [p for p in recorded if p not in DEFAULT_BAD_PLANES]
    if isinstance(planes, str):
        planes = [p.strip() for p in planes.split(",") if p.strip()]
    try:
        planes = [str(p) for p in planes]
    except TypeError:
        raise InputError(f"bad mask planes must be a list of plane names, got {planes!r}") from None
    defined = json.loads(exposure.attrs.get("mask_planes", "{}") or "{}")
    unknown = [p for p in planes if p not in defined]
    if unknown:
        raise InputError(f"unknown mask plane(s) {', '.join(unknown)}; the exposure's mask has "
                         f"{', '.join(sorted(defined)) or 'none'}")
    return planes


def _resolve_config(exposure, threshold, min_area, overrides, fwhm):
    cfg = dict(DEFAULTS)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise InputError(f"unknown detection setting(s): {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, got {threshold!r}") from None
    if not np.isfinite(threshold) or threshold <= 0:
        raise InputError(f"threshold must be positive, got {threshold:g}")
    cfg["threshold"] = threshold
    if min_area is None:
        min_area = max(5, int(round(0.5 * np.pi * (fwhm / 2.0) ** 2)))
    try:
        min_area = int(min_area)
    except (TypeError, ValueError):
        raise InputError(f"min-area must be an integer, got {min_area!r}") from None
    if min_area < 1:
        raise InputError(f"min-area must be at least 1, got {min_area}")
    cfg["min_area"] = min_area
    if cfg["peak_floor"] is None:
        cfg["peak_floor"] = threshold
    if cfg["peak_sigma"] is None:
        cfg["peak_sigma"] = 0.2 * fwhm
    if cfg["residual_radius"] is None:
        cfg["residual_radius"] = 3.0 * fwhm
    if cfg["residual_radius_max"] is None:
        cfg["residual_radius_max"] = 8.0 * fwhm
    if cfg["residual_exclusion"] is None:
        cfg["residual_exclusion"] = 0.6 * fwhm
    if cfg["min_separation"] is None:
        cfg["min_separation"] = max(2.0, 0.5 * fwhm)
    if cfg["association_radius"] is None:
        cfg["association_radius"] = max(2.0, 1.0 * fwhm)
    cfg["bad_mask_planes"] = _bad_planes(exposure, cfg["bad_mask_planes"])
    cfg["fwhm"] = float(fwhm)
    cfg["grow_radius"] = float(cfg["grow_fwhm"] * fwhm)
    return cfg


def _known_positions(exposure, known):
    ys, xs = [], []
    if "known_y" in exposure.variables and "known_x" in exposure.variables:
        ys.append(np.asarray(exposure["known_y"].values, np.float64).ravel())
        xs.append(np.asarray(exposure["known_x"].values, np.float64).ravel())
    if known is not None:
        ky, kx = known
        ys.append(np.asarray(ky, np.float64).ravel())
        xs.append(np.asarray(kx, np.float64).ravel())
    if not ys:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(ys), np.concatenate(xs)


def detect(exposure: xr.Dataset, threshold=5.0, min_area=None, known=None, bands=None,
           progress=False, significance=None, **config) -> xr.Dataset:
    """Detect parent footprints and peaks in a multi-band exposure.

    Parameters
    ----------
    exposure : xarray.Dataset
        Schema ``exposure`` v1.
    threshold : float
        Detection threshold in sigma of each detection image (> 0).
    min_area : int, optional
        Minimum pixels above threshold of a footprint in one detection image
        (default ``max(5, 0.5 pi (FWHM/2)^2)``, half the PSF core).
    known : tuple of arrays (y, x), optional
        Extra known positions (pixels of the exposure arrays), e.g. from
        :func:`read_peaks_table`; the exposure's ``known_y/known_x`` are always used.
    bands : list of str, optional
        Bands used for detection (default all). Bits of ``peak_bands`` still
        index the exposure's full band coordinate.
    progress : bool
        Show a progress bar over bands.
    significance : (band, y, x) array, optional
        Precomputed per-band point-source significance (unit noise, sky
        removed, NaN where there are no data), aligned with the exposure's
        bands, e.g. the Kaiser coadd's (``coadds/likelihood``); it replaces
        the PSF-matched filter of the exposure (:func:`given_significance`).
        Background and peak images still come from the exposure.
    **config
        Overrides of :data:`DEFAULTS` (``grow_fwhm``, ``min_prominence``,
        ``association_radius``, ``bkg_cell``, ...).

    Returns
    -------
    xarray.Dataset
        Schema ``parents`` v1 (see ``schemas/parents/v1.json``).

    Raises
    ------
    InputError
        Non-positive threshold, unknown band, bad settings.
    """
    all_bands, det_bands, band_index = _detection_bands(exposure, bands)
    psfs = np.asarray(exposure["psf"].values)
    fwhms = {b: psf_fwhm(psfs[i]) for b, i in zip(det_bands, band_index)}
    fwhm = max(fwhms.values())  # the widest PSF sets growth and association scales
    cfg = _resolve_config(exposure, threshold, min_area, config, fwhm)
    bits = _bad_bits(exposure, cfg["bad_mask_planes"])
    no_data_bits = _bad_bits(exposure, [p for p in NO_DATA_PLANES if p in cfg["bad_mask_planes"]])
    ny, nx = exposure.sizes["y"], exposure.sizes["x"]

    scan = _scan_bands(exposure, band_index, psfs, cfg, bits, no_data_bits, significance,
                       progress)
    _warn_sky_level(exposure, scan["background"], bits)
    zsig, zsharp = _combined_images(scan.pop("chi2"), scan.pop("chi2_sharp"), scan.pop("nvalid"),
                                    cfg)
    no_data = scan.pop("no_data")
    kept_chi = _peaks_in(zsig, zsharp, CHI2_BIT, cfg, scan["union"], scan["peak_sets"])
    pk = _associated_peaks(scan.pop("peak_sets"), cfg)
    if no_data is not None:
        # A mirror point without data is unknown, as one off the image: its peak image
        # (no light there) would leave the seed's whole profile as a residual.
        zsharp[no_data] = np.nan
    if cfg["residual_peaks"] and pk["y"].size:
        _add_residual_companions(pk, zsharp, kept_chi, _point_profile(psfs[band_index],
                                                                       cfg["peak_sigma"]), cfg)
    del zsharp, kept_chi
    if cfg["refine_isolated"] and pk["y"].size:
        pk["y"], pk["x"] = _refine_isolated(zsig, pk["y"], pk["x"], pk["flags"], pk["keep"],
                                            2.0 * fwhm, 0.5 * fwhm)

    final = fp.grow_mask(scan.pop("union"), cfg["grow_radius"])
    if no_data is not None:
        final &= ~no_data  # growth stops where the data end, as at the image's edge
    del no_data
    _add_known(pk, _known_positions(exposure, known), final, zsig, cfg)
    # integer pixel of externals moved to the known position
    pk["iy"] = np.clip(np.round(pk["y"]), 0, ny - 1).astype(np.int32)
    pk["ix"] = np.clip(np.round(pk["x"]), 0, nx - 1).astype(np.int32)
    # A peak moved to a known position (or rounded) just outside the grown
    # footprints gets a disk so that every peak lies inside a parent.
    _add_disks(final, pk["iy"], pk["ix"], ~final[pk["iy"], pk["ix"]], cfg["grow_radius"])

    labels, nparent = fp.label_mask(final)
    del final
    spans = fp.labels_to_spans(labels, nparent)
    pk["parent"] = labels[pk["iy"], pk["ix"]].astype(np.int64)
    del labels
    pk = _drop_weak(pk, nparent)
    cfg_json = dict(cfg, fwhm_per_band=fwhms,
                    significance="matched_filter" if significance is None else "given")
    return _parents_dataset(exposure, spans, nparent, pk, scan["background"], all_bands,
                            det_bands, cfg, cfg_json)


# ------------------------------------------------------------------ steps of detect()
def _detection_bands(exposure, bands):
    """Check the exposure's variables and the band list.

    Returns
    -------
    all_bands, det_bands : lists of str
    band_index : list of int, the index of each detection band in ``all_bands``
    """
    for var in ("image", "variance", "mask", "psf"):
        if var not in exposure.variables:
            raise InputError(f"exposure has no {var!r} variable")
    all_bands = [str(b) for b in np.asarray(exposure["band"].values)]
    if bands is None:
        det_bands = list(all_bands)
    else:
        det_bands = [str(b) for b in ([bands] if isinstance(bands, str) else bands)]
        missing = [b for b in det_bands if b not in all_bands]
        if missing:
            raise InputError(f"unknown band(s) {', '.join(missing)}; the exposure has "
                             f"{', '.join(all_bands)}")
        twice = sorted({b for b in det_bands if det_bands.count(b) > 1})
        if twice:  # a repeated band would count its chi^2 twice
            raise InputError(f"band(s) {', '.join(twice)} named twice in the detection bands")
        if not det_bands:
            raise InputError("no detection bands given")
    if len(all_bands) > CHI2_BIT:
        raise InputError(f"at most {CHI2_BIT} bands are supported (peak_bands bit {CHI2_BIT} "
                         "is the multi-band image)")
    return all_bands, det_bands, [all_bands.index(b) for b in det_bands]


def _peaks_in(sig, peak_img, bit, cfg, union, peak_sets):
    """Footprints of ``sig`` (added to ``union``) and the peaks of ``peak_img`` on them.

    Appends ``(y, x, iy, ix, value, image bit, own)`` to ``peak_sets`` and
    returns the footprint mask.
    """
    labels, n = fp.label_mask(sig > cfg["threshold"])
    kept = _keep_large(labels, n, cfg["min_area"])
    del labels
    union |= kept
    fwhm = cfg["fwhm"]
    ring = ((cfg["peak_ring"] * fwhm, (cfg["peak_ring"] + 1) * fwhm)
            if cfg["peak_ring"] > 0 else None)
    y, x, iy, ix, val, own = find_peaks(peak_img, kept, cfg["min_prominence"],
                                        level=cfg["peak_level"], significance=sig,
                                        floor=cfg["peak_floor"],
                                        min_separation=cfg["min_separation"],
                                        contrast=cfg["peak_contrast"], return_own=True, ring=ring)
    peak_sets.append((y, x, iy, ix, val, np.full(y.size, bit, np.int64), own))
    return kept


def _band_significance(img, var, good, psf, cfg, given, holes=None):
    """Background, PSF-matched significance and its support (denominator) of one band.

    ``given`` is the band's precomputed significance or None (matched filter).
    ``holes`` are the bad pixels refiltered around (default all; see
    :func:`refilter_holes`).
    The background is estimated twice when ``bkg_passes`` > 1, the second
    time with the first pass's detections (grown) excluded, so bright
    sources' wings do not lift the sky.
    """
    bkg = estimate_background(img, ~good, cell=cfg["bkg_cell"], nsigma=cfg["bkg_nsigma"])
    if given is None:
        sig, den, conv = matched_filter(img, var, good, psf, bkg)
    else:
        sig, den, conv = given_significance(given, img.shape)
    for _ in range(int(cfg["bkg_passes"]) - 1):
        src = fp.grow_mask(sig > cfg["bkg_mask_threshold"], cfg["grow_radius"])
        src |= ~good
        bkg = estimate_background(img, src, cell=cfg["bkg_cell"], nsigma=cfg["bkg_nsigma"])
        del src
        if given is None:
            sig, den, _ = matched_filter(img, var, good, psf, bkg, denominator=den, convolver=conv)
    del conv
    if given is None:
        refilter_holes(sig, img, var, good, psf, bkg, holes=holes)
    return bkg, sig, den


def _peak_image(img, var, good, sig, bkg, cfg, no_data=None):
    """The narrow-Gaussian peak image of one band, filled from ``sig`` where bad pixels (other
    than ``no_data``) leave its kernel without support."""
    sharp = gaussian_significance(img, var, good, cfg["peak_sigma"], bkg, cfg["peak_sigma_wide"])
    fill_unsupported(sharp, sig, good, cfg["peak_sigma"], no_data=no_data)
    return sharp


def _scan_bands(exposure, band_index, psfs, cfg, bits, no_data_bits, significance, progress):
    """Per-band images, accumulated into the multi-band sums, one band at a time.

    Returns a dict: ``background`` (band, y, x), the running sums ``chi2``
    (positive squares of the significances), ``chi2_sharp`` (of the peak
    images), ``nvalid`` (bands with data per pixel), the footprint
    ``union``, the per-band ``peak_sets`` (see :func:`_peaks_in`) and
    ``no_data``, the pixels flagged with a ``no_data_bits`` plane in every
    detection band (None when there are none).
    """
    from ..progress import progress as _progress

    image_all = exposure["image"].values
    var_all = exposure["variance"].values
    mask_all = exposure["mask"].values
    nb, ny, nx = image_all.shape
    out = {"background": np.zeros((nb, ny, nx), np.float32),
           "chi2": np.zeros((ny, nx), np.float32), "chi2_sharp": np.zeros((ny, nx), np.float32),
           "nvalid": np.zeros((ny, nx), np.uint8), "union": np.zeros((ny, nx), bool),
           "peak_sets": [], "no_data": None}
    for k, i in enumerate(_progress(list(band_index), desc="detect", enabled=progress)):
        img, var = image_all[i], var_all[i]
        good = ((mask_all[i] & bits) == 0) & np.isfinite(img) & np.isfinite(var) & (var > 0)
        # pixels without data are treated as off the image, other bad pixels as holes in data
        no_data = (mask_all[i] & no_data_bits) != 0 if no_data_bits else None
        if no_data is not None and not no_data.any():
            no_data = None
        bkg, sig, den = _band_significance(img, var, good, psfs[i], cfg,
                                           None if significance is None else significance[i],
                                           None if no_data is None else ~good & ~no_data)
        out["background"][i] = bkg
        if no_data is not None:  # the band is absent there: 0, not counted
            den[no_data] = 0
            sig[no_data] = 0
        out["nvalid"] += den > 0
        del den  # before the peak image: one full-size array less at the peak of memory
        sharp = _peak_image(img, var, good, sig, bkg, cfg, no_data)
        if no_data is not None:
            sharp[no_data] = 0
        del bkg, good
        if k == 0:
            out["no_data"] = None if no_data is None else no_data.copy()
        elif out["no_data"] is not None:
            out["no_data"] = None if no_data is None else out["no_data"] & no_data
        _accumulate_positive_square(out["chi2"], sig)
        if cfg["peak_combine"] == "sum":
            out["chi2_sharp"] += sharp
        else:
            _accumulate_positive_square(out["chi2_sharp"], sharp)
        if cfg["per_band"]:
            _peaks_in(sig, sharp, i, cfg, out["union"], out["peak_sets"])
        del sig, sharp, no_data
    # bands not used for detection still get a background (for the store)
    for i in range(nb):
        if i not in band_index:
            good = ((mask_all[i] & bits) == 0) & np.isfinite(image_all[i]) & (var_all[i] > 0)
            out["background"][i] = estimate_background(image_all[i], ~good, cell=cfg["bkg_cell"],
                                                       nsigma=cfg["bkg_nsigma"])
    return out


def _combined_images(chi2, chi2_sharp, nvalid, cfg):
    """The multi-band detection image ``Z`` and peak image, in place of the sums."""
    zsig = positive_chi2_significance(chi2, nvalid, out=chi2)  # in place: saves 64 MB at 4k
    if cfg["peak_combine"] == "sum":
        # Unit-noise sum of the band significances (a flat-SED detection
        # image); keeps the sign, which a band-pass image needs.
        zsharp = chi2_sharp
        np.divide(zsharp, np.sqrt(np.maximum(nvalid, 1)).astype(np.float32), out=zsharp)
    else:
        zsharp = positive_chi2_significance(chi2_sharp, nvalid, out=chi2_sharp)
    return zsig, zsharp


def _associated_peaks(peak_sets, cfg):
    """One peak per group of associated peaks of the detection images.

    Returns a dict of arrays: ``y, x`` (sub-pixel), ``iy, ix``, ``sig`` (best
    significance), ``bands`` (OR of the images' bits), ``flags`` and ``keep``
    (False for peaks that fail the band-only or own-significance floors;
    they may still be rescued by :func:`_drop_weak`).
    """
    ys, xs, iys, ixs, sigs, imgs, owns = (np.concatenate([p[k] for p in peak_sets])
                                          for k in range(7))
    iys, ixs = iys.astype(np.int32), ixs.astype(np.int32)
    sigs, owns = sigs.astype(np.float32), owns.astype(np.float32)
    group, seeds = _associate(ys, xs, sigs, imgs, cfg["association_radius"])
    band_bits = np.zeros(seeds.size, np.int64)
    np.bitwise_or.at(band_bits, group, np.left_shift(np.int64(1), imgs))
    best_sig = np.full(seeds.size, -np.inf, np.float32)
    np.maximum.at(best_sig, group, sigs)
    # A peak seen by single bands only is much more often a noise bump on a
    # bright neighbour (each band image is noisier than the combination), so
    # it must be brighter to stand on its own.
    keep = ((band_bits >> CHI2_BIT) & 1).astype(bool) | (best_sig >= cfg["band_only_floor"])
    # A peak on a brighter neighbour's wing must stand out of that wing by
    # itself in at least one detection image (see _own_significance).
    best_own = np.full(seeds.size, -np.inf, np.float32)
    np.maximum.at(best_own, group, owns)
    keep &= best_own >= cfg["peak_own_floor"]
    return {"y": ys[seeds], "x": xs[seeds], "iy": iys[seeds], "ix": ixs[seeds], "sig": best_sig,
            "bands": band_bits, "flags": np.zeros(seeds.size, np.int64), "keep": keep}


def _append_peaks(pk, y, x, sig, bands, flags):
    """Append new peaks (kept, at pixel ``round(y), round(x)``) to the peak dict."""
    n = y.size
    add = {"y": y, "x": x, "iy": np.round(y).astype(np.int32), "ix": np.round(x).astype(np.int32),
           "sig": sig.astype(np.float32), "bands": np.full(n, bands, np.int64),
           "flags": np.broadcast_to(flags, (n,)).astype(np.int64), "keep": np.ones(n, bool)}
    for k, v in add.items():
        pk[k] = np.concatenate([pk[k], v])


def _add_residual_companions(pk, zsharp, kept_chi, profile, cfg):
    """Add companions from the symmetric residual around bright peaks (flag RESIDUAL)."""
    keep = pk["keep"]
    seed = (zsharp[pk["iy"], pk["ix"]] >= cfg["residual_seed_min"]) & keep
    radii = _residual_radii(zsharp[pk["iy"][seed], pk["ix"][seed]], profile, cfg["residual_min"],
                            cfg["residual_radius"], cfg["residual_radius_max"])
    ry, rx, rr = _residual_peaks(zsharp, kept_chi, pk["y"][seed], pk["x"][seed], radii,
                                 float(cfg["residual_exclusion"]), float(cfg["residual_min"]),
                                 float(cfg["residual_frac"]), float(cfg["residual_prominence"]))
    if not ry.size:
        return
    # strongest first; drop any near an existing peak or a stronger candidate
    o = np.argsort(-rr, kind="stable")
    ry, rx, rr = ry[o], rx[o], rr[o]
    sep = cfg["residual_exclusion"]
    d, _ = cKDTree(np.column_stack([pk["y"][keep], pk["x"][keep]])).query(np.column_stack([ry, rx]))
    ok = d >= sep
    tree = cKDTree(np.column_stack([ry, rx]))
    for j in range(ry.size):
        if ok[j]:
            for q in tree.query_ball_point([ry[j], rx[j]], sep):
                if q > j:
                    ok[q] = False
    _append_peaks(pk, ry[ok], rx[ok], rr[ok], 1 << CHI2_BIT, PEAK_RESIDUAL)


def _add_disks(final, iy, ix, where, grow_r):
    """Add to ``final`` a disk (the growth radius, >= 1 px) about each pixel ``where`` selects."""
    if where.any():
        disk = np.zeros(final.shape, bool)
        disk[iy[where], ix[where]] = True
        final |= fp.grow_mask(disk, max(grow_r, 1.0))


KNOWN_DUPLICATE_RADIUS = 0.5  # px: known positions closer than this are one source


def _distinct_positions(ky, kx, n_known):
    """Known positions with repeats (within KNOWN_DUPLICATE_RADIUS of an earlier
    one) dropped, reported in one warning: two sources on one spot share its
    flux arbitrarily (35.6 and 951.4 of 987, each with a 400 error)."""
    pairs = cKDTree(np.column_stack([ky, kx])).query_pairs(KNOWN_DUPLICATE_RADIUS, output_type="ndarray")
    if not len(pairs):
        return ky, kx
    keep = np.ones(ky.size, bool)
    for i, j in sorted(map(tuple, np.sort(pairs, axis=1))):
        if keep[i]:
            keep[j] = False
    warnings.warn(f"{int((~keep).sum())} of {n_known} known position(s) repeat another within "
                  f"{KNOWN_DUPLICATE_RADIUS:g} px: kept once", stacklevel=4)
    return ky[keep], kx[keep]


def _add_known(pk, known_yx, final, zsig, cfg):
    """Merge the known positions into the peaks (flag EXTERNAL), one-to-one, closest first.

    A known object that was also detected becomes one peak at the known
    (catalogue) position; the others are new peaks, and those outside every
    footprint get a disk in ``final`` and the NO_FOOTPRINT flag.
    """
    ny, nx = final.shape
    ky, kx = known_yx
    inside = (ky > -0.5) & (ky < ny - 0.5) & (kx > -0.5) & (kx < nx - 0.5)
    n_known, n_outside = int(ky.size), int((~inside).sum())
    if n_outside:
        warnings.warn(f"{n_outside} of {n_known} known position(s) outside the image ignored",
                      stacklevel=3)
    ky, kx = ky[inside], kx[inside]
    if not ky.size:
        return
    ky, kx = _distinct_positions(ky, kx, n_known)
    matched = np.zeros(ky.size, bool)
    if pk["y"].size:
        sdm = cKDTree(np.column_stack([ky, kx])).sparse_distance_matrix(
            cKDTree(np.column_stack([pk["y"], pk["x"]])), cfg["association_radius"],
            output_type="ndarray")
        taken = np.zeros(pk["y"].size, bool)
        for m in np.argsort(sdm["v"], kind="stable"):
            j, k = sdm["i"][m], sdm["j"][m]
            if not matched[j] and not taken[k]:
                matched[j] = taken[k] = True
                pk["flags"][k] |= PEAK_EXTERNAL
                pk["y"][k], pk["x"][k] = ky[j], kx[j]
    sel = np.flatnonzero(~matched)
    if not sel.size:
        return
    kiy = np.clip(np.round(ky[sel]).astype(np.int64), 0, ny - 1)
    kix = np.clip(np.round(kx[sel]).astype(np.int64), 0, nx - 1)
    outside = ~final[kiy, kix]
    _add_disks(final, kiy, kix, outside, cfg["grow_radius"])
    _append_peaks(pk, ky[sel], kx[sel], zsig[kiy, kix], 0,
                  np.where(outside, PEAK_EXTERNAL | PEAK_NO_FOOTPRINT, PEAK_EXTERNAL))


def _drop_weak(pk, nparent):
    """Drop the peaks ``keep`` rejects, except the best of a parent that would have none.

    Known positions are never dropped, even when merged into a weak peak.
    """
    keep = pk["keep"] | ((pk["flags"] & PEAK_EXTERNAL) != 0)
    parent = pk["parent"]
    has = np.zeros(nparent + 1, bool)
    has[parent[keep]] = True
    rescue = np.flatnonzero(~keep & ~has[parent])
    if rescue.size:
        rescue = rescue[np.argsort(-pk["sig"][rescue], kind="stable")]
        _, first = np.unique(parent[rescue], return_index=True)
        keep[rescue[first]] = True
    pk = {k: v[keep] for k, v in pk.items() if k != "keep"}
    # Invariants: every peak is in a parent (ensured by the disks) and every
    # parent has a peak (each kept footprint holds its maximum, disks their position).
    assert not (pk["parent"] == 0).any(), "a peak lies outside every footprint"
    assert np.bincount(pk["parent"], minlength=nparent + 1)[1:].all(), "a footprint without peaks"
    return pk


def _parent_boxes(spans, nparent, shape):
    """bbox (y0, y1, x0, x1 inclusive), area and EDGE flag per parent from the spans."""
    counts, span_y, span_x0, span_x1 = spans
    ny, nx = shape
    # vectorised over the ragged layout
    parent_of_span = np.repeat(np.arange(nparent), counts)
    y0 = np.full(nparent, np.iinfo(np.int32).max, np.int64)
    y1 = np.full(nparent, -1, np.int64)
    x0 = np.full(nparent, np.iinfo(np.int32).max, np.int64)
    x1 = np.full(nparent, -1, np.int64)
    np.minimum.at(y0, parent_of_span, span_y)
    np.maximum.at(y1, parent_of_span, span_y)
    np.minimum.at(x0, parent_of_span, span_x0)
    np.maximum.at(x1, parent_of_span, span_x1)
    area = np.bincount(parent_of_span, weights=(span_x1 - span_x0 + 1).astype(np.float64),
                       minlength=nparent).astype(np.int64)
    pflags = np.zeros(nparent, np.int64)
    pflags[(y0 == 0) | (x0 == 0) | (y1 == ny - 1) | (x1 == nx - 1)] |= PARENT_EDGE
    return y0, y1, x0, x1, area, pflags




def sky_levels(exposure, background, bits) -> dict:
    """Per band, the median of detection's background over the usable pixels in
    units of the median pixel noise, on a regular subgrid of about 2^14 pixels
    (a median needs no more; the full planes cost 2 % of a detect)."""
    ny, nx = background.shape[1:]
    step = max(1, int(np.sqrt(ny * nx / 2 ** 14)))
    sub = (slice(None), slice(step // 2, None, step), slice(step // 2, None, step))
    mask = np.asarray(exposure["mask"].values[sub])
    var = np.asarray(exposure["variance"].values[sub])
    bkg = background[sub]
    out = {}
    for i, band in enumerate(str(b) for b in exposure["band"].values):
        good = ((mask[i] & bits) == 0) & np.isfinite(var[i]) & (var[i] > 0)
        if good.any():
            out[band] = float(np.median(bkg[i][good]) / np.sqrt(np.median(var[i][good])))
    return out


def _warn_sky_level(exposure, background, bits) -> None:
    """Warn when an image still holds its sky: the deblend and the catalog fit
    and measure the image as given (sky-subtracted, as in the Rubin pipelines),
    so a sky of +1000 became source light (fluxes 880x the truth, reported
    converged) and one of -50 zero fluxes; detection alone subtracts its own
    background estimate, so its parents looked right."""
    levels = {b: v for b, v in sky_levels(exposure, background, bits).items()
              if abs(v) > SKY_LEVEL_SIGMA}
    if levels:
        warnings.warn("the image is not sky-subtracted (median background "
                      + ", ".join(f"{b} {v:+.3g}" for b, v in levels.items())
                      + " pixel sigmas): deblend and catalog take the image as given; subtract "
                      "the sky before ingest", stacklevel=3)


def _parents_dataset(exposure, spans, nparent, pk, background, all_bands, det_bands, cfg,
                     cfg_json):
    """The ``parents`` v1 Dataset: parents with their spans, peaks by parent then significance."""
    counts, span_y, span_x0, span_x1 = spans
    y0, y1, x0, x1, area, pflags = _parent_boxes(spans, nparent, background.shape[1:])
    p_parent, p_flags = pk["parent"], pk["flags"]
    has_ext = np.zeros(nparent, bool)
    has_ext[p_parent[(p_flags & PEAK_EXTERNAL) != 0] - 1] = True
    has_det = np.zeros(nparent, bool)
    has_det[p_parent[pk["bands"] != 0] - 1] = True
    pflags[has_ext] |= PARENT_HAS_EXTERNAL
    pflags[~has_det] |= PARENT_EXTERNAL_ONLY
    order = np.lexsort((-pk["sig"].astype(np.float64), p_parent))
    peak_count = np.bincount(p_parent, minlength=nparent + 1)[1:].astype(np.int64)
    ds = xr.Dataset(
        {
            "parent_id": ("parent", np.arange(1, nparent + 1, dtype=np.int64)),
            "bbox_y0": ("parent", y0.astype(np.int32)),
            "bbox_x0": ("parent", x0.astype(np.int32)),
            "bbox_height": ("parent", (y1 - y0 + 1).astype(np.int32)),
            "bbox_width": ("parent", (x1 - x0 + 1).astype(np.int32)),
            "area": ("parent", area),
            "parent_flags": ("parent", pflags.astype(np.int32)),
            "span_count": ("parent", counts.astype(np.int64), {"sample_dimension": "span"}),
            "peak_count": ("parent", peak_count, {"sample_dimension": "peak"}),
            "span_y": ("span", span_y.astype(np.int32)),
            "span_x0": ("span", span_x0.astype(np.int32)),
            "span_x1": ("span", span_x1.astype(np.int32)),
            "peak_id": ("peak", np.arange(1, order.size + 1, dtype=np.int64)),
            "peak_parent": ("peak", p_parent[order]),
            "peak_y": ("peak", pk["y"][order].astype(np.float64)),
            "peak_x": ("peak", pk["x"][order].astype(np.float64)),
            "peak_iy": ("peak", pk["iy"][order]),
            "peak_ix": ("peak", pk["ix"][order]),
            "peak_significance": ("peak", pk["sig"][order].astype(np.float32)),
            "peak_bands": ("peak", pk["bands"][order].astype(np.int32)),
            "peak_flags": ("peak", p_flags[order].astype(np.int32)),
            "background": (("band", "y", "x"), background),
        },
        coords={"band": ("band", np.asarray(all_bands))},
    )
    ds.attrs.update({
        "threshold": float(cfg["threshold"]),
        "min_area": int(cfg["min_area"]),
        "association_radius": float(cfg["association_radius"]),
        "grow_radius": float(cfg["grow_radius"]),
        "psf_fwhm": float(cfg["fwhm"]),
        "detection_bands": json.dumps(det_bands),
        "config": json.dumps(cfg_json, sort_keys=True),
        "origin_y": int(exposure.attrs.get("origin_y", 0)),
        "origin_x": int(exposure.attrs.get("origin_x", 0)),
    })
    stamp(ds, "parents", 1)
    return validate(ds)
