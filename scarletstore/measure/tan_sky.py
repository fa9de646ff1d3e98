"""Pixel to sky positions through a gnomonic (TAN) WCS with optional SIP distortion.

The catalog's ``ra``/``dec`` columns need one pixel-to-sky transform of a
header that ingest wrote with astropy (``WCS.to_header(relax=True)``).
``astropy.wcs`` costs ~0.3-0.5 s to import (it imports astropy.coordinates),
a quarter of a one-band ``catalog`` call. :func:`tan_pixel_to_sky` computes the
transform for the headers surveys write for coadds and visits, RA---TAN and
RA---TAN-SIP, and returns None for anything else (other projections, lookup
table distortions, more axes, unknown keywords), which the caller then gives
to astropy.

The steps (0-indexed pixels in, degrees out):

1. ``u, v = x + 1 - CRPIX1, y + 1 - CRPIX2`` (FITS pixels are 1-indexed);
2. SIP (Shupe et al. 2005): ``u += sum A_p_q u^p v^q``, ``v += sum B_p_q u^p v^q``;
3. intermediate world coordinates ``(X, Y) = CD (u, v)``, with ``CD = diag(CDELT) PC``
   when the header gives PC and CDELT (Calabretta & Greisen 2002, paper II, eq. 1-3);
4. TAN deprojection (paper II, eq. 14-15, 54): ``phi = atan2(X, -Y)``,
   ``theta = atan(180 / (pi R))`` with ``R = hypot(X, Y)``;
5. rotation from native (phi, theta) to celestial coordinates with the pole at
   ``(CRVAL1, CRVAL2)`` and native longitude of the celestial pole ``LONPOLE``
   (paper II, eq. 2), right ascension normalised to [0, 360).
"""

from __future__ import annotations

import re

import numpy as np

# keywords that do not change a TAN(-SIP) pixel-to-sky transform (reference
# frame names, times, errors, SIP's inverse) or that are read below
_KNOWN = re.compile(
    r"(WCSAXES|CRPIX[12]|CRVAL[12]|CDELT[12]|CUNIT[12]|CTYPE[12]|PC[12]_[12]|CD[12]_[12]"
    r"|LONPOLE|LATPOLE|CRDER[12]|CSYER[12]|RADESYS|EQUINOX|EPOCH|MJDREF[IF]?|DATEREF|TIMESYS"
    r"|TIMEUNIT|DATE|DATE-[A-Z]+|MJD-[A-Z]+|WCSNAME|OBSGEO-[XYZBLH]|(A|B|AP|BP)_ORDER"
    r"|(A|B|AP|BP)_\d+_\d+|[AB]_DMAX|COMMENT|HISTORY|END|)$")


def _value(text: str):
    """A card's value: str, bool, int or float (None when it cannot be read)."""
    text = text.strip()
    if text.startswith("'"):
        m = re.match(r"'((?:[^']|'')*)'", text)
        return m.group(1).replace("''", "'").rstrip() if m else None
    token = text.split("/", 1)[0].strip()
    if token in ("T", "F"):
        return token == "T"
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token.replace("D", "E"))
    except ValueError:
        return None


def parse_cards(text: str) -> dict | None:
    """The keyword values of a header string of 80-character cards (None if not one)."""
    if len(text) % 80:
        return None
    cards = {}
    for i in range(0, len(text), 80):
        card = text[i:i + 80]
        key = card[:8].rstrip()
        if key == "END":
            break
        if card[8:10] != "= ":
            if key in ("COMMENT", "HISTORY", ""):
                continue
            return None  # CONTINUE, HIERARCH or a keyword without a value
        value = _value(card[10:])
        if value is None or key in cards:
            return None
        cards[key] = value
    return cards


def _sip(cards: dict, letter: str):
    """SIP coefficients ``{(p, q): c}`` of polynomial ``letter`` (A or B)."""
    order = cards.get(f"{letter}_ORDER")
    if not isinstance(order, int) or isinstance(order, bool) or not 0 <= order <= 9:
        return None
    coef = {}
    for key, value in cards.items():
        m = re.fullmatch(rf"{letter}_(\d+)_(\d+)", key)
        if m:
            p, q = int(m.group(1)), int(m.group(2))
            if p + q > order or not isinstance(value, (int, float)) or isinstance(value, bool):
                return None
            coef[(p, q)] = float(value)
    return coef


def tan_transform(text: str) -> dict | None:
    """The parameters of a TAN or TAN-SIP header, or None when it is anything else."""
    cards = parse_cards(text)
    if cards is None or not all(_KNOWN.match(k) for k in cards):
        return None
    if cards.get("WCSAXES", 2) != 2:
        return None
    ctype = cards.get("CTYPE1"), cards.get("CTYPE2")
    sip = ctype == ("RA---TAN-SIP", "DEC--TAN-SIP")
    if not (sip or ctype == ("RA---TAN", "DEC--TAN")):
        return None
    if any(cards.get(f"CUNIT{i}", "deg") != "deg" for i in (1, 2)):
        return None
    numbers = {k: v for k, v in cards.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        crpix = np.array([numbers["CRPIX1"], numbers["CRPIX2"]], float)
        crval = np.array([numbers["CRVAL1"], numbers["CRVAL2"]], float)
    except KeyError:
        return None
    has_cd = any(k.startswith("CD") and "_" in k for k in cards)
    has_pc = any(k.startswith("PC") for k in cards)
    if has_cd and (has_pc or "CDELT1" in cards or "CDELT2" in cards):
        return None  # a mix astropy resolves by its own precedence rules
    if has_cd:
        cd = np.array([[numbers.get(f"CD{i}_{j}", 0.0) for j in (1, 2)] for i in (1, 2)])
    else:
        pc = np.array([[numbers.get(f"PC{i}_{j}", float(i == j)) for j in (1, 2)] for i in (1, 2)])
        cd = np.array([numbers.get("CDELT1", 1.0), numbers.get("CDELT2", 1.0)])[:, None] * pc
    if not 0 <= crval[0] < 360 or not -90 < crval[1] < 90:
        return None  # the pole itself changes LONPOLE's default; RA outside [0, 360) its wrapping
    lonpole = numbers.get("LONPOLE", 180.0)
    a = b = None
    if sip:
        a, b = _sip(cards, "A"), _sip(cards, "B")
        if a is None or b is None:
            return None
    elif any(k[:2] in ("A_", "B_") for k in cards):
        return None
    return {"crpix": crpix, "crval": crval, "cd": cd, "lonpole": float(lonpole), "a": a, "b": b}


def _poly(coef: dict, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    for (p, q), c in coef.items():
        out += c * u ** p * v ** q
    return out


def tan_pixel_to_sky(text: str, x, y):
    """Sky positions (ra, dec in degrees) of 0-indexed pixels, or None (not TAN/TAN-SIP).

    Parameters
    ----------
    text : str
        FITS header text (80-character cards) of a celestial WCS.
    x, y : array_like
        Pixel positions, 0-indexed (pixel (0, 0) is the centre of the first pixel).

    Returns
    -------
    (ra, dec) : two float64 arrays of the shape of ``x``, or None
    """
    t = tan_transform(text)
    if t is None:
        return None
    u = np.asarray(x, np.float64) + 1.0 - t["crpix"][0]
    v = np.asarray(y, np.float64) + 1.0 - t["crpix"][1]
    if t["a"] is not None:
        u, v = u + _poly(t["a"], u, v), v + _poly(t["b"], u, v)
    cd = t["cd"]
    xw = cd[0, 0] * u + cd[0, 1] * v
    yw = cd[1, 0] * u + cd[1, 1] * v
    phi = np.arctan2(xw, -yw)
    theta = np.arctan2(180.0 / np.pi, np.hypot(xw, yw))  # atan(180 / (pi R)), R in degrees
    dphi = phi - np.deg2rad(t["lonpole"])
    dec_p = np.deg2rad(t["crval"][1])
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    ra = t["crval"][0] + np.rad2deg(np.arctan2(-cos_t * np.sin(dphi),
                                               sin_t * np.cos(dec_p) - cos_t * np.sin(dec_p) * np.cos(dphi)))
    dec = np.rad2deg(np.arcsin(np.clip(sin_t * np.sin(dec_p) + cos_t * np.cos(dec_p) * np.cos(dphi), -1, 1)))
    return np.mod(ra, 360.0), dec
