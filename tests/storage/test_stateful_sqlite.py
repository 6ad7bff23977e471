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

    machine = make_adapter_state_machine(make_adapter, name="SQLiteFileStateMachine")
    run_state_machine_as_test(machine, settings=SETTINGS)
