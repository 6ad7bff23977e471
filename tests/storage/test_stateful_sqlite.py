"""The SQLite adapter against the stateful model of the storage contract."""

from __future__ import annotations

from pathlib import Path

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from castore_pydantic.testing.contracts import make_adapter_state_machine

SETTINGS = settings(max_examples=200, stateful_step_count=50, deadline=None)


def test_file_database_matches_the_model(tmp_path: Path) -> None:
    """Random pushes, groups, reads and listings on one WAL file agree with the model."""
    path = tmp_path / "events.db"

    async def make_adapter() -> SQLiteEventStorageAdapter:
        # Every example opens the same file; its event store ids are new, so no reset.
        return SQLiteEventStorageAdapter(path)

    machine = make_adapter_state_machine(
        make_adapter, peer_factory=make_adapter, name="SQLiteFileStateMachine"
    )
    run_state_machine_as_test(machine, settings=SETTINGS)


def test_the_factory_makes_one_adapter_per_example(tmp_path: Path) -> None:
    """The machine made a second adapter with the factory once a group came, although the
    factory is documented to be called once per example: a factory that resets its
    storage for each example (or creates a table) broke a correct adapter. A second
    instance now comes only from peer_factory."""
    calls: list[int] = []
    examples: list[int] = []

    async def make_adapter() -> SQLiteEventStorageAdapter:
        calls.append(1)
        return SQLiteEventStorageAdapter(tmp_path / "events.db")

    machine = make_adapter_state_machine(make_adapter, name="SQLiteOnceStateMachine")

    class Counting(machine):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__()
            examples.append(1)

    run_state_machine_as_test(
        Counting, settings=settings(max_examples=20, stateful_step_count=30, deadline=None)
    )
    assert len(calls) == len(examples) > 0
