"""Known positions: reading a table of ra/dec or x/y into exposure pixels for ``detect --peaks``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import InputError

# ------------------------------------------------------------------ known positions
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")


def _column(table, *names):
    lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def read_peaks_table(path, wcs_header_text=""):
    """Read known source positions from a FITS or CSV table.

    Parameters
    ----------
    path : str or path-like
        FITS binary table (first table HDU) or CSV with a header line. Columns
        (case-insensitive) ``x``, ``y`` (0-indexed pixels of the exposure
        arrays) or ``ra``, ``dec`` (degrees, or with angle units); x/y win when
        both are present.
    wcs_header_text : str
        FITS header text of the exposure's WCS, needed for ra/dec.

    Returns
    -------
    y, x : float64 arrays
        Pixel positions.

    Raises
    ------
    InputError
        One line naming the file, on any problem.
    """
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such peaks table")
    name = path.name.lower()
    fmt = "fits" if name.endswith(_FITS_SUFFIXES) else "ascii.csv"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = Table.read(path, format=fmt)
    except Exception as exc:  # astropy raises many types for bad files
        kind = "FITS" if fmt == "fits" else "CSV"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: not a readable {kind} table ({reason})") from None
    cx, cy = _column(table, "x"), _column(table, "y")
    cra, cdec = _column(table, "ra"), _column(table, "dec")
    try:
        if cx is not None and cy is not None:
            x = np.asarray(table[cx], dtype=np.float64)
            y = np.asarray(table[cy], dtype=np.float64)
        elif cra is not None and cdec is not None:
            if not wcs_header_text or not wcs_header_text.strip():
                raise InputError(f"{path}: table gives ra/dec but the exposure has no WCS")
            ra, dec = _degrees(table[cra]), _degrees(table[cdec])
            x, y = _world_to_pixel(wcs_header_text, ra, dec, path)
        else:
            raise InputError(f"{path}: needs columns x and y, or ra and dec; has "
                             f"{', '.join(table.colnames) or 'none'}")
    except InputError:
        raise
    except (TypeError, ValueError):
        raise InputError(f"{path}: position columns are not numeric") from None
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise InputError(f"{path}: non-finite positions")
    return y, x


def _degrees(col):
    unit = getattr(col, "unit", None)
    values = np.asarray(col, dtype=np.float64)
    if unit is not None:
        import astropy.units as u

        try:
            return (values * unit).to_value(u.deg)
        except u.UnitConversionError:
            raise ValueError("not an angle") from None
    return values


def _world_to_pixel(wcs_text, ra, dec, path):
    from astropy.io import fits
    from astropy.wcs import WCS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wcs = WCS(fits.Header.fromstring(wcs_text))
            x, y = wcs.all_world2pix(ra, dec, 0)
    except Exception:
        raise InputError(f"{path}: cannot convert ra/dec with the exposure's WCS") from None
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
