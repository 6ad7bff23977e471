"""Tests for ``castore_pydantic.testing.strategies``: models, events, histories, commands."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import enum
import hashlib
import ipaddress
import itertools
import json
import logging
import pathlib
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, NamedTuple, NewType, TypeVar

import annotated_types as at
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck, NoSuchExample, Unsatisfiable
from pydantic import (
    UUID4,
    UUID7,
    AliasChoices,
    AliasPath,
    AwareDatetime,
    Base64Bytes,
    Base64Str,
    Base64UrlStr,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    FutureDatetime,
    GetCoreSchemaHandler,
    HttpUrl,
    Json,
    JsonValue,
    NaiveDatetime,
    NegativeFloat,
    PastDate,
    PositiveInt,
    RootModel,
    StringConstraints,
    Tag,
    ValidationError,
    conint,
    constr,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema
from typing_extensions import TypedDict

from castore_pydantic import Aggregate, Command, Event, EventLimits, EventStore
from castore_pydantic.errors import (
    AggregateNotFoundError,
    CastoreError,
    NoStrategyError,
    UndefinedEventStorageAdapterError,
)
from castore_pydantic.testing import mock_event_store
from castore_pydantic.testing import strategies as cst
from castore_pydantic.testing._derive import Resolver
from castore_pydantic.testing._running import run_commands

#: The zoo's profile: 100 examples per shape, no deadline (CI machines are shared), health
#: checks on, so a strategy that leans on filtering fails loudly instead of slowing down.
ZOO = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the zoo: model shapes ---------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.IntEnum):
    S = 1
    M = 2


class Mood(enum.StrEnum):
    HAPPY = "happy"
    SAD = "sad"


class IntBounds(BaseModel):
    inclusive: int = Field(ge=-5, le=5)
    exclusive: int = Field(gt=0, lt=3)
    lower_only: int = Field(ge=10**12)
    upper_only: int = Field(lt=-7)


class IntMultiples(BaseModel):
    even: int = Field(multiple_of=2)
    bounded: int = Field(multiple_of=7, ge=10, le=50)
    negative: int = Field(multiple_of=5, lt=0)


class FloatBounds(BaseModel):
    unit: float = Field(ge=0, lt=1)
    positive: float = Field(gt=0)
    tiny: float = Field(gt=-0.001, le=0.001)
    halves: float = Field(multiple_of=0.5, ge=-10, le=10)


class StrLengths(BaseModel):
    short: str = Field(max_length=3)
    long: str = Field(min_length=30)
    exact: str = Field(min_length=4, max_length=4)


class StrPatterns(BaseModel):
    code: str = Field(pattern=r"^[A-Z]{3}-\d{2}$")
    contains: str = Field(pattern=r"ab+c")
    bounded: str = Field(pattern=r"^[a-z]+$", max_length=5)
    # Lengths most strings of the pattern miss: generated at that length, not filtered.
    voucher: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]+$", min_length=12, max_length=12)]
    sku: str = Field(pattern=r"^[a-z]+$", min_length=8)


class StrTransforms(BaseModel):
    lowered: constr(to_lower=True, min_length=1, max_length=8)  # type: ignore[valid-type]
    stripped: Annotated[str, StringConstraints(strip_whitespace=True, min_length=2)]
    ascii: Annotated[str, StringConstraints(pattern=r"^\w+$", max_length=6)]


class Literals(BaseModel):
    word: Literal["a", "b", "c"]
    number: Literal[1, 2, 3]
    mixed: Literal["x", 7, True, None]


class Enums(BaseModel):
    color: Color
    size: Size
    mood: Mood
    colors: list[Color]


class Optionals(BaseModel):
    maybe: int | None
    defaulted: str | None = None
    constrained: int | None = Field(default=None, ge=3, le=4)
    with_default: int = 42


class Unions(BaseModel):
    scalar: int | str
    items: list[int] | dict[str, bool]
    dated: dt.date | None


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool


class Discriminated(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")
    pets: list[Annotated[Cat | Dog, Field(discriminator="kind")]]


def _pet_tag(value: Any) -> str:
    data = value if isinstance(value, dict) else value.__dict__
    return "with-lives" if "lives" in data else "with-good"


class CallableDiscriminated(BaseModel):
    pet: Annotated[
        Annotated[Cat, Tag("with-lives")] | Annotated[Dog, Tag("with-good")],
        Discriminator(_pet_tag),
    ]


class Inner(BaseModel):
    label: str = Field(min_length=1)
    weight: float = Field(ge=0)


class Middle(BaseModel):
    inner: Inner
    inners: list[Inner] = Field(max_length=2)


class Nested(BaseModel):
    middle: Middle
    optional_inner: Inner | None = None


class Sequences(BaseModel):
    numbers: list[int] = Field(min_length=2, max_length=4)
    any_length: list[str]
    sequence: Sequence[Annotated[int, Field(ge=0)]]
    queue: collections.deque[int]


class Sets(BaseModel):
    numbers: set[int] = Field(min_length=1, max_length=3)
    words: frozenset[Annotated[str, Field(max_length=2)]]


class UntypedCollections(BaseModel):
    """Items of a set and keys of a dict typed ``Any``: hashable, and text keys for JSON."""

    bare: set  # type: ignore[type-arg]
    anything: set[Any]
    frozen: frozenset  # type: ignore[type-arg]
    by_any: dict[Any, int]


class Mappings(BaseModel):
    counts: dict[str, Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=3)
    by_number: dict[int, str]
    mapping: Mapping[str, float]


class Tuples(BaseModel):
    pair: tuple[int, str]
    many: tuple[float, ...] = Field(max_length=3)
    empty: tuple[()]


class Datetimes(BaseModel):
    anything: dt.datetime
    aware: AwareDatetime
    naive: NaiveDatetime
    after: dt.datetime = Field(ge=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    before_naive: dt.datetime = Field(lt=dt.datetime(1999, 12, 31))
    zoned: Annotated[dt.datetime, at.Timezone(...)]


class OtherTimes(BaseModel):
    day: dt.date = Field(ge=dt.date(2020, 1, 1), lt=dt.date(2020, 2, 1))
    clock: dt.time
    span: dt.timedelta
    short_span: dt.timedelta = Field(ge=dt.timedelta(0), le=dt.timedelta(hours=1))


class RelativeTimes(BaseModel):
    born: PastDate
    due: FutureDatetime


class FarTimes(BaseModel):
    """Bounds outside the strategies' default window (1900-2200, ten years of timedelta):
    the window used to be cut by them, leaving nothing to draw."""

    old: dt.date = Field(le=dt.date(1850, 1, 1))
    far: dt.datetime = Field(ge=dt.datetime(2300, 1, 1, tzinfo=dt.UTC))
    long: dt.timedelta = Field(ge=dt.timedelta(days=4000))
    longer: dt.timedelta = Field(gt=dt.timedelta(days=4000))
    ancient: dt.timedelta = Field(lt=dt.timedelta(days=-5000))


class Uuids(BaseModel):
    anything: uuid.UUID
    v4: UUID4
    v7: UUID7


class Decimals(BaseModel):
    money: Decimal = Field(max_digits=7, decimal_places=2, ge=0)
    ratio: Decimal = Field(gt=0, lt=1)
    stepped: Annotated[Decimal, at.MultipleOf(Decimal("0.25")), Field(ge=0, le=5)]
    digits_only: Decimal = Field(max_digits=4)


class AnnotatedConstraints(BaseModel):
    small: Annotated[int, at.Gt(0), at.Le(10)]
    interval: Annotated[float, at.Interval(ge=1, lt=2)]
    sized: Annotated[list[int], at.Len(1, 2)]
    positive: PositiveInt
    negative: NegativeFloat
    legacy: conint(ge=3, le=9, multiple_of=3)  # type: ignore[valid-type]
    checked: Annotated[int, at.Predicate(lambda n: n % 3 == 1), Field(ge=0, le=30)]


class Aliased(BaseModel):
    model_config = ConfigDict(validate_by_name=True)

    plain: int = Field(alias="plainAlias")
    choices: str = Field(validation_alias=AliasChoices("first_choice", "second_choice"))
    pathed: int = Field(validation_alias=AliasPath("deep", "value"), ge=0)


class CamelOnly(BaseModel):
    """Accepts only camelCase keys: the generator must use the aliases."""

    model_config = ConfigDict(alias_generator=to_camel, serialize_by_alias=True)

    first_name: str
    level_count: int = Field(ge=0)


class StrictForbid(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    number: int = Field(ge=0)
    when: dt.datetime
    color: Color
    tags: tuple[str, ...]


class Tree(BaseModel):
    value: int
    children: list[Tree] = Field(default_factory=list, max_length=2)


class Chain(BaseModel):
    name: str
    next: Chain | None = None


class Untyped(BaseModel):
    anything: Any
    mapping: dict[str, Any]
    json_value: JsonValue


class Point(TypedDict):
    x: int
    y: Annotated[int, Field(ge=0)]


@dataclasses.dataclass
class Span:
    start: int
    length: int = 1


class Pair(NamedTuple):
    left: str
    right: int


class Structured(BaseModel):
    point: Point
    span: Span
    pair: Pair


T = TypeVar("T")


class Box(BaseModel, Generic[T]):
    item: T
    items: list[T] = Field(max_length=2)


class Boxes(BaseModel):
    ints: Box[int]
    dates: Box[dt.date]


class Numbers(RootModel[list[Annotated[int, Field(ge=0, le=9)]]]):
    pass


class Networks(BaseModel):
    address: ipaddress.IPv4Address
    address6: ipaddress.IPv6Address
    network: ipaddress.IPv4Network
    path: pathlib.Path
    url: HttpUrl
    raw: bytes = Field(max_length=8)


class Encoded(BaseModel):
    raw: Base64Bytes
    text: Base64Str
    url_safe: Base64UrlStr
    document: Json[list[Annotated[int, Field(ge=0)]]]


class Validated(BaseModel):
    """Validators the strategy cannot see: refused values are filtered, results stay valid."""

    odd: int = Field(ge=0, le=1000)
    low: int = Field(ge=0, le=10)
    high: int = Field(ge=0, le=10)

    @field_validator("odd")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Validated:
        if self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


UserId = NewType("UserId", str)


class NewTypes(BaseModel):
    user: UserId
    users: list[UserId] = Field(max_length=2)


class Slug:
    """A custom type with its own core schema: a lower-case word of 2 to 10 letters."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slug) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        from_text = core_schema.no_info_after_validator_function(
            cls, core_schema.str_schema(pattern=r"^[a-z]{2,10}$")
        )
        return core_schema.json_or_python_schema(
            json_schema=from_text,
            python_schema=core_schema.union_schema(
                [core_schema.is_instance_schema(cls), from_text]
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda s: s.text),
        )


class CustomCoreSchema(BaseModel):
    slug: Slug
    slugs: list[Slug] = Field(max_length=2)


class Money:
    """A custom type Pydantic accepts only as a ``Money`` instance or whole cents."""

    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents

    def __hash__(self) -> int:
        return hash(self.cents)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            lambda v: v if isinstance(v, Money) else Money(int(v)),
            serialization=core_schema.plain_serializer_function_ser_schema(lambda m: m.cents),
        )


class Priced(BaseModel):
    price: Money
    discount: Money | None = None


class Appeared(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, validate_by_name=True)

    name: str = Field(min_length=1, max_length=20)
    level: int = Field(ge=1, le=100)


class Trigger(BaseModel):
    trigger: Literal["random", "scripted"] = "random"


class PokemonAppeared(Event):
    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared
    metadata: Trigger | None = None


@dataclasses.dataclass(frozen=True)
class Shape:
    """One zoo entry: a model and how to generate it."""

    model: type[BaseModel]
    overrides: Mapping[Any, Any] | None = None
    #: Shapes whose validators the strategy cannot see: their raw input may be refused.
    filtered: bool = False

    @property
    def id(self) -> str:
        return self.model.__name__


ZOO_SHAPES = [
    Shape(IntBounds),
    Shape(IntMultiples),
    Shape(FloatBounds),
    Shape(StrLengths),
    Shape(StrPatterns),
    Shape(StrTransforms),
    Shape(Literals),
    Shape(Enums),
    Shape(Optionals),
    Shape(Unions),
    Shape(Discriminated),
    Shape(CallableDiscriminated),
    Shape(Nested),
    Shape(Sequences),
    Shape(Sets),
    Shape(Mappings),
    Shape(UntypedCollections),
    Shape(Tuples),
    Shape(Datetimes),
    Shape(OtherTimes),
    Shape(RelativeTimes),
    Shape(FarTimes),
    Shape(Uuids),
    Shape(Decimals),
    Shape(AnnotatedConstraints, filtered=True),  # at.Predicate is a filter by definition
    Shape(Aliased),
    Shape(CamelOnly),
    Shape(StrictForbid),
    Shape(Tree),
    Shape(Chain),
    Shape(Untyped),
    Shape(Structured),
    Shape(Boxes),
    Shape(Numbers),
    Shape(Networks),
    Shape(Encoded),
    Shape(Validated, filtered=True),
    Shape(NewTypes),
    Shape(CustomCoreSchema),
    Shape(Priced, overrides={Money: st.integers(0, 10**6).map(Money)}),
    Shape(PokemonAppeared),
]


class TestModelZoo:
    """Every generated instance of every shape validates and round-trips."""

    def test_zoo_is_large_enough(self) -> None:
        """The zoo covers at least 30 model shapes."""
        assert len({shape.model for shape in ZOO_SHAPES}) >= 30

    @pytest.mark.parametrize("shape", ZOO_SHAPES, ids=lambda shape: shape.id)
    def test_instances_validate_and_round_trip(self, shape: Shape) -> None:
        """Instance, Python dump and JSON dump all validate back to an equal instance."""
        model = shape.model

        @ZOO
        @given(cst.models(model, overrides=shape.overrides))
        def check(instance: BaseModel) -> None:
            assert type(instance) is model
            assert model.model_validate(instance) == instance
            # round_trip=True dumps Json[...] fields as JSON text, as they are given.
            dumped = instance.model_dump(by_alias=True, round_trip=True)
            assert model.model_validate(dumped) == instance
            text = instance.model_dump_json(by_alias=True, round_trip=True)
            assert model.model_validate_json(text) == instance

        check()

    @pytest.mark.parametrize(
        "shape", [s for s in ZOO_SHAPES if not s.filtered], ids=lambda shape: shape.id
    )
    def test_raw_input_is_valid_without_filtering(self, shape: Shape) -> None:
        """Constraints are honoured by construction: the raw generated input already validates."""
        plan = Resolver(shape.overrides).plan(shape.model)

        @FEW
        @given(plan.inputs())
        def check(values: dict[str, Any]) -> None:
            shape.model.model_validate(plan.assemble(values))

        check()


class TestModelsReachEdges:
    """Generation explores the whole allowed range, edges included."""

    @pytest.mark.parametrize(
        ("model", "condition"),
        [
            (IntBounds, lambda m: m.inclusive == -5),
            (IntBounds, lambda m: m.inclusive == 5),
            (IntBounds, lambda m: m.exclusive == 2),
            (IntMultiples, lambda m: m.bounded == 49),
            (StrLengths, lambda m: len(m.short) == 3),
            (Literals, lambda m: m.mixed is None),
            (Literals, lambda m: m.mixed is True),
            (Optionals, lambda m: m.maybe is None),
            (Optionals, lambda m: m.constrained == 4),
            (Discriminated, lambda m: isinstance(m.pet, Dog)),
            (Discriminated, lambda m: isinstance(m.pet, Cat) and m.pet.lives == 9),
            (CallableDiscriminated, lambda m: isinstance(m.pet, Dog)),
            (Tree, lambda m: any(child.children for child in m.children)),
            (Datetimes, lambda m: m.anything.tzinfo is None),
            (Datetimes, lambda m: m.anything.tzinfo is not None),
            (Unions, lambda m: isinstance(m.scalar, str) and isinstance(m.items, dict)),
        ],
    )
    def test_edge_is_reachable(self, model: type[BaseModel], condition: Any) -> None:
        """Hypothesis finds an instance with the edge value."""
        found = find(cst.models(model), condition, settings=settings(max_examples=2000))
        assert condition(found)

    def test_generated_strings_avoid_nul(self) -> None:
        """Text never contains NUL, which JSON stores refuse."""

        @FEW
        @given(cst.from_type(list[str]))
        def check(words: list[str]) -> None:
            assert all("\x00" not in word for word in words)

        check()

    def test_unconstrained_ints_fit_in_64_bits(self) -> None:
        """Unbounded integers stay within a signed 64-bit range."""

        @FEW
        @given(cst.from_type(int))
        def check(number: int) -> None:
            assert -(2**63) <= number < 2**63

        check()


class TestFixedFieldsAndOverrides:
    """Users fix fields, and teach types, per call or globally."""

    @FEW
    @given(cst.models(Appeared, name="Pikachu", level=st.integers(1, 3)))
    def test_fixed_values_and_strategies(self, appeared: Appeared) -> None:
        """A fixed value is used as is; a fixed strategy is drawn from."""
        assert appeared.name == "Pikachu"
        assert 1 <= appeared.level <= 3

    def test_unknown_fixed_field_is_refused(self) -> None:
        """Fixing a field the model lacks is a TypeError naming the model's fields."""
        with pytest.raises(TypeError, match="has no field nickname"):
            cst.models(Appeared, nickname="x")

    def test_a_fixed_value_its_field_refuses_is_refused(self) -> None:
        """A fixed value the field refuses (out of range, a payload missing a field) is a
        ValueError naming the field and the reason when the strategy is built. Every
        example used to be filtered out, ending in a health check that named nothing."""
        with pytest.raises(ValueError, match=r"Appeared\.level is fixed to 0.*greater than"):
            cst.models(Appeared, level=0)
        with pytest.raises(ValueError, match=r"PokemonAppeared\.version is fixed to 0"):
            cst.events(PokemonAppeared, version=0)
        with pytest.raises(ValueError, match=r"\.payload is fixed to .* at level: Field required"):
            cst.events(PokemonAppeared, payload={"name": "Mew"})

    def test_a_fixed_value_the_model_itself_accepts_is_kept(self) -> None:
        """The check goes through the model: its field validators, its configuration
        (coercion, a regex engine, aliases) apply, so what the model accepts is accepted."""

        class Tagged(BaseModel):
            model_config = ConfigDict(coerce_numbers_to_str=True, regex_engine="python-re")
            tags: list[str]
            name: str = Field(pattern=r"^(?!admin)[a-z0-9]+$")

            @field_validator("tags", mode="before")
            @classmethod
            def _split(cls, value: Any) -> Any:
                return value.split(",") if isinstance(value, str) else value

        found = find(cst.models(Tagged, tags="a,b", name=7), lambda t: True)
        assert (found.tags, found.name) == (["a", "b"], "7")
        with pytest.raises(ValueError, match=r"Tagged\.name is fixed to 'admin'"):
            cst.models(Tagged, name="admin")

    def test_models_needs_a_model(self) -> None:
        """``models`` refuses something that is not a model class."""
        with pytest.raises(TypeError, match="Pydantic model"):
            cst.models(int)  # type: ignore[type-var]

    def test_unknown_type_raises_a_clear_error(self) -> None:
        """A type without a strategy names itself and where it was met."""

        class Opaque:
            pass

        class Holder(BaseModel):
            model_config = ConfigDict(arbitrary_types_allowed=True)
            things: list[Opaque]

        with pytest.raises(NoStrategyError, match=r"Holder\.things\[\]") as info:
            cst.models(Holder)
        assert info.value.annotation is Opaque
        assert "register_type_strategy" in str(info.value)

    def test_impossible_constraints_raise(self) -> None:
        """Constraints no value satisfies are reported when the strategy is built."""

        class Impossible(BaseModel):
            n: int = Field(ge=5, le=1)

        with pytest.raises(NoStrategyError, match="leave no value"):
            cst.models(Impossible)

    def test_register_type_strategy_teaches_every_call(self) -> None:
        """A registered strategy is used for the type everywhere until unregistered."""

        class Opaque:
            def __init__(self, n: int) -> None:
                self.n = n

        class Holder(BaseModel):
            model_config = ConfigDict(arbitrary_types_allowed=True)
            thing: Opaque
            things: list[Opaque] = Field(max_length=2)

        cst.register_type_strategy(Opaque, st.integers(0, 9).map(Opaque))
        try:
            holder = find(cst.models(Holder), lambda h: len(h.things) == 2)
            assert all(0 <= thing.n <= 9 for thing in [holder.thing, *holder.things])
        finally:
            cst.unregister_type_strategy(Opaque)
        with pytest.raises(NoStrategyError):
            cst.models(Holder)

    def test_overrides_win_over_the_registry(self) -> None:
        """A per-call override beats a registered strategy for the same type."""
        cst.register_type_strategy(Money, st.just(Money(1)))
        try:
            priced = find(cst.models(Priced, overrides={Money: st.just(Money(2))}), lambda p: True)
            assert priced.price == Money(2)
            assert find(cst.models(Priced), lambda p: True).price == Money(1)
        finally:
            cst.unregister_type_strategy(Money)

    def test_an_override_may_be_a_function_of_the_type(self) -> None:
        """A callable override receives the type and returns the strategy."""
        seen: list[Any] = []

        def make(type_: Any) -> st.SearchStrategy[Money]:
            seen.append(type_)
            return st.just(type_(3))

        priced = find(cst.models(Priced, overrides={Money: make}), lambda p: True)
        assert priced.price == Money(3)
        assert seen[0] is Money

    def test_annotated_alias_can_be_registered(self) -> None:
        """Registering an ``Annotated`` alias gives that meaning of a type its own values."""
        even = Annotated[int, "even"]

        class Holder(BaseModel):
            value: even
            other: int

        cst.register_type_strategy(even, st.integers(0, 50).map(lambda n: n * 2))
        try:
            holder = find(cst.models(Holder), lambda h: h.value > 0 and h.other % 2 == 1)
            assert holder.value % 2 == 0
        finally:
            cst.unregister_type_strategy(even)

    def test_an_alias_with_field_constraints_is_found_for_model_fields(self) -> None:
        """Pydantic turns ``Field(...)`` in an alias into constraint objects before a model
        field reaches the strategies; such an alias, registered or overridden, is still
        found there (a registered one used to be ignored, or to fail on a pattern Python's
        ``re`` cannot read)."""
        letters = Annotated[str, Field(pattern=r"^\p{L}+$", max_length=12)]
        count = Annotated[int, Field(ge=0)]

        class Holder(BaseModel):
            name: letters  # type: ignore[valid-type]
            names: list[letters]  # type: ignore[valid-type]
            count: count  # type: ignore[valid-type]

        cst.register_type_strategy(letters, st.just("Élodie"))
        try:
            holder = find(
                cst.models(Holder, overrides={count: st.just(424242)}), lambda h: bool(h.names)
            )
            assert (holder.name, set(holder.names), holder.count) == ("Élodie", {"Élodie"}, 424242)
        finally:
            cst.unregister_type_strategy(letters)
        with pytest.raises(NoStrategyError):
            cst.models(Holder)

    def test_distinct_aliases_keep_distinct_strategies(self) -> None:
        """Aliases differing only by a Field setting (a description), by marker objects
        that compare by identity, or holding unhashable-looking markers stay apart."""

        class Marker:
            def __init__(self, *tags: str) -> None:
                self.tags = list(tags)

        email, phone = Marker(), Marker()
        aliases: list[tuple[Any, str]] = [
            (Annotated[str, Field(description="a user id")], "user-1"),
            (Annotated[str, Field(description="an order id")], "order-1"),
            (Annotated[str, email], "a@b.c"),
            (Annotated[str, phone], "+331234"),
            (Annotated[str, Marker("money")], "1"),
        ]
        for alias, value in aliases:
            cst.register_type_strategy(alias, st.just(value))
        try:
            for alias, value in aliases:
                assert find(cst.from_type(list[alias]), bool) == [value]
        finally:
            for alias, _ in aliases:
                cst.unregister_type_strategy(alias)

    def test_register_refuses_non_strategies(self) -> None:
        """Registering something that is not a strategy or callable is a TypeError."""
        with pytest.raises(TypeError, match="SearchStrategy"):
            cst.register_type_strategy(Money, 5)  # type: ignore[arg-type]

    @FEW
    @given(cst.from_type(dict[str, Annotated[int, Field(ge=0, le=3)]]))
    def test_from_type_honours_nested_annotations(self, counts: dict[str, int]) -> None:
        """``from_type`` handles any annotation, constraints inside containers included."""
        assert all(0 <= n <= 3 for n in counts.values())


# -- events and histories --------------------------------------------------------------------


class PokemonCaught(Event):
    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"


class PokemonLeveledUp(Event):
    type: Literal["POKEMON_LEVELED_UP"] = "POKEMON_LEVELED_UP"


class PokemonReleased(Event):
    type: Literal["POKEMON_RELEASED", "POKEMON_ESCAPED"]


class Pokemon(Aggregate):
    name: str
    level: int
    status: Literal["wild", "caught", "gone"]


PokemonEvent = PokemonAppeared | PokemonCaught | PokemonLeveledUp | PokemonReleased


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonEvent) -> Pokemon:
    if isinstance(event, PokemonAppeared):
        return Pokemon(
            aggregate_id=event.aggregate_id,
            version=event.version,
            name=event.payload.name,
            level=event.payload.level,
            status="wild",
        )
    assert pokemon is not None
    if isinstance(event, PokemonCaught):
        return pokemon.model_copy(update={"version": event.version, "status": "caught"})
    if isinstance(event, PokemonLeveledUp):
        return pokemon.model_copy(update={"version": event.version, "level": pokemon.level + 1})
    return pokemon.model_copy(update={"version": event.version, "status": "gone"})


def make_pokemons() -> EventStore[Pokemon, PokemonEvent]:
    return EventStore(
        event_store_id="ZOO_POKEMONS",
        event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp, PokemonReleased],
        reducer=reduce_pokemon,
    )


POKEMONS = make_pokemons()
ALL_TYPES = {"POKEMON_APPEARED", "POKEMON_CAUGHT", "POKEMON_LEVELED_UP"} | {
    "POKEMON_RELEASED",
    "POKEMON_ESCAPED",
}


def _ms_utc(moment: dt.datetime | None) -> bool:
    return moment is not None and moment.tzinfo == dt.UTC and moment.microsecond % 1000 == 0


class TestEvents:
    """``events`` makes valid events of one type."""

    @FEW
    @given(cst.events(PokemonAppeared))
    def test_events_are_valid_with_utc_ms_timestamps(self, event: PokemonAppeared) -> None:
        """Events validate, and their timestamps are aware UTC with millisecond precision."""
        assert _ms_utc(event.timestamp)
        assert event.version >= 1
        uuid.UUID(event.aggregate_id)
        assert PokemonAppeared.model_validate_json(event.model_dump_json()) == event
        POKEMONS.context.validate_input(event)

    @FEW
    @given(cst.events(PokemonCaught, aggregate_id="pikachu", version=st.integers(2, 3)))
    def test_fixed_fields(self, event: PokemonCaught) -> None:
        """Fixed fields are respected, and an undeclared (``Any``) payload stays ``None``."""
        assert event.aggregate_id == "pikachu"
        assert event.version in (2, 3)
        assert event.payload is None
        assert event.metadata is None

    @FEW
    @given(cst.models(PokemonAppeared))
    def test_timestamp_fields_of_any_model_are_utc_ms(self, event: PokemonAppeared) -> None:
        """The library's ``Timestamp`` type gets UTC millisecond datetimes wherever it is used."""
        assert event.timestamp is None or _ms_utc(event.timestamp)

    def test_timestamps_bounds(self) -> None:
        """``timestamps`` honours its bounds and refuses an empty range."""
        low = dt.datetime(2024, 5, 1, 12, 0, 0, 500, tzinfo=dt.UTC)
        high = dt.datetime(2024, 5, 1, 12, 0, 1, tzinfo=dt.UTC)
        found = find(cst.timestamps(min_value=low, max_value=high), lambda t: True)
        assert low <= found <= high
        assert _ms_utc(found)
        with pytest.raises(ValueError, match="after"):
            cst.timestamps(min_value=high, max_value=low)
        # Both bounds inside one millisecond: no millisecond timestamp fits.
        inside = low.replace(microsecond=900)
        with pytest.raises(ValueError, match="no whole millisecond"):
            cst.timestamps(min_value=low, max_value=inside)
        exact = low.replace(microsecond=0)
        assert find(cst.timestamps(min_value=exact, max_value=exact), lambda t: True) == exact

    def test_every_literal_of_a_multi_type_class_is_generated(self) -> None:
        """An event class with several type names gets each of them."""
        found = find(cst.events(PokemonReleased), lambda e: e.type == "POKEMON_ESCAPED")
        assert found.type == "POKEMON_ESCAPED"

    def test_events_needs_an_event_type(self) -> None:
        """``events`` refuses a model that is not an Event."""
        with pytest.raises(TypeError, match="Event subclass"):
            cst.events(Appeared)  # type: ignore[type-var]


class Line(BaseModel):
    sku: str
    qty: int


class Basket(BaseModel):
    lines: list[Line]


class BasketFilled(Event):
    type: Literal["BASKET_FILLED"] = "BASKET_FILLED"
    payload: Basket
    metadata: dict[str, str] | None = None


def count_fills(tally: Aggregate | None, event: BasketFilled) -> Aggregate:
    return Aggregate(aggregate_id=event.aggregate_id, version=event.version)


#: A store whose limits refuse most baskets: any line is too deep, long metadata too large.
TIGHT = EventStore(
    event_store_id="BASKETS",
    event_types=[BasketFilled],
    reducer=count_fills,
    limits=EventLimits(max_depth=2, max_bytes=300),
)


class TestHistories:
    """``histories`` makes one aggregate's events, ordered as the rules say."""

    @FEW
    @given(cst.histories(TIGHT, max_size=4))
    def test_histories_hold_only_events_the_store_accepts(self, history: list[Event]) -> None:
        """Events too deep or too large for the store's limits are never drawn: every
        history pushes. (Most histories held an event the store refused.)"""

        async def push_all() -> None:
            mocked = mock_event_store(TIGHT)
            for event in history:
                await mocked.push_event(event)

        asyncio.run(push_all())

    def test_a_type_the_limits_always_refuse_is_named_in_the_log(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Hypothesis only says that it filtered out too many inputs; the log says which
        store refused which events, and why. A type refused only now and then is not named."""
        cramped = EventStore(
            event_store_id="CRAMPED",
            event_types=[BasketFilled],
            reducer=count_fills,
            limits=EventLimits(max_bytes=64),  # less than any basket with a UUID id
        )

        def drawn(store: EventStore[Any, Any]) -> tuple[bool, list[str]]:
            """Whether the health check failed, and the warnings logged meanwhile."""

            @settings(max_examples=20, deadline=None, database=None)
            @given(cst.histories(store, max_size=2))
            def draw(history: list[Event]) -> None:
                pass

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="castore_pydantic.testing.strategies"):
                try:
                    draw()
                except FailedHealthCheck:
                    failed = True
                else:
                    failed = False
            return failed, [r.getMessage() for r in caplog.records]

        failed, logged = drawn(cramped)
        assert failed
        assert len(logged) == 1, logged
        assert "'CRAMPED' refused all 50 BASKET_FILLED events" in logged[0]
        assert "larger than max_bytes=64" in logged[0]
        assert drawn(TIGHT) == (False, [])

    @FEW
    @given(cst.histories(POKEMONS, max_size=8))
    def test_histories_are_well_formed(self, history: list[Event]) -> None:
        """One aggregate, versions 1..n, non-decreasing UTC ms timestamps, store types."""
        assert 1 <= len(history) <= 8
        assert len({e.aggregate_id for e in history}) == 1
        assert [e.version for e in history] == list(range(1, len(history) + 1))
        assert all(_ms_utc(e.timestamp) for e in history)
        stamps = [e.timestamp for e in history]
        assert stamps == sorted(stamps)  # type: ignore[type-var]
        assert {e.type for e in history} <= ALL_TYPES
        for event in history:
            POKEMONS.context.validate_input(event)

    @FEW
    @given(
        cst.histories(
            POKEMONS,
            first=[PokemonAppeared],
            follows={"POKEMON_CAUGHT": ["POKEMON_APPEARED", "POKEMON_LEVELED_UP"]},
            can_follow=lambda previous, name: (
                (
                    name != "POKEMON_APPEARED"
                    and not any(e.type in ("POKEMON_RELEASED", "POKEMON_ESCAPED") for e in previous)
                )
                or not previous
            ),
            min_size=2,
            max_size=6,
        )
    )
    def test_order_rules_hold(self, history: list[Event]) -> None:
        """``first``, ``follows`` and ``can_follow`` are all respected."""
        types = [e.type for e in history]
        assert types[0] == "POKEMON_APPEARED"
        assert "POKEMON_APPEARED" not in types[1:]
        for before, after in itertools.pairwise(types):
            if after == "POKEMON_CAUGHT":
                assert before in ("POKEMON_APPEARED", "POKEMON_LEVELED_UP")
        gone = [i for i, t in enumerate(types) if t in ("POKEMON_RELEASED", "POKEMON_ESCAPED")]
        assert not gone or gone[0] == len(types) - 1
        assert POKEMONS.build_aggregate(history) is not None  # type: ignore[arg-type]

    def test_a_dead_end_ends_the_history(self) -> None:
        """When no type may follow, the history stops (and can be shorter than max_size)."""
        strategy = cst.histories(
            POKEMONS,
            first=["POKEMON_APPEARED"],
            can_follow=lambda previous, name: len(previous) < 2,
            max_size=10,
        )
        history = find(strategy, lambda h: len(h) == 2)
        assert len(history) == 2
        with pytest.raises(NoSuchExample):
            find(strategy, lambda h: len(h) > 2, settings=settings(max_examples=200))

    @FEW
    @given(
        cst.histories(
            POKEMONS,
            aggregate_id="pikachu",
            first=["POKEMON_APPEARED"],
            event_fields={"POKEMON_APPEARED": {"payload": Appeared(name="Pika", level=5)}},
            min_size=3,
            max_size=3,
        )
    )
    def test_fixed_aggregate_id_and_event_fields(self, history: list[Event]) -> None:
        """The aggregate id and per-type fields are fixed as asked; sizes are honoured."""
        assert len(history) == 3
        assert {e.aggregate_id for e in history} == {"pikachu"}
        appeared = [e for e in history if isinstance(e, PokemonAppeared)]
        assert appeared
        assert all(e.payload == Appeared(name="Pika", level=5) for e in appeared)

    @FEW
    @given(cst.histories(POKEMONS, aggregate_id=st.sampled_from(["a", "b"]), max_size=2))
    def test_aggregate_id_strategy(self, history: list[Event]) -> None:
        """An aggregate id strategy is drawn once per history."""
        assert {e.aggregate_id for e in history} in ({"a"}, {"b"})

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"min_size": 3, "max_size": 2}, "min_size"),
            ({"min_size": -1}, "min_size"),
            ({"first": ["NOPE"]}, "unknown event type 'NOPE'"),
            ({"follows": {"NOPE": ["POKEMON_CAUGHT"]}}, "unknown event type 'NOPE'"),
            ({"event_fields": {"POKEMON_CAUGHT": {"version": 3}}}, "may not fix version"),
            ({"aggregate_id": ""}, "non-empty"),
        ],
    )
    def test_bad_arguments_are_refused(self, kwargs: dict[str, Any], message: str) -> None:
        """Bad sizes, unknown type names and envelope fields are clear errors."""
        with pytest.raises(ValueError, match=message):
            cst.histories(POKEMONS, **kwargs)


# -- commands ----------------------------------------------------------------------------------


class AppearInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pokemon_id: str = Field(min_length=1, max_length=36)
    name: str = Field(min_length=1, max_length=20)
    level: int = Field(ge=1, le=100)
    habitat: Literal["forest", "sea"] = "forest"
    code: str = Field(default="AB1", pattern=r"^[A-Z]{2}\d$")


class ShortIdInput(AppearInput):
    """Ids of at most eight characters."""

    pokemon_id: str = Field(min_length=1, max_length=8)


class LevelUpInput(BaseModel):
    pokemon_id: str
    times: int = Field(default=1, ge=1, le=3)


class CatchInput(BaseModel):
    pokemon_id: str


async def appear_handler(data: AppearInput, stores: Sequence[EventStore[Any, Any]]) -> None:
    (pokemons,) = stores
    await pokemons.push_event(
        PokemonAppeared(
            aggregate_id=data.pokemon_id,
            version=1,
            payload=Appeared(name=data.name, level=data.level),
        )
    )


async def level_up_handler(data: LevelUpInput, stores: Sequence[EventStore[Any, Any]]) -> None:
    (pokemons,) = stores
    pokemon = (await pokemons.get_existing_aggregate(data.pokemon_id)).aggregate
    for step in range(1, data.times + 1):
        await pokemons.push_event(
            PokemonLeveledUp(aggregate_id=data.pokemon_id, version=pokemon.version + step)
        )


async def catch_handler(data: CatchInput, stores: Sequence[EventStore[Any, Any]]) -> None:
    (pokemons,) = stores
    pokemon = (await pokemons.get_existing_aggregate(data.pokemon_id)).aggregate
    if pokemon.status == "caught":
        raise AlreadyCaughtError(data.pokemon_id)
    await pokemons.push_event(
        PokemonCaught(aggregate_id=data.pokemon_id, version=pokemon.version + 1)
    )


class SpawnInput(BaseModel):
    name: str = Field(min_length=1, max_length=10)


async def spawn_handler(
    data: SpawnInput, stores: Sequence[EventStore[Any, Any]], generate_id: Any
) -> None:
    (pokemons,) = stores
    await pokemons.push_event(
        PokemonAppeared(
            aggregate_id=generate_id(), version=1, payload=Appeared(name=data.name, level=1)
        )
    )


class AlreadyCaughtError(Exception):
    """A business rule: a caught Pokémon cannot be caught again."""


APPEAR = Command(
    command_id="APPEAR",
    required_event_stores=[POKEMONS],
    handler=appear_handler,
    input_schema=AppearInput,
)
LEVEL_UP = Command(
    command_id="LEVEL_UP",
    required_event_stores=[POKEMONS],
    handler=level_up_handler,
    input_schema=LevelUpInput,
)
CATCH = Command(
    command_id="CATCH",
    required_event_stores=[POKEMONS],
    handler=catch_handler,
    input_schema=CatchInput,
)


SPAWN = Command(
    command_id="SPAWN",
    required_event_stores=[POKEMONS],
    handler=spawn_handler,
    input_schema=SpawnInput,
)


class TestCommandInputs:
    """``command_inputs`` and ``invalid_command_inputs`` follow the input schema."""

    @FEW
    @given(cst.command_inputs(APPEAR, habitat="sea"))
    def test_valid_inputs(self, data: AppearInput) -> None:
        """Inputs validate against the schema and respect fixed fields."""
        assert APPEAR.validate_input(data.model_dump()) == data
        assert data.habitat == "sea"

    @FEW
    @given(cst.command_inputs(Command(command_id="N", handler=appear_handler, input_schema=int)))
    def test_non_model_schema(self, number: int) -> None:
        """A non-model schema gets values of that type."""
        assert isinstance(number, int)

    def test_a_command_without_schema_is_refused(self) -> None:
        """No input schema: nothing to generate from, a clear ValueError."""

        async def handler(data: Any, stores: Any) -> None:
            return None

        bare: Command[Any, Any] = Command(command_id="BARE", handler=handler)
        with pytest.raises(ValueError, match="no input_schema"):
            cst.command_inputs(bare)
        with pytest.raises(ValueError, match="no input_schema"):
            cst.invalid_command_inputs(bare)

    @ZOO
    @given(cst.invalid_command_inputs(APPEAR))
    def test_invalid_inputs_are_refused_before_the_handler_runs(self, bad: Any) -> None:
        """Every invalid input makes ``handler`` raise ValidationError before the handler runs."""
        calls: list[Any] = []

        async def spy(data: Any, stores: Any, *context: Any) -> None:
            calls.append(data)

        command = Command(command_id="SPY", handler=spy, input_schema=AppearInput)
        with pytest.raises(ValidationError):
            asyncio.run(command.handler(bad, [POKEMONS]))
        assert calls == []

    @pytest.mark.parametrize(
        ("label", "condition"),
        [
            ("not a mapping", lambda v: not isinstance(v, dict | str)),
            ("JSON text", lambda v: isinstance(v, str) and v.startswith("{")),
            ("missing field", lambda v: isinstance(v, dict) and "pokemon_id" not in v),
            (
                "out of range",
                lambda v: (
                    isinstance(v, dict)
                    and isinstance(v.get("level"), int)
                    and not isinstance(v.get("level"), bool)
                    and not 1 <= v["level"] <= 100
                ),
            ),
            ("pattern", lambda v: isinstance(v, dict) and v.get("code") in ("", "a", "!", "0")),
            ("extra field", lambda v: isinstance(v, dict) and "unexpected_field" in v),
            (
                "wrong literal",
                lambda v: isinstance(v, dict) and v.get("habitat") == "__not_an_allowed_value__",
            ),
        ],
    )
    def test_every_kind_of_breakage_occurs(self, label: str, condition: Any) -> None:
        """Each way of breaking an input is generated."""
        found = find(
            cst.invalid_command_inputs(APPEAR), condition, settings=settings(max_examples=3000)
        )
        assert condition(found), label

    def test_a_pattern_only_pydantic_understands_breaks_inputs(self) -> None:
        """A pattern Python's ``re`` cannot compile (``\\p{L}``) is probed with Pydantic's
        own engine: a text it refuses is generated. (It used to raise ``re.error``.)"""

        letters = Annotated[str, StringConstraints(pattern=r"^\p{L}+$")]

        class Register(BaseModel):
            name: letters  # type: ignore[valid-type]

        async def register(data: Any, stores: Any) -> None:
            return None

        command = Command(command_id="REGISTER", handler=register, input_schema=Register)
        found = find(
            cst.invalid_command_inputs(
                command, overrides={letters: st.sampled_from(["Ash", "Élodie"])}
            ),
            lambda v: isinstance(v, dict) and v.get("name") in ("", "!", "0"),
            settings=settings(max_examples=3000),
        )
        with pytest.raises(ValidationError):
            Register.model_validate(found)

    def test_a_pattern_for_pythons_engine_breaks_inputs(self) -> None:
        """A model on ``regex_engine="python-re"`` may use look-arounds, which Pydantic's
        default engine refuses: its pattern is probed with Python's engine."""

        class Rename(BaseModel):
            model_config = ConfigDict(regex_engine="python-re")
            name: str = Field(pattern=r"^(?!admin)[a-z]+$")

        async def rename(data: Any, stores: Any) -> None:
            return None

        command = Command(command_id="RENAME", handler=rename, input_schema=Rename)
        found = find(
            cst.invalid_command_inputs(command),
            lambda v: isinstance(v, dict) and v.get("name") in ("", "!", "0", "A"),
            settings=settings(max_examples=3000),
        )
        with pytest.raises(ValidationError):
            Rename.model_validate(found)

    def test_json_text_inputs_are_json(self) -> None:
        """Broken inputs sent as JSON text parse as JSON objects."""
        found = find(
            cst.invalid_command_inputs(APPEAR),
            lambda v: isinstance(v, str) and v.startswith("{") and v.endswith("}"),
        )
        assert isinstance(json.loads(found), dict)


class TestCommandHistories:
    """``command_histories`` runs commands on in-memory copies and returns the events."""

    @FEW
    @given(
        cst.command_histories(
            POKEMONS,
            [APPEAR, LEVEL_UP, CATCH],
            aggregate_id_field="pokemon_id",
            expected_errors=(CastoreError, AlreadyCaughtError),
            max_size=6,
        )
    )
    def test_histories_come_from_commands(self, history: list[Event]) -> None:
        """Events of one aggregate, versions 1..n, starting with the appearance."""
        assert history[0].type == "POKEMON_APPEARED"
        assert [e.version for e in history] == list(range(1, len(history) + 1))
        assert len({e.aggregate_id for e in history}) == 1
        assert all(_ms_utc(e.timestamp) for e in history)
        assert POKEMONS.event_storage_adapter is None  # the real store was never touched

    def test_a_catch_follows_an_appearance(self) -> None:
        """Commands compose: a catch after level-ups is reachable."""
        history = find(
            cst.command_histories(
                POKEMONS,
                [APPEAR, LEVEL_UP, CATCH],
                aggregate_id_field="pokemon_id",
                expected_errors=(CastoreError, AlreadyCaughtError),
            ),
            lambda h: [e.type for e in h][-2:] == ["POKEMON_LEVELED_UP", "POKEMON_CAUGHT"],
            settings=settings(max_examples=500),
        )
        assert history[-1].type == "POKEMON_CAUGHT"

    def test_without_field_the_first_pushed_aggregate_is_used(self) -> None:
        """No ``aggregate_id_field``: the aggregate of the first pushed event is returned."""
        history = find(
            cst.command_histories(POKEMONS, [APPEAR], min_size=2, max_size=2),
            lambda h: True,
        )
        assert [e.version for e in history] == [1]

    def test_unexpected_errors_propagate(self) -> None:
        """A command failing with an error not listed in ``expected_errors`` is not hidden."""
        strategy = cst.command_histories(
            POKEMONS, [CATCH], aggregate_id_field="pokemon_id", expected_errors=()
        )
        with pytest.raises(AggregateNotFoundError) as raised:
            find(strategy, lambda h: True)
        # It says which commands ran, with which input, the failing one last.
        (note,) = [n for n in raised.value.__notes__ if n.startswith("The command history")]
        assert note.splitlines()[-1].startswith("  1. CATCH: CatchInput(pokemon_id=")

    def test_a_shared_error_keeps_the_last_history_only(self) -> None:
        """An exception object raised again at each run (a module-level instance) keeps
        one history note, the last run's (Hypothesis runs shrunk histories last), and the
        note marks the commands that were skipped (one note per run piled up before)."""
        shared = RuntimeError("bug in the command under test")

        async def failing_catch(data: Any, stores: Any) -> Any:
            (store,) = stores
            if (await store.get_aggregate(data.pokemon_id)).aggregate is None:
                raise AggregateNotFoundError("POKEMONS", data.pokemon_id)
            raise shared

        failing = Command(
            command_id="FAILING_CATCH",
            required_event_stores=[POKEMONS],
            handler=failing_catch,
            input_schema=CATCH.input_schema,
        )
        catch = (failing, {"pokemon_id": "p"})
        appear = (APPEAR, {"pokemon_id": "p", "name": "Pikachu", "level": 3})
        notes = []
        for steps in ([catch, appear, catch], [appear, catch]):
            with pytest.raises(RuntimeError):
                run_commands(
                    POKEMONS,
                    [(command, command.validate_input(value)) for command, value in steps],
                    aggregate_id="p",
                    contexts={"APPEAR": (), "FAILING_CATCH": ()},
                    expected_errors=(AggregateNotFoundError,),
                )
            (note,) = [n for n in shared.__notes__ if n.startswith("The command history")]
            notes.append(note.splitlines()[1:])
        assert [line.split(":")[0].strip() for line in notes[1]] == [
            "1. APPEAR",
            "2. FAILING_CATCH",
        ]
        assert notes[0][0].endswith("(raised AggregateNotFoundError, expected: skipped)")
        assert not notes[0][1].endswith("skipped)")

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"commands": [Command(command_id="X", handler=appear_handler)]}, "required_event"),
            ({"inputs": {"NOPE": {}}}, "inputs name unknown command 'NOPE'"),
            ({"context": {"NOPE": ()}}, "context name unknown command 'NOPE'"),
            ({"min_size": 4, "max_size": 1}, "min_size"),
            ({"min_size": 0}, "at least one command"),
        ],
    )
    def test_bad_arguments_are_refused(self, kwargs: dict[str, Any], message: str) -> None:
        """A store no command uses, unknown commands in ``inputs``, bad sizes: ValueError."""
        arguments: dict[str, Any] = {"commands": [APPEAR], **kwargs}
        with pytest.raises(ValueError, match=message):
            cst.command_histories(POKEMONS, **arguments)

    def test_drawn_ids_the_input_refuses_are_filtered(self) -> None:
        """An aggregate id the input field refuses (too long here) is skipped like any
        invalid input, not raised while drawing."""
        short = Command(
            command_id="SHORT",
            required_event_stores=[POKEMONS],
            handler=appear_handler,
            input_schema=ShortIdInput,
        )
        seen: list[str] = []

        @settings(max_examples=30, database=None, suppress_health_check=list(HealthCheck))
        @given(
            cst.command_histories(
                POKEMONS,
                [short],
                aggregate_id=st.sampled_from(["much-too-long", "ok"]),
                aggregate_id_field="pokemon_id",
                max_size=1,
            )
        )
        def check(history: list[Event]) -> None:
            seen.extend(event.aggregate_id for event in history)

        check()
        assert set(seen) == {"ok"}

    def test_unknown_fixed_input_is_refused_early(self) -> None:
        """Fixing an input field the schema lacks fails when the strategy is built."""
        with pytest.raises(TypeError, match="has no field nickname"):
            cst.command_histories(POKEMONS, [APPEAR], inputs={"APPEAR": {"nickname": "x"}})

    @FEW
    @given(
        cst.command_histories(
            POKEMONS,
            [SPAWN, LEVEL_UP],
            aggregate_id="spawned",
            aggregate_id_field="pokemon_id",
            context={"SPAWN": (lambda: "spawned",)},
            min_size=3,
            max_size=4,
        )
    )
    def test_context_per_command(self, history: list[Event]) -> None:
        """Context arguments go to the commands they are given for, and only to those."""
        assert history[0].aggregate_id == "spawned"
        assert isinstance(history[0], PokemonAppeared)
        assert {e.type for e in history[1:]} <= {"POKEMON_LEVELED_UP"}

    @FEW
    @given(
        cst.command_histories(
            POKEMONS,
            [APPEAR],
            aggregate_id_field="pokemon_id",
            aggregate_id="fixed-id",
            inputs={"APPEAR": {"level": 7}},
            max_size=1,
        )
    )
    def test_fixed_inputs(self, history: list[Event]) -> None:
        """Fixed inputs per command id and a fixed aggregate id are used."""
        (appeared,) = history
        assert isinstance(appeared, PokemonAppeared)
        assert appeared.aggregate_id == "fixed-id"
        assert appeared.payload.level == 7


# -- values validation keeps refusing ------------------------------------------------------------


class Sealed(BaseModel):
    """A cross-field rule that values derived field by field never meet."""

    body: str
    seal: str

    @model_validator(mode="after")
    def _sealed(self) -> Sealed:
        if self.seal != seal_of(self.body):
            raise ValueError("seal does not match body")
        return self


def seal_of(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()[:12]


class Planned(Event):
    type: Literal["PLANNED"] = "PLANNED"
    payload: Sealed


class Noted(Event):
    type: Literal["NOTED"] = "NOTED"


def _warnings_while(
    caplog: pytest.LogCaptureFixture, strategy: st.SearchStrategy[Any], examples: int = 20
) -> tuple[bool, list[str]]:
    """Draw from ``strategy`` in a test; whether Hypothesis gave up, and the warnings logged."""

    @settings(max_examples=examples, deadline=None, database=None)
    @given(strategy)
    def draw(value: Any) -> None:
        pass

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="castore_pydantic.testing.strategies"):
        try:
            draw()
        except (FailedHealthCheck, Unsatisfiable):
            failed = True
        else:
            failed = False
    return failed, [record.getMessage() for record in caplog.records]


class TestRefusedValuesAreNamed:
    """Values a validator always refuses are named in the log, not silently dropped."""

    @pytest.mark.parametrize(
        ("strategy", "named"),
        [
            (lambda: cst.models(Sealed), "drawn for Sealed so far"),
            (lambda: cst.events(Planned), "drawn for Sealed (Planned.payload) so far"),
            (lambda: cst.from_type(list[Sealed]), "drawn for Sealed (list["),
        ],
        ids=["models", "events", "from_type"],
    )
    def test_a_model_whose_validator_refuses_everything_is_named(
        self,
        caplog: pytest.LogCaptureFixture,
        strategy: Any,
        named: str,
    ) -> None:
        """Hypothesis only says it could not satisfy the strategy; the log names the model,
        the validator's message and how to give it values that pass."""
        failed, logged = _warnings_while(caplog, strategy())
        assert failed
        assert len(logged) == 1, logged
        assert named in logged[0]
        assert "refused all 50 values" in logged[0]
        assert "seal does not match body" in logged[0]
        assert "register_type_strategy" in logged[0]

    def test_histories_name_the_payload_of_a_type_that_never_appears(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A history with such an event is discarded and the type never appears: the log
        says why, while the other types are still drawn."""
        store = EventStore(
            event_store_id="PLANS", event_types=[Noted, Planned], reducer=count_fills
        )
        types: set[str] = set()
        strategy = cst.histories(store, max_size=3).map(
            lambda history: types.update(e.type for e in history)
        )
        _, logged = _warnings_while(caplog, strategy, examples=50)
        assert types == {"NOTED"}
        assert len(logged) == 1, logged
        assert "Sealed (Planned.payload)" in logged[0]

    def test_values_refused_now_and_then_are_not_named(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A validator that refuses some values (here about half) only filters them."""
        assert _warnings_while(caplog, cst.models(Validated)) == (False, [])

    def test_fixed_values_that_pass_silence_it(self, caplog: pytest.LogCaptureFixture) -> None:
        """The advice works: fixing the payload to one that passes draws it quietly."""
        payload = st.text().map(lambda body: Sealed(body=body, seal=seal_of(body)))
        assert _warnings_while(caplog, cst.events(Planned, payload=payload)) == (False, [])


async def stale_level_up_handler(data: CatchInput, stores: Sequence[EventStore[Any, Any]]) -> None:
    """Makes the Pokémon appear if needed, then forgets ``version + 1`` when levelling up."""
    (pokemons,) = stores
    pokemon = (await pokemons.get_aggregate(data.pokemon_id)).aggregate
    if pokemon is None:
        appeared = PokemonAppeared(
            aggregate_id=data.pokemon_id, version=1, payload=Appeared(name="Mew", level=1)
        )
        pokemon = (await pokemons.push_event(appeared)).next_aggregate
    await pokemons.push_event(
        PokemonLeveledUp(aggregate_id=data.pokemon_id, version=pokemon.version)
    )


async def module_store_handler(data: CatchInput, stores: Sequence[EventStore[Any, Any]]) -> None:
    """Pushes to the module-level store instead of the copy it is given."""
    await POKEMONS.push_event(PokemonCaught(aggregate_id=data.pokemon_id, version=2))


class TestCommandsThatNeverSucceed:
    """A command whose every run raises an expected error is named, not silently skipped."""

    def test_a_command_that_always_fails_is_named_in_the_log(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A level-up that pushes a taken version raises EventAlreadyExistsError (a
        CastoreError, expected by default) on every run: the log names it and the error."""
        stale = Command(
            command_id="STALE_LEVEL_UP",
            required_event_stores=[POKEMONS],
            handler=stale_level_up_handler,
            input_schema=CatchInput,
        )
        # Three runs an example, all failing: the 20 examples make 60.
        strategy = cst.command_histories(POKEMONS, [stale], min_size=3, max_size=3)
        _, logged = _warnings_while(caplog, strategy)
        assert len(logged) == 1, logged
        assert "command STALE_LEVEL_UP ran 50 times" in logged[0]
        assert "EventAlreadyExistsError" in logged[0]
        assert "version + 1" in logged[0]

    def test_commands_that_sometimes_succeed_are_not_named(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Catching fails when nothing appeared yet, and works after an appearance."""
        strategy = cst.command_histories(
            POKEMONS,
            [APPEAR, CATCH],
            aggregate_id="p",
            aggregate_id_field="pokemon_id",
            expected_errors=(CastoreError, AlreadyCaughtError),
        )
        assert _warnings_while(caplog, strategy) == (False, [])

    def test_a_store_without_adapter_is_never_an_expected_error(self) -> None:
        """A handler pushing to the module-level store (no adapter) fails at once, saying
        to push through the stores it is given, instead of being skipped as a CastoreError."""
        wrong = Command(
            command_id="WRONG_STORE",
            required_event_stores=[POKEMONS],
            handler=module_store_handler,
            input_schema=CatchInput,
        )
        with pytest.raises(UndefinedEventStorageAdapterError) as raised:
            find(cst.command_histories(POKEMONS, [wrong]), lambda h: True)
        assert any("push through the stores" in note for note in raised.value.__notes__)
