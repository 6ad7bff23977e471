"""The checks an event class passes before an event store takes it as one of its types.

A store refuses, when it is built, an event class whose ``type`` is not a ``Literal`` of
strings, that renames or retypes an event's six fields, or whose events would be stored but
not read back as they were written (keys written under one name and read under another,
secrets written masked, fields that storage does not keep).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import (
    Annotated,
    Any,
    Final,
    Literal,
    NewType,
    get_args,
    get_origin,
    get_type_hints,
)

from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasPath,
    BaseModel,
    Json,
    PlainSerializer,
    PlainValidator,
    Secret,
    SecretBytes,
    SecretStr,
    WrapSerializer,
    WrapValidator,
)
from pydantic_core import PydanticUndefined
from typing_extensions import TypeAliasType, is_typeddict

from castore_pydantic._event import Event

__all__ = ["check_keys_read_back", "event_type_names"]


def event_type_names(event_type: type[Event]) -> tuple[str, ...]:
    """The ``type`` values an event class accepts (the arguments of its ``Literal``).

    Raises:
        TypeError: ``event_type`` is not an ``Event`` subclass with a ``Literal`` ``type``.
    """
    if not (isinstance(event_type, type) and issubclass(event_type, Event)):
        raise TypeError(f"event types must be Event subclasses, got {event_type!r}")
    annotation = event_type.model_fields["type"].annotation
    if get_origin(annotation) is not Literal or not all(
        isinstance(arg, str) for arg in get_args(annotation)
    ):
        raise TypeError(
            f"{event_type.__name__}.type must be annotated with a Literal of strings, e.g. "
            f'type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"'
        )
    names = tuple(get_args(annotation))
    default = event_type.model_fields["type"].default
    if default is not PydanticUndefined and default not in names:
        raise TypeError(
            f"{event_type.__name__}.type defaults to {default!r}, which is not one of its"
            f" Literal's values {list(names)}: events pushed without a type would be stored"
            " under a type the store does not know"
        )
    return names


#: The key each of an event's six fields is written and read under: Castore's JSON.
_WIRE_KEYS: Final = {
    "aggregate_id": "aggregateId",
    "version": "version",
    "timestamp": "timestamp",
    "type": "type",
    "payload": "payload",
    "metadata": "metadata",
}


def _check_base_fields(event_type: type[Event]) -> None:
    """Refuse an event type that renames an event's fields or retypes its id, version or time.

    Every adapter writes the six fields under Castore's keys and reads them back from
    there; ids are text, versions integers and timestamps aware datetimes wherever they
    are stored. Constraints and validators of those types are the author's to add.

    Raises:
        TypeError: Names the field and what is wrong with it.
    """
    name = event_type.__name__
    if event_type.model_config.get("validate_by_alias") is False:
        raise TypeError(
            f"event type {name}: validate_by_alias=False would refuse the keys its events are"
            f" stored under ({', '.join(_WIRE_KEYS.values())})"
        )
    for field_name, key in _WIRE_KEYS.items():
        field = event_type.model_fields[field_name]
        written = field.serialization_alias or field.alias or field_name
        if written != key or not _reads_key(field.validation_alias, key):
            raise TypeError(
                f"event type {name}: field {field_name} must be written and read as {key!r}"
                f" (written as {written!r}, read as {field.validation_alias or written!r});"
                " events are stored under Castore's keys"
            )
        if field.exclude:
            raise TypeError(
                f"event type {name}: field {field_name} is excluded from dumps, so messages"
                " and exports would leave it out; every event keeps its six fields"
            )
        base = Event.model_fields[field_name]
        if field_name in ("aggregate_id", "version", "timestamp") and (
            _underlying(field.annotation) != _underlying(base.annotation)
        ):
            raise TypeError(
                f"event type {name}: field {field_name} must keep its type"
                f" ({_type_name(base.annotation)}), not {_type_name(field.annotation)};"
                " constrain it or validate it instead"
            )


def _reads_key(validation_alias: object, key: str) -> bool:
    """Whether a field with this ``validation_alias`` reads ``key`` (besides its name)."""
    if validation_alias is None or validation_alias == key:
        return True
    return isinstance(validation_alias, AliasChoices) and key in validation_alias.choices


#: ``type X = ...`` aliases: the standard library's (Python 3.12+) and typing_extensions'.
_TYPE_ALIASES: Final = tuple({TypeAliasType, getattr(typing, "TypeAliasType", TypeAliasType)})


def _underlying(annotation: Any) -> Any:
    """The type a ``NewType``, a type alias or an ``Annotated`` type stands for."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif isinstance(annotation, NewType):
            annotation = annotation.__supertype__
        elif isinstance(annotation, _TYPE_ALIASES):
            annotation = annotation.__value__
        else:
            return annotation


def _type_name(annotation: object) -> str:
    return annotation.__name__ if isinstance(annotation, type) else repr(annotation)


def check_keys_read_back(event_type: type[Event]) -> None:
    """Refuse an event type whose payload or metadata would not read back what is written.

    Events are written by alias (as Castore's JSON is); a field whose written key is not
    one its model accepts on input (say ``serialization_alias="firstName"`` without a
    matching ``validation_alias``) would be stored, then fail every read. Two kinds of
    field lose their value on the way: Pydantic secrets (``SecretStr``, ``SecretBytes``,
    ``Secret[...]``) are written masked, and ``Json[...]`` is written as its parsed value,
    which does not validate as JSON text again. Fields with a ``field_serializer`` of their
    own, and models with a ``model_serializer``, are left to their author.

    Storage keeps an event's six fields only: an event type with fields of its own, computed
    fields, or ``extra="allow"`` would lose them on the way, and fail to read back when they
    are required.

    Raises:
        TypeError: Names the field and what would be lost.
    """
    _check_base_fields(event_type)
    own = [
        *(name for name in event_type.model_fields if name not in Event.model_fields),
        *event_type.model_computed_fields,
    ]
    if own or event_type.model_config.get("extra") == "allow":
        what = f"fields {own}" if own else 'extra="allow"'
        raise TypeError(
            f"event type {event_type.__name__}: {what} would not be stored: an event holds"
            f" only {', '.join(Event.model_fields)}; put its data in payload or metadata"
        )
    seen: set[type] = set()
    serialized = _serialized_fields(event_type, event_type.model_fields)
    for part in ("payload", "metadata"):
        field = event_type.model_fields[part]
        problem = None
        if part not in serialized:
            problem = _lossy(
                field.annotation, (*field.metadata, *_converted(event_type, part)), part
            )
        if problem is None:
            problem = _unread_key(field.annotation, part, seen)
        if problem is not None:
            raise TypeError(f"event type {event_type.__name__}: {problem}")


def _serialized_fields(cls: type, fields: Iterable[str]) -> set[str]:
    """Which of ``fields`` a ``field_serializer`` of ``cls`` writes (all of them for ``*``).

    ``cls`` is a model, or a TypedDict or dataclass (which may have none).
    """
    decorators = getattr(cls, "__pydantic_decorators__", None)
    names: set[str] = set()
    for serializer in decorators.field_serializers.values() if decorators else ():
        if "*" in serializer.info.fields:
            return set(fields)
        names.update(serializer.info.fields)
    return names


#: Marks a field whose own field validator (after, plain or wrap) replaces its value.
_CONVERTED: Final = object()


def _converted(model: type, name: str) -> tuple[Any, ...]:
    """``(_CONVERTED,)`` when a field validator of ``model`` may replace ``name``'s value."""
    decorators = getattr(model, "__pydantic_decorators__", None)
    for validator in decorators.field_validators.values() if decorators else ():
        if validator.info.mode != "before" and (
            name in validator.info.fields or "*" in validator.info.fields
        ):
            return (_CONVERTED,)
    return ()


#: Field types Pydantic validates lazily, as iterators read once.
_ONE_SHOT: Final = (collections.abc.Iterable, collections.abc.Iterator, collections.abc.Generator)


def _lossy(  # noqa: PLR0911 - a flat type dispatch
    annotation: Any, metadata: Sequence[Any], path: str, seen: set[Any] | None = None
) -> str | None:
    """Why a value of this type loses what it holds when written, if it does.

    Models are left to the model walk (``_unread_model_key``); TypedDicts and dataclasses
    are walked here. A serializer in the metadata (``PlainSerializer``, ``WrapSerializer``)
    writes the value as its author chose: it is not judged.
    """
    if any(isinstance(item, PlainSerializer | WrapSerializer) for item in metadata):
        return None
    if _is_annotated(annotation):
        base, *more = get_args(annotation)
        return _lossy(base, (*more, *metadata), path, seen)
    if any(type(item) is Json for item in metadata) or annotation is Json:
        return (
            f"{path} is Json[...], which is written as its parsed value and would then fail "
            "every read; declare the parsed type instead"
        )
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return None  # its own fields are checked with the model
    origin = get_origin(annotation)
    secret = origin if isinstance(origin, type) else annotation
    if isinstance(secret, type) and issubclass(secret, (SecretStr, SecretBytes, Secret)):
        return (
            f"{path} is a Pydantic secret, which is written masked ('**********'), so its "
            "value would be lost; store it in another form, or write it with a serializer "
            "of your own (field_serializer, PlainSerializer)"
        )
    if (origin or annotation) in _ONE_SHOT and not any(
        isinstance(item, AfterValidator | PlainValidator | WrapValidator) or item is _CONVERTED
        for item in metadata
    ):  # (a validator of the author's may turn it into a list)
        return (
            f"{path} is a one-shot iterable, which the event store cannot check without using"
            " it up (nor store twice); declare a list or a Sequence instead"
        )
    if isinstance(annotation, type) and (
        is_typeddict(annotation) or dataclasses.is_dataclass(annotation)
    ):
        return _lossy_fields(annotation, path, set() if seen is None else seen)
    for argument in get_args(annotation):  # list[SecretStr], dict[str, Json[...]], ...
        found = _lossy(argument, (), path, seen)
        if found is not None:
            return found
    return None


def _lossy_fields(container: type, path: str, seen: set[Any]) -> str | None:
    """``_lossy`` of the fields of a TypedDict or dataclass."""
    if container in seen:
        return None
    seen.add(container)
    hints = _field_hints(container)
    if hints is None:
        return None
    written = _serialized_fields(container, hints)
    for name, hint in hints.items():
        if name in written:
            continue
        found = _lossy(hint, (), f"{path}.{name}", seen)
        if found is not None:
            return found
    return None


def _field_hints(container: type) -> dict[str, Any] | None:
    """The annotations of a TypedDict's or dataclass's fields, not its class variables.

    ``None`` when they cannot be resolved.
    """
    try:
        hints = get_type_hints(container, include_extras=True)
    except Exception:
        return None
    if dataclasses.is_dataclass(container):
        names = {field.name for field in dataclasses.fields(container)}
        return {name: hint for name, hint in hints.items() if name in names}
    return hints


def _is_annotated(annotation: Any) -> bool:
    return get_origin(annotation) is Annotated


def _unread_key(annotation: Any, path: str, seen: set[type]) -> str | None:
    """The first field that would not read back, in what ``annotation`` holds.

    Models, Pydantic dataclasses and the models inside TypedDicts and dataclasses.
    """
    if isinstance(annotation, type) and (
        issubclass(annotation, BaseModel)
        or is_typeddict(annotation)
        or dataclasses.is_dataclass(annotation)
    ):
        if annotation in seen:
            return None
        seen.add(annotation)
        if issubclass(annotation, BaseModel):
            return _unread_model_key(
                annotation, annotation.model_fields, annotation.model_config, path, seen
            )
        fields = getattr(annotation, "__pydantic_fields__", None)
        if fields is not None:  # a Pydantic dataclass: its fields are checked as a model's
            config = getattr(annotation, "__pydantic_config__", {})
            return _unread_model_key(annotation, fields, config, path, seen)
        return _unread_hint_key(annotation, path, seen)
    for argument in get_args(annotation):  # list[Model], Model | None, Annotated[...], ...
        found = _unread_key(argument, path, seen)
        if found is not None:
            return found
    return None


def _unread_hint_key(container: type, path: str, seen: set[type]) -> str | None:
    """``_unread_key`` of the models a TypedDict's or a standard dataclass's fields hold."""
    hints = _field_hints(container)
    for name, hint in (hints or {}).items():
        found = _unread_key(hint, f"{path}.{name}", seen)
        if found is not None:
            return found
    return None


def _unread_model_key(
    model: type, fields: Mapping[str, Any], config: Mapping[str, Any], path: str, seen: set[type]
) -> str | None:
    """``_unread_key`` of one model's (or Pydantic dataclass's) fields and what they hold."""
    decorators = getattr(model, "__pydantic_decorators__", None)
    if decorators is not None and decorators.model_serializers:
        return None  # it writes what it wants: it cannot be judged
    validators = decorators.model_validators.values() if decorators is not None else ()
    free_keys = any(validator.info.mode in ("before", "wrap") for validator in validators)
    serialized = _serialized_fields(model, fields)
    by_name = bool(config.get("validate_by_name") or config.get("populate_by_name"))
    by_alias = config.get("validate_by_alias") is not False
    dropped = None if free_keys else _dropped_keys(model, fields, config, path)
    if dropped is not None:
        return dropped
    for name, field in fields.items():
        if field.exclude:
            continue  # never written
        if name not in serialized:
            metadata = (*field.metadata, *_converted(model, name))
            lossy = _lossy(field.annotation, metadata, f"{path}.{name}")
            if lossy is not None:
                return lossy
        written = field.serialization_alias or field.alias or name
        read = _keys_read(name, field.validation_alias or field.alias, by_alias=by_alias)
        if read is not None and by_name:
            read.add(name)
        if not free_keys and read is not None and written not in read:
            # A before or wrap model validator may map written keys back itself.
            return (
                f"{path}.{name} is written as {written!r} but read only as "
                f"{', '.join(map(repr, sorted(read))) or 'nothing'}, so its events could be "
                "stored but never read back; let the field accept that key too, e.g. with "
                "validation_alias=AliasChoices(...)"
            )
        # What a field serializer writes is its author's: the models inside are not judged.
        skip = free_keys or name in serialized
        found = None if skip else _unread_key(field.annotation, f"{path}.{name}", seen)
        if found is not None:
            return found
    return None


def _dropped_keys(
    model: type, fields: Mapping[str, Any], config: Mapping[str, Any], path: str
) -> str | None:
    """A key the model writes but refuses, or needs but never writes, if there is one."""
    computed = getattr(model, "__pydantic_computed_fields__", None) or {}
    if computed and config.get("extra") == "forbid":
        return (
            f"{path} writes its computed field {next(iter(computed))!r}, which it refuses on"
            ' input (extra="forbid"), so its events could be stored but never read back; let'
            ' it ignore extra keys (extra="ignore")'
        )
    for name, field in fields.items():
        if field.exclude and field.is_required():
            return (
                f"{path}.{name} is required but excluded when written, so its events could "
                "be stored but never read back; give it a default"
            )
    return None


def _keys_read(name: str, alias: Any, *, by_alias: bool) -> set[str] | None:
    """The top-level keys a field accepts by alias; ``None`` when too intricate to tell."""
    if alias is None:
        return {name}  # no alias: its name is its key
    if not by_alias:
        return set()
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    keys: set[str] = set()
    for choice in choices:
        if isinstance(choice, str):
            keys.add(choice)
        elif isinstance(choice, AliasPath) and len(choice.path) == 1:
            keys.add(str(choice.path[0]))
        else:
            return None  # a nested path: it may well read what is written
    return keys
