"""Numbers through ``jsonb``: what is pushed reads back as the same value of the same type."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.errors import EventLimitExceededError
from castore_pydantic.storage import _postgres_jsonb as jsonb
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from tests.storage.postgres_support import DSN, fetch, make_table, pg_schema

__all__ = ["pg_schema"]  # the fixture is used by name

#: Floats pydantic writes with a positive exponent, and the extremes of the doubles.
EDGE_FLOATS = [
    1e20,
    1.2345678901234567e19,
    1e16,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    -1e20,
    1.5e300,
    0.0,
]


class Reading(BaseModel):
    """A value that may be an int or a float, and free-form attributes."""

    value: float | int
    extra: dict[str, Any]


class Measured(Event):
    """A typed payload whose fields keep whatever number type they are given."""

    type: Literal["MEASURED"] = "MEASURED"
    payload: Reading


class Sensor(BaseModel):
    """Readings written with JSON's missing constants: ``-Infinity``, ``Infinity``, ``NaN``."""

    model_config = ConfigDict(ser_json_inf_nan="constants")

    note: str
    values: list[float]


class Sensed(Event):
    """An event whose payload may hold non-finite floats."""

    type: Literal["SENSED"] = "SENSED"
    payload: Sensor


class Anything(Event):
    """Any JSON value as payload and metadata."""

    type: Literal["ANYTHING"] = "ANYTHING"
    payload: Any = None
    metadata: dict[str, Any] | None = None


def _reduce(aggregate: Aggregate | None, event: Measured | Anything | Sensed) -> Aggregate:
    return Aggregate(aggregate_id=event.aggregate_id, version=event.version)


def _store(
    adapter: PostgresEventStorageAdapter,
) -> EventStore[Aggregate, Measured | Anything | Sensed]:
    return EventStore(
        event_store_id="NUMBERS",
        event_types=[Measured, Anything, Sensed],
        reducer=_reduce,
        event_storage_adapter=adapter,
    )


def _typed(value: Any) -> Any:
    """``value`` with the type of every number beside it: equal only if types match too."""
    if isinstance(value, dict):
        return {key: _typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_typed(item) for item in value]
    return (type(value).__name__, value)


_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
#: Strings that look like the numbers the adapter rewrites: they must stay strings.
_NUMBER_LIKE = st.from_regex(r"-?[0-9]{1,3}(\.[0-9]{1,3})?[eE][+-]?[0-9]{1,3}", fullmatch=True)
_SCALARS = (
    st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(EDGE_FLOATS)
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | _NUMBER_LIKE
    | _TEXT
    | st.booleans()
    | st.none()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(_TEXT | _NUMBER_LIKE, children, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for all of a test's examples (the adapter's pool lives on it)."""
    with asyncio.Runner() as loop:
        yield loop


@pytest.fixture
def adapter(pg_schema: str, runner: asyncio.Runner) -> Iterator[PostgresEventStorageAdapter]:
    """An adapter on a fresh table, closed afterwards."""
    table = runner.run(make_table(pg_schema))
    made = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table, max_size=2)
    yield made
    runner.run(made.aclose())


@pytest.mark.postgres
class TestNumbersReadBackUnchanged:
    """A pushed number reads back as the same number of the same type (int stays int)."""

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(payload=_VALUES, metadata=st.dictionaries(_TEXT, _VALUES, max_size=3))
    @example(payload=EDGE_FLOATS, metadata={"3e45": "1e+20", "raw": 1.2345678901234567e19})
    @example(payload={"zeta": 1, "alpha": -0.0, "big": 10**30}, metadata={})
    def test_any_json_value_through_push_group_and_force(
        self,
        runner: asyncio.Runner,
        adapter: PostgresEventStorageAdapter,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        """Floats of any size (jsonb stored 1e20 as the integer 100000000000000000000),
        ints, and strings that look like numbers read back equal and of the same type,
        whether pushed alone, in a group or over a stored version with force."""
        event_metadata = metadata or None
        store = _store(adapter)

        async def check() -> None:
            alone, forced, grouped = (f"{kind}-{uuid.uuid4().hex}" for kind in "afg")
            pushed = Anything(
                aggregate_id=alone, version=1, payload=payload, metadata=event_metadata
            )
            await store.push_event(pushed)
            await store.push_event(Anything(aggregate_id=forced, version=1, payload="before"))
            await store.push_event(pushed.model_copy(update={"aggregate_id": forced}), force=True)
            await EventStore.push_event_group(
                store.group_event(pushed.model_copy(update={"aggregate_id": grouped})),
                store.group_event(Anything(aggregate_id=grouped, version=2, payload=[payload])),
            )
            for aggregate_id in (alone, forced, grouped):
                read = (await store.get_events(aggregate_id)).events[0]
                assert _typed(read.payload) == _typed(payload)
                assert _typed(read.metadata) == _typed(event_metadata)
            second = (await store.get_events(grouped, min_version=2)).events[0]
            assert _typed(second.payload) == _typed([payload])

        runner.run(check())

    @pytest.mark.parametrize("value", EDGE_FLOATS)
    async def test_a_float_or_int_field_keeps_floats_floats(
        self, pg_schema: str, value: float
    ) -> None:
        """A ``float | int`` field read back 1e20 as an int, and 1.2345678901234567e19 as a
        different number; jsonb now holds them with a fractional part."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as made:
            store = _store(made)
            pushed = Measured(
                aggregate_id="s1", version=1, payload=Reading(value=value, extra={"raw": value})
            )
            stored = (await store.push_event(pushed)).event
            (read,) = (await store.get_events("s1")).events
        assert read == stored
        assert type(read.payload.value) is float
        assert type(read.payload.extra["raw"]) is float
        ((text,),) = await fetch(f'SELECT data::text FROM "{pg_schema}"."{table}"')
        assert json.loads(text)["value"] == value  # with a fraction: a float to any reader
        assert type(json.loads(text)["value"]) is float

    async def test_jsonb_holds_the_positional_form(self, pg_schema: str) -> None:
        """1e20 is stored as 100000000000000000000.0; a string "1e+20" as it was."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as made:
            await _store(made).push_event(
                Anything(aggregate_id="x", version=1, payload=[1e20, "1e+20", 10**20])
            )
        ((stored,),) = await fetch(f'SELECT data::text FROM "{pg_schema}"."{table}"')
        assert stored == '[100000000000000000000.0, "1e+20", 100000000000000000000]'

    async def test_non_finite_floats_are_refused_at_once(self, pg_schema: str) -> None:
        """A -Infinity after 8,000 floats is refused at once as unstorable; nothing is written."""
        table = await make_table(pg_schema)
        event = Sensed(
            aggregate_id="s1",
            version=1,
            payload=Sensor(note="sensor 1e+5", values=[1.5] * 8000 + [-math.inf]),
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as made:
            store = _store(made)
            with pytest.raises(EventLimitExceededError):
                await made.push_event(event, store.context)
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]


class TestJsonbText:
    """The text written to jsonb: only exponent-form numbers that would lose their fraction."""

    @pytest.mark.parametrize(
        ("text", "written"),
        [
            ("1e+20", "100000000000000000000.0"),
            ("-1.2345678901234567e+19", "-12345678901234567000.0"),
            ('{"a":[1.5e+1,2.5e-7,1e-0,0e+5]}', '{"a":[15.0,2.5e-7,1.0,0.0]}'),
            ('{"3e+45":"1e+20","x\\"1e+2":1e+2}', '{"3e+45":"1e+20","x\\"1e+2":100.0}'),
            ('{"k\\\\":"a\\\\\\"1e+5","m":[1e+3]}', '{"k\\\\":"a\\\\\\"1e+5","m":[1000.0]}'),
            ("[1.25e+1,1.0,-0.0,12345678901234567890,1.5]", None),
            ('"e+"', None),
            ("[1e+0002,2E+1]", "[100.0,20.0]"),
            ('{"note":"id 3e+45","values":[-Infinity]}', None),
            ('{"values":[1e+20,-Infinity],"note":"1e+5"}', None),
            (
                '{"note":"id 3e+45","values":[1e+2,Infinity,NaN]}',
                '{"note":"id 3e+45","values":[100.0,Infinity,NaN]}',
            ),
        ],
    )
    def test_only_numbers_that_jsonb_makes_integers_change(
        self, text: str, written: str | None
    ) -> None:
        """Strings (keys and values) never change, nor numbers that keep a fraction."""
        assert jsonb.jsonb_text(text) == (text if written is None else written)

    def test_a_large_text_it_cannot_read_is_returned_as_it_is(self) -> None:
        """300 kB of numbers, then -Infinity: returned unchanged in one pass (was quadratic)."""
        text = '{"note":"id 3e+45","values":[' + "1.5," * 75_000 + "-Infinity]}"
        assert jsonb.jsonb_text(text) == text

    def test_an_exponent_of_thousands_of_digits_is_left_as_it_is(self) -> None:
        """An exponent past int()'s 4,300 digits stays as it is; later numbers are still read."""
        huge = "1e+" + "1" * 5000
        assert jsonb.jsonb_text(f"[{huge},1e+2]") == f"[{huge},100.0]"

    def test_exponents_without_a_plus_are_found_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Where pydantic-core writes 1e20 without a '+', a regular expression finds it."""
        monkeypatch.setattr(jsonb, "_may_lose_fraction", jsonb._any_form)
        assert jsonb.jsonb_text('[1e20,"3e45",1E5]') == '[100000000000000000000.0,"3e45",100000.0]'
        assert jsonb.jsonb_text('[1e-7,"a"]') == '[1e-7,"a"]'

    @settings(max_examples=2000)
    @given(value=st.floats(allow_nan=False, allow_infinity=False))
    def test_every_float_keeps_its_exact_value(self, value: float) -> None:
        """The positional text of any double parses back to exactly that double."""
        for text in (repr(value), repr(value).replace("e+", "e")):
            written = jsonb._NEXT_EXPONENT.sub(jsonb._positional, text)
            assert float(written) == value
            assert math.copysign(1.0, float(written)) == math.copysign(1.0, value)
