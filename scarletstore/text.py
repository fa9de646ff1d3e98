"""Wording of messages: counts with the noun in the right number."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and ``noun`` in the number ``n`` takes: "1 band", "2 bands", "0 bands".

    Parameters
    ----------
    n : int
        The count.
    noun : str
        The singular.
    many : str, optional
        The plural when it is not ``noun + "s"`` ("patches", "were").

    Returns
    -------
    str
    """
    return f"{n} {noun if n == 1 else (many or noun + 's')}"


def noun(n: int, one: str, many: str | None = None) -> str:
    """The word alone in the number ``n`` takes ("run"/"runs", "was"/"were")."""
    return one if n == 1 else (many or one + "s")
