"""``ListingOptions``, which custom adapters use to resolve listing options as ours do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from castore_pydantic.storage import AggregateIdEntry, ListingOptions

ENTRY = AggregateIdEntry("a", datetime(2024, 1, 1, tzinfo=UTC))


def test_bounds_are_whole_utc_milliseconds_rounded_inwards() -> None:
    given = datetime(2024, 1, 1, 1, 0, 0, 500, tzinfo=timezone(timedelta(hours=1)))
    options = ListingOptions.resolve(initial_event_after=given, initial_event_before=given)
    assert options.initial_event_after == datetime(2024, 1, 1, 0, 0, 0, 1000, tzinfo=UTC)
    assert options.initial_event_before == datetime(2024, 1, 1, tzinfo=UTC)
    assert options.initial_event_after.tzinfo is UTC


def test_a_bound_past_9999_in_utc_lets_nothing_through_page_or_in_bounds() -> None:
    late = datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1)))
    options = ListingOptions.resolve(initial_event_after=late)
    assert options.matches_nothing
    assert options.lists_nothing
    assert not options.in_bounds(ENTRY)
    assert options.page([ENTRY]).aggregate_ids == []


def test_a_bound_before_year_1_in_utc_bounds_nothing() -> None:
    early = datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    options = ListingOptions.resolve(initial_event_after=early)
    assert options.initial_event_after is None
    assert not options.lists_nothing
    assert options.page([ENTRY]).aggregate_ids == [ENTRY]
    assert ListingOptions.resolve(initial_event_before=early).page([ENTRY]).aggregate_ids == []
