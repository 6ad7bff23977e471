"""The JSON text the PostgreSQL adapter writes to ``jsonb``, so that floats read back as floats.

``jsonb`` keeps a number as the ``numeric`` of its decimal text and prints that numeric
positionally, with as many fractional digits as the text had after the exponent is applied.
A float written in exponent form with a positive exponent has none left: ``1e+20`` is stored
as ``100000000000000000000`` and ``1.2345678901234567e+19`` as ``12345678901234567000``,
which read back as integers. A ``float`` field converts them back to the same float, but an
``Any``, ``dict[str, Any]`` or ``float | int`` field gets an int, and a different number
(``12345678901234567000 != 1.2345678901234567e19``).

``jsonb_text`` writes such numbers positionally, with a fractional part: ``1e+20`` becomes
``100000000000000000000.0``, the same decimal value, which ``jsonb`` keeps and prints as it
is and which parses back to the same float. Nothing else changes: other numbers, and every
string (an id ``"3e45"``), stay as they are.

The text is read once from its start, in linear time, one run of what needs no change and
one number with an exponent at a time. Text it cannot read that way (``-Infinity``, which a
model with ``ser_json_inf_nan="constants"`` writes, and ``jsonb`` refuses) is left as it is,
whole.

Both writers of the text, pydantic-core's serialiser and Python's ``json`` (for event types
with serialisers of their own), write a positive exponent with a ``+`` (``repr(1e20)`` is
``'1e+20'``); should the installed pydantic-core write it without one, a regular expression
looks for such numbers instead of a substring search.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic_core import to_json

__all__ = ["jsonb_text"]

#: A run of JSON that needs no change (strings, numbers without an exponent, the rest), then a
#: number with an exponent (captured: sign, integer digits, fractional digits, exponent) or
#: the end of the text. Possessive, so that strings are skipped in C and never backtracked
#: into: a number-like text inside a string (an id ``"3e45"``) is never matched.
_RUN = r'(?:[^"0-9-]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"|-?[0-9]++(?:\.[0-9]++)?+(?![.0-9eE]))*+'
_NEXT_EXPONENT = re.compile(rf"({_RUN})(?:(-?)([0-9]+)(?:\.([0-9]+))?[eE]([+-]?[0-9]+)|\Z)")
#: A number with an exponent that may leave it no fractional digit (``-0`` included).
_SUSPECT = re.compile(r"[0-9][eE](?:\+|-0|[0-9])")
#: Exponents past any float's: such a number is no float's text, and is left as it is.
_MAX_EXPONENT = 400
#: Digits an exponent past ``_MAX_EXPONENT`` may have and still be read (``int()`` refuses
#: more than 4,300 by default; and any exponent of four digits is past it anyway).
_EXPONENT_DIGITS = 4


def _with_plus(text: str) -> bool:
    return "e+" in text


def _any_form(text: str) -> bool:
    return _SUSPECT.search(text) is not None


#: Whether a text may hold a number ``jsonb`` would store without a fractional part although
#: it was written with an exponent. A substring search (nearly ten times faster than the
#: regular expression on a small payload) when every float's positive exponent has a ``+``.
_may_lose_fraction: Callable[[str], bool] = (
    _with_plus if b"e+" in to_json(1e20) and b"e+" in to_json(1.5e300) else _any_form
)


def _positional(match: re.Match[str]) -> str:
    """The run of a ``_NEXT_EXPONENT`` match, then its number as ``jsonb`` keeps a float.

    A number that would keep a fractional digit in ``jsonb`` stays as it is; one that would
    not is written positionally, with ``.0``.
    """
    exponent = match[5]
    if exponent is None:  # the end of the text
        return match[1]
    fraction = match[4] or ""
    if len(exponent.lstrip("+-").lstrip("0")) > _EXPONENT_DIGITS:
        return match[0]
    shift = int(exponent)
    if shift < len(fraction) or shift > _MAX_EXPONENT:
        return match[0]
    digits = (match[3] + fraction).lstrip("0") or "0"
    zeros = "0" * (shift - len(fraction)) if digits != "0" else ""
    return f"{match[1]}{match[2]}{digits}{zeros}.0"


def jsonb_text(text: str | None) -> str | None:
    """``text`` with each number ``jsonb`` would read back as an integer written positionally.

    Only numbers written with an exponent that leaves them no fractional digit change, to
    the same decimal value with ``.0`` after it; strings and other numbers are untouched.
    A text holding anything else the scan does not read is returned as it is.
    """
    if text is None or not _may_lose_fraction(text):
        return text
    parts = []
    position = 0
    # Each match starts where the last one ended: one that cannot (a search from a later
    # offset could start inside a string, and would make the scan quadratic) means the
    # text holds something the scan does not read.
    while (match := _NEXT_EXPONENT.match(text, position)) is not None:
        parts.append(_positional(match))
        if match[5] is None:  # the end of the text
            return "".join(parts)
        position = match.end()
    return text
