"""Laws every reducer should obey, checked over generated event histories.

``check_reducer(store)`` runs Hypothesis over histories of the store (by default
``strategies.histories(store)``) and checks each of them; ``check_history(store, events)``
checks one history, e.g. a regression found earlier. Both are plain synchronous functions that
work in any test, sync or async. A broken law raises ``ReducerLawError`` (an
``AssertionError``) naming the law and printing the (shrunk) history as JSON. The laws:

``totality``
    The reducer never raises on a valid history. Every other law folds the history, so a
    reducer that raises always fails with this law, selected or not.
``version_tracking``
    After each event, the aggregate's ``aggregate_id`` and ``version`` are the event's.
``determinism``
    Folding the same events twice gives equal aggregates.
``prefix_consistency``
    ``get_aggregate(aggregate_id, max_version=k)`` on an in-memory copy of the store seeded
    with the history equals the aggregate folding the whole history reached at version k,
    for every k (a reducer that mutates the previous aggregate or a list or dict inside it,
    which ``model_copy`` shares with the copy unless ``deep=True``, breaks it, and so does
    one that caches state across folds).
``incremental_equals_batch``
    Pushing the events one by one with ``push_event(event, prev_aggregate=...)`` gives, at
    every step, the aggregate that folding the events so far gives (a reducer that mutates the
    previous aggregate in place breaks it).
``json_round_trip``
    Every aggregate survives ``type(a).model_validate_json(a.model_dump_json()) == a``.

Example::

    from castore_pydantic.testing import strategies as cst
    from castore_pydantic.testing.laws import check_reducer

    def test_pokemon_reducer():
        # can_follow(previous_events, event_type) keeps histories to what the domain allows
        # (appeared first, caught once, level at most 100): see the testing guide.
        check_reducer(
            pokemons,
            histories=cst.histories(pokemons, can_follow=can_follow),
            max_examples=200,
        )
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

try:
    import hypothesis
    from hypothesis import given
    from hypothesis import strategies as st
    from hypothesis.errors import HypothesisException, NoSuchExample, Unsatisfiable
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "castore_pydantic.testing.laws needs Hypothesis; install it with: "
        "pip install 'castore-pydantic[testing]'"
    ) from exc
from pydantic import BaseModel

from castore_pydantic._command import Command
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._event_types import event_type_names
from castore_pydantic.errors import ReducerLawError, UncheckedEventTypesError
from castore_pydantic.testing import _refusals, mock_event_store
from castore_pydantic.testing import strategies as _strategies
from castore_pydantic.testing._running import run_now

__all__ = ["ALL_LAWS", "Law", "check_history", "check_reducer"]


_SHOWN = 600  # characters of an aggregate's repr shown in a failure
#: The usual causes of a fold that depends on more than its events.
_IN_PLACE_HINT = (
    "A reducer that changes the previous aggregate in place breaks this, e.g. by appending "
    "to a list of a model_copy, which shares its lists and dicts with the original unless "
    "deep=True; so does one that keeps state across folds (a cache, a counter)."
)


class Law(enum.StrEnum):
    """The reducer laws; pass them (or their string values) as ``laws=``."""

    TOTALITY = "totality"
    VERSION_TRACKING = "version_tracking"
    DETERMINISM = "determinism"
    PREFIX_CONSISTENCY = "prefix_consistency"
    INCREMENTAL_EQUALS_BATCH = "incremental_equals_batch"
    JSON_ROUND_TRIP = "json_round_trip"


ALL_LAWS: tuple[Law, ...] = tuple(Law)
"""Every law, in the order they are checked."""


def check_reducer(
    store: EventStore[Any, Any],
    *,
    histories: st.SearchStrategy[Sequence[Event]] | None = None,
    laws: Iterable[Law | str] | None = None,
    max_examples: int | None = None,
    settings: hypothesis.settings | None = None,
    event_types: Iterable[str | type[Event]] | None = None,
) -> None:
    """Check a store's reducer against the laws over many generated histories.

    Call it from a plain test function (not from inside another ``@given``). Hypothesis
    shrinks a failing history to a small one before it is reported.

    When no checked history held an event of one of the store's types because
    ``histories()`` could make none of the events of it drawn, nor a longer search one
    (its payload's validators, the store's limits, a strategy given in ``event_fields`` or
    ``overrides`` whose values its validators refuse: see the warnings
    ``castore_pydantic.testing.strategies`` logs), the reducer was never checked on that
    type and ``UncheckedEventTypesError`` says so. Each name of an event class with several
    counts on its own. A type that could be made but is in no checked history (rarely
    valid, or filtered out by the strategy) only gets a logged warning. A type your history
    rules leave out is never drawn, so it is never reported.

    Args:
        store: The event store whose reducer is checked. It is not read or written: the
            laws that need storage use in-memory copies (``mock_event_store``).
        histories: Histories to check (default ``strategies.histories(store)``); pass one
            with ordering rules when the reducer expects them, e.g.
            ``histories(store, first=["POKEMON_APPEARED"])``.
        laws: Which laws to check (default all of ``ALL_LAWS``).
        max_examples: How many histories to try (default: the settings' value, 100).
        settings: Hypothesis settings to start from. Without them the database and the
            deadline are off. Multiple-bug reporting is always off, so that exactly one
            ``ReducerLawError`` is raised.
        event_types: The event types (names or classes) the check must cover (default all
            the store's); the others are never reported, e.g. a type ``histories`` leave out
            with ``.filter``.

    Raises:
        ReducerLawError: A law is broken; the message names it and shows the history.
        UncheckedEventTypesError: No event of some of the store's types could be generated.
        ValueError: An unknown law name, or an ``event_types`` entry that is not one of the
            store's types.
        TypeError: ``store`` is not an ``EventStore`` or ``histories`` not a strategy.

    Example::

        def test_reducer():
            check_reducer(pokemons, laws=["totality", "determinism"], max_examples=50)
    """
    _require_store(store, "check_reducer")
    if histories is not None and not isinstance(histories, st.SearchStrategy):
        raise TypeError(
            f"histories must be a Hypothesis strategy of event lists, such as "
            f"strategies.histories(store), got {histories!r:.200}"
        )
    selected = _select(laws)
    required = _required_names(store, event_types)
    strategy = histories if histories is not None else _strategies.histories(store)
    base = settings if settings is not None else hypothesis.settings(deadline=None, database=None)
    chosen = hypothesis.settings(base, report_multiple_bugs=False)
    if max_examples is not None:
        chosen = hypothesis.settings(chosen, max_examples=max_examples)

    seen: set[str] = set()

    @chosen
    @given(strategy)
    def reducer_obeys_laws(history: Sequence[Event]) -> None:
        checked = _as_events(store, history)
        seen.update(event.type for event in checked)
        check_history(store, checked, laws=selected)

    with _refusals.watching() as given_up, _refusals.counting_slots() as slots:
        reducer_obeys_laws()
    _require_coverage(store, required, seen, given_up, slots)


def _can_make(search: st.SearchStrategy[Sequence[Event]] | None) -> tuple[bool | None, str]:
    """Whether a longer search makes one event where a check's histories made none.

    The search draws a few hundred more histories, each up to an event of the type, as
    ``histories()`` draws them (same rules, versions and times): a type valid once in a
    few hundred values is told from one never valid, so that it does not fail a correct
    check at random. It is derandomized, with
    settings built here and not taken from the active profile, so that a check gives the
    same verdict every time. ``None`` (with why) when the search could not tell, e.g. a
    validator that depends on state outside the event makes Hypothesis call it flaky.
    """
    if search is None:
        return False, ""
    searching = hypothesis.settings(
        database=None,
        deadline=None,
        derandomize=True,
        # Every history the search tries and that makes no event of the type is rejected:
        # Hypothesis gives up after a few hundred (about 460) of them.
        max_examples=1,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
        verbosity=hypothesis.Verbosity.quiet,
    )
    try:
        hypothesis.find(search, lambda _history: True, settings=searching)
    except (NoSuchExample, Unsatisfiable):
        return False, ""
    except HypothesisException as exc:  # Flaky and the like: no verdict either way
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return True, ""


def _required_names(
    store: EventStore[Any, Any], event_types: Iterable[str | type[Event]] | None
) -> list[str]:
    """The names of the store's types the check must cover, in the store's order."""
    names = [name for cls in store.event_types for name in event_type_names(cls)]
    if event_types is None:
        return names
    if isinstance(event_types, str):
        event_types = [event_types]
    wanted: set[str] = set()
    for item in event_types:
        for name in [item] if isinstance(item, str) else event_type_names(item):
            if name not in names:
                raise ValueError(
                    f"event_types names {name!r}, not a type of event store "
                    f"{store.event_store_id} (its types: {sorted(names)})"
                )
            wanted.add(name)
    return [name for name in names if name in wanted]


def _require_coverage(
    store: EventStore[Any, Any],
    required: Sequence[str],
    seen: set[str],
    given_up: set[_refusals.Refusals],
    slots: Mapping[str, _refusals.Slots],
) -> None:
    """Fail when generation could make no event of a type that no checked history held.

    What ``histories()`` set out to draw decides, per name: none made out of enough tries
    fails unless a longer search makes one, anything less is only a logged warning (a
    rarely valid type, a type filtered out afterwards must not fail a correct check at
    random). A name ``histories()`` never set out to draw (its rules leave it out) is never
    reported. For other strategies, the counters of values generated for the type that
    refused many and never accepted one.
    """
    classes = {name: cls for cls in store.event_types for name in event_type_names(cls)}
    missing: dict[str, str] = {}
    unsure: list[str] = []
    for name in required:
        if name in seen:
            continue
        counted = slots.get(name)
        if counted is not None:
            found, why = (True, "") if counted.made else _can_make(counted.search)
            if found is False:
                missing[name] = (
                    f"{name}: none of the {counted.refused} events of it drawn could be made, "
                    f"nor one in a longer search; the last refusal: {counted.reason()}"
                )
            else:
                last = f"; the last refusal: {counted.reason()}" if counted.refused else ""
                unsure.append(
                    f"{name} ({counted.made} made, {counted.refused} refused{last}"
                    + (
                        f"; a longer search could not tell whether one can be made: {why}"
                        if why
                        else ""
                    )
                    + ")"
                )
            continue
        if slots:
            # histories() made the events: a name it never set out to draw is one its rules
            # leave out, even when another name of the same class was refused.
            continue
        reasons = sorted(
            counter.warning(counter.count, counter.reason)
            for counter in given_up
            if counter.origin is classes[name] and counter.given_up
        )
        if reasons:
            missing[name] = f"{name}: " + " ".join(reasons)
    if unsure:
        _refusals.logger.warning(
            "check_reducer(): event store %s: no checked history held an event of %s. Its "
            "events are hard to draw or filtered out: raise max_examples, give its fields "
            "values that pass (event_fields= of histories(), overrides=), or leave it out "
            "of event_types= of check_reducer if that is on purpose.",
            store.event_store_id,
            "; ".join(unsure),
        )
    if missing:
        raise UncheckedEventTypesError(store.event_store_id, list(missing), list(missing.values()))


def check_history(
    store: EventStore[Any, Any],
    events: Sequence[Event],
    *,
    laws: Iterable[Law | str] | None = None,
) -> None:
    """Check the laws on one history of one aggregate.

    Args:
        store: The event store whose reducer is checked (it is not read or written).
        events: Events of one aggregate, versions increasing, at least one: instances of
            the store's event types, or mappings (either key spelling, such as the JSON a
            ``ReducerLawError`` shows) validated like pushed events.
        laws: Which laws to check (default all of ``ALL_LAWS``).

    Raises:
        ReducerLawError: A law is broken; the message names it and shows the history.
        ValueError: The history is empty, mixes aggregates, does not start at version 1,
            its versions do not increase, or a law name is unknown.
        pydantic.ValidationError: A mapping is not a valid event of the store.
        UnknownEventTypeError: A mapping's type is not one of the store's.
        TypeError: ``store`` is not an ``EventStore``, ``events`` not a sequence, or an
            event neither an ``Event`` nor a mapping.

    Example::

        def test_regression():
            check_history(pokemons, [appeared_v1, caught_v2], laws=["version_tracking"])
    """
    _require_store(store, "check_history")
    selected = _select(laws)
    history = _as_events(store, events)
    _check_shape(history)
    if selected & {Law.PREFIX_CONSISTENCY, Law.INCREMENTAL_EQUALS_BATCH}:
        # These laws compare folds with what the store gives back: the history is taken
        # as stored (stamped, UTC milliseconds, through JSON) for every law.
        history = _as_stored(store, history)
    checker = _Checker(store, history)
    aggregates = checker.fold()
    if Law.VERSION_TRACKING in selected:
        checker.version_tracking(aggregates)
    if Law.DETERMINISM in selected:
        checker.determinism(aggregates[-1])
    if Law.PREFIX_CONSISTENCY in selected:
        checker.prefix_consistency(aggregates)
    if Law.INCREMENTAL_EQUALS_BATCH in selected:
        checker.incremental_equals_batch()
    if Law.JSON_ROUND_TRIP in selected:
        checker.json_round_trip(aggregates)


def _as_stored(store: EventStore[Any, Any], history: list[Event]) -> list[Event]:
    """The history as the store gives it back: stamped, in UTC milliseconds, through JSON.

    The laws compare folds of the given events with folds of stored ones; a timestamp with
    microseconds, a missing one or a tuple in a payload would otherwise look like a broken
    law of a correct reducer.
    """

    async def read_back() -> list[Event]:
        seeded = mock_event_store(store, history)
        return list((await seeded.get_events(history[0].aggregate_id)).events)

    return run_now(read_back)


def _require_store(store: Any, caller: str) -> None:
    if not isinstance(store, EventStore):
        raise TypeError(
            f"{caller}() checks the reducer of an EventStore, got {store!r:.200}"
            + (
                " (a Command: pass one of its required_event_stores)"
                if isinstance(store, Command)
                else ""
            )
        )


def _as_events(store: EventStore[Any, Any], events: Any) -> list[Event]:
    """The history as events; mappings are validated by the store like pushed events."""
    if isinstance(events, str | bytes | bytearray):
        raise TypeError(
            "events must be a sequence of events (instances or mappings), got JSON text "
            f"(a {type(events).__name__}); parse it first: check_history(store, json.loads(text))"
        )
    if isinstance(events, Mapping | Event) or not isinstance(events, Iterable):
        raise TypeError(
            "events must be a sequence of events (instances or mappings), got a "
            f"{type(events).__name__}; wrap a single event in a list"
        )
    history: list[Event] = []
    for position, event in enumerate(events, start=1):
        if isinstance(event, Event):
            history.append(event)
        elif isinstance(event, Mapping):
            history.append(store.context.validate_input(event, timestamp=False, limits=False))
        else:
            raise TypeError(
                f"event {position} of the history is a {type(event).__name__}, not an Event "
                "or a mapping"
            )
    return history


def _select(laws: Iterable[Law | str] | None) -> frozenset[Law]:
    if laws is None:
        return frozenset(ALL_LAWS)
    if isinstance(laws, str):
        laws = [laws]
    selected = set()
    for law in laws:
        try:
            selected.add(Law(law))
        except ValueError:
            known = ", ".join(law.value for law in ALL_LAWS)
            raise ValueError(f"unknown reducer law {law!r} (known: {known})") from None
    return frozenset(selected)


def _check_shape(history: Sequence[Event]) -> None:
    if not history:
        raise ValueError("a history needs at least one event")
    ids = {event.aggregate_id for event in history}
    if len(ids) > 1:
        raise ValueError(f"a history belongs to one aggregate, got {sorted(ids)}")
    versions = [event.version for event in history]
    if versions[0] != 1:
        # The laws fold from no aggregate, which only a version-1 event starts.
        raise ValueError(f"a history starts at version 1, not {versions[0]}")
    if any(b <= a for a, b in itertools.pairwise(versions)):
        raise ValueError(f"versions of a history must increase, got {versions}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class _Checker:
    """The laws, applied to one history."""

    def __init__(self, store: EventStore[Any, Any], history: list[Event]) -> None:
        self.store = store
        self.history = history

    def fail(self, law: Law, detail: str, cause: BaseException | None = None) -> NoReturn:
        events = [event.model_dump(mode="json") for event in self.history]
        raise ReducerLawError(law.value, self.store.event_store_id, detail, events) from cause

    def build(self, count: int) -> Any:
        """Fold the first ``count`` events afresh."""
        return self.store.build_aggregate(self.history[:count])

    def fold(self) -> list[Any]:
        """Fold once, keeping the aggregate after each event (the totality law)."""
        aggregates = []
        aggregate = None
        for event in self.history:
            try:
                aggregate = self.store.reducer(aggregate, event)
            except Exception as exc:
                self.fail(
                    Law.TOTALITY,
                    f"the reducer raised {type(exc).__name__}: {exc} "
                    f"on the event of version {event.version} ({event.type})",
                    exc,
                )
            aggregates.append(aggregate)
        return aggregates

    def version_tracking(self, aggregates: Sequence[Any]) -> None:
        for event, aggregate in zip(self.history, aggregates, strict=True):
            got = (
                getattr(aggregate, "aggregate_id", "<missing>"),
                getattr(aggregate, "version", "<missing>"),
            )
            if got != (event.aggregate_id, event.version):
                self.fail(
                    Law.VERSION_TRACKING,
                    f"after the event of version {event.version} ({event.type}) the aggregate "
                    f"has aggregate_id={got[0]!r}, version={got[1]!r}; expected "
                    f"aggregate_id={event.aggregate_id!r}, version={event.version!r}. "
                    f"Aggregate: {_show(aggregate)}",
                )

    def determinism(self, first: Any) -> None:
        second = self.build(len(self.history))
        if second != first:
            self.fail(
                Law.DETERMINISM,
                f"folding the same events twice gave different aggregates:\n"
                f"  first:  {_show(first)}\n  second: {_show(second)}",
            )

    def prefix_consistency(self, aggregates: Sequence[Any]) -> None:
        store, history = self.store, self.history
        aggregate_id = history[0].aggregate_id

        async def read_prefixes() -> list[Any]:
            seeded = mock_event_store(store, history)
            return [
                (await seeded.get_aggregate(aggregate_id, max_version=event.version)).aggregate
                for event in history
            ]

        stored_prefixes = run_now(read_prefixes)
        for event, stored, folded in zip(history, stored_prefixes, aggregates, strict=True):
            if stored != folded:
                self.fail(
                    Law.PREFIX_CONSISTENCY,
                    f"get_aggregate(max_version={event.version}) differs from the aggregate "
                    f"folding reached at that event:\n  get_aggregate: {_show(stored)}\n"
                    f"  folded:        {_show(folded)}\n{_IN_PLACE_HINT}",
                )

    def incremental_equals_batch(self) -> None:
        store, history = self.store, self.history

        async def push_one_by_one() -> list[Any]:
            empty = mock_event_store(store)
            previous = None
            produced = []
            for event in history:
                result = await empty.push_event(event, prev_aggregate=previous)
                previous = result.next_aggregate
                produced.append(previous)
            return produced

        # Compared after all pushes: a reducer that mutates its input corrupts earlier results.
        for count, pushed in enumerate(run_now(push_one_by_one), start=1):
            folded = self.build(count)
            if pushed != folded:
                event = history[count - 1]
                self.fail(
                    Law.INCREMENTAL_EQUALS_BATCH,
                    f"after pushing events one by one up to version {event.version}, "
                    f"next_aggregate differs from folding those events (compared once all "
                    f"were pushed):\n  pushed: {_show(pushed)}\n  folded: {_show(folded)}\n"
                    f"{_IN_PLACE_HINT}",
                )

    def json_round_trip(self, aggregates: Sequence[Any]) -> None:
        for event, aggregate in zip(self.history, aggregates, strict=True):
            if not isinstance(aggregate, BaseModel):
                self.fail(
                    Law.JSON_ROUND_TRIP,
                    f"the aggregate after version {event.version} is a "
                    f"{type(aggregate).__name__}, not a Pydantic model",
                )
            try:
                text = aggregate.model_dump_json()
                back = type(aggregate).model_validate_json(text)
            except Exception as exc:
                self.fail(
                    Law.JSON_ROUND_TRIP,
                    f"the aggregate after version {event.version} does not survive JSON: "
                    f"{type(exc).__name__}: {exc}",
                    exc,
                )
            if back != aggregate:
                self.fail(
                    Law.JSON_ROUND_TRIP,
                    f"the aggregate after version {event.version} changes through JSON:\n"
                    f"  before: {_show(aggregate)}\n  JSON:   {text[:_SHOWN]}\n"
                    f"  after:  {_show(back)}",
                )
