"""Reach the real services the suite runs against, or skip (fail under CASTORE_REQUIRE_SERVICES=1).

On a developer's laptop a missing PostgreSQL, Redis or RabbitMQ skips the tests that need it,
with the reason. CI sets ``CASTORE_REQUIRE_SERVICES=1``: there an unreachable service fails
the test instead, so a green run always means the real backends were exercised.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

POSTGRES_HOST = os.environ.get("CASTORE_TEST_PG_HOST", "127.0.0.1")
POSTGRES_PORT = int(os.environ.get("CASTORE_TEST_PG_PORT", "5432"))
REDIS_HOST = os.environ.get("CASTORE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CASTORE_TEST_REDIS_PORT", "6379"))
RABBITMQ_HOST = os.environ.get("CASTORE_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("CASTORE_TEST_RABBITMQ_PORT", "5672"))


def services_required() -> bool:
    """Whether an unreachable service must fail the run (CI) rather than skip."""
    return os.environ.get("CASTORE_REQUIRE_SERVICES", "") not in ("", "0", "false")


def is_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test (or fail it under CASTORE_REQUIRE_SERVICES) if unreachable."""
    if is_reachable(host, port):
        return
    reason = f"{name} is not reachable at {host}:{port}"
    if services_required():
        pytest.fail(f"{reason} and CASTORE_REQUIRE_SERVICES is set", pytrace=False)
    pytest.skip(reason)


def require_command(name: str, needed_for: str) -> None:
    """Skip the calling test (or fail it under CASTORE_REQUIRE_SERVICES) without ``name``."""
    if shutil.which(name) is not None:
        return
    reason = f"{name} is not on the PATH ({needed_for})"
    if services_required():
        pytest.fail(f"{reason} and CASTORE_REQUIRE_SERVICES is set", pytrace=False)
    pytest.skip(reason)


def require_postgres() -> None:
    """Skip or fail when PostgreSQL is not reachable."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)


def require_redis() -> None:
    """Skip or fail when Redis is not reachable."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)


def require_rabbitmq() -> None:
    """Skip or fail when RabbitMQ is not reachable."""
    require_service("RabbitMQ", RABBITMQ_HOST, RABBITMQ_PORT)
