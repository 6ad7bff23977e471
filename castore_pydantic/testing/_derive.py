"""Derive Hypothesis strategies from annotations and Pydantic field metadata.

The public face is ``castore_pydantic.testing.strategies``. The ``Resolver`` here walks a type:
``Annotated`` metadata, unions, literals, containers, nested models, dataclasses, typed dicts
and named tuples, handing scalars to ``_scalars``. A class it does not know is generated from
its Pydantic core schema when that schema is a simple one; otherwise ``NoStrategyError`` names
the type and where it was met.

Models are built by validating generated input with the model itself, so validators run and
the instances are real; input a validator refuses is discarded, and when every input of a
model is refused, a logged warning names it (``_refusals``).
"""

from __future__ import annotations

import collections
import collections.abc as cabc
import dataclasses
import datetime as dt
import itertools
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from typing import (
    Annotated,
    Any,
    ForwardRef,
    Literal,
    NotRequired,
    Required,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import annotated_types as at
import pydantic
import pydantic.types as pt
from hypothesis import strategies as st
from pydantic import AliasChoices, AliasPath, BaseModel, RootModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from typing_extensions import ReadOnly, TypeAliasType, is_typeddict

from castore_pydantic._event import Timestamp
from castore_pydantic.errors import NoStrategyError
from castore_pydantic.testing import _scalars
from castore_pydantic.testing._refusals import Refusals, reason_of
from castore_pydantic.testing._scalars import Constraints

__all__ = ["INVALID", "ModelPlan", "Override", "Resolver", "register", "unregister", "validated"]

_EXTRA_ITEMS = 5  # unbounded containers are at most this much longer than their minimum
_MAX_MODEL_DEPTH = 3  # how many times one model may appear on a path through nested models
_SEQUENCES = {list, cabc.Sequence, cabc.MutableSequence, cabc.Collection, collections.deque}
_SETS = {set, frozenset, cabc.Set, cabc.MutableSet}
_MAPPINGS = {dict, cabc.Mapping, cabc.MutableMapping, collections.OrderedDict}
_BARE = {list, set, frozenset, dict, tuple}
_WRAPS: dict[Any, Callable[[list[Any]], Any]] = {tuple: tuple, collections.deque: collections.deque}

#: What a failed validation maps to before it is filtered out.
INVALID: Any = object()

#: A strategy, or a function from the type to a strategy (for generic types).
Override = st.SearchStrategy[Any] | Callable[[Any], st.SearchStrategy[Any]]


def _key(type_: Any) -> Any:
    """How a type is looked up among registered strategies.

    Pydantic turns the constraints of a ``Field(...)`` inside ``Annotated`` into the
    constraint objects they stand for (``Field(ge=0)`` into ``annotated_types.Ge(0)``), and
    a model field reaches the resolver in that form. An ``Annotated`` alias is therefore
    keyed by its base type and those constraints, compared by value, so that a registered
    ``Annotated[int, Field(ge=0)]`` is found for a field declared with it. A ``Field``'s
    other settings (a description) stay part of the key: aliases that differ by them are
    different aliases.
    """
    if get_origin(type_) is not Annotated:
        return type_
    items: list[Any] = []
    for item in type_.__metadata__:
        if isinstance(item, FieldInfo):
            items.extend(_value_key(constraint) for constraint in item.metadata)
            settings = getattr(item, "_attributes_set", None) or {}
            if settings:
                items.append(("Field", tuple(sorted((k, repr(v)) for k, v in settings.items()))))
        else:
            items.append(_value_key(item))
    return ("Annotated", type_.__origin__, tuple(items))


def _value_key(item: Any) -> Any:
    """``item`` itself, or its class and attributes for Pydantic's own metadata classes.

    Those compare by identity, although two of them made alike mean the same.
    """
    if not type(item).__module__.startswith("pydantic") or dataclasses.is_dataclass(item):
        return item
    try:
        key = (type(item), tuple(sorted(vars(item).items())))
        hash(key)
    except TypeError:  # no __dict__, or attributes that cannot be compared this way
        return item
    return key


_REGISTRY: dict[Any, Override] = {}
_BUILTIN: dict[Any, Override] = {
    _key(Timestamp): _scalars.timestamps(),
    _key(pydantic.JsonValue): _scalars.json_values(),
}


def register(type_: Any, strategy: Override) -> None:
    """Add ``type_`` to the global registry (see ``strategies.register_type_strategy``)."""
    if not (isinstance(strategy, st.SearchStrategy) or callable(strategy)):
        raise TypeError(f"expected a SearchStrategy or a callable, got {strategy!r}")
    _REGISTRY[_key(type_)] = strategy


def unregister(type_: Any) -> None:
    """Remove ``type_`` from the global registry (nothing happens if it is absent)."""
    _REGISTRY.pop(_key(type_), None)


@lru_cache(maxsize=512)
def _adapter(type_: Any) -> TypeAdapter[Any]:
    return TypeAdapter(type_)


def _sized(
    make: Callable[..., st.SearchStrategy[Any]],
    lo: int,
    hi: int,
    elements: st.SearchStrategy[Any],
) -> st.SearchStrategy[Any]:
    """A collection strategy; only empty ones when elements cannot be drawn (deep recursion)."""
    if elements.is_empty:
        return make(elements, max_size=0) if lo == 0 else st.nothing()
    return make(elements, min_size=lo, max_size=hi)


def _is_valid(value: Any) -> bool:
    return value is not INVALID


#: How to make refused values pass, for the warning that names a type none of whose values
#: passed validation.
_ADVICE = (
    "Its validators refuse what is derived from the field types alone: give the fields "
    "values that pass (fixed fields of models() / events(), event_fields= of histories(), "
    "inputs= of command_histories()), or a strategy for the type with overrides= or "
    "register_type_strategy()."
)


def refusal_warning(what: str) -> Callable[[int, str], str]:
    """The warning text for values of ``what`` that validation keeps refusing."""

    def warning(count: int, reason: str) -> str:
        return (
            f"validation refused all {count} values drawn for {what} so far ({reason}). {_ADVICE}"
        )

    return warning


def validated(
    strategy: st.SearchStrategy[Any],
    validate: Callable[[Any], Any],
    what: str = "",
    origin: type | None = None,
) -> st.SearchStrategy[Any]:
    """Map raw input through ``validate``; drop what it refuses with a ``ValidationError``.

    ``what`` names the values in the warning logged when none is ever accepted; ``origin``
    is the class they belong to at the top (see ``Refusals``).
    """
    refusals = Refusals(origin, refusal_warning(what or "a type"))

    def run(value: Any) -> Any:
        try:
            made = validate(value)
        except ValidationError as error:
            refusals.refused(reason_of(error))
            return INVALID
        refusals.passed()
        return made

    return strategy.map(run).filter(_is_valid)


def _input_key(model: type[BaseModel], name: str) -> tuple[str | int, ...]:
    """The key path under which ``model`` accepts field ``name`` on validation."""
    field = model.model_fields[name]
    alias: Any = field.validation_alias if field.validation_alias is not None else field.alias
    if alias is None or not model.model_config.get("validate_by_alias", True):
        return (name,)
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    if isinstance(alias, AliasPath):
        return tuple(alias.path)
    return (str(alias),)


class ModelPlan:
    """How to build input for one model: a strategy per field and the key it goes under.

    Args:
        model: The Pydantic model.
        fields: Field name to the strategy of its values.
        optional: Names of fields with a default, which the input may leave out.
        where: Where the model was met (``"Loan.payload"``), for warnings; its name if empty.
        origin: The class at the top of that path (the event type a payload belongs to).
    """

    def __init__(
        self,
        model: type[BaseModel],
        fields: dict[str, st.SearchStrategy[Any]],
        optional: frozenset[str],
        where: str = "",
        origin: type | None = None,
    ) -> None:
        self.model = model
        self.fields = fields
        self.optional = optional
        self._keys = {name: _input_key(model, name) for name in model.model_fields}
        what = model.__name__ if where in ("", model.__name__) else f"{model.__name__} ({where})"
        # Across the examples of a test: refusals until one input passes validation.
        self.refusals = Refusals(origin or model, refusal_warning(what))

    def inputs(
        self, fixed: Mapping[str, Any] | None = None, omit: Sequence[str] = ()
    ) -> st.SearchStrategy[dict[str, Any]]:
        """Field values keyed by name; ``fixed`` values (or strategies) replace generated ones.

        Raises:
            TypeError: ``fixed`` names a field the model does not have.
        """
        fixed = dict(fixed or {})
        unknown = sorted(set(fixed) - set(self.fields))
        if unknown:
            raise TypeError(
                f"{self.model.__name__} has no field {', '.join(unknown)} "
                f"(its fields: {', '.join(self.fields)})"
            )
        required: dict[str, st.SearchStrategy[Any]] = {}
        optional: dict[str, st.SearchStrategy[Any]] = {}
        for name, strategy in self.fields.items():
            if name in fixed:
                value = fixed[name]
                if isinstance(value, st.SearchStrategy):
                    required[name] = value
                else:
                    self._check_fixed(name, value)
                    required[name] = st.just(value)
            elif name in omit:
                continue
            elif name in self.optional:
                optional[name] = strategy
            else:
                required[name] = strategy
        return st.fixed_dictionaries(required, optional=optional)

    def _check_fixed(self, name: str, value: Any) -> None:
        """Refuse a fixed value the model refuses: every example would be filtered out.

        The model validates an input holding the value alone, with its own validators and
        configuration; only errors about that field count (the others are missing).

        Raises:
            ValueError: Names the field and Pydantic's reason.
        """
        path = self._keys.get(name)
        if path is None or issubclass(self.model, RootModel):
            return
        try:
            self.model.model_validate(self.assemble({name: value}))
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                loc = tuple(error["loc"])
                if loc[: len(path)] != tuple(path):
                    continue  # another field (missing here), or the model as a whole
                where = ".".join(str(part) for part in loc[len(path) :])
                raise ValueError(
                    f"{self.model.__name__}.{name} is fixed to {value!r:.200}, which it "
                    f"refuses{f' at {where}' if where else ''}: {error['msg']}"
                ) from exc
        except Exception:
            return

    def assemble(self, values: Mapping[str, Any]) -> Any:
        """Turn field values keyed by name into the input the model validates."""
        if issubclass(self.model, RootModel):
            return values["root"]
        data: dict[Any, Any] = {}
        for name, value in values.items():
            path = self._keys[name]
            target: Any = data
            for part, following in itertools.pairwise(path):
                target = _child(target, part, [] if isinstance(following, int) else {})
            _set(target, path[-1], value)
        return data

    def validate(self, values: Mapping[str, Any]) -> Any:
        """Validate assembled input: the instance, or ``INVALID`` when the model refuses it.

        Refusals are counted: a model that refuses everything is named in a logged warning.
        """
        try:
            made = self.model.model_validate(self.assemble(values))
        except ValidationError as error:
            self.refusals.refused(reason_of(error))
            return INVALID
        self.refusals.passed()
        return made

    def instances(self, fixed: Mapping[str, Any] | None = None) -> st.SearchStrategy[Any]:
        """Validated model instances."""
        return self.inputs(fixed).map(self.validate).filter(_is_valid)


def _set(target: Any, key: str | int, value: Any) -> None:
    if isinstance(target, list):
        assert isinstance(key, int)
        target.extend([None] * (key + 1 - len(target)))
    target[key] = value


def _child(target: Any, key: str | int, empty: Any) -> Any:
    if isinstance(target, list):
        assert isinstance(key, int)
        if key >= len(target) or target[key] is None:
            _set(target, key, empty)
        return target[key]
    return target.setdefault(key, empty)


class Resolver:
    """Turns annotations into strategies; one per top-level strategy call.

    Args:
        overrides: Strategies for types (or ``Annotated`` aliases) that win over the global
            registry and the built-in rules for this call.
    """

    def __init__(self, overrides: Mapping[Any, Override] | None = None) -> None:
        self.overrides = {_key(type_): made for type_, made in (overrides or {}).items()}
        self._stack: list[Any] = []

    def _lookup(self, key: Any) -> st.SearchStrategy[Any] | None:
        try:
            lookup = _key(key)
            hash(lookup)
        except TypeError:  # unhashable metadata cannot be a registered key
            return None
        for table in (self.overrides, _REGISTRY, _BUILTIN):
            found = table.get(lookup)
            if found is not None:
                return found if isinstance(found, st.SearchStrategy) else found(key)
        return None

    # -- entry points ----------------------------------------------------------------------

    def plan(self, model: type[BaseModel], path: str = "") -> ModelPlan:
        """The plan of a model's fields."""
        path = path or model.__name__
        self._stack.append(model)
        origin = self._stack[0]
        try:
            fields = {
                name: self.resolve(field.annotation, tuple(field.metadata), f"{path}.{name}")
                for name, field in model.model_fields.items()
            }
        finally:
            self._stack.pop()
        root = issubclass(model, RootModel)
        optional = frozenset(
            name for name, field in model.model_fields.items() if not (root or field.is_required())
        )
        return ModelPlan(model, fields, optional, path, origin)

    def resolve(
        self, tp: Any, metadata: tuple[Any, ...] = (), path: str = ""
    ) -> st.SearchStrategy[Any]:
        """Values that validate as ``Annotated[tp, *metadata]``.

        Raises:
            NoStrategyError: Some part of the type cannot be generated.
        """
        tp, metadata, found = self._unwrap(tp, metadata)
        if found is not None:
            return found
        constraints = Constraints.of(metadata)
        origin = get_origin(tp)
        if origin is Union or origin is types.UnionType:
            # Pydantic applies a union's constraints to its members; filters and JSON
            # encoding apply once, to the union.
            inner = tuple(m for m in metadata if not isinstance(m, at.Predicate | pt.Json))
            made = st.one_of(
                *(
                    self.resolve(arg, () if arg is type(None) else inner, path)
                    for arg in get_args(tp)
                )
            )
        else:
            made = self._dispatch(tp, constraints, path)
        return constraints.finish(made)

    def _unwrap(
        self, tp: Any, metadata: tuple[Any, ...]
    ) -> tuple[Any, tuple[Any, ...], st.SearchStrategy[Any] | None]:
        """Strip ``Annotated``, aliases and ``NewType``; stop at a registered strategy."""
        if metadata:
            # A field annotated with a registered alias (``ts: Timestamp``) reaches us split
            # into its type and metadata: put it back together to look it up.
            try:
                alias: Any = Annotated[(tp, *metadata)]
            except TypeError:  # not something Annotated takes
                alias = None
            found = None if alias is None else self._lookup(alias)
            if found is not None:
                return tp, metadata, found
        while (found := self._lookup(tp)) is None:
            origin = get_origin(tp)
            if origin is Annotated:
                metadata = (*tp.__metadata__, *metadata)
                tp = tp.__origin__
            elif origin in (Required, NotRequired, ReadOnly):
                tp = get_args(tp)[0]
            elif isinstance(tp, TypeAliasType):
                tp = tp.__value__
            elif isinstance(tp, typing.NewType):
                tp = tp.__supertype__
            elif isinstance(tp, TypeVar):
                bound = tp.__bound__ or (Union[tp.__constraints__] if tp.__constraints__ else Any)  # noqa: UP007
                tp = bound
            else:
                return tp, metadata, None
        return tp, metadata, found

    def _dispatch(self, tp: Any, c: Constraints, path: str) -> st.SearchStrategy[Any]:  # noqa: PLR0911 (a dispatch table)
        if tp is Any or tp is object:
            return _scalars.json_values()
        if tp is None or tp is type(None):
            return st.none()
        if isinstance(tp, str | ForwardRef):
            raise NoStrategyError(tp, path, "it is an unresolved forward reference")
        origin = get_origin(tp)
        if origin is Literal:
            return st.sampled_from(get_args(tp))
        if origin is not None or tp in _BARE:
            return self._generic(tp, origin or tp, get_args(tp), c, path)
        if not isinstance(tp, type):
            raise NoStrategyError(tp, path, "it is not a type")
        if issubclass(tp, BaseModel):
            return self._model(tp, path)
        if issubclass(tp, Enum):
            return st.sampled_from(list(tp))
        made = _scalars.scalar(tp, c, path)
        if made is not None:
            return made
        if is_typeddict(tp):
            return self._typed_dict(tp, path)
        if dataclasses.is_dataclass(tp):
            return self._dataclass(tp, path)
        if issubclass(tp, tuple) and hasattr(tp, "_fields"):
            return self._named_tuple(tp, path)
        return self._from_core_schema(tp, path)

    def _generic(  # noqa: PLR0911 (a dispatch table)
        self, tp: Any, origin: Any, args: tuple[Any, ...], c: Constraints, path: str
    ) -> st.SearchStrategy[Any]:
        lo = c.min_length or 0
        hi = c.max_length if c.max_length is not None else lo + _EXTRA_ITEMS
        if lo > hi:
            raise NoStrategyError(tp, path, f"min_length {lo} exceeds max_length {hi}")
        item = args[0] if args else Any
        if origin is tuple and tp is not tuple and args in ((), ((),)):
            return st.just(())  # tuple[()]
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return st.tuples(*(self.resolve(a, (), f"{path}[{i}]") for i, a in enumerate(args)))
        if origin in _SEQUENCES or origin is tuple:
            items = _sized(st.lists, lo, hi, self.resolve(item, (), f"{path}[]"))
            wrap = _WRAPS.get(origin)
            return items if wrap is None else items.map(wrap)
        if origin in _SETS:
            # Items must be hashable: JSON's lists and objects are not.
            items = (
                _scalars.json_scalars()
                if item is Any or item is object
                else self.resolve(item, (), f"{path}[]")
            )
            made = _sized(st.frozensets, lo, hi, items)
            return made if origin is frozenset else made.map(set)
        if origin in _MAPPINGS:
            key = args[0] if args else str
            # JSON's keys are text: any other key would not read back as itself.
            keys = self.resolve(str if key is Any or key is object else key, (), f"{path}.<key>")
            values = self.resolve(args[1] if len(args) > 1 else Any, (), f"{path}[]")
            if keys.is_empty or values.is_empty:
                return st.just({}) if lo == 0 else st.nothing()
            return st.dictionaries(keys, values, min_size=lo, max_size=hi)
        if isinstance(origin, type) and issubclass(origin, BaseModel):
            return self._model(tp, path)
        raise NoStrategyError(tp, path, f"the generic {origin!r} is not supported")

    # -- structured types ------------------------------------------------------------------

    def _origin(self, tp: type) -> type:
        """The class at the top of the path being resolved (``tp`` itself at the top)."""
        return self._stack[0] if self._stack else tp

    def _model(self, model: Any, path: str) -> st.SearchStrategy[Any]:
        if self._stack.count(model) >= _MAX_MODEL_DEPTH:
            # Deep enough: an optional or empty branch above must end the recursion here.
            return st.nothing()
        return self.plan(model, path).instances()

    def _fields(
        self, tp: type, hints: Mapping[str, Any], path: str, infos: Mapping[str, FieldInfo]
    ) -> dict[str, st.SearchStrategy[Any]]:
        self._stack.append(tp)
        try:
            made = {}
            for name, hint in hints.items():
                info = infos.get(name)
                if info is not None:
                    made[name] = self.resolve(info.annotation, tuple(info.metadata), path)
                else:
                    made[name] = self.resolve(hint, (), f"{path}.{name}")
            return made
        finally:
            self._stack.pop()

    def _typed_dict(self, tp: type, path: str) -> st.SearchStrategy[Any]:
        strategies = self._fields(tp, get_type_hints(tp, include_extras=True), path, {})
        required_keys: frozenset[str] = getattr(tp, "__required_keys__", frozenset(strategies))
        mapping = st.fixed_dictionaries(
            {k: s for k, s in strategies.items() if k in required_keys},
            optional={k: s for k, s in strategies.items() if k not in required_keys},
        )
        return validated(mapping, _adapter(tp).validate_python, path, self._origin(tp))

    def _dataclass(self, tp: type, path: str) -> st.SearchStrategy[Any]:
        fields = [f for f in dataclasses.fields(tp) if f.init]
        hints = get_type_hints(tp, include_extras=True)
        infos: dict[str, FieldInfo] = getattr(tp, "__pydantic_fields__", {})
        strategies = self._fields(tp, {f.name: hints[f.name] for f in fields}, path, infos)
        optional = {
            f.name
            for f in fields
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        mapping = st.fixed_dictionaries(
            {k: s for k, s in strategies.items() if k not in optional},
            optional={k: s for k, s in strategies.items() if k in optional},
        )
        return validated(mapping, _adapter(tp).validate_python, path, self._origin(tp))

    def _named_tuple(self, tp: type, path: str) -> st.SearchStrategy[Any]:
        hints = get_type_hints(tp, include_extras=True)
        names: tuple[str, ...] = tp._fields  # type: ignore[attr-defined]
        strategies = self._fields(tp, {n: hints.get(n, Any) for n in names}, path, {})
        return validated(
            st.tuples(*strategies.values()), _adapter(tp).validate_python, path, self._origin(tp)
        )

    def _from_core_schema(self, tp: type, path: str) -> st.SearchStrategy[Any]:
        try:
            adapter = _adapter(tp)
        except Exception as exc:  # whatever stops Pydantic stops us
            raise NoStrategyError(tp, path, "Pydantic has no schema for it") from exc
        raw = _CoreSchemaWalker(tp, path).walk(adapter.core_schema)
        return validated(raw, adapter.validate_python, path, self._origin(tp))


class _CoreSchemaWalker:
    """Raw input from simple Pydantic core schemas: the fallback for custom types."""

    _KEYS = ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length", "pattern")
    _LEAVES: typing.ClassVar[dict[str, Any]] = {
        "str": str,
        "int": int,
        "float": float,
        "decimal": Decimal,
        "bool": bool,
        "bytes": bytes,
        "uuid": uuid.UUID,
        "datetime": dt.datetime,
        "date": dt.date,
    }

    def __init__(self, tp: Any, path: str) -> None:
        self.tp = tp
        self.path = path

    def walk(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:  # noqa: PLR0911 (a dispatch table)
        kind = schema["type"]
        inner = {
            "function-after": "schema",
            "function-wrap": "schema",
            "default": "schema",
            "lax-or-strict": "lax_schema",
        }
        if kind in inner:
            return self.walk(schema[inner[kind]])
        if kind == "nullable":
            return st.none() | self.walk(schema["schema"])
        if kind == "chain":
            return self.walk(schema["steps"][0])
        if kind in ("json-or-python", "union"):
            return self._any_of(schema)
        if kind == "literal":
            return st.sampled_from(schema["expected"])
        if kind in ("url", "multi-host-url"):
            return _scalars.urls(schema.get("allowed_schemes") or ["http", "https"])
        if kind == "none":
            return st.none()
        if kind in self._LEAVES:
            c = Constraints()
            for key in self._KEYS:
                if schema.get(key) is not None:
                    setattr(c, key, schema[key])
            made = _scalars.scalar(self._LEAVES[kind], c, self.path)
            assert made is not None
            return made
        raise NoStrategyError(self.tp, self.path, f"its Pydantic schema ({kind!r}) is unknown")

    def _any_of(self, schema: Mapping[str, Any]) -> st.SearchStrategy[Any]:
        if schema["type"] == "union":
            choices = [c[0] if isinstance(c, tuple) else c for c in schema["choices"]]
        else:
            choices = [schema["python_schema"], schema["json_schema"]]
        walked = []
        for choice in choices:
            try:
                walked.append(self.walk(choice))
            except NoStrategyError:
                continue
        if not walked:
            raise NoStrategyError(self.tp, self.path, "no branch of its Pydantic schema is known")
        return st.one_of(walked)
