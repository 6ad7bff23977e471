"""The public contract suites run under pytest-asyncio's strict mode, its default."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

STRICT = "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"


def test_storage_and_queue_contracts_pass_in_strict_mode(pytester: pytest.Pytester) -> None:
    """An adapter author's tests, written as the docs show, pass without ``asyncio_mode =
    auto``, next to synchronous tests of the author's own. (Every test of the suites used
    to error or fail in strict mode; then a class-wide mark reached the author's sync
    tests.)"""
    pytester.makeini(STRICT + "filterwarnings = error\n")
    pytester.makepyfile(
        test_contracts=textwrap.dedent(
            """
            import pytest_asyncio

            from castore_pydantic.messaging.memory import InMemoryMessageQueueAdapter
            from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
            from castore_pydantic.testing.contracts import (
                EventStorageAdapterContract,
                MessageQueueAdapterContract,
            )


            class TestMemoryStorage(EventStorageAdapterContract):
                @pytest_asyncio.fixture
                async def adapter_factory(self):
                    shared = InMemoryEventStorageAdapter()

                    async def make():
                        return shared

                    yield make

                def test_an_authors_own_sync_check(self):
                    # Not marked asyncio by the suite (a warning, an error here).
                    assert InMemoryEventStorageAdapter() is not None


            class TestMemoryQueue(MessageQueueAdapterContract):
                delivery_timeout = 5.0

                @pytest_asyncio.fixture
                async def queue_adapter_factory(self):
                    adapters = []

                    async def make(channel, **retry):
                        adapter = InMemoryMessageQueueAdapter.attach_to(channel, **retry)
                        adapters.append(adapter)
                        return adapter

                    yield make
                    for adapter in adapters:
                        await adapter.aclose()
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 50, result.stdout.str()[-2000:]
    assert not {"failed", "errors", "error", "skipped"} & outcomes.keys(), outcomes
