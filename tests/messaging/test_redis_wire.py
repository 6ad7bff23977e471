"""How the Redis adapters read entry bodies: the same messages and errors as the channel's."""

from __future__ import annotations

import pytest

from castore_pydantic.messaging._redis_wire import redact


class TestRedact:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
        ],
    )
    def test_hides_the_password(self, url: str, shown: str) -> None:
        """A URL's password is replaced by *** and nothing else changes."""
        assert redact(url) == shown
