"""Marking the contract suites' async tests for pytest-asyncio."""

from __future__ import annotations

import inspect
from typing import TypeVar

import pytest

__all__ = ["async_tests"]

_C = TypeVar("_C", bound=type)


def async_tests(cls: _C) -> _C:
    """Mark each ``async def test_...`` of ``cls`` with ``pytest.mark.asyncio``.

    Marking the class instead would reach the synchronous tests an adapter author adds to
    a subclass, which pytest-asyncio then warns about (an error under ``-W error``).
    """
    for name, member in list(vars(cls).items()):
        if name.startswith("test_") and inspect.iscoroutinefunction(member):
            setattr(cls, name, pytest.mark.asyncio(member))
    return cls
