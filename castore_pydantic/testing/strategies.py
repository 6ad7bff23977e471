"""Hypothesis strategies for Pydantic models, events, event histories and command inputs.

Strategies are derived from the models themselves: field annotations and the constraints in
Pydantic's field metadata (``Field(ge=1)``, ``max_length``, ``pattern``, ``Literal``, enums,
unions and discriminated unions, nested models, containers with length bounds, dates, UUIDs,
decimals, ``Annotated`` constraints). Every generated model instance is produced by the
model's own validation, so it is valid; drawn values that validation refuses (a cross-field
``model_validator``, say) are dropped, and when a model's validation refuses 50 and accepts
none, a warning logged by ``castore_pydantic.testing.strategies`` names the model and the
reason::

    from hypothesis import given
    from castore_pydantic.testing import strategies as cst

    @given(cst.histories(pokemons, first=["POKEMON_APPEARED"]))
    def test_folds(history):
        assert pokemons.build_aggregate(history) is not None

Generated text never contains NUL (no JSON store keeps it), floats are finite (NaN never
equals itself, infinities have no JSON form) and unbounded integers stay within 64 bits.
Event timestamps are timezone-aware UTC with millisecond precision, as stores keep them.

Types the library cannot generate raise ``NoStrategyError`` when the strategy is built. Teach
it with ``register_type_strategy(MyType, strategy)`` (global) or ``overrides={MyType:
strategy}`` (one call); both also take ``Annotated`` aliases and win over the built-in rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, get_origin

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "castore_pydantic.testing.strategies needs Hypothesis; install it with: "
        "pip install 'castore-pydantic[testing]'"
    ) from exc
from pydantic import BaseModel, TypeAdapter

from castore_pydantic._command import Command
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._event_types import event_type_names
from castore_pydantic.errors import CastoreError, EventLimitExceededError
from castore_pydantic.testing import _derive, _invalid, _scalars
from castore_pydantic.testing._derive import INVALID, ModelPlan, Override, Resolver
from castore_pydantic.testing._refusals import Refusals, drawing
from castore_pydantic.testing._running import run_commands

__all__ = [
    "command_histories",
    "command_inputs",
    "events",
    "from_type",
    "histories",
    "invalid_command_inputs",
    "models",
    "register_type_strategy",
    "timestamps",
    "unregister_type_strategy",
]

ModelT = TypeVar("ModelT", bound=BaseModel)
EventTypeT = TypeVar("EventTypeT", bound=Event)

#: ``can_follow(previous_events, event_type) -> bool``: may an event of ``event_type`` come
#: next after ``previous_events`` (empty for the first event)?
CanFollow = Callable[[Sequence[Event], str], bool]

_ENVELOPE = ("aggregate_id", "version", "timestamp")
_MAX_STEP_MS = 86_400_000  # at most a day between two events of a generated history
_ATTEMPTS = 3  # draws of an event of a history before the history is given up
_HISTORY_START = (dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2080, 1, 1, tzinfo=dt.UTC))


def register_type_strategy(type_: Any, strategy: Override) -> None:
    """Teach every strategy of this module how to generate values of ``type_``.

    The registered strategy wins over the built-in rules (but not over a call's
    ``overrides``) and is used wherever ``type_`` appears: as a field, inside containers and
    unions. Its values must validate as ``type_``; constraints written next to the type are not
    applied to them. Register an ``Annotated`` alias to give one meaning of a type its own
    strategy.

    Args:
        type_: A class, an ``Annotated[...]`` alias or any hashable annotation.
        strategy: A strategy, or a function ``type_ -> strategy`` (for generic types).

    Raises:
        TypeError: ``strategy`` is neither a strategy nor callable.

    Example::

        class Money: ...   # a type with its own __get_pydantic_core_schema__
        register_type_strategy(Money, st.integers(0, 10**6).map(Money.from_cents))
    """
    _derive.register(type_, strategy)


def unregister_type_strategy(type_: Any) -> None:
    """Forget a strategy given to ``register_type_strategy`` (no error if there is none).

    Args:
        type_: The type it was registered for.

    Example::

        register_type_strategy(Money, money_strategy)
        try:
            ...
        finally:
            unregister_type_strategy(Money)
    """
    _derive.unregister(type_)


def timestamps(
    *, min_value: dt.datetime | None = None, max_value: dt.datetime | None = None
) -> st.SearchStrategy[dt.datetime]:
    """Timezone-aware UTC datetimes with millisecond precision: what stores keep.

    Args:
        min_value: Earliest value (default 2000-01-01); naive values are read as UTC.
        max_value: Latest value (default 2090-01-01).

    Raises:
        ValueError: ``min_value`` is after ``max_value``, or no whole millisecond lies
            between them.

    Example::

        @given(timestamps(min_value=datetime(2024, 1, 1, tzinfo=UTC)))
        def test_ms(ts):
            assert ts.microsecond % 1000 == 0
    """
    return _scalars.timestamps(min_value, max_value)


def from_type(
    annotation: Any, *, overrides: Mapping[Any, Override] | None = None
) -> st.SearchStrategy[Any]:
    """Values of any annotation Pydantic validates, validated by a ``TypeAdapter``.

    Args:
        annotation: ``int``, ``list[Annotated[str, Field(max_length=3)]]``, a model, ...
        overrides: Strategies for types, for this call only.

    Raises:
        NoStrategyError: Part of the annotation cannot be generated.

    Example::

        @given(from_type(dict[str, Annotated[int, Field(ge=0)]]))
        def test_counts(counts):
            assert all(n >= 0 for n in counts.values())
    """
    what = _describe(annotation)
    raw = Resolver(overrides).resolve(annotation, (), what)
    return _derive.validated(raw, TypeAdapter(annotation).validate_python, what)


def models(
    model: type[ModelT], *, overrides: Mapping[Any, Override] | None = None, **fixed_fields: Any
) -> st.SearchStrategy[ModelT]:
    """Valid instances of a Pydantic model, honouring its fields' constraints.

    Args:
        model: The model class.
        overrides: Strategies for types, for this call only.
        **fixed_fields: Field values (or strategies) to use instead of generated ones, by
            field name.

    Raises:
        NoStrategyError: A field's type cannot be generated.
        TypeError: ``model`` is not a model, or a fixed field is not one of its fields.
        ValueError: A fixed value is one its field refuses.

    Example::

        @given(models(Appeared, level=st.integers(1, 5)))
        def test_low_levels(appeared):
            assert appeared.level <= 5
    """
    _require_model(model)
    instances: st.SearchStrategy[ModelT] = Resolver(overrides).plan(model).instances(fixed_fields)
    return instances


def events(
    event_type: type[EventTypeT],
    *,
    overrides: Mapping[Any, Override] | None = None,
    **fixed_fields: Any,
) -> st.SearchStrategy[EventTypeT]:
    """Valid events of one event type, with a UUID aggregate id and a UTC ms timestamp.

    ``payload`` and ``metadata`` are generated from their annotations; left as ``Any`` (not
    declared by the event type) they keep their default, ``None``. An event type knows no
    store's limits (``EventLimits``): a store may refuse some of these events as too deep
    or too large. ``histories(store)`` draws only events its store accepts.

    Args:
        event_type: An ``Event`` subclass.
        overrides: Strategies for types, for this call only.
        **fixed_fields: Field values (or strategies) by field name, e.g. ``aggregate_id="p1"``
            or ``version=st.integers(1, 3)``.

    Raises:
        NoStrategyError: A field's type cannot be generated.
        TypeError: ``event_type`` is not an ``Event`` subclass, or a fixed field is unknown.
        ValueError: A fixed value is one its field refuses.

    Example::

        @given(events(PokemonAppeared, aggregate_id="pikachu"))
        def test_appears(event):
            assert pokemons.build_aggregate([event.model_copy(update={"version": 1})])
    """
    _require_event_type(event_type)
    plan = Resolver(overrides).plan(event_type)
    defaults = {
        "aggregate_id": _uuid_text(),
        "version": st.integers(1, 10_000),
        "timestamp": _scalars.timestamps(),
    }
    inputs = plan.inputs({**defaults, **fixed_fields}, omit=_untyped(event_type))
    made: st.SearchStrategy[EventTypeT] = inputs.map(plan.validate).filter(_is_valid)
    return made


def histories(
    store: EventStore[Any, Any],
    *,
    aggregate_id: str | st.SearchStrategy[str] | None = None,
    first: Iterable[str | type[Event]] | None = None,
    follows: Mapping[str, Iterable[str | type[Event]]] | None = None,
    can_follow: CanFollow | None = None,
    event_fields: Mapping[str, Mapping[str, Any]] | None = None,
    min_size: int = 1,
    max_size: int = 10,
    overrides: Mapping[Any, Override] | None = None,
) -> st.SearchStrategy[list[Event]]:
    """Histories of one aggregate: valid events of the store's types with versions 1..n.

    Timestamps are UTC with millisecond precision and never decrease (equal ones happen, as
    in real stores). Which event types may come next is narrowed by three rules that must all
    allow it: ``first`` (types allowed as version 1), ``follows`` (for a type, the types
    allowed *right before* it; such a type is never first) and ``can_follow`` (any rule, given
    the events so far). When no type may come next the history ends there; histories that end
    shorter than ``min_size`` are discarded. Every event is one the store accepts: one that
    its limits (``EventLimits``) refuse, too deep or too large, is drawn again, and a history
    whose events keep being refused is discarded. When the limits have refused 50 events of
    a type and accepted none, a warning is logged (``castore_pydantic.testing.strategies``)
    with the limit's message: Hypothesis itself only reports that it filtered out too many
    inputs. The same goes for payloads whose validators refuse every value drawn for them
    (a cross-field rule): such a type never appears, and the warning names the model.

    Args:
        store: The event store whose event types are used (no I/O happens).
        aggregate_id: The aggregate id: fixed, a strategy, or ``None`` for a random UUID.
        first: Event types (names or classes) allowed as the first event.
        follows: Event type name -> the event types allowed right before it.
        can_follow: ``can_follow(previous_events, event_type) -> bool``.
        event_fields: Event type name -> fixed fields (values or strategies) for its events,
            e.g. ``{"POKEMON_APPEARED": {"payload": models(Appeared, level=1)}}``.
        min_size: Fewest events (at least 0).
        max_size: Most events.
        overrides: Strategies for types, for this call only.

    Raises:
        NoStrategyError: A field of an event type cannot be generated.
        ValueError: Bad sizes, an unknown event type name, an envelope field
            (``aggregate_id``, ``version``, ``timestamp``) in ``event_fields``, or a value
            there that its field refuses.

    Example::

        @given(histories(
            pokemons,
            first=["POKEMON_APPEARED"],
            follows={"POKEMON_CAUGHT": ["POKEMON_APPEARED", "POKEMON_LEVELED_UP"]},
            can_follow=lambda previous, type_: type_ != "POKEMON_APPEARED" or not previous,
        ))
        def test_versions(history):
            assert [e.version for e in history] == list(range(1, len(history) + 1))
    """
    _check_sizes(min_size, max_size)
    classes = {name: cls for cls in store.event_types for name in event_type_names(cls)}
    rules = _OrderRules(classes, first, follows, can_follow)
    resolver = Resolver(overrides)
    plans = {cls: resolver.plan(cls) for cls in dict.fromkeys(classes.values())}
    fixed = {name: dict(fields) for name, fields in (event_fields or {}).items()}
    for name, fields in fixed.items():
        _known(name, classes)
        if envelope := sorted(set(fields) & set(_ENVELOPE)):
            raise ValueError(f"event_fields may not fix {', '.join(envelope)}: the history does")
    bodies = {
        name: plans[cls].inputs({"type": name, **fixed.get(name, {})}, omit=_body_omit(cls))
        for name, cls in classes.items()
    }
    draws = _HistoryDraws(store, rules, plans, bodies, _aggregate_ids(aggregate_id))
    return draws.histories(min_size, max_size)


def command_inputs(
    command: Command[Any, Any],
    *,
    overrides: Mapping[Any, Override] | None = None,
    **fixed_fields: Any,
) -> st.SearchStrategy[Any]:
    """Valid inputs of a command, from its ``input_schema``.

    Args:
        command: The command.
        overrides: Strategies for types, for this call only.
        **fixed_fields: Input fields to fix (values or strategies) when the schema is a model.

    Raises:
        ValueError: The command has no ``input_schema``.
        TypeError: Fixed fields were given for a schema that is not a model.
        NoStrategyError: A field's type cannot be generated.

    Example::

        @given(command_inputs(make_pokemon_appear, level=st.integers(1, 5)))
        def test_appear(appear_input):
            stores = (mock_event_store(pokemons), mock_event_store(trainers))
            asyncio.run(make_pokemon_appear.handler(appear_input, stores))
    """
    schema = _input_schema(command)
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return models(schema, overrides=overrides, **fixed_fields)
    if fixed_fields:
        raise TypeError(
            f"fixed fields need a model input_schema; command {command.command_id} takes {schema!r}"
        )
    return from_type(schema, overrides=overrides)


def invalid_command_inputs(
    command: Command[Any, Any], *, overrides: Mapping[Any, Override] | None = None
) -> st.SearchStrategy[Any]:
    """Inputs a command must refuse with ``pydantic.ValidationError`` before its handler runs.

    Each starts from a valid input and breaks one thing: not a mapping (or JSON text that does
    not parse), a required field missing, a field of the wrong type, a value out of its
    ``ge``/``le``/length/``pattern``/``Literal`` range, an unknown field when the schema
    forbids extras; some are sent as JSON text. Each is checked against the command's
    validator before it is produced, so all of them are refused.

    Args:
        command: The command.
        overrides: Strategies for types, for this call only.

    Raises:
        ValueError: The command has no ``input_schema``.
        NoStrategyError: A field's type cannot be generated.

    Example::

        @given(invalid_command_inputs(catch_pokemon))
        def test_refused(bad):
            with pytest.raises(ValidationError):
                asyncio.run(catch_pokemon.handler(bad, [pokemons, trainers]))
    """
    schema = _input_schema(command)
    return _invalid.invalid_inputs(schema, command.validate_input, Resolver(overrides))


def command_histories(
    store: EventStore[Any, Any],
    commands: Sequence[Command[Any, Any]],
    *,
    aggregate_id: str | st.SearchStrategy[str] | None = None,
    aggregate_id_field: str | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
    context: Sequence[Any] | Mapping[str, Sequence[Any]] = (),
    expected_errors: tuple[type[BaseException], ...] = (CastoreError,),
    min_size: int = 1,
    max_size: int = 10,
    overrides: Mapping[Any, Override] | None = None,
) -> st.SearchStrategy[list[Event]]:
    """Histories made by running commands with generated valid inputs: real-world sequences.

    Each example runs ``min_size`` to ``max_size`` commands, drawn from ``commands``, against
    fresh in-memory copies (``mock_event_store``) of every store they require, and returns the
    events one aggregate of ``store`` ended up with. Handlers must push through the stores
    they are given (their second argument). A command that raises one of
    ``expected_errors`` (a business rule refusing it, an aggregate not found) is skipped;
    other errors propagate, and so does ``UndefinedEventStorageAdapterError`` (a handler
    that pushed to a store it was not given). Examples where the aggregate got no event are
    discarded. When a command has run 50 times and raised an expected error every time, a
    warning logged by ``castore_pydantic.testing.strategies`` names it and its last error.

    Which aggregate: with ``aggregate_id_field``, every command whose input has that field
    gets the history's aggregate id there (from ``aggregate_id``, a random UUID by default),
    and the events of that aggregate are returned. Without it, the events of the aggregate
    that received the first event pushed to ``store``.

    Args:
        store: The store whose events make the history.
        commands: The commands to draw from.
        aggregate_id: The aggregate id (fixed or a strategy) for ``aggregate_id_field``.
        aggregate_id_field: The input field that names the aggregate.
        inputs: Command id -> fixed input fields (values or strategies).
        context: Extra arguments for the handlers (id generators, clocks): one sequence for
            every command, or a mapping from command id to its own sequence.
        expected_errors: Errors that skip a command instead of failing the example.
        min_size: Fewest commands run per example (at least 1).
        max_size: Most commands run per example.
        overrides: Strategies for types, for this call only.

    Raises:
        ValueError: No command requires ``store``, bad sizes, or ``inputs`` / ``context``
            name an unknown command.
        TypeError: ``inputs`` fixes a field the command's input schema does not have.
            (A fixed value the field refuses is a ``ValueError``.)
        NoStrategyError: An input field cannot be generated.

    Example (the Pokémon example application; its appear command makes its own id, so
    ``context`` gives its id generator the history's)::

        @given(command_histories(
            pokemons,
            [make_pokemon_appear, level_up_pokemon],
            aggregate_id="pikachu",
            aggregate_id_field="pokemon_id",
            context={"MAKE_POKEMON_APPEAR": (lambda: "pikachu",)},
            expected_errors=(
                AggregateNotFoundError, EventAlreadyExistsError, MaxLevelReachedError,
            ),
        ))
        def test_reducer(history):
            check_history(pokemons, history)
    """
    _check_sizes(max(min_size, 1), max_size)
    if min_size < 1:
        raise ValueError(f"command histories run at least one command, got min_size={min_size}")
    if not any(s is store for c in commands for s in c.required_event_stores):
        raise ValueError(
            f"no command lists event store {store.event_store_id} in required_event_stores"
        )
    by_id = {command.command_id: command for command in commands}
    per_command = context if isinstance(context, Mapping) else {}
    for what, mapping in (("inputs", inputs or {}), ("context", per_command)):
        for command_id in mapping:
            if command_id not in by_id:
                raise ValueError(
                    f"{what} name unknown command {command_id!r} (known: {sorted(by_id)})"
                )
    contexts = {
        command_id: tuple(per_command.get(command_id, ()))
        if isinstance(context, Mapping)
        else tuple(context)
        for command_id in by_id
    }
    resolver = Resolver(overrides)
    plans = {c.command_id: _command_plan(c, resolver) for c in commands}
    ids = _aggregate_ids(aggregate_id)
    # Across the examples of a test: expected errors of each command until one run succeeds.
    failures = {command_id: Refusals(None, _failing_warning(command_id)) for command_id in by_id}

    def step_inputs(command: Command[Any, Any], key: str | st.SearchStrategy[str]) -> Any:
        fixed = dict(fixed_inputs.get(command.command_id, {}))
        plan = plans[command.command_id]
        if isinstance(plan, ModelPlan):
            if aggregate_id_field is not None and aggregate_id_field in plan.fields:
                # As a strategy: a drawn id the field refuses is filtered out, not an error.
                fixed[aggregate_id_field] = (
                    key if isinstance(key, st.SearchStrategy) else st.just(key)
                )
            return plan.inputs(fixed).map(plan.validate).filter(_is_valid)
        return plan

    fixed_inputs: dict[str, Mapping[str, Any]] = {
        command_id: dict(values) for command_id, values in (inputs or {}).items()
    }
    for command in commands:
        # Unknown or refused fixed fields fail now, not while drawing (the key is drawn).
        step_inputs(command, st.text())
    # Checked: from now on they are strategies, which the plan takes as they are at each
    # draw instead of validating them again.
    fixed_inputs = {
        command_id: {
            name: value if isinstance(value, st.SearchStrategy) else st.just(value)
            for name, value in values.items()
        }
        for command_id, values in fixed_inputs.items()
    }

    @st.composite
    def history(draw: st.DrawFn) -> list[Event]:
        key = draw(ids)
        count = draw(st.integers(min_size, max_size))
        steps = []
        for _ in range(count):
            command = draw(st.sampled_from(commands))
            steps.append((command, draw(step_inputs(command, key))))
        made = run_commands(
            store,
            steps,
            aggregate_id=key if aggregate_id_field is not None else None,
            contexts=contexts,
            expected_errors=expected_errors,
            failures=failures,
        )
        assume(made)
        return made

    return history()


# -- helpers ---------------------------------------------------------------------------------


def _is_valid(value: Any) -> bool:
    return value is not INVALID


def _failing_warning(command_id: str) -> Callable[[int, str], str]:
    def warning(count: int, reason: str) -> str:
        return (
            f"command_histories(): command {command_id} ran {count} times and raised an "
            f"expected error every time, the last: {reason}. Its runs are skipped, so it never "
            "adds to a history. A handler that pushes a taken version (forgetting version + 1) "
            "always raises EventAlreadyExistsError; otherwise fix its inputs with inputs= or "
            "narrow expected_errors to the errors its business rules raise."
        )

    return warning


def _limits_warning(event_store_id: str, name: str) -> Callable[[int, str], str]:
    def warning(count: int, reason: str) -> str:
        return (
            f"histories(): the limits of event store {event_store_id!r} refused all {count}"
            f" {name} events drawn so far ({reason}). Raise its EventLimits, or fix smaller"
            " values for these events with event_fields or overrides."
        )

    return warning


def _describe(annotation: Any) -> str:
    if get_origin(annotation) is not None:  # list[Model]: its __name__ is "list"
        return repr(annotation)
    return getattr(annotation, "__name__", None) or repr(annotation)


def _require_model(model: Any) -> None:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"expected a Pydantic model class, got {model!r}")


def _require_event_type(event_type: Any) -> None:
    if not (isinstance(event_type, type) and issubclass(event_type, Event)):
        raise TypeError(f"expected an Event subclass, got {event_type!r}")


def _untyped(event_type: type[Event]) -> tuple[str, ...]:
    """``payload`` / ``metadata`` fields an event type left as ``Any``: keep their default."""
    return tuple(
        name for name in ("payload", "metadata") if event_type.model_fields[name].annotation is Any
    )


def _body_omit(event_type: type[Event]) -> tuple[str, ...]:
    return (*_ENVELOPE, *_untyped(event_type))


def _uuid_text() -> st.SearchStrategy[str]:
    return st.uuids(version=4).map(str)


def _aggregate_ids(aggregate_id: str | st.SearchStrategy[str] | None) -> st.SearchStrategy[str]:
    if aggregate_id is None:
        return _uuid_text()
    if isinstance(aggregate_id, st.SearchStrategy):
        return aggregate_id
    if not isinstance(aggregate_id, str) or not aggregate_id:
        raise ValueError(f"aggregate_id must be a non-empty string, got {aggregate_id!r}")
    return st.just(aggregate_id)


def _check_sizes(min_size: int, max_size: int) -> None:
    if not 0 <= min_size <= max_size:
        raise ValueError(f"need 0 <= min_size <= max_size, got {min_size} and {max_size}")


def _known(name: str, classes: Mapping[str, type[Event]]) -> str:
    if name not in classes:
        raise ValueError(f"unknown event type {name!r} (the store's: {sorted(classes)})")
    return name


def _names(items: Iterable[str | type[Event]], classes: Mapping[str, type[Event]]) -> set[str]:
    names: set[str] = set()
    for item in items:
        if isinstance(item, str):
            names.add(_known(item, classes))
        else:
            names.update(_known(name, classes) for name in event_type_names(item))
    return names


def _ms(moment: dt.datetime) -> int:
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(milliseconds=1)


def _from_ms(ms: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=ms)


class _HistoryDraws:
    """How ``histories()`` draws the events of a history, for it and for the searches.

    ``check_reducer`` searches with ``search(name)`` for an event of a type the check's
    histories made none of: the same draws, cut after the first event of that type.
    """

    def __init__(
        self,
        store: EventStore[Any, Any],
        rules: _OrderRules,
        plans: Mapping[type[Event], ModelPlan],
        bodies: Mapping[str, st.SearchStrategy[dict[str, Any]]],
        ids: st.SearchStrategy[str],
    ) -> None:
        self.store = store
        self.rules = rules
        self.plans = plans
        self.bodies = bodies
        self.ids = ids
        self.classes = rules.classes
        # Across the examples of a test: the limits' refusals of each type until one passes.
        self.limits_refused = {
            name: Refusals(cls, _limits_warning(store.event_store_id, name))
            for name, cls in self.classes.items()
        }
        self.searches: dict[str, st.SearchStrategy[list[Event]]] = {}

    def histories(self, min_size: int, max_size: int) -> st.SearchStrategy[list[Event]]:
        # A search is no longer than these histories: no version they never reach.
        self.searches = {name: self.search(name, max_size) for name in self.classes}

        @st.composite
        def history(draw: st.DrawFn) -> list[Event]:
            events = self.draw(draw, min_size, max_size, None)
            assert events is not None
            return events

        return history()

    def search(self, target: str, max_size: int) -> st.SearchStrategy[list[Event]]:
        """Histories up to their first event of ``target``; any other is rejected."""

        @st.composite
        def up_to_target(draw: st.DrawFn) -> list[Event]:
            events = self.draw(draw, min(1, max_size), max_size, target)
            assert events is not None
            return events

        return up_to_target()

    def accept(self, name: str, candidate: Event) -> bool:
        try:
            self.store.context.check_limits(candidate)
        except EventLimitExceededError as error:
            self.limits_refused[name].refused(str(error))
            return False
        self.limits_refused[name].passed()
        return True

    def make(self, draw: st.DrawFn, name: str, key: str, version: int, moment: int) -> Event | None:
        plan = self.plans[self.classes[name]]
        for _ in range(_ATTEMPTS):  # drawn again, not the whole history: limits bite
            values = draw(self.bodies[name])
            values.update(aggregate_id=key, version=version, timestamp=_from_ms(moment))
            candidate = plan.validate(values)
            if candidate is not INVALID and self.accept(name, candidate):
                made: Event = candidate
                return made
        return None

    def draw(
        self, draw: st.DrawFn, min_size: int, max_size: int, target: str | None
    ) -> list[Event] | None:
        """A history, or with a ``target`` its prefix up to the first event of that type."""
        key = draw(self.ids)
        size = draw(st.integers(min_size, max_size))
        moment = draw(st.integers(*(_ms(t) for t in _HISTORY_START)))
        made: list[Event] = []
        for version in range(1, size + 1):
            allowed = self.rules.allowed(made)
            if not allowed:
                break
            # A search takes its type as soon as the rules allow it, half of the time, so
            # that its events are drawn at the versions and times histories reach them.
            name = (
                target
                if target in allowed and draw(st.booleans())
                else draw(st.sampled_from(allowed))
            )
            if made:
                moment += draw(st.integers(0, _MAX_STEP_MS))
            if target is not None:
                found = self.make(draw, name, key, version, moment)
                assume(found is not None)
                assert found is not None
                made.append(found)
                if name == target:
                    return made
                continue
            # Counted per type whatever made its fields (models(), overrides, ...), so that
            # check_reducer knows which types could not be made.
            with drawing(name, self.searches[name]) as slot:
                event = self.make(draw, name, key, version, moment)
                slot.made = event is not None
            assume(event is not None)
            assert event is not None
            made.append(event)
        assume(target is None and len(made) >= min_size)
        return made


class _OrderRules:
    """The ``first`` / ``follows`` / ``can_follow`` rules of ``histories``."""

    def __init__(
        self,
        classes: Mapping[str, type[Event]],
        first: Iterable[str | type[Event]] | None,
        follows: Mapping[str, Iterable[str | type[Event]]] | None,
        can_follow: CanFollow | None,
    ) -> None:
        if isinstance(first, str):
            first = [first]
        self.classes = dict(classes)
        self.names = sorted(classes)
        self.first = None if first is None else _names(first, classes)
        self.follows = {
            _known(name, classes): _names([before] if isinstance(before, str) else before, classes)
            for name, before in (follows or {}).items()
        }
        self.can_follow = can_follow

    def allowed(self, previous: Sequence[Event]) -> list[str]:
        """The event types that may come after ``previous``, in a stable order."""
        last = previous[-1].type if previous else None
        snapshot = tuple(previous)
        return [
            name
            for name in self.names
            if (previous or self.first is None or name in self.first)
            and (name not in self.follows or last in self.follows[name])
            and (self.can_follow is None or self.can_follow(snapshot, name))
        ]


def _input_schema(command: Command[Any, Any]) -> Any:
    schema = command.input_schema
    if schema is None:
        raise ValueError(
            f"command {command.command_id} has no input_schema to generate inputs from"
        )
    return schema


def _command_plan(
    command: Command[Any, Any], resolver: Resolver
) -> ModelPlan | st.SearchStrategy[Any]:
    schema = command.input_schema
    if schema is None:
        return st.none()
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return resolver.plan(schema)
    return _derive.validated(
        resolver.resolve(schema),
        TypeAdapter(schema).validate_python,
        f"the input of command {command.command_id}",
    )
