"""Blend-level queries over a run: a table per blend and selections on it."""

from __future__ import annotations

import keyword
import math
import re
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..errors import InputError
from .blend_columns import BLEND_COLUMNS, WHERE_GRAMMAR  # noqa: F401  (re-exported)


def blend_table(store, run: str) -> pd.DataFrame:
    """One row per blend of ``run`` (small columns only; no morphology is read)."""
    with store.open(f"runs/{run}") as r:
        cols = {new: np.asarray(r[old].values) for old, new in BLEND_COLUMNS.items()}
        src_parent = np.asarray(r["source_parent_id"].values)
        src_x, src_y = np.asarray(r["source_x"].values), np.asarray(r["source_y"].values)
    table = pd.DataFrame(cols)
    table["reason"] = table["reason"].astype(str)
    table["converged"] = table["converged"].astype(bool)
    table.attrs["sources"] = pd.DataFrame({"parent": src_parent, "x": src_x, "y": src_y})
    return table


def _wcs(text):
    from astropy.io import fits
    from astropy.wcs import WCS

    return WCS(fits.Header.fromstring(text))


def select(table: pd.DataFrame, blend=None, region=None, where=None, wcs: str = "") -> pd.DataFrame:
    """Rows of ``table`` matching every given condition.

    Parameters
    ----------
    blend : parent id
    region : (ra, dec, radius_arcsec): blends with a source within the radius
    where : a condition on the columns in the grammar of :func:`where_mask`,
        e.g. ``"n_sources > 3 and converged"``
    wcs : FITS header text of the exposure WCS (needed for ``region``)
    """
    sources = table.attrs.get("sources")
    if blend is not None:
        table = table[table["parent"] == int(blend)]
        if table.empty:
            raise InputError(f"no blend with parent id {blend}")
    if region is not None:
        ra, dec, radius = _check_region(region)
        if not wcs:
            raise InputError("--region needs a WCS; this store's exposure has none")
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        sra, sdec = _wcs(wcs).all_pix2world(sources["x"].values, sources["y"].values, 0)
        sep = SkyCoord(sra * u.deg, sdec * u.deg).separation(SkyCoord(ra * u.deg, dec * u.deg))
        hit = set(sources["parent"].values[sep.arcsec <= radius].tolist())
        table = table[table["parent"].isin(hit)]
    if where is not None:
        table = table[where_mask(table, where)]
    return table


def _check_region(region) -> tuple[float, float, float]:
    """``(ra, dec, radius_arcsec)`` as floats, refusing values no sky position has."""
    try:
        ra, dec, radius = (float(v) for v in region)
    except (TypeError, ValueError):
        raise InputError(f"--region expects RA DEC RADIUS_ARCSEC as numbers, got {region!r}") from None
    if not all(math.isfinite(v) for v in (ra, dec, radius)):
        raise InputError(f"--region values must be finite numbers, got {ra:g} {dec:g} {radius:g}")
    if not -90 <= dec <= 90:
        raise InputError(f"--region DEC must be in [-90, 90] degrees, got {dec:g}")
    if not -180 <= ra <= 360:  # RA either way round the sky, but not several times
        raise InputError(f"--region RA must be in [-180, 360] degrees, got {ra:g}")
    if radius <= 0:
        raise InputError(f"--region radius must be positive, got {radius:g} arcsec")
    return ra, dec, radius


# ------------------------------------------------------------ --where grammar
# A condition is parsed by our own small grammar and evaluated with numpy on
# the table's columns. Nothing in it is ever handed to eval, pandas' query or
# any other interpreter, so it cannot reach attributes, calls or modules:
#
#   condition  := or
#   or         := and ("or" and)*
#   and        := not ("and" not)*
#   not        := "not" not | comparison
#   comparison := operand (OP operand)*          chained: a < b < c
#               | operand ["not"] "in" list
#   operand    := COLUMN | NUMBER | STRING | True | False | "(" condition ")"
#   list       := "[" literal ("," literal)* [","] "]"   (or with parentheses)
#   literal    := NUMBER | STRING | True | False
#   OP         := == != < <= > >=
#
# NUMBER is an int, a decimal or scientific float, optionally signed.


_MAX_DEPTH = 64  # nesting limit: deep parentheses are an error, not a RecursionError
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],-])
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "True", "False", "true", "false"}
# characters people (or payloads) reach for, with the reason they are refused
_REFUSED = {
    ".": "attribute access ('.') is not allowed",
    "@": "'@' variables are not allowed",
    "`": "backtick-quoted names are not allowed",
    "=": "'=' is not a comparison (use '==')",
    "&": "use 'and' instead of '&'", "|": "use 'or' instead of '|'", "~": "use 'not' instead of '~'",
    ":": "':' is not allowed (no lambdas or slices)",
    "+": "arithmetic is not allowed", "*": "arithmetic is not allowed",
    "/": "arithmetic is not allowed", "%": "arithmetic is not allowed",
}


class _Token(NamedTuple):
    kind: str  # number, name, keyword, string, op, punct, bad, end
    text: str
    pos: int


def _where_error(where: str, pos: int, problem: str, grammar: bool = True) -> InputError:
    hint = f"; the grammar is {WHERE_GRAMMAR}" if grammar else ""
    shown = where if len(where) <= 80 else where[:77] + "..."  # the message stays one short line
    return InputError(f"--where {shown!r}: {problem} (at character {pos + 1}){hint}")


def _tokens(where: str) -> list[_Token]:
    """The tokens of ``where``; an unreadable character ends them with a ``bad``
    token holding the reason, raised when the parser reaches it, so the first
    problem in reading order is the one reported."""
    out, pos = [], 0
    while pos < len(where):
        m = _TOKEN.match(where, pos)
        if m is None:
            ch = where[pos]
            reason = "unterminated string" if ch in "'\"" else \
                _REFUSED.get(ch, f"unexpected character {ch!r}")
            out.append(_Token("bad", reason, pos))
            break
        kind = m.lastgroup
        if kind != "space":
            text = m.group()
            if kind == "name" and text in _KEYWORDS:
                kind = "keyword"
            out.append(_Token(kind, text, pos))
        pos = m.end()
    out.append(_Token("end", "", len(where)))
    return out


def _literal_value(tok: _Token, negative: bool = False):
    """The Python value of a number, string or boolean token."""
    if tok.kind == "number":
        text = ("-" if negative else "") + tok.text
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
            # beyond int64 numpy would refuse to compare; a float compares right
            return value if -2**63 <= value < 2**63 else float(value)
        return float(text)
    if tok.kind == "string":
        return re.sub(r"\\(.)", r"\1", tok.text[1:-1])
    return tok.text in ("True", "true")


class _Parser:
    """Recursive descent over the tokens; builds the boolean mask as it goes."""

    def __init__(self, where: str, columns: dict[str, np.ndarray], n: int):
        self.where, self.columns, self.n = where, columns, n
        self.toks = _tokens(where)
        self.i = 0
        self.depth = 0

    # -- helpers
    @property
    def tok(self) -> _Token:
        tok = self.toks[self.i]
        if tok.kind == "bad":
            raise _where_error(self.where, tok.pos, tok.text)
        return tok

    def fail(self, problem: str, tok: _Token | None = None, grammar: bool = True) -> InputError:
        return _where_error(self.where, (tok or self.tok).pos, problem, grammar)

    def peek(self) -> _Token:
        """The token after the current one (the end token at the end)."""
        return self.toks[min(self.i + 1, len(self.toks) - 1)]

    def take(self) -> _Token:
        tok = self.tok
        self.i += 1
        return tok

    def at(self, kind: str, *texts: str) -> bool:
        return self.tok.kind == kind and (not texts or self.tok.text in texts)

    def describe(self, tok: _Token) -> str:
        return "the end of the condition" if tok.kind == "end" else repr(tok.text)

    def expect(self, kind: str, text: str):
        if not self.at(kind, text):
            raise self.fail(f"expected {text!r}, found {self.describe(self.tok)}")
        return self.take()

    # -- grammar
    def parse(self) -> np.ndarray:
        if self.at("end"):
            raise self.fail("empty condition")
        value = self.condition()
        if not self.at("end"):
            raise self.fail(f"unexpected {self.describe(self.tok)} after a complete condition")
        return self.mask(value, self.toks[0])

    def condition(self):
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.fail(f"nested more than {_MAX_DEPTH} levels deep")
        try:
            return self.boolean_chain("or", self.and_chain, np.logical_or)
        finally:
            self.depth -= 1

    def and_chain(self):
        return self.boolean_chain("and", self.negation, np.logical_and)

    def boolean_chain(self, word, operand, combine):
        start = self.tok
        value = operand()
        if not self.at("keyword", word):
            return value
        value = self.mask(value, start)
        while self.at("keyword", word):
            self.take()
            start = self.tok
            value = combine(value, self.mask(operand(), start))
        return value

    def negation(self):
        if self.at("keyword", "not"):
            self.take()
            start = self.tok
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise self.fail(f"nested more than {_MAX_DEPTH} levels deep")
            try:
                return ~self.mask(self.negation(), start)
            finally:
                self.depth -= 1
        return self.comparison()

    def comparison(self):
        start = self.tok
        left = self.operand()
        if self.at("keyword", "in") or (self.at("keyword", "not")
                                        and self.peek()[:2] == ("keyword", "in")):
            negate = self.take().text == "not"
            if negate:
                self.take()
            hit = self.membership(left, start)
            return ~hit if negate else hit
        result = None
        while self.at("op"):
            op_tok = self.take()
            right_tok = self.tok
            right = self.operand()
            step = self.compare(left, op_tok, right, start, right_tok)
            result = step if result is None else result & step
            left, start = right, right_tok
        return left if result is None else result

    def operand(self):
        tok = self.tok
        nxt = self.peek()
        if tok.kind == "name":
            if keyword.iskeyword(tok.text):  # lambda, import, if, is, None, ...
                raise self.fail(f"the Python keyword {tok.text!r} is not allowed", tok)
            if nxt.kind == "punct" and nxt.text == "(":
                raise self.fail(f"function calls are not allowed ({tok.text}(...))", tok)
            if nxt.kind == "punct" and nxt.text == "[":
                raise self.fail(f"subscripts are not allowed ({tok.text}[...])", tok)
            if tok.text not in self.columns:
                raise self.fail(f"unknown column {tok.text!r}; columns are "
                                f"{', '.join(self.columns)}", tok, grammar=False)
            self.take()
            return _Value(self.columns[tok.text], tok.text)
        if self.at("punct", "("):
            self.take()
            value = self.condition()
            self.expect("punct", ")")
            return value if isinstance(value, _Value) else _Value(value, None)
        return _Value(self.literal(), None)

    def literal(self):
        tok = self.tok
        if self.at("punct", "-"):
            self.take()
            if not self.at("number"):
                raise self.fail("'-' must be followed by a number (arithmetic is not allowed)")
            return _literal_value(self.take(), negative=True)
        if tok.kind in ("number", "string") or (tok.kind == "keyword"
                                                and tok.text in ("True", "False", "true", "false")):
            return _literal_value(self.take())
        if tok.kind == "end":
            raise self.fail("the condition ends too early")
        raise self.fail(f"expected a column, number, string or True/False, found {tok.text!r}")

    def membership(self, left, start):
        opener = self.tok
        if not (self.at("punct", "[") or self.at("punct", "(")):
            raise self.fail(f"'in' needs a list like [1, 2] or ('a', 'b'), found {self.describe(opener)}")
        closer = "]" if self.take().text == "[" else ")"
        items = []
        while not self.at("punct", closer):
            items.append((self.tok, self.literal()))
            if not self.at("punct", closer):
                self.expect("punct", ",")
        self.take()
        if not items:
            raise self.fail("'in' needs at least one value", opener)
        values = left.array()
        for tok, item in items:
            _check_comparable(self, values, left.label, item, tok)
        return np.isin(values, np.array([v for _, v in items], dtype=object)
                       if values.dtype == object else [v for _, v in items])

    def compare(self, left, op_tok, right, left_tok, right_tok):
        a, b = left.array(), right.array()
        _check_comparable(self, a, left.label, b, right_tok)
        _check_comparable(self, b, right.label, a, left_tok)
        fn = {"==": np.equal, "!=": np.not_equal, "<": np.less, "<=": np.less_equal,
              ">": np.greater, ">=": np.greater_equal}[op_tok.text]
        if a.dtype == object or b.dtype == object:  # text columns: compare elementwise as str
            return np.array([fn(x, y) for x, y in zip(*np.broadcast_arrays(a, b))], dtype=bool)
        with np.errstate(invalid="ignore"):
            return fn(a, b)

    def mask(self, value, tok: _Token) -> np.ndarray:
        """``value`` as a boolean mask over the rows, or an error saying why it is not one."""
        arr = value.array() if isinstance(value, _Value) else np.asarray(value)
        if arr.dtype != bool:
            if isinstance(value, _Value) and value.label:
                problem = (f"column {value.label!r} is not a condition "
                           f"(compare it, e.g. '{value.label} > 0')")
            else:
                problem = f"{self.describe(tok)} is not a condition (compare it with something)"
            raise self.fail(problem, tok)
        return np.broadcast_to(arr, (self.n,)).copy() if arr.ndim == 0 else arr


class _Value(NamedTuple):
    """A column (with its name) or a literal inside a comparison."""

    data: object
    label: str | None

    def array(self) -> np.ndarray:
        return self.data if isinstance(self.data, np.ndarray) else np.asarray(self.data)


def _kind(arr: np.ndarray) -> str:
    if arr.dtype == object or arr.dtype.kind in "US":
        return "text"
    return "bool" if arr.dtype == bool else "number"


def _check_comparable(parser, a, label, b, tok):
    """Text only compares with text and numbers (and booleans) with numbers."""
    b = np.asarray(b) if not isinstance(b, np.ndarray) else b
    ka, kb = _kind(np.asarray(a)), _kind(b)
    if (ka == "text") != (kb == "text"):
        name = f"column {label!r}" if label else "a value"
        raise parser.fail(f"cannot compare {name} ({ka}) with {kb}", tok)


def where_mask(table: pd.DataFrame, where: str) -> np.ndarray:
    """Boolean mask of the rows of ``table`` satisfying the condition ``where``.

    Parameters
    ----------
    table : pandas.DataFrame
        Columns are referred to by name; text columns hold ``str``.
    where : str
        A condition in the grammar above, e.g.
        ``"n_sources >= 3 and not converged or reason in ['isolated']"``.

    Returns
    -------
    numpy.ndarray of bool, one entry per row.

    Raises
    ------
    InputError
        Anything outside the grammar (attribute access, calls, subscripts,
        ``@`` names, backticks, arithmetic, unknown columns, trailing text),
        with the problem and its position.
    """
    columns = {}
    for name in table.columns:
        values = table[name].to_numpy()
        if values.dtype == object:
            values = np.asarray([str(v) for v in values], dtype=object)
        columns[str(name)] = values
    return _Parser(where, columns, len(table)).parse()
