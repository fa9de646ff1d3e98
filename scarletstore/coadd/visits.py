"""Visit FITS files and the grid file: reading and validation.

A visit is one calibrated exposure in one band, one FITS file:

* ``IMAGE``: the pixels, with a celestial WCS and the keywords ``BAND``,
  ``MAGZERO`` (AB magnitude of one count), ``MJD-OBS`` and ``EXPTIME``
  (any of them may also sit in the primary header);
* ``MASK``: int bit planes named by ``MP_<NAME>`` keywords (LSST bits when none);
* ``VARIANCE``: per-pixel variance in counts^2;
* ``PSF``: an odd-sized image of the PSF at the visit centre, unit sum.

The grid file holds an ``IMAGE`` HDU (or a primary image) whose WCS and
shape define the coadd's pixel grid. Every problem raises
:class:`~scarletstore.errors.InputError` with one line naming the file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..ingest.exposure import LSST_MASK_PLANES, bad_bits

# Planes whose pixels never enter a warp: a cosmic ray is bad in a single
# visit even though it is informational on a coadd.
WARP_BAD_PLANES = ["BAD", "CR", "NO_DATA", "SAT", "SUSPECT", "EDGE"]
PSF_SUM_TOLERANCE = 1e-3
REQUIRED_KEYS = ("BAND", "MAGZERO", "MJD-OBS", "EXPTIME")


@dataclass
class Visit:
    """Header-level description of one visit (pixels are read by :meth:`load`)."""

    path: Path
    band: str
    magzero: float
    mjd: float
    exptime: float
    shape: tuple
    wcs: object  # astropy.wcs.WCS
    wcs_text: str
    mask_planes: dict
    psf: np.ndarray
    extra: dict = field(default_factory=dict)

    def flux_scale(self, zeropoint: float = 27.0) -> float:
        """Factor taking this visit's counts to flux units of ``zeropoint``."""
        return 10.0 ** (0.4 * (zeropoint - self.magzero))

    def bad_bits(self) -> int:
        return bad_bits(self.mask_planes, WARP_BAD_PLANES)

    def load(self):
        """(image, variance, mask) arrays of the visit."""
        from astropy.io import fits

        raw = self.extra.get("raw")
        if raw is not None and raw["stat"] == _stat(self.path):
            # The planes' data offsets were found when the headers were read:
            # read them straight from the file instead of parsing every header again.
            planes = [np.fromfile(self.path, dtype=dt, count=int(np.prod(self.shape)), offset=off)
                      .reshape(self.shape) for off, dt in (raw[n] for n in ("IMAGE", "VARIANCE", "MASK"))]
            return planes[0].astype(np.float64), planes[1].astype(np.float64), planes[2].astype(np.int32)
        with fits.open(self.path, memmap=False) as hdul:
            img = np.asarray(hdul["IMAGE"].data, np.float64)
            var = np.asarray(hdul["VARIANCE"].data, np.float64)
            msk = np.asarray(hdul["MASK"].data).astype(np.int32)
        return img, var, msk


_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def _stat(path):
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns


def _raw_layout(hdul, path):
    """Data offset and dtype of IMAGE, VARIANCE and MASK when they are stored plain
    (uncompressed, no BSCALE/BZERO scaling), else None (then astropy reads them)."""
    from astropy.io import fits

    out = {}
    for name in ("IMAGE", "VARIANCE", "MASK"):
        hdu = hdul[name]
        h = hdu.header
        if (type(hdu) is not fits.ImageHDU or h.get("BSCALE", 1) != 1 or h.get("BZERO", 0) != 0
                or int(h.get("BITPIX", 0)) not in _BITPIX):
            return None
        out[name] = (int(hdu.fileinfo()["datLoc"]), _BITPIX[int(h["BITPIX"])])
    out["stat"] = _stat(path)
    return out


def _celestial_wcs(header, where):
    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            w = WCS(header)
        except Exception:
            raise InputError(f"{where}: unreadable WCS in the IMAGE header") from None
    if not w.has_celestial or w.naxis != 2:
        raise InputError(f"{where}: IMAGE has no celestial WCS")
    try:
        det = np.linalg.det(w.pixel_scale_matrix)
    except Exception:
        det = 0.0
    if not np.isfinite(det) or det == 0:
        raise InputError(f"{where}: IMAGE WCS is singular")
    return w


def _wcs_text(w) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return w.to_header(relax=True).tostring()


def _keyword(hdul, key, where):
    for hdu in (hdul["IMAGE"], hdul[0]):
        if key in hdu.header:
            return hdu.header[key]
    raise InputError(f"{where}: no {key} keyword (IMAGE or primary header)")


def _number(value, key, where, positive=False):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {key} = {value!r} is not a number") from None
    if not math.isfinite(x) or (positive and not x > 0):
        raise InputError(f"{where}: {key} = {value!r} must be a finite{' positive' if positive else ''} number")
    return x


def _hdu_shape(hdu):
    naxis = int(hdu.header.get("NAXIS", 0))
    return tuple(int(hdu.header.get(f"NAXIS{naxis - k}", 0)) for k in range(naxis))


def check_visit_psf(psf, where) -> np.ndarray:
    """A visit PSF: 2-D, odd, finite, summing to 1 (to 1e-3). Returned as float64, renormalised."""
    psf = np.asarray(psf, np.float64)
    if psf.ndim != 2 or psf.size == 0:
        raise InputError(f"{where}: PSF must be a 2-D image, got shape {psf.shape}")
    if psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise InputError(f"{where}: PSF must be odd-sized, got {psf.shape[0]}x{psf.shape[1]}")
    if not np.all(np.isfinite(psf)):
        raise InputError(f"{where}: PSF has non-finite values")
    total = float(psf.sum())
    if abs(total - 1.0) > PSF_SUM_TOLERANCE:
        raise InputError(f"{where}: PSF sums to {total:.6g}, not 1")
    return psf / total


def read_visit(path) -> Visit:
    """Read and validate the headers and PSF of one visit (pixels stay on disk)."""
    from astropy.io import fits

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(f"{where}: no such file")
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception:
        raise InputError(f"{where}: not a readable FITS file") from None
    if any("truncated" in str(w.message) for w in caught):
        # astropy reads on and fails later on a short data block (a traceback)
        hdul.close()
        raise InputError(f"{where}: the FITS file is truncated")
    with hdul:
        for name in ("IMAGE", "MASK", "VARIANCE", "PSF"):
            if name not in hdul:
                raise InputError(f"{where}: missing HDU {name}")
        shapes = {n: _hdu_shape(hdul[n]) for n in ("IMAGE", "MASK", "VARIANCE")}
        shape = shapes["IMAGE"]
        if len(shape) != 2 or min(shape) < 1:
            raise InputError(f"{where}: IMAGE must be a 2-D image, got shape {shape}")
        for name in ("MASK", "VARIANCE"):
            if shapes[name] != shape:
                raise InputError(f"{where}: {name} is {shapes[name]}, IMAGE is {shape}: shapes must agree")
        band = str(_keyword(hdul, "BAND", where)).strip()
        if not band:
            raise InputError(f"{where}: empty BAND keyword")
        magzero = _number(_keyword(hdul, "MAGZERO", where), "MAGZERO", where)
        mjd = _number(_keyword(hdul, "MJD-OBS", where), "MJD-OBS", where)
        exptime = _number(_keyword(hdul, "EXPTIME", where), "EXPTIME", where, positive=True)
        w = _celestial_wcs(hdul["IMAGE"].header, where)
        planes = {k[3:]: int(v) for k, v in hdul["MASK"].header.items() if k.startswith("MP_")}
        if hdul["PSF"].data is None:
            raise InputError(f"{where}: PSF HDU is empty")
        try:
            psf_data = np.array(hdul["PSF"].data)
        except (ValueError, TypeError, OSError):
            raise InputError(f"{where}: unreadable PSF data") from None
        psf = check_visit_psf(psf_data, where)
        raw = _raw_layout(hdul, path)
    return Visit(path=path, band=band, magzero=magzero, mjd=mjd, exptime=exptime, shape=shape,
                 wcs=w, wcs_text=_wcs_text(w), mask_planes=planes or dict(LSST_MASK_PLANES), psf=psf,
                 extra={} if raw is None else {"raw": raw})


@dataclass
class Grid:
    """The coadd pixel grid: a celestial WCS and a (ny, nx) shape."""

    wcs: object
    shape: tuple
    wcs_text: str
    path: Path | None = None


def read_grid(path) -> Grid:
    """The grid file: the ``IMAGE`` HDU (or the first image HDU) gives WCS and shape."""
    from astropy.io import fits

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(f"{where}: no such grid file")
    try:
        hdul = fits.open(path, memmap=False)
    except Exception:
        raise InputError(f"{where}: not a readable FITS file") from None
    with hdul:
        hdu = hdul["IMAGE"] if "IMAGE" in hdul else next(
            (h for h in hdul if int(h.header.get("NAXIS", 0)) == 2), None)
        if hdu is None:
            raise InputError(f"{where}: no 2-D IMAGE HDU defines the grid")
        shape = _hdu_shape(hdu)
        if len(shape) != 2 or min(shape) < 1:
            raise InputError(f"{where}: grid IMAGE must be 2-D, got shape {shape}")
        w = _celestial_wcs(hdu.header, where)
    return Grid(wcs=w, shape=shape, wcs_text=_wcs_text(w), path=path)


def sub_grid(grid: Grid, y0: int, x0: int, height: int, width: int) -> Grid:
    """The ``height`` x ``width`` piece of ``grid`` whose first pixel is grid pixel (y0, x0).

    Its WCS is the grid's with the reference pixel moved by (x0, y0) (astropy's
    ``WCS.slice``, which carries distortion terms along), so a pixel of the
    piece and the grid pixel it came from see the same sky: a coadd of the
    piece is the same pixels as that box of the grid's coadd.
    """
    ny, nx = grid.shape
    if not (0 <= y0 and 0 <= x0 and height >= 1 and width >= 1 and y0 + height <= ny
            and x0 + width <= nx):
        raise InputError(f"box y0={y0} x0={x0} {height}x{width} is not inside the {ny}x{nx} grid")
    w = grid.wcs.slice((slice(y0, y0 + height), slice(x0, x0 + width)))
    return Grid(wcs=w, shape=(int(height), int(width)), wcs_text=_wcs_text(w), path=grid.path)


def overlaps(visit: Visit, grid: Grid, step: int = 8) -> bool:
    """True when some grid pixel (on a node grid of ``step``) falls inside the visit."""
    ny, nx = grid.shape
    ys = np.unique(np.r_[np.arange(0, ny, step), ny - 1]).astype(float)
    xs = np.unique(np.r_[np.arange(0, nx, step), nx - 1]).astype(float)
    Y, X = np.meshgrid(ys, xs, indexing="ij")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra, dec = grid.wcs.pixel_to_world_values(X.ravel(), Y.ravel())
        u, v = visit.wcs.world_to_pixel_values(ra, dec)
    u, v = np.asarray(u), np.asarray(v)
    vy, vx = visit.shape
    inside = (u > 2.5) & (u < vx - 3.5) & (v > 2.5) & (v < vy - 3.5)  # kernel support inside
    return bool(inside.any())


class DistinctVisits:
    """Reads visits, refusing one given twice, by path or as a copy.

    A copy under another name (same band, MJD-OBS, EXPTIME, shape and WCS)
    is the same exposure: it counted twice in every stack, and in forced
    photometry gave its rows again as another epoch.
    """

    def __init__(self):
        self.paths, self.exposures = set(), {}

    def read(self, path) -> "Visit":
        key = Path(path).resolve()
        if key in self.paths:
            raise InputError(f"{path}: visit given twice")
        self.paths.add(key)
        v = read_visit(path)
        same = self.exposures.setdefault((v.band, v.mjd, v.exptime, v.shape, v.wcs_text), path)
        if same is not path:
            raise InputError(f"{path}: the same exposure as {same} (band, MJD-OBS, EXPTIME and WCS)")
        return v


def read_visits(paths, grid: Grid, bands=None) -> list[Visit]:
    """Read and validate every visit before any pixel is warped.

    ``bands`` (list) keeps only visits of those bands, in that band order;
    a named band that no visit has is an error.
    """
    if not paths:
        raise InputError("no visit files given")
    distinct = DistinctVisits()
    visits = []
    for p in paths:
        v = distinct.read(p)
        if not overlaps(v, grid):
            raise InputError(f"{p}: visit does not overlap the grid")
        visits.append(v)
    if bands is not None:
        have = {v.band for v in visits}
        missing = [b for b in bands if b not in have]
        if missing:
            raise InputError(f"--bands names {', '.join(missing)} but no visit is in that band")
        visits = [v for b in bands for v in visits if v.band == b]
    return visits
