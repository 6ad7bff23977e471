"""Listing options and page tokens for ``list_aggregate_ids``, shared by every adapter.

A page token is Castore's JSON form, ``{"limit"?, "initialEventAfter"?, "initialEventBefore"?,
"reverse"?, "lastEvaluatedKey": {"aggregateId", "initialEventTimestamp"}}``, holding the
*effective* options of the listing so that any number of pages can follow. Options given
explicitly next to a token override the token's. Aggregates are ordered by ``(initial event
timestamp, aggregate id)``, so equal timestamps never skip or repeat an aggregate.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from castore_pydantic._event import format_timestamp, utf8_encodable
from castore_pydantic._types import AggregateIdEntry, ListAggregateIdsResult
from castore_pydantic.errors import InvalidPageTokenError

__all__ = ["ListingOptions", "check_count", "check_read_options", "lower_bound", "parse_timestamp"]

_T = TypeVar("_T")


def parse_timestamp(value: datetime | str, what: str) -> datetime:
    """Read a listing bound or token timestamp: an aware datetime or an ISO string."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{what} is not an ISO 8601 timestamp: {value!r}") from exc
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime or an ISO string, not {type(value).__name__}")
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (e.g. 2024-01-01T00:00:00.000Z)")
    return value


def check_count(name: str, value: object) -> int | None:
    """``value`` if it is ``None`` or an int >= 0 (a limit, a version bound).

    Raises:
        TypeError: It is not an int.
        ValueError: It is negative.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_read_options(min_version: object, max_version: object, limit: object) -> None:
    """Refuse ``get_events`` bounds and limit that are not ``None`` or ints >= 0.

    Raises:
        TypeError: One is not an int.
        ValueError: One is negative.
    """
    check_count("min_version", min_version)
    check_count("max_version", max_version)
    check_count("limit", limit)


def _check_limit(limit: object) -> int | None:
    return check_count("limit", limit)


def lower_bound(value: datetime | None) -> tuple[datetime | None, bool]:
    """An inclusive lower bound, in UTC rounded up to a whole millisecond.

    Stored timestamps are whole milliseconds, so rounding loses none. Also returned: whether
    no timestamp can reach the bound.
    """
    if value is None:
        return None, False
    try:
        utc = value.astimezone(UTC)
        extra = utc.microsecond % 1000
        return (utc + timedelta(microseconds=1000 - extra) if extra else utc), False
    except OverflowError:
        # Outside datetime's range in UTC: before year 1 it bounds nothing, after 9999 all.
        return None, value.year > 1


def _upper_bound(value: datetime | None) -> tuple[datetime | None, bool]:
    """An inclusive upper bound, in UTC rounded down to a whole millisecond.

    Also returned: whether no timestamp can be that early.
    """
    if value is None:
        return None, False
    try:
        utc = value.astimezone(UTC)
    except OverflowError:
        # Outside datetime's range in UTC: before year 1 nothing is that early; after 9999
        # it bounds nothing.
        return None, value.year == 1
    return utc.replace(microsecond=utc.microsecond - utc.microsecond % 1000), False


def _after(value: Any) -> datetime:
    return parse_timestamp(value, "initial_event_after")


def _before(value: Any) -> datetime:
    return parse_timestamp(value, "initial_event_before")


def _option(parse: Callable[[Any], _T], explicit: object, from_token: object) -> _T | None:
    """``explicit`` parsed, else the token's value parsed; ``None`` when neither is given.

    Raises:
        ValueError: ``explicit`` does not parse.
        InvalidPageTokenError: The value taken from the page token does not parse.
    """
    if explicit is not None:
        return parse(explicit)
    if from_token is None:
        return None
    try:
        return parse(from_token)
    except (TypeError, ValueError) as exc:
        raise InvalidPageTokenError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class ListingOptions:
    """The effective options of one ``list_aggregate_ids`` call.

    Bounds are in UTC and whole milliseconds, as stored timestamps are: the lower one
    rounded up, the upper one rounded down, which selects the same aggregates and writes
    them into page tokens exactly. A bound out of datetime's range in UTC either bounds
    nothing (``None``) or lets nothing through (``matches_nothing``).

    Attributes:
        limit: Page size, ``None`` for everything.
        initial_event_after: Inclusive lower bound on the initial event timestamp.
        initial_event_before: Inclusive upper bound on the initial event timestamp.
        reverse: Newest first.
        cursor: The last aggregate of the previous page (timestamp in UTC), ``None`` on the
            first page.
        matches_nothing: No timestamp can pass the bounds: the listing is empty.
    """

    limit: int | None = None
    initial_event_after: datetime | None = None
    initial_event_before: datetime | None = None
    reverse: bool = False
    cursor: AggregateIdEntry | None = None
    matches_nothing: bool = False

    @classmethod
    def resolve(
        cls,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | str | None = None,
        initial_event_before: datetime | str | None = None,
        reverse: bool | None = None,
    ) -> ListingOptions:
        """Merge explicit options with a page token's (explicit ones win).

        Raises:
            InvalidPageTokenError: ``page_token`` is malformed.
            ValueError: A negative limit or a naive/unparseable bound.
        """
        token: dict[str, Any] = {} if page_token is None else _decode(page_token)
        cursor = None
        if page_token is not None:
            cursor = _decode_cursor(token.get("lastEvaluatedKey"))
        eff_reverse = reverse if reverse is not None else token.get("reverse", False)
        if not isinstance(eff_reverse, bool):
            raise InvalidPageTokenError("'reverse' must be a boolean")
        # A bad explicit option is the caller's ValueError; a bad value taken from the token
        # means the token is invalid.
        after, too_late = lower_bound(
            _option(_after, initial_event_after, token.get("initialEventAfter"))
        )
        before, too_early = _upper_bound(
            _option(_before, initial_event_before, token.get("initialEventBefore"))
        )
        return cls(
            limit=_option(_check_limit, limit, token.get("limit")),
            initial_event_after=after,
            initial_event_before=before,
            reverse=eff_reverse,
            cursor=cursor,
            matches_nothing=too_late or too_early,
        )

    @property
    def lists_nothing(self) -> bool:
        """Whether the listing is empty whatever is stored (a limit of 0, or bounds)."""
        return self.limit == 0 or self.matches_nothing

    def next_page_token(self, last: AggregateIdEntry) -> str:
        """The token that continues this listing after ``last``."""
        token: dict[str, Any] = {}
        if self.limit is not None:
            token["limit"] = self.limit
        if self.initial_event_after is not None:
            token["initialEventAfter"] = format_timestamp(self.initial_event_after)
        if self.initial_event_before is not None:
            token["initialEventBefore"] = format_timestamp(self.initial_event_before)
        if self.reverse:
            token["reverse"] = True
        token["lastEvaluatedKey"] = {
            "aggregateId": last.aggregate_id,
            "initialEventTimestamp": format_timestamp(last.initial_event_timestamp),
        }
        return json.dumps(token, separators=(",", ":"), ensure_ascii=False)

    def in_bounds(self, entry: AggregateIdEntry) -> bool:
        """Whether ``entry`` passes the inclusive timestamp bounds."""
        if self.matches_nothing:
            return False
        ts = entry.initial_event_timestamp
        if self.initial_event_after is not None and ts < self.initial_event_after:
            return False
        return not (self.initial_event_before is not None and ts > self.initial_event_before)

    def past_cursor(self, entry: AggregateIdEntry) -> bool:
        """Whether ``entry`` comes after the cursor in this listing's order."""
        if self.cursor is None:
            return True
        key = (entry.initial_event_timestamp, entry.aggregate_id)
        cursor_key = (self.cursor.initial_event_timestamp, self.cursor.aggregate_id)
        return key < cursor_key if self.reverse else key > cursor_key

    def page(self, entries: Iterable[AggregateIdEntry]) -> ListAggregateIdsResult:
        """Apply bounds, order, cursor and limit to all of a store's aggregates."""
        if self.lists_nothing:
            return ListAggregateIdsResult(aggregate_ids=[])
        selected = sorted(
            (e for e in entries if self.in_bounds(e) and self.past_cursor(e)),
            key=lambda e: (e.initial_event_timestamp, e.aggregate_id),
            reverse=self.reverse,
        )
        return self.finish(selected)

    def finish(self, ordered: list[AggregateIdEntry]) -> ListAggregateIdsResult:
        """Cut an ordered candidate list (at least ``limit + 1`` long if more exist)."""
        if self.limit is None or len(ordered) <= self.limit:
            return ListAggregateIdsResult(aggregate_ids=ordered)
        page = ordered[: self.limit]
        if not page:
            return ListAggregateIdsResult(aggregate_ids=[])
        return ListAggregateIdsResult(
            aggregate_ids=page, next_page_token=self.next_page_token(page[-1])
        )


def _decode(page_token: object) -> dict[str, Any]:
    if not isinstance(page_token, str):
        raise InvalidPageTokenError(f"expected a string, got {type(page_token).__name__}")
    try:
        token = json.loads(page_token)
    except (ValueError, RecursionError) as exc:
        raise InvalidPageTokenError("not valid JSON") from exc
    if not isinstance(token, dict):
        raise InvalidPageTokenError("expected a JSON object")
    return token


def _decode_cursor(raw: object) -> AggregateIdEntry:
    if not isinstance(raw, dict):
        raise InvalidPageTokenError("'lastEvaluatedKey' is missing or not an object")
    aggregate_id = raw.get("aggregateId")
    timestamp = raw.get("initialEventTimestamp")
    if not isinstance(aggregate_id, str) or not isinstance(timestamp, str):
        raise InvalidPageTokenError(
            "'lastEvaluatedKey' needs string 'aggregateId' and 'initialEventTimestamp'"
        )
    if not utf8_encodable(aggregate_id):  # no such aggregate can be stored
        raise InvalidPageTokenError(
            "'lastEvaluatedKey.aggregateId' is not valid Unicode (lone surrogate)"
        )
    try:
        ts = parse_timestamp(timestamp, "initialEventTimestamp").astimezone(UTC)
    except ValueError as exc:
        raise InvalidPageTokenError(str(exc)) from exc
    except OverflowError as exc:
        raise InvalidPageTokenError(
            f"'initialEventTimestamp' is out of range in UTC: {timestamp!r}"
        ) from exc
    return AggregateIdEntry(aggregate_id=aggregate_id, initial_event_timestamp=ts)
