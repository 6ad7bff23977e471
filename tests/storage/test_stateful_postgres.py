"""The PostgreSQL adapter against the stateful model of the storage contract."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres

pytestmark = pytest.mark.postgres

SETTINGS = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
DSN = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname=test"


def test_postgres_matches_the_model() -> None:
    """Random pushes, groups, reads and listings on one table agree with the model."""
    require_postgres()
    from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
    from castore_pydantic.testing.contracts import make_adapter_state_machine

    table = f"stateful_{uuid.uuid4().hex[:12]}"

    async def on_table(action: str) -> None:
        async with PostgresEventStorageAdapter(DSN, table_name=table) as adapter:
            await getattr(adapter, action)()

    async def make_adapter() -> PostgresEventStorageAdapter:
        # One table for the whole run: each example uses event store ids of its own.
        return PostgresEventStorageAdapter(DSN, table_name=table, min_size=1, max_size=2)

    asyncio.run(on_table("create_event_table"))
    try:
        machine = make_adapter_state_machine(
            make_adapter, peer_factory=make_adapter, name="PostgresStateMachine"
        )
        run_state_machine_as_test(machine, settings=SETTINGS)
    finally:
        asyncio.run(on_table("drop_event_table"))
