from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest_plugins = ["pytester"]

PLUGIN = "castore_pydantic.testing.pytest_plugin"

# A test module for the inner pytest runs: a tiny store built in the test file itself.
DOMAIN = """
from typing import Literal

from castore_pydantic import Event, EventStore


class Appeared(Event):
    type: Literal["APPEARED"] = "APPEARED"


def reduce(state, event):
    return event.version


pokemons = EventStore(event_store_id="POKEMONS", event_types=[Appeared], reducer=reduce)
"""


def write_tests(pytester: pytest.Pytester, body: str, *, asyncio: bool = True) -> None:
    """Write the domain module and a test module using it into the pytester directory."""
    pytester.makepyfile(domain=DOMAIN, test_it=textwrap.dedent(body))
    options = "asyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    pytester.makeini(f"[pytest]\n{options if asyncio else ''}filterwarnings = error\n")


class TestFixtures:
    """The plugin's fixtures, as a project using them sees them."""

    def test_in_memory_adapter_is_fresh_per_test(self, pytester: pytest.Pytester) -> None:
        """Each test gets its own empty in-memory adapter."""
        write_tests(
            pytester,
            """
            from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
            from domain import Appeared, pokemons

            seen = []

            async def test_one(in_memory_adapter):
                assert isinstance(in_memory_adapter, InMemoryEventStorageAdapter)
                pokemons.event_storage_adapter = in_memory_adapter
                await pokemons.push_event(Appeared(aggregate_id="p", version=1))
                seen.append(in_memory_adapter)

            async def test_two(in_memory_adapter):
                pokemons.event_storage_adapter = in_memory_adapter
                assert (await pokemons.get_events("p")).events == []
                assert in_memory_adapter is not seen[0]
            """,
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)

    def test_mock_store_factory(self, pytester: pytest.Pytester) -> None:
        """``mock_store`` makes seeded copies and leaves the module-level store alone."""
        write_tests(
            pytester,
            """
            from castore_pydantic.testing import MockedEventStore
            from domain import Appeared, pokemons

            async def test_mock(mock_store):
                seed = {"aggregateId": "p", "version": 1, "type": "APPEARED"}
                mocked = mock_store(pokemons, [seed])
                assert isinstance(mocked, MockedEventStore)
                assert [e.version for e in (await mocked.get_events("p")).events] == [1]
                assert pokemons.event_storage_adapter is None
            """,
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)

    def test_mock_store_works_in_hypothesis_tests(self, pytester: pytest.Pytester) -> None:
        """Hypothesis refuses function-scoped fixtures in ``@given`` tests; the stateless
        ``mock_store`` is not one, so such a test runs (it used to fail a health check)."""
        write_tests(
            pytester,
            """
            import asyncio

            from hypothesis import given, settings, strategies as st
            from domain import pokemons

            @settings(max_examples=5, database=None)
            @given(st.integers(1, 3))
            def test_given(mock_store, count):
                mocked = mock_store(pokemons, [
                    {"aggregateId": "p", "version": v, "type": "APPEARED"}
                    for v in range(1, count + 1)
                ])
                events = asyncio.run(mocked.get_events("p")).events
                assert len(events) == count
            """,
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)

    def test_mute_store_restores_the_adapter(self, pytester: pytest.Pytester) -> None:
        """``mute_store`` mutes in place for one test and puts the original adapter back."""
        write_tests(
            pytester,
            """
            from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
            from domain import Appeared, pokemons

            ORIGINAL = InMemoryEventStorageAdapter()
            pokemons.event_storage_adapter = ORIGINAL

            async def test_muted(mute_store):
                mute_store(pokemons, [Appeared(aggregate_id="p", version=1)])
                mute_store(pokemons, [Appeared(aggregate_id="q", version=1)])
                assert pokemons.event_storage_adapter is not ORIGINAL
                assert (await pokemons.get_events("q")).events != []

            def test_restored():
                assert pokemons.event_storage_adapter is ORIGINAL
            """,
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)

    def test_invalid_seed_fails_the_test_that_wrote_it(self, pytester: pytest.Pytester) -> None:
        """A bad seed given to ``mock_store`` fails with a ValidationError in that test."""
        write_tests(
            pytester,
            """
            from domain import pokemons

            def test_bad_seed(mock_store):
                mock_store(pokemons, [{"aggregateId": "p", "version": 0, "type": "APPEARED"}])
            """,
        )
        result = pytester.runpytest("-p", "no:cacheprovider")
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(["*ValidationError*"])

    def test_project_fixture_of_the_same_name_wins(self, pytester: pytest.Pytester) -> None:
        """A project's own ``mock_store`` fixture overrides the plugin's."""
        pytester.makeconftest(
            """
            import pytest

            @pytest.fixture
            def mock_store():
                return "project's own"
            """
        )
        write_tests(
            pytester,
            """
            def test_own(mock_store):
                assert mock_store == "project's own"
            """,
        )
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


class TestLoading:
    """How the plugin is found and what loading it costs."""

    def test_explicit_opt_in_next_to_auto_loading(self, pytester: pytest.Pytester) -> None:
        """``pytest_plugins = [...]`` works while the entry point also loads the plugin."""
        pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]")
        write_tests(pytester, "def test_it(in_memory_adapter):\n    assert in_memory_adapter\n")
        pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)

    def test_explicit_opt_in_without_auto_loading(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With plugin auto-loading disabled, opting in through a conftest provides fixtures."""
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        pytester.makeconftest(f"pytest_plugins = [{PLUGIN!r}]")
        body = "def test_it(mock_store):\n    assert callable(mock_store)\n"
        write_tests(pytester, body, asyncio=False)
        pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)

    def test_without_auto_loading_and_opt_in_there_are_no_fixtures(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Negative control: without the plugin, the fixtures do not exist."""
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        write_tests(pytester, "def test_it(mock_store):\n    pass\n", asyncio=False)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*fixture 'mock_store' not found*"])

    def test_auto_loaded_for_projects_that_do_not_use_it(self, pytester: pytest.Pytester) -> None:
        """An unrelated test suite passes with the plugin auto-loaded, and it is listed."""
        pytester.makepyfile(test_plain="def test_plain():\n    assert 1 + 1 == 2\n")
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--trace-config")
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([f"*{PLUGIN}*"])

    def test_loading_imports_no_hypothesis_or_driver(self) -> None:
        """Importing the plugin pulls in neither Hypothesis nor a database or broker driver."""
        code = textwrap.dedent(
            f"""
            import sys
            import {PLUGIN}
            heavy = ("hypothesis", "psycopg", "psycopg_pool", "aio_pika", "redis", "sqlite3")
            print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        assert out.strip() == "[]"
