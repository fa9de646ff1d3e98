"""A FITS binary table writer for catalogs of plain numeric and boolean columns.

Importing ``astropy.table`` and ``astropy.io.fits`` costs ~0.35 s of a
one-band ``catalog`` call (~2 s), for a file that is a few header cards and
the columns' big-endian bytes. :func:`write_fits_table` writes that file itself
(FITS standard 4.0, sections 4 and 7.3: an empty primary HDU, then one
BINTABLE HDU) when every column is a 1-d bool, signed integer or float array
and every header value a str, int, float or bool; :func:`fits_writable` says
whether it can. Other tables (strings, unsigned or multi-dimensional columns)
are left to astropy by the caller. Long string values use the ``CONTINUE``
long-string convention, as astropy writes them (and reads them back).
"""

from __future__ import annotations

import math
import re

import numpy as np

BLOCK = 2880
CARD = 80

# numpy kind + itemsize -> TFORM letter (FITS 4.0, table 18)
# keys this writer sets itself, or that mean something else than a value
_RESERVED = re.compile(r"(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|TFIELDS|END|CONTINUE"
                       r"|COMMENT|HISTORY|HIERARCH|T[A-Z]+\d+|)$")
_TFORMS = {("b", 1): "L", ("i", 2): "I", ("i", 4): "J", ("i", 8): "K",
           ("f", 4): "E", ("f", 8): "D"}


def _tform(a: np.ndarray) -> str | None:
    if a.dtype.kind == "b":
        return "L"
    return _TFORMS.get((a.dtype.kind, a.dtype.itemsize))


def fits_writable(columns: dict, header: dict, units: dict | None = None) -> bool:
    """Whether :func:`write_fits_table` can write these columns, header values and units."""
    lengths = {np.shape(v)[0] if np.ndim(v) == 1 else -1 for v in columns.values()}
    if len(lengths) > 1 or -1 in lengths or not columns:
        return False
    if not all(_tform(np.asarray(v)) and len(k) <= 68 and k.isascii() for k, v in columns.items()):
        return False
    for k, v in header.items():
        if not (len(k) <= 8 and re.fullmatch(r"[A-Z0-9_-]+", k) and not _RESERVED.match(k)):
            return False
        if not isinstance(v, (str, bool, int, float, np.integer, np.floating, np.bool_)):
            return False
        if isinstance(v, str) and not (v.isascii() and v.isprintable()):
            return False
        if isinstance(v, (float, np.floating)) and not math.isfinite(v):
            return False
    for k, v in (units or {}).items():
        if k not in columns or not (isinstance(v, str) and v.isascii() and v.isprintable()):
            return False
    return True


def _card(key: str, value: str = "", comment: str = "") -> str:
    """One 80-character card: ``KEY     = value / comment`` (no ``=`` for an empty value)."""
    text = f"{key:<8}= {value:<20}" if value else f"{key:<8}"
    if comment:
        text = f"{text} / {comment}"
    return f"{text[:CARD]:<{CARD}}"


def _fixed(value) -> str:
    """A value in fixed format (right-justified to column 30), FITS 4.0 section 4.2."""
    if isinstance(value, (bool, np.bool_)):
        text = "T" if value else "F"
    elif isinstance(value, (int, np.integer)):
        text = str(int(value))
    else:
        text = repr(float(value)).upper()  # shortest round-trip digits, E exponent
        if "." not in text and "E" not in text:
            text += ".0"
        if len(text) > 20:
            text = f"{float(value):.16G}"
    return f"{text:>20}"


def _string_cards(key: str, value: str) -> list[str]:
    """A string value, over ``CONTINUE`` cards when it does not fit one card.

    Quotes are doubled inside the value (4.2.1); a value split over cards ends
    every piece but the last with ``&`` (the long-string convention), and a
    doubled quote is never split between two cards.
    """
    escaped = value.replace("'", "''")
    if not escaped:
        return [_card(key, "''")]
    if len(escaped) <= 68:  # '...' from column 11, padded to 8 characters
        return [_card(key, f"'{escaped:<8}'")]
    cards, first = [], True
    while escaped:
        # 10 columns of key (or CONTINUE) and indicator, two quotes, one '&'
        piece = escaped if len(escaped) <= 68 else escaped[:67]
        if piece is not escaped and (len(piece) - len(piece.rstrip("'"))) % 2:
            piece = piece[:-1]  # keep a doubled quote together
        escaped = escaped[len(piece):]
        text = f"'{piece}&'" if escaped else f"'{piece}'"
        cards.append(_card(key, text) if first else f"{'CONTINUE  ' + text:<{CARD}}")
        first = False
    return cards


def _header_block(cards: list[str]) -> bytes:
    cards = [*cards, f"{'END':<{CARD}}"]
    text = "".join(cards)
    return (text + " " * (-len(text) % BLOCK)).encode("ascii")


def write_fits_table(columns: dict, header: dict, path, units: dict | None = None,
                     comments: dict | None = None) -> None:
    """Write equal-length 1-d columns as a FITS file with one binary table.

    Parameters
    ----------
    columns : dict of str -> 1-d numpy array (bool, int16/32/64, float32/64)
        The table's columns, in order.
    header : dict of str -> str, int, float or bool
        Extra cards of the table HDU (keys upper case, at most 8 characters).
    path : str or os.PathLike
        The file written (overwritten).
    units : dict of str -> str, optional
        Units of some columns, written as their ``TUNITn`` (FITS 4.0, 7.3.2),
        after ``TFORMn`` as astropy writes them.
    comments : dict of str -> str, optional
        Comments of some header cards (a string value too long for one card
        gets none).
    """
    units, comments = units or {}, comments or {}
    if not fits_writable(columns, header, units):
        raise ValueError("columns or header values not writable by write_fits_table")
    arrays = [np.asarray(v) for v in columns.values()]
    forms = [_tform(a) for a in arrays]
    nrow = arrays[0].shape[0]
    # big-endian storage; bools as the characters T and F (FITS 4.0, 7.3.3.1)
    stored = [np.where(a, ord("T"), ord("F")).astype("u1") if f == "L" else a.astype(a.dtype.newbyteorder(">"))
              for a, f in zip(arrays, forms)]
    rows = np.empty(nrow, dtype=[(f"c{i}", s.dtype) for i, s in enumerate(stored)])
    for i, s in enumerate(stored):
        rows[f"c{i}"] = s
    primary = [_card("SIMPLE", f"{'T':>20}", "conforms to FITS standard"),
               _card("BITPIX", f"{8:>20}", "array data type"),
               _card("NAXIS", f"{0:>20}", "number of array dimensions"),
               _card("EXTEND", f"{'T':>20}")]
    table = [_card("XTENSION", "'BINTABLE'", "binary table extension"),
             _card("BITPIX", f"{8:>20}", "array data type"),
             _card("NAXIS", f"{2:>20}", "number of array dimensions"),
             _card("NAXIS1", f"{rows.dtype.itemsize:>20}", "length of dimension 1"),
             _card("NAXIS2", f"{nrow:>20}", "length of dimension 2"),
             _card("PCOUNT", f"{0:>20}", "number of group parameters"),
             _card("GCOUNT", f"{1:>20}", "number of groups"),
             _card("TFIELDS", f"{len(arrays):>20}", "number of table fields")]
    for i, (name, form) in enumerate(zip(columns, forms), start=1):
        table += _string_cards(f"TTYPE{i}", name) + [_card(f"TFORM{i}", f"'{form:<8}'")]
        if units.get(name):
            table += _string_cards(f"TUNIT{i}", units[name])
    for key, value in header.items():
        note = comments.get(key, "")
        if isinstance(value, str):
            cards = _string_cards(key, value)
            table += [_card(key, cards[0][10:].rstrip(), note)] if note and len(cards) == 1 else cards
        else:
            table += [_card(key, _fixed(value), note)]
    data = rows.tobytes()
    with open(path, "wb") as f:
        f.write(_header_block(primary))
        f.write(_header_block(table))
        f.write(data + b"\0" * (-len(data) % BLOCK))
