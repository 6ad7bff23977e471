"""Tests for ``castore_pydantic.testing.laws``: good reducers pass, each broken one is caught."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, model_validator

from castore_pydantic import Aggregate, Command, Event, EventStore
from castore_pydantic._event_limits import EventLimits
from castore_pydantic.errors import (
    EventLimitExceededError,
    ReducerLawError,
    UncheckedEventTypesError,
)
from castore_pydantic.testing import strategies as cst
from castore_pydantic.testing._running import run_now
from castore_pydantic.testing.laws import ALL_LAWS, Law, check_history, check_reducer

# -- a small counter domain ----------------------------------------------------------------


class Named(BaseModel):
    name: str = Field(min_length=1, max_length=12)


class Step(BaseModel):
    by: int = Field(ge=1, le=10)


class CounterCreated(Event):
    type: Literal["COUNTER_CREATED"] = "COUNTER_CREATED"
    payload: Named


class CounterIncremented(Event):
    type: Literal["COUNTER_INCREMENTED"] = "COUNTER_INCREMENTED"
    payload: Step


class CounterRenamed(Event):
    type: Literal["COUNTER_RENAMED"] = "COUNTER_RENAMED"
    payload: Named


CounterEvent = CounterCreated | CounterIncremented | CounterRenamed
Reducer = Callable[[Any, Any], Any]


class Counter(Aggregate):
    name: str
    value: int


def reduce_counter(counter: Counter | None, event: CounterEvent) -> Counter:
    if isinstance(event, CounterCreated):
        return Counter(
            aggregate_id=event.aggregate_id, version=event.version, name=event.payload.name, value=0
        )
    assert counter is not None
    if isinstance(event, CounterIncremented):
        return counter.model_copy(
            update={"version": event.version, "value": counter.value + event.payload.by}
        )
    return counter.model_copy(update={"version": event.version, "name": event.payload.name})


def counters(reducer: Reducer = reduce_counter) -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="COUNTERS",
        event_types=[CounterCreated, CounterIncremented, CounterRenamed],
        reducer=reducer,
    )


def counter_histories(store: EventStore[Any, Any]) -> Any:
    """Counters are created once, first; anything else may follow."""
    return cst.histories(
        store,
        first=["COUNTER_CREATED"],
        can_follow=lambda previous, name: name != "COUNTER_CREATED" or not previous,
        max_size=8,
    )


T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CREATED = CounterCreated(aggregate_id="c1", version=1, timestamp=T0, payload=Named(name="one"))
INCREMENTED = CounterIncremented(aggregate_id="c1", version=2, timestamp=T0, payload=Step(by=2))
RENAMED = CounterRenamed(aggregate_id="c1", version=3, timestamp=T0, payload=Named(name="two"))


# -- broken reducers, one per law ----------------------------------------------------------


def raises_on_rename(counter: Counter | None, event: CounterEvent) -> Counter:
    """Forgot a case: renaming raises."""
    if isinstance(event, CounterRenamed):
        raise KeyError(event.type)
    return reduce_counter(counter, event)


def forgets_version_on_increment(counter: Counter | None, event: CounterEvent) -> Counter:
    """Forgot to move the version forward on increments."""
    if isinstance(event, CounterIncremented):
        assert counter is not None
        return counter.model_copy(update={"value": counter.value + event.payload.by})
    return reduce_counter(counter, event)


class Stamped(Counter):
    fold_number: int


class HiddenState:
    """A reducer with state shared across folds; ``reset`` starts an example afresh.

    Hypothesis replays and shrinks failing examples, so each example must behave the same
    whenever it runs: the checks below reset the state at the start of every history.
    """

    def reset(self, history: list[Event]) -> list[Event]:
        raise NotImplementedError

    def __call__(self, counter: Any, event: CounterEvent) -> Any:
        raise NotImplementedError


class Stamping(HiddenState):
    """Stamps each aggregate with a running number: folding twice gives different stamps."""

    def reset(self, history: list[Event]) -> list[Event]:
        self.calls = itertools.count()
        return history

    def __call__(self, counter: Stamped | None, event: CounterEvent) -> Stamped:
        base = reduce_counter(counter, event)
        return Stamped(**base.model_dump(by_alias=False), fold_number=next(self.calls))


class Snapshotting(HiddenState):
    """Resumes from the latest snapshot when folding from scratch: wrong for older versions."""

    def reset(self, history: list[Event]) -> list[Event]:
        self.snapshots: dict[str, Counter] = {}
        return history

    def __call__(self, counter: Counter | None, event: CounterEvent) -> Counter:
        if counter is None and event.aggregate_id in self.snapshots:
            return self.snapshots[event.aggregate_id]
        folded = reduce_counter(counter, event)
        self.snapshots[event.aggregate_id] = folded
        return folded


class Tally(Aggregate):
    steps: list[int]


def mutating_reducer(tally: Tally | None, event: CounterEvent) -> Tally:
    """Appends to the previous aggregate's list in place: earlier aggregates change too."""
    if tally is None:
        return Tally(aggregate_id=event.aggregate_id, version=event.version, steps=[event.version])
    tally.steps.append(event.version)
    return tally.model_copy(update={"version": event.version})


class Tagged(Aggregate):
    tags: Any


def tuple_reducer(tagged: Tagged | None, event: CounterEvent) -> Tagged:
    """Keeps a tuple in an ``Any`` field: JSON brings it back as a list."""
    tags = (*(tagged.tags if tagged else ()), event.type)
    return Tagged(aggregate_id=event.aggregate_id, version=event.version, tags=tags)


BROKEN: list[tuple[Law, Callable[[], Reducer]]] = [
    (Law.TOTALITY, lambda: raises_on_rename),
    (Law.VERSION_TRACKING, lambda: forgets_version_on_increment),
    (Law.DETERMINISM, Stamping),
    (Law.PREFIX_CONSISTENCY, Snapshotting),
    (Law.INCREMENTAL_EQUALS_BATCH, lambda: mutating_reducer),
    (Law.JSON_ROUND_TRIP, lambda: tuple_reducer),
]


def history_in(error: ReducerLawError) -> list[dict[str, Any]]:
    """The JSON history printed in the error's message."""
    text = str(error)
    rendered: list[dict[str, Any]] = json.loads(
        text[text.index("events):\n") + len("events):\n") :]
    )
    return rendered


class TestGoodReducer:
    """A correct reducer passes every law."""

    def test_obeys_every_law(self) -> None:
        """``check_reducer`` returns quietly for a correct reducer."""
        store = counters()
        check_reducer(store, histories=counter_histories(store), max_examples=100)

    def test_default_histories_fit_an_order_free_reducer(self) -> None:
        """Without ``histories``, every order of the store's types is tried."""

        def log(tally: Tally | None, event: CounterEvent) -> Tally:
            steps = [*(tally.steps if tally else []), event.version]
            return Tally(aggregate_id=event.aggregate_id, version=event.version, steps=steps)

        check_reducer(counters(log), max_examples=50)

    async def test_works_inside_a_running_event_loop(self) -> None:
        """It can be called from an ``async def`` test (it runs its own loop elsewhere)."""
        store = counters()
        check_reducer(store, histories=counter_histories(store), max_examples=20)
        with pytest.raises(ReducerLawError):
            check_reducer(counters(mutating_reducer), max_examples=50)

    def test_default_histories_keep_to_the_stores_limits(self) -> None:
        """Without ``histories``, only events the store accepts are drawn: a correct
        reducer passes on a store whose limits refuse most of them. (check_reducer raised
        EventLimitExceededError for events it had drawn itself.)"""

        class CounterNoted(Event):
            type: Literal["COUNTER_NOTED"] = "COUNTER_NOTED"
            payload: list[Step]  # a step is one level too deep for the store

        def count(tally: Tally | None, event: CounterNoted) -> Tally:
            steps = [*(tally.steps if tally else []), event.version]
            return Tally(aggregate_id=event.aggregate_id, version=event.version, steps=steps)

        store: EventStore[Any, Any] = EventStore(
            event_store_id="NOTED",
            event_types=[CounterNoted],
            reducer=count,
            limits=EventLimits(max_depth=1),
        )
        # Only an empty list is accepted: many draws are refused, which is the point.
        lenient = settings(suppress_health_check=[HealthCheck.filter_too_much])
        check_reducer(store, max_examples=50, settings=lenient)

    def test_check_history_on_a_fixed_history(self) -> None:
        """``check_history`` checks one concrete history."""
        check_history(counters(), [CREATED, INCREMENTED, RENAMED])

    def test_laws_without_storage_check_histories_the_store_refuses(self) -> None:
        """Only the laws that compare with stored events read the history back through a
        store: totality and determinism still check a history beyond the store's limits."""
        store: EventStore[Any, Any] = EventStore(
            event_store_id="DEEP",
            event_types=[CounterCreated],
            reducer=reduce_counter,
            limits=EventLimits(max_depth=1),
        )
        deep = CREATED.model_copy(update={"metadata": {"a": {"b": 1}}})
        check_history(store, [deep], laws=["totality", "determinism", "version_tracking"])
        with pytest.raises(EventLimitExceededError):
            check_history(store, [deep], laws=["prefix_consistency"])

    def test_run_now_runs_coroutines_that_need_a_loop(self) -> None:
        """Work that waits on the event loop falls back to a real loop."""

        async def sleeps() -> str:
            await asyncio.sleep(0.001)
            return "slept"

        async def suspends() -> str:
            await asyncio.sleep(0)
            return "suspended"

        assert run_now(sleeps) == "slept"
        assert run_now(suspends) == "suspended"

    def test_histories_the_store_would_normalise_pass(self) -> None:
        """Timestamps finer than a millisecond, in another zone, or missing come back
        from storage normalised; a reducer that keeps them is still correct. (Such
        histories used to break ``prefix_consistency`` and ``incremental_equals_batch``.)"""

        class Seen(Counter):
            at: dt.datetime | None

        def keeps(counter: Seen | None, event: CounterEvent) -> Seen:
            base = reduce_counter(counter, event)
            return Seen(**base.model_dump(by_alias=False, exclude={"at"}), at=event.timestamp)

        at = dt.datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
        for stamp in (at, at.astimezone(dt.timezone(dt.timedelta(hours=2))), None):
            history = [
                CREATED.model_copy(update={"timestamp": stamp}),
                INCREMENTED.model_copy(update={"timestamp": stamp}),
            ]
            check_history(counters(keeps), history)


class TestBrokenReducers:
    """Each law catches a reducer that breaks it, and says which law and which history."""

    @pytest.mark.parametrize(("law", "make_reducer"), BROKEN, ids=[law for law, _ in BROKEN])
    def test_law_catches_broken_reducer(
        self, law: Law, make_reducer: Callable[[], Reducer]
    ) -> None:
        """The selected law fails with a ReducerLawError naming it and showing the history."""
        reducer = make_reducer()
        store = counters(reducer)
        histories = counter_histories(store)
        if isinstance(reducer, HiddenState):
            histories = histories.map(reducer.reset)
        with pytest.raises(ReducerLawError) as info:
            check_reducer(store, histories=histories, laws=[law], max_examples=200)
        error = info.value
        assert isinstance(error, AssertionError)
        assert error.law == law.value
        assert error.event_store_id == "COUNTERS"
        assert str(error).startswith(f"Reducer law '{law.value}' broken by event store COUNTERS")
        shown = history_in(error)
        assert shown == error.events
        assert shown[0]["type"] == "COUNTER_CREATED"
        assert {"aggregateId", "version", "timestamp", "type"} <= set(shown[0])
        assert shown[0]["timestamp"].endswith("Z")

    def test_failing_history_is_shrunk(self) -> None:
        """The reported history is the smallest that fails: create, then rename."""
        store = counters(raises_on_rename)
        with pytest.raises(ReducerLawError) as info:
            check_reducer(store, histories=counter_histories(store), max_examples=200)
        assert [event["type"] for event in history_in(info.value)] == [
            "COUNTER_CREATED",
            "COUNTER_RENAMED",
        ]
        assert "KeyError" in info.value.detail
        assert isinstance(info.value.__cause__, KeyError)

    def test_a_raising_reducer_fails_totality_whatever_is_selected(self) -> None:
        """Every law needs a fold, so a raising reducer is reported as totality."""
        with pytest.raises(ReducerLawError) as info:
            check_history(counters(raises_on_rename), [CREATED, RENAMED], laws=["determinism"])
        assert info.value.law == "totality"

    def test_unselected_laws_are_not_checked(self) -> None:
        """A reducer that only breaks JSON round trips passes when that law is left out."""
        store = counters(tuple_reducer)
        others = [law for law in ALL_LAWS if law is not Law.JSON_ROUND_TRIP]
        check_reducer(store, histories=counter_histories(store), laws=others, max_examples=50)
        with pytest.raises(ReducerLawError, match="json_round_trip"):
            check_history(store, [CREATED, INCREMENTED])

    def test_mutation_is_caught_only_when_compared_after_all_pushes(self) -> None:
        """The in-place mutation leaves totality, version tracking and determinism intact."""
        store = counters(mutating_reducer)
        history = [CREATED, INCREMENTED, RENAMED]
        check_history(store, history, laws=["totality", "version_tracking", "determinism"])
        with pytest.raises(ReducerLawError, match="incremental_equals_batch"):
            check_history(store, history, laws=["incremental_equals_batch"])

    def test_non_model_aggregates_fail_the_json_law_clearly(self) -> None:
        """An aggregate that is not a Pydantic model cannot round-trip; the message says so."""

        @dataclasses.dataclass(frozen=True)
        class Plain:
            aggregate_id: str
            version: int

        def reduce(plain: Plain | None, event: CounterEvent) -> Plain:
            return Plain(event.aggregate_id, event.version)

        store = counters(reduce)
        check_history(store, [CREATED, INCREMENTED], laws=ALL_LAWS[:-1])
        with pytest.raises(ReducerLawError, match="not a Pydantic model"):
            check_history(store, [CREATED, INCREMENTED], laws=["json_round_trip"])


class TestArguments:
    """Law selection, settings and history shape are validated."""

    def test_unknown_law_is_refused(self) -> None:
        """An unknown law name is a ValueError listing the known ones."""
        with pytest.raises(ValueError, match=r"unknown reducer law 'purity'.*totality"):
            check_reducer(counters(), laws=["purity"])

    def test_a_single_law_string_is_accepted(self) -> None:
        """``laws="totality"`` means that one law."""
        check_history(
            counters(forgets_version_on_increment), [CREATED, INCREMENTED], laws="totality"
        )

    @pytest.mark.parametrize(
        ("history", "message"),
        [
            ([], "at least one event"),
            ([CREATED, INCREMENTED.model_copy(update={"aggregate_id": "c2"})], "one aggregate"),
            ([CREATED, RENAMED, INCREMENTED], "must increase"),
            ([INCREMENTED, RENAMED], "starts at version 1"),
        ],
    )
    def test_bad_histories_are_refused(self, history: Sequence[Event], message: str) -> None:
        """Empty, mixed-aggregate, unordered or headless histories are a ValueError (one
        without its version 1 used to be checked, and blamed a correct reducer)."""
        with pytest.raises(ValueError, match=message):
            check_history(counters(), history)

    @pytest.mark.parametrize(("given", "expected"), [(None, 7), (3, 3)])
    def test_settings_and_max_examples(self, given: int | None, expected: int) -> None:
        """Settings are honoured; ``max_examples`` overrides theirs."""
        store = counters()
        seen: list[int] = []

        def record(history: list[Event]) -> list[Event]:
            seen.append(len(history))
            return history

        histories = counter_histories(store).map(record)
        check_reducer(
            store,
            histories=histories,
            settings=settings(max_examples=7, database=None, deadline=None),
            max_examples=given,
        )
        assert 1 <= len(seen) <= expected

    def test_custom_history_strategy(self) -> None:
        """Any strategy of histories may be checked, e.g. fixed ones."""
        store = counters(forgets_version_on_increment)
        with pytest.raises(ReducerLawError, match="version_tracking"):
            check_reducer(store, histories=st.just([CREATED, INCREMENTED]), max_examples=5)

    @pytest.mark.parametrize(
        ("store", "message"),
        [
            (None, r"check_reducer\(\) checks the reducer of an EventStore, got None"),
            ("COUNTERS", "got 'COUNTERS'"),
        ],
    )
    def test_check_reducer_refuses_what_is_not_a_store(self, store: Any, message: str) -> None:
        """A wrong first argument is a TypeError saying what is expected, not an
        AttributeError from deep inside."""
        with pytest.raises(TypeError, match=message):
            check_reducer(store, max_examples=1)

    def test_a_command_is_not_a_store(self) -> None:
        """Passing a command says to pass one of its stores."""
        store = counters()

        async def handler(value: Any, stores: Any) -> None:
            return None

        command: Command[Any, Any] = Command(
            command_id="C", required_event_stores=[store], handler=handler
        )
        with pytest.raises(TypeError, match="a Command: pass one of its required_event_stores"):
            check_reducer(command, max_examples=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="check_history"):
            check_history(command, [CREATED])  # type: ignore[arg-type]

    def test_histories_must_be_a_strategy(self) -> None:
        """A list of events given as ``histories=`` is refused with a hint."""
        with pytest.raises(TypeError, match="histories must be a Hypothesis strategy"):
            check_reducer(counters(), histories=[CREATED], max_examples=1)  # type: ignore[arg-type]

    def test_check_history_takes_the_json_a_law_error_shows(self) -> None:
        """The history a ReducerLawError prints can be pasted back into check_history."""
        store = counters(forgets_version_on_increment)
        with pytest.raises(ReducerLawError) as info:
            check_history(store, [CREATED, INCREMENTED])
        with pytest.raises(ReducerLawError, match="version_tracking"):
            check_history(store, info.value.events)
        check_history(counters(), info.value.events)

    @pytest.mark.parametrize(
        ("events", "error", "message"),
        [
            (CREATED, TypeError, "wrap a single event in a list"),
            ([CREATED, 3], TypeError, "event 2 of the history is a int"),
            ([{"aggregateId": "c1", "version": 1, "type": "NOPE"}], ValueError, "NOPE"),
            ('[{"aggregateId": "c1", "version": 1}]', TypeError, r"JSON text.*json\.loads"),
            (b"[]", TypeError, r"JSON text \(a bytes\).*json\.loads"),
        ],
        ids=["single event", "not an event", "unknown type", "JSON text", "JSON bytes"],
    )
    def test_check_history_refuses_what_is_not_a_history(
        self, events: Any, error: type[Exception], message: str
    ) -> None:
        """A lone event, a non-event, a mapping of an unknown type or JSON text is refused
        clearly (JSON text with the advice to parse it)."""
        with pytest.raises(error, match=message):
            check_history(counters(), events)


# -- what the laws never saw -------------------------------------------------------------


class Signed(BaseModel):
    """A cross-field rule that values derived field by field never meet."""

    body: str
    signature: str

    @model_validator(mode="after")
    def _signed(self) -> Signed:
        if self.signature != sign(self.body):
            raise ValueError("signature does not match body")
        return self


def sign(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:12]


class CounterScheduled(Event):
    type: Literal["COUNTER_SCHEDULED"] = "COUNTER_SCHEDULED"
    payload: Signed


def raises_on_schedule(counter: Counter | None, event: Any) -> Counter:
    """A reducer that raises on every event of the type generation cannot make."""
    if isinstance(event, CounterScheduled):
        raise KeyError("forgot COUNTER_SCHEDULED")
    return reduce_counter(counter, event)


def scheduling_counters() -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="SCHEDULED",
        event_types=[CounterCreated, CounterIncremented, CounterScheduled],
        reducer=raises_on_schedule,
    )


#: Derandomized, so that the rarely valid cases are the same on every run.
QUIET = settings(
    database=None,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


def rare_store(salt: int) -> EventStore[Any, Any]:
    """A store one of whose payloads is valid for about 5 values in 256."""

    class Rare(BaseModel):
        n: int

        @model_validator(mode="after")
        def _rare(self) -> Rare:
            if hashlib.sha256(f"{salt}:{self.n}".encode()).digest()[0] >= 5:
                raise ValueError("unlucky")
            return self

    class CounterTagged(Event):
        type: Literal["COUNTER_TAGGED"] = "COUNTER_TAGGED"
        payload: Rare

    def count(counter: Counter | None, event: Any) -> Counter:
        value = counter.value + 1 if counter is not None else 0
        return Counter(aggregate_id=event.aggregate_id, version=event.version, name="", value=value)

    return EventStore(
        event_store_id="RARE", event_types=[CounterCreated, CounterTagged], reducer=count
    )


class Ended(Event):
    """Two names; the second is always refused."""

    type: Literal["COUNTER_ENDED", "COUNTER_ABANDONED"] = "COUNTER_ENDED"

    @model_validator(mode="after")
    def _never_abandoned(self) -> Ended:
        if self.type == "COUNTER_ABANDONED":
            raise ValueError("counters are never abandoned")
        return self


def raises_on_abandoned(counter: Counter | None, event: Any) -> Counter:
    if event.type == "COUNTER_ABANDONED":
        raise KeyError("forgot COUNTER_ABANDONED")
    return Counter(aggregate_id=event.aggregate_id, version=event.version, name="", value=0)


class TestUncheckedEventTypes:
    """A type no history held, because its values were all refused, is not a pass."""

    def test_a_type_generation_cannot_make_fails_the_check(self) -> None:
        """The reducer raises on every COUNTER_SCHEDULED, which generation never made: the
        check fails naming the type, the refusing model and how to fix it."""
        store = scheduling_counters()
        with pytest.raises(UncheckedEventTypesError) as info:
            check_reducer(
                store, histories=cst.histories(store, first=["COUNTER_CREATED"]), max_examples=50
            )
        error = info.value
        assert isinstance(error, AssertionError)
        assert error.event_types == ("COUNTER_SCHEDULED",)
        (reason,) = error.reasons
        assert "Signed (CounterScheduled.payload)" in reason
        assert "signature does not match body" in reason
        assert "event_fields=" in reason

    def test_the_fix_the_error_gives_works(self) -> None:
        """With valid payloads given through event_fields, the reducer's bug is found."""
        store = scheduling_counters()
        signed = st.text().map(lambda body: Signed(body=body, signature=sign(body)))
        histories = cst.histories(
            store,
            first=["COUNTER_CREATED"],
            event_fields={"COUNTER_SCHEDULED": {"payload": signed}},
        )
        with pytest.raises(ReducerLawError, match="forgot COUNTER_SCHEDULED"):
            check_reducer(store, histories=histories, max_examples=50)

    def test_a_type_the_rules_leave_out_is_not_reported(self) -> None:
        """Rules that exclude the type on purpose never draw it: nothing to report."""
        store = scheduling_counters()
        histories = cst.histories(
            store,
            first=["COUNTER_CREATED"],
            can_follow=lambda previous, name: name == "COUNTER_INCREMENTED" or not previous,
        )
        check_reducer(store, histories=histories, max_examples=50)

    @pytest.mark.parametrize(
        "how",
        ["event_fields", "overrides"],
    )
    def test_a_payload_strategy_of_refused_values_is_still_reported(self, how: str) -> None:
        """A strategy given for the payload whose values its validator refuses (the signature
        left random) makes no event: reported, whichever strategy made the payload."""
        store = scheduling_counters()
        half_fixed = cst.models(Signed, body="x")
        histories = (
            cst.histories(
                store,
                first=["COUNTER_CREATED"],
                event_fields={"COUNTER_SCHEDULED": {"payload": half_fixed}},
            )
            if how == "event_fields"
            else cst.histories(store, first=["COUNTER_CREATED"], overrides={Signed: half_fixed})
        )
        with pytest.raises(UncheckedEventTypesError) as info:
            check_reducer(store, histories=histories, settings=QUIET, max_examples=50)
        assert info.value.event_types == ("COUNTER_SCHEDULED",)
        (reason,) = info.value.reasons
        assert "signature does not match body" in reason

    def test_a_rarely_valid_type_does_not_fail_a_correct_check(self) -> None:
        """A payload valid for about one value in fifty is no unchecked type: whether a
        short run happens to make one is luck, and a correct reducer must pass every time
        (ten differently rare payloads, each run derandomized)."""
        for salt in range(10):
            store = rare_store(salt)
            check_reducer(store, settings=QUIET, max_examples=20)

    def test_a_name_of_a_multi_name_class_is_reported_on_its_own(self) -> None:
        """A class with two names whose second is always refused is not covered by the
        first: the refused name alone is reported, as a name of its own."""
        store = EventStore(
            event_store_id="ENDINGS",
            event_types=[CounterCreated, Ended],
            reducer=raises_on_abandoned,
        )
        with pytest.raises(UncheckedEventTypesError) as info:
            check_reducer(store, settings=QUIET, max_examples=50)
        assert info.value.event_types == ("COUNTER_ABANDONED",)
        assert "COUNTER_ABANDONED" in info.value.reasons[0]

    def test_a_type_filtered_out_is_left_out_with_event_types(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A type the strategy filters out on purpose: event_types= says which types the
        check must cover, and the others are neither reported nor warned about."""
        store = scheduling_counters()
        histories = cst.histories(store, first=["COUNTER_CREATED"]).filter(
            lambda history: all(event.type != "COUNTER_SCHEDULED" for event in history)
        )
        check_reducer(
            store,
            histories=histories,
            settings=QUIET,
            max_examples=30,
            event_types=["COUNTER_CREATED", CounterIncremented],
        )
        assert "no checked history held" not in caplog.text
        with pytest.raises(ValueError, match="NOPE"):
            check_reducer(store, event_types=["NOPE"])

    def test_a_type_made_but_in_no_checked_history_is_a_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Events made and then filtered out by the strategy: a logged warning naming the
        type, not a failure."""
        store = counters()
        histories = counter_histories(store).filter(
            lambda history: all(event.type != "COUNTER_RENAMED" for event in history)
        )
        check_reducer(store, histories=histories, settings=QUIET, max_examples=30)
        assert "no checked history held an event of COUNTER_RENAMED" in caplog.text

    def test_a_type_that_merely_did_not_come_up_is_not_reported(self) -> None:
        """A handful of histories need not hold every type: only refusals count."""
        store = counters()
        seen: set[str] = set()

        def record(history: list[Event]) -> list[Event]:
            seen.update(event.type for event in history)
            return history

        check_reducer(store, histories=st.just([CREATED]).map(record), max_examples=3)
        assert seen == {"COUNTER_CREATED"}


class TestHints:
    """Failures say what usually causes them."""

    def test_a_reducer_mutating_the_previous_aggregate_is_told_so(self) -> None:
        """Appending to a list of a shallow model_copy is reported (by whichever law sees it
        first) with a hint that names in-place changes to the previous aggregate."""
        store = counters(mutating_reducer)
        with pytest.raises(ReducerLawError) as info:
            check_reducer(store, histories=counter_histories(store), max_examples=200)
        assert info.value.law in {"prefix_consistency", "incremental_equals_batch"}
        assert "changes the previous aggregate in place" in info.value.detail
        assert "model_copy" in info.value.detail


# -- the search for an event of a type the check's histories made none of -----------------


def tagging_store(salt: int, *, rarity: int, not_first: bool = False) -> EventStore[Any, Any]:
    """COUNTER_TAGGED payloads pass for ``rarity`` values in 65536; with ``not_first``, a
    tag is never valid as version 1 (a counter is created first)."""

    class Rare(BaseModel):
        n: int

        @model_validator(mode="after")
        def _rare(self) -> Rare:
            digest = hashlib.sha256(f"{salt}:{self.n}".encode()).digest()
            if digest[0] * 256 + digest[1] >= rarity:
                raise ValueError("unlucky")
            return self

    class CounterTagged(Event):
        type: Literal["COUNTER_TAGGED"] = "COUNTER_TAGGED"
        payload: Rare

        @model_validator(mode="after")
        def _not_first(self) -> CounterTagged:
            if not_first and self.version == 1:
                raise ValueError("a counter is created first")
            return self

    def count(counter: Counter | None, event: Any) -> Counter:
        return Counter(aggregate_id=event.aggregate_id, version=event.version, name="", value=0)

    return EventStore(
        event_store_id="TAGS", event_types=[CounterCreated, CounterTagged], reducer=count
    )


def closing_store(salt: int) -> EventStore[Any, Any]:
    """One class named COUNTER_ENDED and COUNTER_ABANDONED, valid for 200 values in 65536."""

    class Rare(BaseModel):
        n: int

        @model_validator(mode="after")
        def _rare(self) -> Rare:
            digest = hashlib.sha256(f"{salt}:{self.n}".encode()).digest()
            if digest[0] * 256 + digest[1] >= 200:
                raise ValueError("unlucky")
            return self

    class Closed(Event):
        type: Literal["COUNTER_ABANDONED", "COUNTER_ENDED"] = "COUNTER_ENDED"
        payload: Rare

    def close(counter: Counter | None, event: Any) -> Counter:
        return Counter(aggregate_id=event.aggregate_id, version=event.version, name="", value=0)

    return EventStore(event_store_id="CLOSING", event_types=[CounterCreated, Closed], reducer=close)


class TestTheSearch:
    """A type none of whose drawn events was made is searched for before it is reported."""

    @pytest.mark.parametrize("not_first", [False, True])
    def test_a_type_the_search_finds_only_warns(
        self, caplog: pytest.LogCaptureFixture, not_first: bool
    ) -> None:
        """The check's three histories make no tag (one value in a hundred passes), the
        search finds one: a warning, no failure, also for a type valid only after version 1,
        which the search draws where histories reach it."""
        store = tagging_store(0, rarity=600, not_first=not_first)
        histories = cst.histories(store, first=["COUNTER_CREATED"])
        check_reducer(store, histories=histories, settings=QUIET, max_examples=3)
        assert "no checked history held an event of COUNTER_TAGGED (0 made" in caplog.text

    def test_the_verdict_does_not_change_between_runs(self) -> None:
        """A type valid about once in a thousand values: the search may or may not find
        one, but the same check gives the same verdict every time (the search is
        derandomized, whatever the profile)."""
        verdicts = set()
        for _ in range(8):
            store = tagging_store(1, rarity=60)
            try:
                check_reducer(store, settings=QUIET, max_examples=10)
                verdicts.add("pass")
            except UncheckedEventTypesError:
                verdicts.add("unchecked")
        assert len(verdicts) == 1

    def test_a_name_the_rules_leave_out_is_not_reported_for_its_class(self) -> None:
        """COUNTER_ABANDONED is never drawn (the rules leave it out) while COUNTER_ENDED,
        its class's other name, is rarely valid: the left-out name is not reported."""
        for salt in range(4):
            store = closing_store(salt)
            histories = cst.histories(
                store,
                first=["COUNTER_CREATED"],
                can_follow=lambda _previous, name: name != "COUNTER_ABANDONED",
            )
            check_reducer(store, histories=histories, settings=QUIET, max_examples=10)

    def test_a_search_hypothesis_calls_flaky_only_warns(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A validator that accepts one event only, ever (state outside the event): the
        search's replay of what it found is refused and Hypothesis calls it flaky. The
        search could not tell: a warning saying so, not an error."""
        used: list[int] = []

        class Ticket(BaseModel):
            n: int

        class CounterIssued(Event):
            type: Literal["COUNTER_ISSUED"] = "COUNTER_ISSUED"
            payload: Ticket

            @model_validator(mode="after")
            def _once(self) -> CounterIssued:
                digest = hashlib.sha256(f"1:{self.payload.n}".encode()).digest()
                if used or digest[0] * 256 + digest[1] >= 600:
                    raise ValueError("taken")
                used.append(self.payload.n)
                return self

        store = EventStore(
            event_store_id="ISSUES",
            event_types=[CounterCreated, CounterIssued],
            reducer=reduce_counter,
        )
        histories = cst.histories(store, first=["COUNTER_CREATED"])
        check_reducer(store, histories=histories, settings=QUIET, max_examples=3)
        assert "could not tell whether one can be made: Flaky" in caplog.text
