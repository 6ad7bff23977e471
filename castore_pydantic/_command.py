"""``Command``: validated input, a user handler, retries on version conflicts, validated output."""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import (
    Annotated,
    Any,
    Generic,
    TypeVar,
    Union,
    cast,
    get_args,
    get_origin,
    get_type_hints,
    is_typeddict,
)

from pydantic import BaseModel, RootModel, TypeAdapter, ValidationError

from castore_pydantic._types import call_and_await, function_of
from castore_pydantic.errors import EventAlreadyExistsError, is_event_already_exists_error

__all__ = ["Command", "OnEventAlreadyExistsContext"]

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")

_NO_SCHEMA: Any = inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class OnEventAlreadyExistsContext:
    """Given to ``on_event_already_exists`` after each conflict.

    Attributes:
        attempt_number: Which attempt failed, from 1.
        retries_left: How many attempts remain after this one.
    """

    attempt_number: int
    retries_left: int


OnEventAlreadyExists = Callable[
    [EventAlreadyExistsError, OnEventAlreadyExistsContext], Awaitable[None] | None
]


def _annotation(handler: Callable[..., Any], which: str) -> Any:
    """The handler's annotation for its first parameter or its return (``_NO_SCHEMA``: none).

    Raises:
        TypeError: The annotation is there but names something that cannot be found (a
            class defined inside a function, under ``from __future__ import annotations``).
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return _NO_SCHEMA
    if which == "return":
        name, raw = "return", signature.return_annotation
    else:
        params = list(signature.parameters.values())
        if not params:
            return _NO_SCHEMA
        name, raw = params[0].name, params[0].annotation
    if raw is inspect.Parameter.empty:
        return _NO_SCHEMA
    function = function_of(handler)
    try:
        hints = get_type_hints(function)
    except (NameError, TypeError):
        hints = {}  # another annotation cannot be resolved (a name only type checkers see)
    if name in hints:
        hint = hints[name]
    else:  # resolve this one alone, in the handler's module
        holder = types.SimpleNamespace(__annotations__={name: raw})
        names = getattr(function, "__globals__", None)
        try:
            hint = get_type_hints(holder, globalns=names if isinstance(names, dict) else {})[name]
        except (NameError, TypeError) as exc:
            what = "return" if which == "return" else f"first parameter ({name!r})"
            raise TypeError(
                f"cannot resolve the handler's {what} annotation {raw!r} ({exc}): pass "
                f"{'output' if which == 'return' else 'input'}_schema= to Command"
            ) from exc
    if which == "return" and hint is type(None):
        return _NO_SCHEMA
    return _NO_SCHEMA if hint is Any else hint


def _object_like(schema: Any) -> bool:
    """Whether ``schema`` only accepts objects or arrays, and perhaps ``None``: no text.

    Objects: a model, a dataclass, a TypedDict, a mapping; arrays: a sequence or a set.
    ``Model | None`` counts too, as does an ``Annotated`` one (a discriminated union) and a
    ``RootModel`` of one.
    """
    if get_origin(schema) is Annotated:
        return _object_like(get_args(schema)[0])
    if get_origin(schema) in (Union, types.UnionType):
        members = [member for member in get_args(schema) if member is not type(None)]
        return bool(members) and all(_object_like(member) for member in members)
    origin = get_origin(schema) or schema
    if not isinstance(origin, type):
        return False
    if issubclass(origin, RootModel):
        return _object_like(origin.model_fields["root"].annotation)
    if issubclass(origin, str | bytes | bytearray):
        return False
    return (
        issubclass(origin, BaseModel | Mapping | Sequence | AbstractSet)
        or dataclasses.is_dataclass(origin)
        or is_typeddict(origin)
    )


def _awaitable(command_id: str, running: Any) -> Awaitable[Any]:
    """What a command's handler returned, which must be awaitable.

    Raises:
        TypeError: It is not (a plain ``def`` handler).
    """
    if not inspect.isawaitable(running):
        raise TypeError(
            f"the handler of command {command_id!r} returned {type(running).__name__}, not an "
            "awaitable: define it with 'async def'"
        )
    return running


class Command(Generic[InputT, OutputT]):
    """A unit of business logic that validates its input, pushes events and may retry.

    ``await command.handler(input, event_stores, *context)`` validates ``input`` against
    ``input_schema`` (a mapping, JSON text or model instance) *before* the user function runs,
    calls it, retries it when it raises ``EventAlreadyExistsError`` (up to
    ``event_already_exists_retries`` more times, with no delay), and validates what it returns
    against ``output_schema``. When a schema is not given it is read from the handler's
    annotations (first parameter, return type).

    Args:
        command_id: The command's name.
        required_event_stores: The event stores the handler works with (informational).
        handler: ``async (input, event_stores, *context) -> output``.
        input_schema: A Pydantic model (or any type Pydantic validates) for the input.
        output_schema: The same for the output.
        event_already_exists_retries: How many times to retry after a conflict (default 2).
        on_event_already_exists: Called (and awaited if async) after each conflict with the
            error and an ``OnEventAlreadyExistsContext``.

    Raises:
        ValueError: ``event_already_exists_retries`` is negative.
        TypeError: A schema is not given and the handler's annotation for it cannot be
            resolved.
    """

    def __init__(
        self,
        *,
        command_id: str,
        required_event_stores: Sequence[Any] = (),
        handler: Callable[..., Awaitable[OutputT]],
        input_schema: type[InputT] | None = None,
        output_schema: type[OutputT] | None = None,
        event_already_exists_retries: int = 2,
        on_event_already_exists: OnEventAlreadyExists | None = None,
    ) -> None:
        if isinstance(event_already_exists_retries, bool) or not isinstance(
            event_already_exists_retries, int
        ):
            raise TypeError("event_already_exists_retries must be an int")
        if event_already_exists_retries < 0:
            raise ValueError("event_already_exists_retries must be >= 0")
        self.command_id = command_id
        self.required_event_stores = tuple(required_event_stores)
        self.event_already_exists_retries = event_already_exists_retries
        self.on_event_already_exists = on_event_already_exists
        self._handler = handler
        in_schema = input_schema if input_schema is not None else _annotation(handler, "input")
        out_schema = output_schema if output_schema is not None else _annotation(handler, "return")
        self.input_schema: Any = None if in_schema is _NO_SCHEMA else in_schema
        self.output_schema: Any = None if out_schema is _NO_SCHEMA else out_schema
        self._input_adapter = None if self.input_schema is None else TypeAdapter(self.input_schema)
        # Text given for an object-like schema is JSON; for any other (``str`` itself, a
        # union with it) it is the value.
        self._json_input = _object_like(self.input_schema)
        self._output_adapter = (
            None if self.output_schema is None else TypeAdapter(self.output_schema)
        )

    def __repr__(self) -> str:
        return f"Command(command_id={self.command_id!r})"

    def validate_input(self, value: object) -> InputT:
        """Validate ``value`` against ``input_schema`` (identity when there is none).

        Raises:
            pydantic.ValidationError: The input is invalid.
        """
        adapter = self._input_adapter
        if adapter is None:
            return cast(InputT, value)
        if self._json_input and isinstance(value, str | bytes | bytearray):
            return cast(InputT, adapter.validate_json(value))
        return cast(InputT, adapter.validate_python(value))

    async def handler(
        self, input: InputT | Any, required_event_stores: Sequence[Any] = (), *context: Any
    ) -> OutputT:
        """Run the command: validate input, call the handler with retries, validate output.

        Args:
            input: The command input (mapping, JSON text or model instance).
            required_event_stores: Passed to the user handler as its second argument.
            *context: Extra arguments passed to the user handler on every attempt.

        Raises:
            pydantic.ValidationError: Invalid input (the handler never ran) or invalid output
                (the handler ran: what it pushed is stored; a note on the error says so).
            EventAlreadyExistsError: Still conflicting after all retries (the last error).
            TypeError: The handler returned something other than an awaitable (it is not
                an ``async`` function).
        """
        validated = self.validate_input(input)
        retries_left = self.event_already_exists_retries
        attempt_number = 1
        while True:
            try:
                running = self._handler(validated, required_event_stores, *context)
                output = await _awaitable(self.command_id, running)
                break
            except Exception as error:
                if not is_event_already_exists_error(error):
                    raise
                callback = self.on_event_already_exists
                if callback is not None:
                    await call_and_await(
                        callback,
                        cast(EventAlreadyExistsError, error),
                        OnEventAlreadyExistsContext(attempt_number, retries_left),
                    )
                if retries_left == 0:
                    raise
                retries_left -= 1
                attempt_number += 1
        if self._output_adapter is None:
            return cast(OutputT, output)
        try:
            return cast(OutputT, self._output_adapter.validate_python(output))
        except ValidationError as error:
            error.add_note(  # a new error at each validation: no earlier note to replace
                f"The handler of command {self.command_id!r} ran to its end: the events it "
                "pushed are stored. Do not run the command again for this input; fix what the "
                "handler returns, or output_schema."
            )
            raise
