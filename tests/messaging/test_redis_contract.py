"""The public messaging contracts, run against the Redis Streams adapters and a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from castore_pydantic.messaging import MessageChannel
from castore_pydantic.messaging.redis import RedisMessageBusAdapter, RedisMessageQueueAdapter
from castore_pydantic.testing.contracts import (
    MessageAdapterFactory,
    MessageBusAdapterContract,
    MessageQueueAdapterContract,
)
from tests.messaging.redis_support import REDIS_URL, private_prefix

pytestmark = [pytest.mark.redis]


async def _factory(
    adapter_class: type[RedisMessageQueueAdapter] | type[RedisMessageBusAdapter],
) -> AsyncIterator[MessageAdapterFactory]:
    async with private_prefix() as prefix:
        adapters: list[Any] = []

        async def make(
            channel: MessageChannel[Any],
            *,
            retry_attempts: int,
            retry_delay_in_ms: float,
            retry_backoff_rate: float,
        ) -> Any:
            adapter = adapter_class.attach_to(
                channel,
                REDIS_URL,
                retry_attempts=retry_attempts,
                retry_delay_in_ms=retry_delay_in_ms,
                retry_backoff_rate=retry_backoff_rate,
                key_prefix=prefix,
                block_ms=100,
            )
            await adapter.__aenter__()
            adapters.append(adapter)
            return adapter

        yield make
        for adapter in adapters:
            await adapter.purge()
            await adapter.aclose()


class TestRedisMessageQueueContract(MessageQueueAdapterContract):
    @pytest.fixture
    async def queue_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        async for factory in _factory(RedisMessageQueueAdapter):
            yield factory


class TestRedisMessageBusContract(MessageBusAdapterContract):
    @pytest.fixture
    async def bus_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        async for factory in _factory(RedisMessageBusAdapter):
            yield factory
