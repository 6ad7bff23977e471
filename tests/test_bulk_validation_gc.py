"""Large batches of stored events are validated with the cyclic GC paused, and only then.

A payload validator records whether the collector is running while Pydantic validates it,
so these tests see the pause from inside the validation call.
"""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel, field_validator

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import StoredEventValidationError
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

SEEN: list[bool] = []


class Reading(BaseModel):
    value: int
    note: str

    @field_validator("value")
    @classmethod
    def record_collector(cls, value: int) -> int:
        SEEN.append(gc.isenabled())
        return value


class Measured(Event):
    type: Literal["MEASURED"] = "MEASURED"
    payload: Reading


def store() -> EventStore[Any, Measured]:
    return EventStore(
        event_store_id="METERS",
        event_types=[Measured],
        reducer=lambda aggregate, event: aggregate,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


def rows(count: int, bad: int | None = None) -> list[dict[str, Any]]:
    return [
        {
            "aggregateId": "m1",
            "version": v,
            "type": "MEASURED",
            "timestamp": "2026-01-01T00:00:00.000Z",
            "payload": {"value": "not a number" if v == bad else v, "note": "x" * 200},
        }
        for v in range(1, count + 1)
    ]


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    """Each test starts with the collector running and leaves it as it found it."""
    was = gc.isenabled()
    gc.enable()
    SEEN.clear()
    yield
    if not was:
        gc.disable()


class TestPause:
    def test_a_large_json_batch_is_validated_with_the_collector_paused(self) -> None:
        events = store().context.parse_events_json(json.dumps(rows(500)))
        assert len(events) == 500
        assert len(SEEN) == 500
        assert not any(SEEN)
        assert gc.isenabled()

    def test_a_large_batch_of_rows_is_validated_with_the_collector_paused(self) -> None:
        events = store().context.parse_events(rows(300))
        assert len(events) == 300
        assert len(SEEN) == 300
        assert not any(SEEN)
        assert gc.isenabled()

    @pytest.mark.parametrize("count", [1, 20])
    def test_small_batches_leave_the_collector_alone(self, count: int) -> None:
        context = store().context
        context.parse_events_json(json.dumps(rows(count)))
        context.parse_events(rows(count))
        assert len(SEEN) == 2 * count
        assert all(SEEN)

    def test_the_collector_runs_again_after_a_batch_that_fails(self) -> None:
        with pytest.raises(StoredEventValidationError):
            store().context.parse_events_json(json.dumps(rows(500, bad=250)))
        assert gc.isenabled()

    def test_a_collector_the_application_stopped_stays_stopped(self) -> None:
        gc.disable()
        store().context.parse_events_json(json.dumps(rows(500)))
        assert not gc.isenabled()

    def test_threads_validating_at_once_leave_the_collector_running(self) -> None:
        context = store().context
        text = json.dumps(rows(500))
        start = threading.Barrier(4)
        failures: list[BaseException] = []

        def work() -> None:
            try:
                start.wait()
                for _ in range(10):
                    assert len(context.parse_events_json(text)) == 500
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert len(SEEN) == 4 * 10 * 500
        assert not any(SEEN), "a thread validated while another had restarted the collector"
        assert gc.isenabled()
