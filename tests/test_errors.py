"""Every error survives pickling: a worker process can raise it to its parent."""

from __future__ import annotations

import asyncio
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor

import pytest

from castore_pydantic import errors

EXAMPLES: list[errors.CastoreError] = [
    errors.EventAlreadyExistsError("POKEMONS", "pikachu", 2),
    errors.AggregateNotFoundError("POKEMONS", "pikachu"),
    errors.UndefinedEventStorageAdapterError("POKEMONS"),
    errors.UndefinedMessageChannelAdapterError("bus", "POKEMON_BUS"),
    errors.MessageChannelEventStoreNotFoundError("bus", "POKEMON_BUS", "TRAINERS"),
    errors.ReservedEventTypeError("__REPLAYED__"),
    errors.UnknownEventTypeError("POKEMONS", "NOPE", ["POKEMON_APPEARED"]),
    errors.EventLimitExceededError("POKEMONS", "too deep", ("payload", "a", 3)),
    errors.StoredEventValidationError("POKEMONS", "pikachu", 7),
    errors.InvalidPageTokenError("not JSON"),
    errors.EventGroupError("empty"),
    errors.StorageError("disk on fire"),
    errors.StorageUnavailableError("connection lost", outcome_unknown=True),
    errors.MessagingError("broker said no"),
    errors.MessageBrokerUnavailableError("broker gone"),
    errors.NoStrategyError(complex, "Order.total", "no strategy"),
    errors.ReducerLawError("determinism", "POKEMONS", "two results", [{"version": 1}]),
    errors.UncheckedEventTypesError("POKEMONS", ["POKEMON_CAUGHT"], ["always refused"]),
]


def test_every_public_error_class_has_an_example() -> None:
    public = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and name != "CastoreError"
    }
    assert {type(error).__name__ for error in EXAMPLES} == public


@pytest.mark.parametrize("error", EXAMPLES, ids=lambda error: type(error).__name__)
def test_an_error_pickles_to_an_equal_one(error: errors.CastoreError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)


def _raise(index: int) -> None:
    raise EXAMPLES[index]


async def test_an_error_raised_in_a_worker_process_reaches_the_parent() -> None:
    index = next(i for i, e in enumerate(EXAMPLES) if type(e) is errors.StoredEventValidationError)
    with ProcessPoolExecutor(max_workers=1) as pool:
        future = asyncio.get_running_loop().run_in_executor(pool, _raise, index)
        with pytest.raises(errors.StoredEventValidationError) as info:
            await future
    assert (info.value.aggregate_id, info.value.version) == ("pikachu", 7)


class AppConflict(errors.EventAlreadyExistsError):
    """An application's subclass without a constructor of its own."""


class AppFailure(errors.StorageError):
    """An application's subclass with its own constructor, holding something unpicklable."""

    def __init__(self, reason: str, lock: object) -> None:
        self.lock = lock
        super().__init__(reason)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), None))


def test_application_subclasses_pickle_as_they_would_without_the_library() -> None:
    """A subclass inheriting a library constructor is rebuilt from its arguments; one with a
    constructor of its own is left to its own means (it is not made to keep its arguments)."""
    conflict = pickle.loads(pickle.dumps(AppConflict("S", "a", 3)))
    assert (type(conflict), conflict.aggregate_id, conflict.version) == (AppConflict, "a", 3)
    failure = AppFailure("disk", threading.Lock())
    assert "_made_with" not in vars(failure)
    copy = pickle.loads(pickle.dumps(failure))
    assert (type(copy), str(copy), copy.lock) == (AppFailure, "disk", None)
