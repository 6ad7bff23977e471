from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from castore_pydantic.messaging import MessageChannel
from castore_pydantic.messaging.memory import InMemoryMessageQueueAdapter
from castore_pydantic.testing.contracts import MessageAdapterFactory, MessageQueueAdapterContract


class TestInMemoryQueueContract(MessageQueueAdapterContract):
    """The in-memory queue adapter honours the public message queue contract."""

    @pytest.fixture
    async def queue_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        adapters: list[InMemoryMessageQueueAdapter] = []

        async def make(
            channel: MessageChannel[Any],
            *,
            retry_attempts: int,
            retry_delay_in_ms: float,
            retry_backoff_rate: float,
        ) -> InMemoryMessageQueueAdapter:
            adapter = InMemoryMessageQueueAdapter.attach_to(
                channel,
                retry_attempts=retry_attempts,
                retry_delay_in_ms=retry_delay_in_ms,
                retry_backoff_rate=retry_backoff_rate,
            )
            adapters.append(adapter)
            return adapter

        yield make
        for adapter in adapters:
            await adapter.aclose()
