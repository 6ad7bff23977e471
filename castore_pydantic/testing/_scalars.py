"""Constraints read from Pydantic metadata, and strategies for scalar types that honour them.

``Constraints.of(metadata)`` reads ``annotated_types`` objects (``Ge``, ``MinLen``, ...),
Pydantic's own field metadata (``pattern``, ``max_digits``, ``StringConstraints``, ...) and
nested ``FieldInfo``. ``scalar(tp, constraints, path)`` then builds a strategy for the scalar
types Pydantic knows, or returns ``None`` for anything else.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import math
import pathlib
import re
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import lru_cache
from typing import Annotated, Any
from zoneinfo import ZoneInfo

import annotated_types as at
import pydantic.types as pt
import pydantic_core
from hypothesis import strategies as st
from pydantic import ConfigDict, StringConstraints, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from castore_pydantic.errors import NoStrategyError

__all__ = [
    "TEXT_CHARACTERS",
    "Constraints",
    "json_values",
    "scalar",
    "text",
    "timestamps",
    "urls",
]

#: Characters of generated text: any Unicode scalar value except NUL, which JSON stores such
#: as PostgreSQL refuse (and so does the event store).
TEXT_CHARACTERS = st.characters(codec="utf-8", exclude_characters="\x00")
_ASCII = st.characters(min_codepoint=1, max_codepoint=127)

_INT64 = (-(2**63), 2**63 - 1)
_EXTRA_TEXT = 20  # unbounded text is at most this much longer than its minimum
_DATETIME_RANGE = (dt.datetime(1900, 1, 1), dt.datetime(2200, 1, 1))
_TIMESTAMP_RANGE = (dt.datetime(2000, 1, 1), dt.datetime(2090, 1, 1))
_OFFSETS = (
    dt.UTC,
    dt.timezone(dt.timedelta(hours=2)),
    dt.timezone(-dt.timedelta(hours=5, minutes=30)),
)
_UNSET: Any = object()


@dataclasses.dataclass
class Constraints:
    """The constraints gathered from a type's metadata; the tightest bound wins."""

    ge: Any = None
    gt: Any = None
    le: Any = None
    lt: Any = None
    multiple_of: Any = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    max_digits: int | None = None
    decimal_places: int | None = None
    strip_whitespace: bool = False
    ascii_only: bool = False
    uuid_version: int | None = None
    timezone: Any = _UNSET
    json: bool = False
    encoder: Any = None
    must_exist: bool = False
    predicates: list[Callable[[Any], bool]] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, metadata: Sequence[Any]) -> Constraints:
        """Gather constraints from ``Annotated`` / ``FieldInfo.metadata`` items."""
        constraints = cls()
        for item in metadata:
            constraints.add(item)
        return constraints

    def add(self, item: Any) -> None:
        """Fold one metadata item in; unknown items (validators, serializers) are skipped."""
        if item is None:
            return
        if isinstance(item, FieldInfo):
            for inner in item.metadata:
                self.add(inner)
        elif isinstance(item, at.Timezone):
            self.timezone = item.tz
        elif isinstance(item, at.Predicate):
            self.predicates.append(item.func)
        elif isinstance(item, pt.Json):
            self.json = True
        elif isinstance(item, pt.EncodedBytes | pt.EncodedStr):
            self.encoder = item.encoder
        elif isinstance(item, pt.PathType):
            self.must_exist = item.path_type != "new"
        else:
            self._attributes(item)
            if isinstance(item, at.GroupedMetadata):
                for inner in item:
                    self.add(inner)

    def _attributes(self, item: Any) -> None:
        # annotated_types, StringConstraints and Pydantic's general metadata all spell their
        # constraints as attributes with these names.
        for name, tighter in (("ge", max), ("gt", max), ("le", min), ("lt", min)):
            value = getattr(item, name, None)
            if value is not None:
                current = getattr(self, name)
                setattr(self, name, value if current is None else tighter(current, value))
        for name in ("min_length", "max_digits", "decimal_places", "uuid_version"):
            value = getattr(item, name, None)
            if isinstance(value, int):
                current = getattr(self, name)
                setattr(self, name, value if current is None else max(current, value))
        value = getattr(item, "max_length", None)
        if isinstance(value, int):
            self.max_length = value if self.max_length is None else min(self.max_length, value)
        if getattr(item, "multiple_of", None) is not None:
            self.multiple_of = item.multiple_of
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            self.pattern = pattern if isinstance(pattern, str) else pattern.pattern
        self.strip_whitespace |= getattr(item, "strip_whitespace", None) is True
        self.ascii_only |= getattr(item, "ascii_only", None) is True

    def finish(self, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        """Apply ``Predicate`` filters and the encodings of ``Base64Bytes`` and ``Json``."""
        for predicate in self.predicates:
            strategy = strategy.filter(predicate)
        if self.encoder is not None:
            # Base64Bytes and friends take encoded input and hold the decoded value.
            strategy = strategy.map(self._encode)
        if self.json:
            strategy = strategy.map(lambda value: pydantic_core.to_json(value).decode())
        return strategy

    def _encode(self, value: str | bytes) -> str | bytes:
        encoded: bytes = self.encoder.encode(value.encode() if isinstance(value, str) else value)
        return encoded.decode() if isinstance(value, str) else encoded

    def within(self, value: Any) -> bool:
        """Whether ``value`` satisfies the numeric (or temporal) bounds."""
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def lower(self) -> tuple[Any, bool]:
        """The tightest lower bound and whether it is exclusive."""
        if self.gt is not None and (self.ge is None or self.gt >= self.ge):
            return self.gt, True
        return self.ge, False

    def upper(self) -> tuple[Any, bool]:
        """The tightest upper bound and whether it is exclusive."""
        if self.lt is not None and (self.le is None or self.lt <= self.le):
            return self.lt, True
        return self.le, False


def _empty(tp: Any, path: str, why: str) -> NoStrategyError:
    return NoStrategyError(tp, path, f"its constraints leave no value ({why})")


# -- public helpers ---------------------------------------------------------------------------


def _naive_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is None else value.astimezone(dt.UTC).replace(tzinfo=None)


def timestamps(
    min_value: dt.datetime | None = None, max_value: dt.datetime | None = None
) -> st.SearchStrategy[dt.datetime]:
    """Timezone-aware UTC datetimes with millisecond precision, 2000 to 2090 by default."""
    lo = _naive_utc(min_value) if min_value is not None else _TIMESTAMP_RANGE[0]
    hi = _naive_utc(max_value) if max_value is not None else _TIMESTAMP_RANGE[1]
    if lo > hi:
        raise ValueError(f"min_value {min_value} is after max_value {max_value}")
    # Whole milliseconds from the lower bound, rounded up to a whole millisecond.
    lo_ms = -(-(lo - dt.datetime(1970, 1, 1)) // dt.timedelta(milliseconds=1))
    hi_ms = (hi - dt.datetime(1970, 1, 1)) // dt.timedelta(milliseconds=1)
    if lo_ms > hi_ms:
        raise ValueError(
            f"no whole millisecond lies between min_value {min_value} and max_value {max_value}"
        )
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return st.integers(lo_ms, hi_ms).map(lambda ms: epoch + dt.timedelta(milliseconds=ms))


def json_scalars() -> st.SearchStrategy[Any]:
    """JSON's hashable values: what the items of a ``set[Any]`` get."""
    return (
        st.none()
        | st.booleans()
        | st.integers(-(2**53), 2**53)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(TEXT_CHARACTERS, max_size=_EXTRA_TEXT)
    )


def json_values() -> st.SearchStrategy[Any]:
    """Small JSON documents: what an ``Any`` field gets."""
    return st.recursive(
        json_scalars(),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(TEXT_CHARACTERS, max_size=10), inner, max_size=4)
        ),
        max_leaves=10,
    )


def text(c: Constraints, path: str) -> st.SearchStrategy[str]:
    """Strings honouring length, ``pattern``, ``strip_whitespace`` and ``ascii_only``."""
    lo = c.min_length or 0
    hi = c.max_length
    if hi is not None and lo > hi:
        raise _empty(str, path, f"min_length {lo} > max_length {hi}")
    alphabet = _ASCII if c.ascii_only else TEXT_CHARACTERS
    if c.pattern is None:
        made = st.text(alphabet, min_size=lo, max_size=hi if hi is not None else lo + _EXTRA_TEXT)
        return made.map(str.strip).filter(lambda s: len(s) >= lo) if c.strip_whitespace else made
    pattern = _sized_pattern(c.pattern, lo, hi)
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise NoStrategyError(
            str, path, f"Python cannot compile its pattern {c.pattern!r}"
        ) from exc
    # Pydantic searches for the pattern; a pattern anchored at both ends must match it all.
    anchored = c.pattern.startswith("^") and c.pattern.endswith("$")
    made = st.from_regex(compiled, fullmatch=anchored, alphabet=alphabet).filter(
        pydantic_pattern(c.pattern)
    )
    if c.strip_whitespace:
        made = made.map(str.strip)
    top = hi if hi is not None else math.inf
    return made.filter(lambda s: lo <= len(s) <= top) if lo or hi is not None else made


#: A whole pattern that repeats one character class: ``^[A-Z0-9]+$``, ``^\d*$``, ``^.+$``.
_REPEATED_CLASS = re.compile(r"\^(\[(?:\\.|[^\]\\])+\]|\\[dwsDWS]|\.)([+*])\$")


def _sized_pattern(pattern: str, lo: int, hi: int | None) -> str:
    """``pattern`` with its length bounds built in, when it repeats one character class.

    Generating from ``^[A-Z0-9]+$`` and keeping only strings of twelve characters would
    filter out nearly everything; ``^[A-Z0-9]{12,12}$`` generates them directly. Other
    patterns are returned unchanged (their lengths are filtered).
    """
    if not lo and hi is None:
        return pattern
    found = _REPEATED_CLASS.fullmatch(pattern)
    if found is None:
        return pattern
    atom, repeat = found.groups()
    low = max(lo, 1 if repeat == "+" else 0)
    high = hi if hi is not None else low + _EXTRA_TEXT
    if low > high:
        return pattern  # nothing fits: the length filter says so
    return f"^{atom}{{{low},{high}}}$"


def _pattern_adapter(pattern: str) -> TypeAdapter[str] | None:
    """Pydantic's validator of ``pattern``: its default regex engine, else Python's."""
    constrained: Any = Annotated[str, StringConstraints(pattern=pattern)]
    try:
        return TypeAdapter(constrained)
    except Exception:  # the default engine refuses it (a look-around): try Python's
        engine = ConfigDict(regex_engine="python-re")
    try:
        return TypeAdapter(constrained, config=engine)
    except Exception:  # neither engine builds it
        return None


@lru_cache(maxsize=256)
def pydantic_pattern(pattern: str) -> Callable[[str], bool]:
    r"""Whether Pydantic accepts a text for ``pattern``, checked by Pydantic itself.

    Its regex engines are not Python's ``re``: the default one differs on Unicode classes
    (Python's word class matches ``²``, Rust's not) and knows ``\p{L}``; a model on
    ``regex_engine="python-re"`` may use look-arounds the default one refuses. A pattern
    neither engine builds is never judged (every text passes).
    """
    adapter = _pattern_adapter(pattern)
    if adapter is None:
        return lambda _: True

    def matches(value: str) -> bool:
        try:
            adapter.validate_python(value)
        except ValidationError:
            return False
        return True

    return matches


def urls(schemes: Sequence[str]) -> st.SearchStrategy[str]:
    """Simple URLs with one of ``schemes``."""
    host = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True)
    segment = st.from_regex(r"[a-z0-9_]{0,8}", fullmatch=True)
    return st.builds(
        lambda scheme, name, parts: f"{scheme}://{name}.example/{'/'.join(parts)}",
        st.sampled_from(list(schemes)),
        host,
        st.lists(segment, max_size=3),
    )


# -- numbers ----------------------------------------------------------------------------------


def _integers(c: Constraints, path: str, tp: Any = int) -> st.SearchStrategy[int]:
    lo: int | None = None if c.ge is None else math.ceil(c.ge)
    if c.gt is not None:
        lo = math.floor(c.gt) + 1 if lo is None else max(lo, math.floor(c.gt) + 1)
    hi: int | None = None if c.le is None else math.floor(c.le)
    if c.lt is not None:
        hi = math.ceil(c.lt) - 1 if hi is None else min(hi, math.ceil(c.lt) - 1)
    # Unbounded sides stay within 64 bits, which every JSON store keeps exactly.
    if lo is None:
        lo = _INT64[0] if hi is None or hi >= _INT64[0] else hi - 2**32
    if hi is None:
        hi = _INT64[1] if lo <= _INT64[1] else lo + 2**32
    if lo > hi:
        raise _empty(tp, path, f"{lo} > {hi}")
    step = c.multiple_of
    if step is None:
        return st.integers(lo, hi)
    if not isinstance(step, int) or step <= 0:
        return st.integers(lo, hi).filter(lambda v: v % step == 0)
    k_lo, k_hi = -(-lo // step), hi // step
    if k_lo > k_hi:
        raise _empty(tp, path, f"no multiple of {step} in [{lo}, {hi}]")
    return st.integers(k_lo, k_hi).map(lambda k: k * step)


def _multiples(c: Constraints, path: str, tp: Any, step: Any) -> st.SearchStrategy[Any]:
    lo, _ = c.lower()
    hi, _ = c.upper()
    k_lo = math.ceil(lo / step) if lo is not None else -(10**6)
    k_hi = math.floor(hi / step) if hi is not None else 10**6
    if k_lo > k_hi:
        raise _empty(tp, path, f"no multiple of {step} in range")
    return st.integers(k_lo, k_hi).map(lambda k: k * step).filter(c.within)


def _floats(c: Constraints, path: str, tp: Any = float) -> st.SearchStrategy[float]:
    if c.multiple_of is not None:
        return _multiples(c, path, tp, float(c.multiple_of))
    lo, exclude_lo = c.lower()
    hi, exclude_hi = c.upper()
    if lo is not None and hi is not None and (lo > hi or (lo == hi and exclude_lo | exclude_hi)):
        raise _empty(tp, path, f"{lo} .. {hi}")
    # NaN never equals itself and infinities have no JSON form: neither round-trips.
    return st.floats(
        min_value=None if lo is None else float(lo),
        max_value=None if hi is None else float(hi),
        exclude_min=exclude_lo,
        exclude_max=exclude_hi,
        allow_nan=False,
        allow_infinity=False,
    )


def _decimals(c: Constraints, path: str, tp: Any = Decimal) -> st.SearchStrategy[Decimal]:
    if c.multiple_of is not None:
        return _multiples(c, path, tp, Decimal(str(c.multiple_of)))
    lo = None if c.lower()[0] is None else Decimal(str(c.lower()[0]))
    hi = None if c.upper()[0] is None else Decimal(str(c.upper()[0]))
    places = c.decimal_places
    if c.max_digits is not None:
        places = min(2, c.max_digits) if places is None else places
        if places > c.max_digits:
            raise _empty(tp, path, "decimal_places exceeds max_digits")
        bound = Decimal(10) ** (c.max_digits - places) - Decimal(10) ** -places
        lo = -bound if lo is None else max(lo, -bound)
        hi = bound if hi is None else min(hi, bound)
    if lo is not None and hi is not None and lo > hi:
        raise _empty(tp, path, f"{lo} > {hi}")
    made = st.decimals(lo, hi, places=places, allow_nan=False, allow_infinity=False)
    return made.filter(c.within) if (c.gt, c.lt) != (None, None) else made


# -- other scalars ----------------------------------------------------------------------------


def _text(c: Constraints, path: str, tp: Any = str) -> st.SearchStrategy[Any]:
    made = text(c, path)
    return made if tp is str else made.map(tp)


def _bytes(c: Constraints, path: str, tp: Any = bytes) -> st.SearchStrategy[Any]:
    # ASCII keeps bytes valid UTF-8, which is Pydantic's default JSON form of bytes.
    lo = c.min_length or 0
    hi = c.max_length if c.max_length is not None else lo + _EXTRA_TEXT
    made = st.text(_ASCII, min_size=lo, max_size=hi).map(str.encode)
    return made if tp is bytes else made.map(tp)


def _uuids(c: Constraints, path: str, tp: Any = uuid.UUID) -> st.SearchStrategy[uuid.UUID]:
    version = c.uuid_version
    if version is None:
        return st.uuids()

    def stamp(bits: int) -> uuid.UUID:
        # Set the version nibble and the RFC 4122 variant bits, as uuid.UUID(version=) does.
        bits = (bits & ~(0xF << 76)) | (version << 76)
        bits = (bits & ~(0x3 << 62)) | (0x2 << 62)
        return uuid.UUID(int=bits)

    return st.integers(0, 2**128 - 1).map(stamp)


def _paths(c: Constraints, path: str, tp: Any = pathlib.Path) -> st.SearchStrategy[Any]:
    if c.must_exist:
        raise NoStrategyError(tp, path, "the path must exist on this machine")
    segment = st.from_regex(r"[a-z0-9_]{1,8}", fullmatch=True)
    return st.lists(segment, min_size=1, max_size=3).map(lambda parts: tp("/".join(parts)))


def _ip(c: Constraints, path: str, tp: Any) -> st.SearchStrategy[Any]:
    return st.ip_addresses(v=6 if "6" in tp.__name__ else 4).map(tp)


def _secret(c: Constraints, path: str, tp: Any) -> st.SearchStrategy[Any]:
    inner = _text(c, path) if tp is pt.SecretStr else _bytes(c, path)
    return inner.map(tp)


def _window(
    lo: Any, hi: Any, defaults: tuple[Any, Any], limits: tuple[Any, Any]
) -> tuple[Any, Any]:
    """The range to draw from: the field's bounds, ``defaults`` on a side it leaves open.

    A default on the far side of the field's only bound moves past it by the defaults'
    width (within ``limits``), so that a bound outside the default range still has room.
    """
    low, high = defaults
    width = high - low
    if lo is None:
        lo = (
            low
            if hi is None or hi >= low
            else (hi - width if hi - limits[0] > width else limits[0])
        )
    if hi is None:
        hi = high if lo <= high else (lo + width if limits[1] - lo > width else limits[1])
    return lo, hi


def _datetimes(c: Constraints, path: str, tp: Any = dt.datetime) -> st.SearchStrategy[Any]:
    kind = _TIME_KINDS.get(tp, "any")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    bounds = [b for b in (c.ge, c.gt, c.le, c.lt) if isinstance(b, dt.datetime)]
    lows = [_naive_utc(b) for b in (c.ge, c.gt) if isinstance(b, dt.datetime)]
    highs = [_naive_utc(b) for b in (c.le, c.lt) if isinstance(b, dt.datetime)]
    if kind == "past":
        highs.append(now - dt.timedelta(days=2))  # margins absorb offsets and slow test runs
    elif kind == "future":
        lows.append(now + dt.timedelta(days=2))
    lo, hi = _window(
        max(lows, default=None),
        min(highs, default=None),
        _DATETIME_RANGE,
        (dt.datetime.min + dt.timedelta(days=2), dt.datetime.max - dt.timedelta(days=2)),
    )
    if lo > hi:
        raise _empty(tp, path, f"{lo} > {hi}")
    made = st.datetimes(lo, hi, timezones=_zones(c, kind, bounds), allow_imaginary=False)
    return made.filter(c.within) if (c.gt, c.lt) != (None, None) else made


def _zones(c: Constraints, kind: str, bounds: list[dt.datetime]) -> st.SearchStrategy[Any]:
    if c.timezone is None or kind == "naive":
        return st.none()
    if isinstance(c.timezone, dt.tzinfo):
        return st.just(c.timezone)
    if isinstance(c.timezone, str):
        return st.just(ZoneInfo(c.timezone))
    if bounds:
        # Aware bounds compare in UTC (the range above is UTC); naive ones only with naive.
        return st.just(dt.UTC) if any(b.tzinfo for b in bounds) else st.none()
    if kind != "any" or c.timezone is Ellipsis:
        return st.sampled_from(_OFFSETS)
    return st.sampled_from((None, *_OFFSETS))


def _dates(c: Constraints, path: str, tp: Any = dt.date) -> st.SearchStrategy[dt.date]:
    today = dt.datetime.now(dt.UTC).date()
    one = dt.timedelta(days=1)
    lows = [b for b in [c.ge] if isinstance(b, dt.date)]
    lows += [b + one for b in [c.gt] if isinstance(b, dt.date)]
    highs = [b for b in [c.le] if isinstance(b, dt.date)]
    highs += [b - one for b in [c.lt] if isinstance(b, dt.date)]
    if tp is pt.PastDate:
        highs.append(today - dt.timedelta(days=2))
    elif tp is pt.FutureDate:
        lows.append(today + dt.timedelta(days=2))
    lo, hi = _window(
        max(lows, default=None),
        min(highs, default=None),
        (_DATETIME_RANGE[0].date(), _DATETIME_RANGE[1].date()),
        (dt.date.min, dt.date.max),
    )
    if lo > hi:
        raise _empty(tp, path, f"{lo} > {hi}")
    return st.dates(lo, hi)


def _times(c: Constraints, path: str, tp: Any = dt.time) -> st.SearchStrategy[dt.time]:
    if c.timezone is not _UNSET and c.timezone is not None:
        return st.times(timezones=st.just(dt.UTC))
    return st.times()


def _timedeltas(c: Constraints, path: str, tp: Any = dt.timedelta) -> st.SearchStrategy[Any]:
    ten_years = dt.timedelta(days=3650)
    lows = [b for b in (c.ge, c.gt) if isinstance(b, dt.timedelta)]
    highs = [b for b in (c.le, c.lt) if isinstance(b, dt.timedelta)]
    lo, hi = _window(
        max(lows, default=None),
        min(highs, default=None),
        (-ten_years, ten_years),
        (dt.timedelta.min, dt.timedelta.max),
    )
    if lo > hi:
        raise _empty(tp, path, f"{lo} > {hi}")
    made = st.timedeltas(lo, hi)
    return made.filter(c.within) if (c.gt, c.lt) != (None, None) else made


_TIME_KINDS: dict[Any, str] = {
    pt.AwareDatetime: "aware",
    pt.NaiveDatetime: "naive",
    pt.PastDatetime: "past",
    pt.FutureDatetime: "future",
}

_Maker = Callable[[Constraints, str, Any], st.SearchStrategy[Any]]

# Exact types first (Pydantic's marker classes are not subclasses of what they validate).
_EXACT: dict[Any, _Maker] = {
    bool: lambda c, path, tp: st.booleans(),
    int: _integers,
    str: _text,
    bytes: _bytes,
    bytearray: _bytes,
    pt.SecretStr: _secret,
    pt.SecretBytes: _secret,
    pt.PastDate: _dates,
    pt.FutureDate: _dates,
    **dict.fromkeys(_TIME_KINDS, _datetimes),
    **dict.fromkeys(
        (
            ipaddress.IPv4Address,
            ipaddress.IPv6Address,
            ipaddress.IPv4Interface,
            ipaddress.IPv6Interface,
            ipaddress.IPv4Network,
            ipaddress.IPv6Network,
        ),
        _ip,
    ),
}
# Then by subclass, most specific first (datetime is a date).
_BY_BASE: tuple[tuple[type, _Maker], ...] = (
    (dt.datetime, _datetimes),
    (dt.date, _dates),
    (dt.time, _times),
    (dt.timedelta, _timedeltas),
    (uuid.UUID, _uuids),
    (Decimal, _decimals),
    (float, _floats),
    (pathlib.PurePath, _paths),
)


def scalar(tp: type, c: Constraints, path: str) -> st.SearchStrategy[Any] | None:
    """A strategy for scalar class ``tp`` honouring ``c``, or ``None`` if it is not one."""
    maker = _EXACT.get(tp)
    if maker is None:
        maker = next((m for base, m in _BY_BASE if issubclass(tp, base)), None)
    return None if maker is None else maker(c, path, tp)
