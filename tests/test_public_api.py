from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import castore_pydantic
from castore_pydantic import errors

PUBLIC_API = [
    "RESERVED_EVENT_TYPES",
    "Aggregate",
    "AggregateIdEntry",
    "AggregateNotFoundError",
    "CastoreError",
    "Command",
    "Event",
    "EventAlreadyExistsError",
    "EventLimits",
    "EventStore",
    "EventStoreContext",
    "GetAggregateResult",
    "GetEventsResult",
    "GetExistingAggregateResult",
    "GroupedEvent",
    "ListAggregateIdsResult",
    "OnEventAlreadyExistsContext",
    "PushEventGroupResult",
    "PushEventResult",
    "Reducer",
    "Timestamp",
    "UndefinedEventStorageAdapterError",
    "is_event_already_exists_error",
]


class TestPublicSurface:
    def test_all_is_pinned(self) -> None:
        """The top-level public names are exactly the pinned list."""
        assert castore_pydantic.__all__ == PUBLIC_API

    def test_all_is_sorted_and_importable(self) -> None:
        """__all__ is sorted (constants, classes, functions) and every name resolves."""

        def isort_key(name: str) -> tuple[int, str]:
            kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
            return (kind, name)

        assert castore_pydantic.__all__ == sorted(castore_pydantic.__all__, key=isort_key)
        for name in castore_pydantic.__all__:
            assert getattr(castore_pydantic, name) is not None

    def test_no_private_module_leaks(self) -> None:
        """Nothing public is defined only in a private module without being exported."""
        # "@..." names are planted by pytest's assertion rewriting, not by the package.
        public = {n for n in dir(castore_pydantic) if not n.startswith(("_", "@"))}
        assert public - set(PUBLIC_API) <= {
            "errors", "storage", "testing", "messaging", "dam", "cli",
        }  # fmt: skip

    def test_every_error_descends_from_castore_error(self) -> None:
        """Every exception in errors.py is a CastoreError and is listed in the tree."""
        doc = errors.__doc__ or ""
        for name in errors.__all__:
            obj = getattr(errors, name)
            if isinstance(obj, type):
                assert issubclass(obj, errors.CastoreError)
                assert name in doc, f"{name} missing from the tree in errors.py's docstring"

    def test_errors_subclass_the_natural_builtin(self) -> None:
        """Errors also subclass the builtin that fits them."""
        assert issubclass(errors.EventAlreadyExistsError, ValueError)
        assert issubclass(errors.AggregateNotFoundError, LookupError)
        assert issubclass(errors.StorageUnavailableError, ConnectionError)

    def test_importing_the_package_imports_no_driver(self) -> None:
        """import castore_pydantic pulls in no database or broker driver."""
        code = (
            "import sys, castore_pydantic, castore_pydantic.storage, castore_pydantic.errors; "
            "print(','.join(m for m in ('psycopg', 'psycopg_pool', 'aio_pika', 'redis', "
            "'asyncpg', 'hypothesis', 'click', 'rich') if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert out == ""

    def test_errors_module_is_reimportable(self) -> None:
        """The errors module is a plain public module."""
        assert importlib.import_module("castore_pydantic.errors") is errors


@pytest.mark.parametrize(
    ("missing", "module", "advice"),
    [
        ("hypothesis", "castore_pydantic.testing.strategies", "castore-pydantic[testing]'"),
        ("hypothesis", "castore_pydantic.testing.laws", "castore-pydantic[testing]'"),
        ("hypothesis", "castore_pydantic.testing.contracts", "pytest pytest-asyncio"),
        ("pytest_asyncio", "castore_pydantic.testing.contracts", "pytest pytest-asyncio"),
    ],
)
def test_testing_tools_name_what_to_install(missing: str, module: str, advice: str) -> None:
    """Without the packages a test tool needs, importing it says what to install (it was a
    bare ModuleNotFoundError; the contracts also need pytest and pytest-asyncio, which the
    ``testing`` extra does not bring)."""
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith(f"ImportError {module} needs "), out
    assert "install them with: pip install 'castore-pydantic[testing]'" in out or (
        "install it with: pip install 'castore-pydantic[testing]'" in out
    ), out
    assert out.rstrip().endswith(advice), out
