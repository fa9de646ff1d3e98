"""Read multi-band exposures (FITS per band, or npz) into an exposure Dataset.

Every problem with an input raises :class:`~scarletstore.errors.InputError`
with a one-line message naming the file, before anything is written.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from ..store.schema import stamp, validate
from ..text import noun, plural
from .masks import DEFAULT_BAD_PLANES, LSST_MASK_PLANES  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import xarray as xr

# a PSF image is centred on its central pixel; real PSF stamps sit within a
# few tenths of a pixel of it, so a centroid further than this is a wrong image
PSF_MAX_OFFSET = 1.0
# PSF sums further than this from 1 are renormalised with a warning
PSF_SUM_TOLERANCE = 0.01
# pixel positions of two bands' WCSs may differ by this much and still be one grid
GRID_TOLERANCE = 0.01


def warn(message: str) -> None:
    """One warning line on stderr (what a scientist should know, not a traceback)."""
    sys.stderr.write(f"scarletstore: warning: {message}\n")


def bad_bits(mask_planes: dict, bad_planes=DEFAULT_BAD_PLANES) -> int:
    """The OR of the bits of the named bad planes that this mask defines."""
    bits = 0
    for name in bad_planes:
        if name in mask_planes:
            bits |= 1 << int(mask_planes[name])
    return bits


def bad_pixels(exposure: xr.Dataset, bad_planes=None) -> np.ndarray:
    """(band, y, x) bool: pixels flagged in a bad plane of ``exposure``."""
    planes = json.loads(exposure.attrs["mask_planes"])
    if bad_planes is None:
        bad_planes = json.loads(exposure.attrs["bad_mask_planes"])
    return (np.asarray(exposure["mask"].values) & bad_bits(planes, bad_planes)) != 0


def check_psf(psf, where: str) -> np.ndarray:
    """Validate a PSF image and return it normalised to unit sum (float64).

    Refused: not 2-D, empty, even-sized, non-finite, a sum that is not
    positive, or a centroid more than :data:`PSF_MAX_OFFSET` pixels from the
    central pixel (the deblender centres every model on it, so such a PSF
    shifts every source). A sum further than :data:`PSF_SUM_TOLERANCE` from 1
    (a stamp in counts, a star cut-out) is renormalised with one warning line.
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2:
        raise InputError(f"{where}: PSF must be 2-D, got {psf.ndim}-D")
    if psf.size == 0:
        raise InputError(f"{where}: PSF is empty")
    if psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise InputError(f"{where}: PSF must be odd-sized, got {psf.shape[0]}x{psf.shape[1]}")
    if not np.all(np.isfinite(psf)):
        raise InputError(f"{where}: PSF has non-finite values")
    total = psf.sum()
    if not total > 0:
        raise InputError(f"{where}: PSF sums to {total:g}; it must have a positive sum")
    y, x = np.indices(psf.shape)
    cy = (psf * y).sum() / total - psf.shape[0] // 2
    cx = (psf * x).sum() / total - psf.shape[1] // 2
    if np.hypot(cy, cx) > PSF_MAX_OFFSET:
        raise InputError(f"{where}: PSF centroid is ({cy:+.2f}, {cx:+.2f}) px (y, x) from its central "
                         f"pixel; a PSF image must be centred on it (within {PSF_MAX_OFFSET:g} px)")
    if abs(total - 1) > PSF_SUM_TOLERANCE:
        warn(f"{where}: PSF sums to {total:.4g}, renormalised to 1")
    return psf / total


def _stack_psfs(psfs: list[np.ndarray]) -> np.ndarray:
    """Zero-pad odd PSFs of different sizes to a common centred shape."""
    ny = max(p.shape[0] for p in psfs)
    nx = max(p.shape[1] for p in psfs)
    out = np.zeros((len(psfs), ny, nx), dtype=np.float32)
    for i, p in enumerate(psfs):
        dy, dx = (ny - p.shape[0]) // 2, (nx - p.shape[1]) // 2
        out[i, dy:dy + p.shape[0], dx:dx + p.shape[1]] = p
    return out


def _check_planes(image, variance, mask, bands, where, mask_planes, bad_planes):
    names = list(bands)
    dup = sorted({b for b in names if names.count(b) > 1})
    if dup:
        raise InputError(f"{where}: duplicate band name(s) {', '.join(dup)}")
    bits = bad_bits(mask_planes, bad_planes)
    for i, band in enumerate(names):
        good = (mask[i] & bits) == 0
        v = variance[i][good]
        if not np.all(np.isfinite(v)):
            raise InputError(f"{where[i] if isinstance(where, list) else where}: "
                             f"band {band}: non-finite variance on unmasked pixels")
        if np.any(v < 0):
            raise InputError(f"{where[i] if isinstance(where, list) else where}: "
                             f"band {band}: negative variance on unmasked pixels")
        if not np.all(np.isfinite(image[i][good])):
            raise InputError(f"{where[i] if isinstance(where, list) else where}: "
                             f"band {band}: non-finite image values on unmasked pixels")
        if not np.any(v > 0):
            # a pixel with variance 0 is unusable, so the band would hold no data
            # and give fluxes of 0 +- 0 that look like measurements
            raise InputError(f"{where[i] if isinstance(where, list) else where}: band {band}: "
                             + ("variance is zero on every unmasked pixel (no noise estimate)"
                                if v.size else "every pixel is masked"))


def make_exposure(image, variance, mask, psfs, bands, *, wcs: str = "", origin=(0, 0),
                  mask_planes=None, bad_planes=None, known=None, sources=(),
                  mask_defects: bool = True, units: str = "counts") -> xr.Dataset:
    """Build a validated exposure Dataset from arrays.

    Parameters
    ----------
    image, variance : (band, y, x) arrays, stored as float32
    mask : (band, y, x) int array or None (all zero)
    psfs : list of 2-D arrays (validated, normalised, padded to one shape)
    bands : list of str
    wcs : FITS header text of the WCS ("" when unknown)
    origin : global (y, x) of pixel (0, 0)
    known : optional (y, x) arrays of known source positions
    mask_defects : bool
        Set the CR plane on pixels sharper than their band's PSF allows
        (unflagged hot columns, hot pixels, cosmic rays;
        :mod:`scarletstore.ingest.defects`) and record the count per band in
        attr ``defect_pixels`` (JSON ``null`` when off). Done here, not in
        the readers, so FITS, npz, coadds and arrays are treated alike.
    units : str
        Units of the pixel values (attr ``units`` of ``image``; the variance's
        are their square); FITS inputs give their ``BUNIT``. Catalogs label
        their fluxes with it.
    """
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    mask = np.zeros(image.shape, np.int32) if mask is None else np.asarray(mask).astype(np.int32)
    mask_planes = dict(LSST_MASK_PLANES if mask_planes is None else mask_planes)
    bad_planes = list(DEFAULT_BAD_PLANES if bad_planes is None else bad_planes)
    where = ", ".join(str(s) for s in sources) or "input"
    if image.ndim != 3 or variance.shape != image.shape or mask.shape != image.shape:
        raise InputError(f"{where}: image {image.shape}, variance {variance.shape} and "
                         f"mask {mask.shape} must be equal (band, y, x) shapes")
    if image.size == 0:
        raise InputError(f"{where}: the image is empty ({' x '.join(str(n) for n in image.shape)} "
                         "band x y x x pixels)")
    if len(bands) != image.shape[0] or len(psfs) != image.shape[0]:
        raise InputError(f"{where}: {image.shape[0]} image planes but {len(bands)} band names "
                         f"and {len(psfs)} PSFs")
    _check_planes(image, variance, mask, bands, where, mask_planes, bad_planes)
    psf = _stack_psfs([check_psf(p, f"{where} (band {b})") for p, b in zip(psfs, bands)])
    defects = None
    if mask_defects:
        from .defects import mask_defects as _mask

        mask, mask_planes, defects = _mask(image, variance, mask, bad_bits(mask_planes, bad_planes),
                                           psf, bands, mask_planes)
    import xarray as xr  # here: a deblend imports this module for its mask-plane helpers only

    ds = xr.Dataset(
        {
            "image": (("band", "y", "x"), image),
            "variance": (("band", "y", "x"), variance),
            "mask": (("band", "y", "x"), mask),
            "psf": (("band", "psf_y", "psf_x"), psf),
        },
        coords={"band": np.array(list(bands), dtype=object)},
        attrs={
            "wcs": wcs,
            "origin_y": int(origin[0]),
            "origin_x": int(origin[1]),
            "mask_planes": json.dumps(mask_planes, sort_keys=True),
            "bad_mask_planes": json.dumps(bad_planes),
            "sources": json.dumps([str(s) for s in sources]),
            "defect_pixels": json.dumps(defects),
        },
    )
    ds["image"].attrs["units"] = units
    ds["variance"].attrs["units"] = f"{units}^2" if units.isidentifier() else f"({units})^2"
    if known is not None and len(known[0]):
        ds["known_y"] = ("known", np.asarray(known[0], dtype=np.float64))
        ds["known_x"] = ("known", np.asarray(known[1], dtype=np.float64))
    stamp(ds, "exposure", 1)
    return validate(ds)


# ------------------------------------------------------------------ FITS
def read_psf_file(path) -> np.ndarray:
    """A PSF image from a FITS file (first HDU with 2-D data, or HDU ``PSF``) or ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such PSF file")
    if path.suffix == ".npy":
        try:
            return np.load(path)
        except Exception as exc:  # numpy raises several types for bad files
            raise InputError(f"{path}: unreadable PSF file ({exc.__class__.__name__})") from None
    from astropy.io import fits
    try:
        with fits.open(path) as hdul:
            if "PSF" in hdul:
                return np.array(hdul["PSF"].data)
            for hdu in hdul:
                if hdu.data is not None and getattr(hdu.data, "ndim", 0) == 2:
                    return np.array(hdu.data)
    except OSError:
        raise InputError(f"{path}: not a readable FITS file") from None
    raise InputError(f"{path}: no 2-D PSF image found")


def _celestial_wcs(header):
    """The header's celestial WCS, or None (astropy's fix-up warnings kept quiet)."""
    from astropy.wcs import WCS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            w = WCS(header)
        except Exception:
            return None
    return w if w.has_celestial else None


def _wcs_text(header) -> str:
    w = _celestial_wcs(header)
    if w is None:
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.to_header(relax=True).tostring()


def _grid_mismatch(first, other, shape, reference: str = "the first band") -> str:
    """Why two bands' WCSs put the same pixels on different sky positions ('' when they agree).

    The sky position of a grid of pixels (corners, edges and centre) under
    ``other`` must map back through ``first`` to the same pixels, to
    :data:`GRID_TOLERANCE` pixels. ``reference`` names ``first`` in the reason.
    """
    if (first is None) != (other is None):
        return "has no WCS" if other is None else f"has a WCS {reference} lacks"
    if first is None:
        return ""
    ny, nx = shape
    y, x = np.meshgrid(np.linspace(0, max(ny - 1, 0), 5), np.linspace(0, max(nx - 1, 0), 5), indexing="ij")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ra, dec = other.celestial.all_pix2world(x.ravel(), y.ravel(), 0)
            bx, by = first.celestial.all_world2pix(ra, dec, 0)
        except Exception:
            return f"has a WCS that cannot be compared with {reference}'s"
    off = float(np.nanmax(np.hypot(bx - x.ravel(), by - y.ravel()))) if np.size(bx) else 0.0
    if not np.isfinite(off) or off > GRID_TOLERANCE:
        return f"is on a different pixel grid (its pixels sit up to {off:.3g} px from {reference}'s)"
    return ""


def read_fits_bands(paths, bands=None, psf_files=None, require_psf: bool = True,
                    mask_defects: bool = True) -> xr.Dataset:
    """One FITS file per band (HDUs IMAGE, MASK, VARIANCE and PSF) -> exposure.

    The band name comes from header ``BAND`` (primary or IMAGE HDU) or, in
    order, from ``bands``; a PSF in ``psf_files[band]`` overrides the PSF HDU.
    Every band must be on the first band's pixel grid (same WCS and LTV
    origin): bands on different grids are refused, never silently given the
    first band's WCS. ``mask_defects`` as in :func:`make_exposure`.
    """
    psf_files = dict(psf_files or {})
    if bands is not None and len(bands) != len(paths):
        raise InputError(f"--bands names {plural(len(bands), 'band')} but "
                         f"{plural(len(paths), 'file')} {noun(len(paths), 'was', 'were')} given")
    with warnings.catch_warnings():
        # astropy reports the files' header fix-ups (FITSFixedWarning, VerifyWarning
        # on trailing bytes, ...) as warnings: the data are read all the same, and a
        # problem that matters is refused below with one line
        warnings.simplefilter("ignore")
        return _read_fits_bands(paths, bands, psf_files, require_psf, mask_defects)


def _read_fits_bands(paths, bands, psf_files, require_psf, mask_defects):
    from astropy.io import fits

    images, variances, masks, psfs, names = [], [], [], [], []
    wcs, first_wcs, mask_planes, shape, origin, units = None, None, None, None, (0, 0), None
    for i, path in enumerate(paths):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            hdul = fits.open(path, memmap=False)
            hdul.verify("silentfix")
        except Exception:
            raise InputError(f"{path}: not a readable FITS file") from None
        with hdul:
            for name in ("IMAGE", "MASK", "VARIANCE"):
                if name not in hdul:
                    raise InputError(f"{path}: missing HDU {name}")
            try:
                img = np.array(hdul["IMAGE"].data)
                var = np.array(hdul["VARIANCE"].data)
                msk = np.array(hdul["MASK"].data)
            except Exception:
                raise InputError(f"{path}: unreadable image data") from None
            header_band = hdul[0].header.get("BAND") or hdul["IMAGE"].header.get("BAND")
            band = bands[i] if bands is not None else header_band
            if not band:
                raise InputError(f"{path}: no BAND header; name the bands with --bands")
            band = str(band).strip()
            if header_band and str(header_band).strip() != band:
                # --bands wins, but a swapped list would relabel the data silently
                warn(f"{path.name}: --bands names it {band}, its BAND header says "
                     f"{str(header_band).strip()}")
            if band in psf_files:
                psf = read_psf_file(psf_files.pop(band))
            elif "PSF" in hdul and hdul["PSF"].data is not None:
                psf = np.array(hdul["PSF"].data)
            elif not require_psf:
                psf = np.ones((1, 1))  # a reprocessed image for redistribution needs no PSF
            else:
                raise InputError(f"{path}: missing HDU PSF (or give --psf {band}=FILE)")
            if img.ndim != 2 or var.shape != img.shape or msk.shape != img.shape:
                raise InputError(f"{path}: IMAGE {img.shape}, VARIANCE {var.shape} and MASK "
                                 f"{msk.shape} must be equal 2-D shapes")
            hdr = hdul["IMAGE"].header
            # LSST cut-outs carry their global pixel offset as LTV (negated).
            band_origin = (int(-hdr.get("LTV2", 0)), int(-hdr.get("LTV1", 0)))
            if shape is None:
                shape = img.shape
                wcs, first_wcs, origin = _wcs_text(hdr), _celestial_wcs(hdr), band_origin
            elif img.shape != shape:
                raise InputError(f"{path}: band {band} has shape {img.shape[0]}x{img.shape[1]}, "
                                 f"other bands {shape[0]}x{shape[1]}")
            else:
                why = _grid_mismatch(first_wcs, _celestial_wcs(hdr), shape)
                if not why and band_origin != origin:
                    why = f"has pixel origin {list(band_origin)} (LTV), the first band {list(origin)}"
                if why:
                    raise InputError(f"{path}: band {band} {why}; every band must be on one pixel "
                                     "grid: resample them onto a common grid (a coadd) first")
            planes = {k[3:]: int(v) for k, v in hdul["MASK"].header.items() if k.startswith("MP_")}
            if mask_planes is None:
                mask_planes = planes or dict(LSST_MASK_PLANES)
            elif planes and planes != mask_planes:
                raise InputError(f"{path}: mask planes differ from the first band's")
            psf = check_psf(psf, f"{path} (band {band})")
            # the pixel values' units (the simulator writes nJy); unrecorded: counts
            band_units = str(hdr.get("BUNIT", "")).strip() or "counts"
            if units is None:
                units = band_units
            elif band_units != units:
                raise InputError(f"{path}: band {band} is in {band_units!r} (BUNIT), band {names[0]} "
                                 f"in {units!r}; every band must be in the same units")
            images.append(img)
            variances.append(var)
            masks.append(msk)
            psfs.append(psf)
            names.append(band)
    if psf_files:
        raise InputError(f"--psf names band(s) {', '.join(psf_files)} that no input provides")
    return make_exposure(np.stack(images), np.stack(variances), np.stack(masks), psfs, names,
                         wcs=wcs or "", origin=origin, mask_planes=mask_planes,
                         sources=[Path(p).name for p in paths], mask_defects=mask_defects,
                         units=units)


# ------------------------------------------------------------------ npz
def _npz_array(data, key, path, kinds="iuf"):
    """``data[key]`` with its dtype kind in ``kinds``, else one InputError line.

    Object arrays need pickle, which is never allowed (a file could run code),
    and complex or text pixels are not pixels: both failed later with a
    traceback or a ComplexWarning.
    """
    try:
        arr = data[key]
    except ValueError:  # object array: loading it would need allow_pickle
        raise InputError(f"{path}: {key!r} is an object array (not loaded: it would need pickle)") from None
    if arr.dtype.kind not in kinds:
        raise InputError(f"{path}: {key!r} has dtype {arr.dtype}, expected "
                         + {"iuf": "real numbers", "iub": "integers", "US": "text",
                            "V": "a table with x and y fields"}.get(kinds, kinds))
    return arr


def read_npz(path, bands=None, psf_files=None, mask_defects: bool = True) -> xr.Dataset:
    """An npz in the layout of hsc_cosmos_35.npz -> exposure.

    Keys ``images`` (band, y, x), ``variance``, ``psfs`` (band, py, px),
    ``filters``; optional ``mask`` (LSST bits) and ``catalog`` with ``x, y``
    (kept as known peaks for detection). ``mask_defects`` as in :func:`make_exposure`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception:
        raise InputError(f"{path}: not a readable npz file") from None
    with data:
        if "images" not in keys:
            raise InputError(f"{path}: npz has no 'images' array")
        for key in ("variance", "psfs"):
            if key not in keys:
                raise InputError(f"{path}: npz has no {key!r} array")
        images = _npz_array(data, "images", path)
        if images.ndim != 3:
            raise InputError(f"{path}: 'images' must be (band, y, x), got shape {images.shape}")
        variance = _npz_array(data, "variance", path)
        if variance.shape != images.shape:
            raise InputError(f"{path}: 'variance' shape {variance.shape} differs from images {images.shape}")
        mask = _npz_array(data, "mask", path, kinds="iub") if "mask" in keys else None
        if mask is not None and mask.shape != images.shape:
            raise InputError(f"{path}: 'mask' shape {mask.shape} differs from images {images.shape}")
        if bands is None:
            if "filters" not in keys:
                raise InputError(f"{path}: npz has no 'filters'; name the bands with --bands")
            bands = [(b.decode() if isinstance(b, bytes) else str(b)).strip()
                     for b in _npz_array(data, "filters", path, kinds="US").tolist()]
            if not all(bands):
                raise InputError(f"{path}: 'filters' holds an empty band name")
        elif len(bands) != images.shape[0]:
            raise InputError(f"{path}: --bands names {plural(len(bands), 'band')}, "
                             f"images have {images.shape[0]}")
        psfs = list(_npz_array(data, "psfs", path))
        if len(psfs) != images.shape[0]:
            raise InputError(f"{path}: {plural(len(psfs), 'PSF')} for {plural(images.shape[0], 'band')}")
        for band, pf in dict(psf_files or {}).items():
            if band not in bands:
                raise InputError(f"--psf names band {band} that {path.name} does not have")
            psfs[bands.index(band)] = read_psf_file(pf)
        known = None
        if "catalog" in keys:
            cat = _npz_array(data, "catalog", path, kinds="V")
            if cat.dtype.names is None or not {"x", "y"} <= set(cat.dtype.names):
                raise InputError(f"{path}: 'catalog' must be a table with x and y fields")
            try:
                known = (np.asarray(cat["y"], np.float64), np.asarray(cat["x"], np.float64))
            except (TypeError, ValueError):
                raise InputError(f"{path}: 'catalog' x and y must be numbers") from None
            if not (np.isfinite(known[0]).all() and np.isfinite(known[1]).all()):
                # as detect --peaks: a NaN position is no position
                raise InputError(f"{path}: 'catalog' holds non-finite x or y")
    return make_exposure(images, variance, mask, psfs, bands, known=known,
                         sources=[path.name], mask_defects=mask_defects)


def read_inputs(paths, bands=None, psf_files=None, mask_defects: bool = True) -> xr.Dataset:
    """Dispatch on the inputs: a single ``.npz``, or FITS files (one per band)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no input files given")
    if any(p.suffix == ".npz" for p in paths):
        if len(paths) != 1:
            raise InputError("give a single .npz input (it holds every band)")
        return read_npz(paths[0], bands=bands, psf_files=psf_files, mask_defects=mask_defects)
    return read_fits_bands(paths, bands=bands, psf_files=psf_files, mask_defects=mask_defects)
