"""Public, reusable contract test suites for adapters (ours and third parties').

Subclass a contract in your own test module and override its factory fixture; see each class's
docstring. The suites need pytest and pytest-asyncio (strict or auto mode); declare async
factory fixtures with ``pytest_asyncio.fixture``.
"""

try:
    import hypothesis  # noqa: F401 - only checked here
    import pytest  # noqa: F401
    import pytest_asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"castore_pydantic.testing.contracts needs pytest, pytest-asyncio and Hypothesis "
        f"({exc.name} is missing); install them with: "
        "pip install 'castore-pydantic[testing]' pytest pytest-asyncio"
    ) from exc

from castore_pydantic.testing.contracts._messaging import (
    MessageAdapterFactory,
    MessageBusAdapterContract,
    MessageQueueAdapterContract,
)
from castore_pydantic.testing.contracts._stateful import (
    EventStorageAdapterStateMachine,
    make_adapter_state_machine,
)
from castore_pydantic.testing.contracts._storage import AdapterFactory, EventStorageAdapterContract

__all__ = [
    "AdapterFactory",
    "EventStorageAdapterContract",
    "EventStorageAdapterStateMachine",
    "MessageAdapterFactory",
    "MessageBusAdapterContract",
    "MessageQueueAdapterContract",
    "make_adapter_state_machine",
]
