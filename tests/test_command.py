from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, RootModel, ValidationError
from typing_extensions import TypedDict

from castore_pydantic import Command, EventAlreadyExistsError, OnEventAlreadyExistsContext

if TYPE_CHECKING:  # a name only type checkers see, as modules often import for annotations
    from collections.abc import Sequence as OnlyForTypeCheckers


class LevelUpInput(BaseModel):
    pokemon_id: str = Field(min_length=1)
    levels: int = Field(default=1, ge=1, le=10)


class Levels(TypedDict):
    levels: int


@dataclasses.dataclass
class LevelsDataclass:
    levels: int


class LevelsModel(BaseModel):
    kind: Literal["levels"] = "levels"
    levels: int


class Renamed(BaseModel):
    kind: Literal["renamed"] = "renamed"
    name: str


class LevelUpOutput(BaseModel):
    new_level: int


def conflict() -> EventAlreadyExistsError:
    return EventAlreadyExistsError("POKEMONS", "pikachu", 2)


class Recorder:
    """Records the calls a command makes to its handler and its conflict callback."""

    def __init__(self, failures: int, error: Exception | None = None) -> None:
        self.failures = failures
        self.error = error or conflict()
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.callbacks: list[tuple[int, int]] = []
        self.errors: list[Exception] = []

    async def handler(self, data: Any, stores: Sequence[Any], *context: Any) -> dict[str, int]:
        self.calls.append((data, context))
        if len(self.calls) <= self.failures:
            raise self.error
        return {"new_level": 5}

    async def on_conflict(
        self, error: EventAlreadyExistsError, context: OnEventAlreadyExistsContext
    ) -> None:
        self.errors.append(error)
        self.callbacks.append((context.attempt_number, context.retries_left))


def command(recorder: Recorder, **options: Any) -> Command[LevelUpInput, LevelUpOutput]:
    return Command(
        command_id="LEVEL_UP",
        required_event_stores=[],
        handler=recorder.handler,
        input_schema=LevelUpInput,
        output_schema=LevelUpOutput,
        on_event_already_exists=recorder.on_conflict,
        **options,
    )


class TestRetries:
    def test_default_retries_is_two(self) -> None:
        """event_already_exists_retries defaults to 2 (B46)."""
        assert command(Recorder(0)).event_already_exists_retries == 2

    async def test_succeeds_on_third_attempt(self) -> None:
        """Two conflicts then success: 3 calls, 2 callbacks with (1,2), (2,1) (B47)."""
        recorder = Recorder(failures=2)
        output = await command(recorder).handler({"pokemon_id": "pikachu"}, [], "ctx-a", 7)
        assert output == LevelUpOutput(new_level=5)
        assert len(recorder.calls) == 3
        assert recorder.callbacks == [(1, 2), (2, 1)]
        assert all(context == ("ctx-a", 7) for _, context in recorder.calls)

    async def test_gives_up_with_the_original_error(self) -> None:
        """Always conflicting: 3 calls, callback (3,0) last, the same error re-raised (B48)."""
        recorder = Recorder(failures=99)
        with pytest.raises(EventAlreadyExistsError) as info:
            await command(recorder).handler({"pokemon_id": "pikachu"})
        assert info.value is recorder.error
        assert len(recorder.calls) == 3
        assert recorder.callbacks == [(1, 2), (2, 1), (3, 0)]

    async def test_other_errors_are_not_retried(self) -> None:
        """A non-conflict exception propagates at once, without callback (B49)."""
        recorder = Recorder(failures=1, error=KeyError("boom"))
        with pytest.raises(KeyError):
            await command(recorder).handler({"pokemon_id": "pikachu"})
        assert len(recorder.calls) == 1
        assert recorder.callbacks == []

    async def test_zero_retries_runs_once(self) -> None:
        """event_already_exists_retries=0: one attempt, callback (1,0), then raise (B50)."""
        recorder = Recorder(failures=1)
        with pytest.raises(EventAlreadyExistsError):
            await command(recorder, event_already_exists_retries=0).handler({"pokemon_id": "p"})
        assert len(recorder.calls) == 1
        assert recorder.callbacks == [(1, 0)]

    async def test_failing_callback_stops_retrying(self) -> None:
        """An exception in on_event_already_exists escapes and stops the retries (B51)."""
        recorder = Recorder(failures=5)

        async def explode(error: EventAlreadyExistsError, context: Any) -> None:
            raise RuntimeError("stop")

        cmd = command(recorder)
        cmd.on_event_already_exists = explode
        with pytest.raises(RuntimeError, match="stop"):
            await cmd.handler({"pokemon_id": "p"})
        assert len(recorder.calls) == 1

    async def test_no_delay_between_attempts(self) -> None:
        """Retries happen immediately (B52)."""
        recorder = Recorder(failures=2)
        start = time.perf_counter()
        await command(recorder).handler({"pokemon_id": "p"})
        assert time.perf_counter() - start < 0.5

    async def test_duck_typed_conflicts_are_retried(self) -> None:
        """Any error with code EventAlreadyExistsError counts as a conflict (B20)."""

        class ForeignConflictError(Exception):
            code = "EventAlreadyExistsError"

        recorder = Recorder(failures=1, error=ForeignConflictError())
        assert await command(recorder).handler({"pokemon_id": "p"}) == LevelUpOutput(new_level=5)
        assert len(recorder.calls) == 2

    async def test_sync_callback_is_supported(self) -> None:
        """A plain function works as on_event_already_exists."""
        seen: list[int] = []
        recorder = Recorder(failures=1)
        cmd = command(recorder)
        cmd.on_event_already_exists = lambda error, context: seen.append(context.attempt_number)
        await cmd.handler({"pokemon_id": "p"})
        assert seen == [1]

    def test_negative_retries_are_refused(self) -> None:
        """A negative retry count is a ValueError at construction."""
        with pytest.raises(ValueError, match="retries"):
            command(Recorder(0), event_already_exists_retries=-1)


class TestValidation:
    @pytest.mark.parametrize(
        "given",
        [
            {"pokemon_id": "pikachu", "levels": 2},
            '{"pokemon_id": "pikachu", "levels": 2}',
            b'{"pokemon_id": "pikachu", "levels": 2}',
            LevelUpInput(pokemon_id="pikachu", levels=2),
        ],
    )
    async def test_input_forms_are_validated_into_the_model(self, given: object) -> None:
        """A dict, JSON text or model instance reaches the handler as the input model."""
        recorder = Recorder(0)
        await command(recorder).handler(given)
        assert recorder.calls[0][0] == LevelUpInput(pokemon_id="pikachu", levels=2)

    @pytest.mark.parametrize(
        "given",
        [
            {"pokemon_id": "", "levels": 2},
            {"levels": 2},
            {"pokemon_id": "p", "levels": 11},
            {"pokemon_id": "p", "levels": "many"},
            "not json",
            42,
            None,
        ],
    )
    async def test_invalid_input_never_reaches_the_handler(self, given: object) -> None:
        """Invalid input raises ValidationError before the handler runs."""
        recorder = Recorder(0)
        with pytest.raises(ValidationError):
            await command(recorder).handler(given)
        assert recorder.calls == []

    async def test_invalid_output_is_refused(self) -> None:
        """A handler returning data that does not fit output_schema raises ValidationError."""

        async def bad(data: LevelUpInput, stores: Sequence[Any]) -> Any:
            return {"new_level": "high"}

        cmd = Command(command_id="C", handler=bad, input_schema=LevelUpInput,
                      output_schema=LevelUpOutput)  # fmt: skip
        with pytest.raises(ValidationError) as raised:
            await cmd.handler({"pokemon_id": "p"})
        # The handler ran: whatever it pushed is stored, and the error says so.
        assert any("pushed are stored" in note for note in raised.value.__notes__)

    async def test_a_plain_function_handler_is_a_clear_error(self) -> None:
        """A handler defined without 'async' is named as such (it failed with "object ...
        can't be used in 'await' expression")."""

        def plain(data: LevelUpInput, stores: Sequence[Any]) -> LevelUpOutput:
            return LevelUpOutput(new_level=1)

        cmd = Command(command_id="C", handler=plain)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="returned LevelUpOutput, not an awaitable"):
            await cmd.handler({"pokemon_id": "p"})

    async def test_a_lambda_returning_a_coroutine_is_a_handler(self) -> None:
        """What matters is that the call returns an awaitable, not how it is defined."""
        recorder = Recorder(failures=0)
        cmd = Command(
            command_id="C",
            handler=lambda data, stores: recorder.handler(data, stores),  # noqa: PLW0108
            input_schema=LevelUpInput,
            output_schema=LevelUpOutput,
        )
        assert await cmd.handler({"pokemon_id": "p"}) == LevelUpOutput(new_level=5)

    async def test_schemas_are_read_from_annotations(self) -> None:
        """Without explicit schemas, the handler's annotations are used."""

        async def handler(data: LevelUpInput, stores: Sequence[Any]) -> LevelUpOutput:
            return LevelUpOutput(new_level=data.levels)

        cmd = Command(command_id="C", handler=handler)
        assert cmd.input_schema is LevelUpInput
        assert cmd.output_schema is LevelUpOutput
        assert await cmd.handler('{"pokemon_id": "p", "levels": 3}') == LevelUpOutput(new_level=3)
        with pytest.raises(ValidationError):
            await cmd.handler({"pokemon_id": "p", "levels": 0})

    async def test_an_unresolvable_other_annotation_does_not_drop_the_schemas(self) -> None:
        """A name imported only for type checkers, on the second parameter, used to make
        both schemas None without a word: invalid input reached the handler."""
        called: list[object] = []

        async def handler(data: LevelUpInput, stores: OnlyForTypeCheckers) -> LevelUpOutput:
            called.append(data)
            return LevelUpOutput(new_level=data.levels)

        cmd = Command(command_id="C", handler=handler)
        assert (cmd.input_schema, cmd.output_schema) == (LevelUpInput, LevelUpOutput)
        with pytest.raises(ValidationError):
            await cmd.handler({"pokemon_id": 42, "levels": -5})
        assert called == []

    async def test_a_handler_object_is_described_by_its_call_method(self) -> None:
        """A handler object whose class annotates its attributes (a dataclass holding its
        dependencies) takes its schemas from ``__call__``, not from those annotations (the
        input schema used to be a bare string, or the attribute's type)."""

        @dataclasses.dataclass
        class LevelUp:
            data: str  # an attribute named like __call__'s first parameter

            async def __call__(self, data: LevelUpInput, stores: Sequence[Any]) -> LevelUpOutput:
                return LevelUpOutput(new_level=data.levels)

        cmd = Command(command_id="C", handler=LevelUp(data="injected"))
        assert (cmd.input_schema, cmd.output_schema) == (LevelUpInput, LevelUpOutput)
        assert await cmd.handler('{"pokemon_id": "p", "levels": 4}') == LevelUpOutput(new_level=4)

    def test_an_unresolvable_schema_annotation_is_an_error_naming_the_fix(self) -> None:
        """An input or return annotation that cannot be resolved (a class defined inside a
        function) is a TypeError at construction, not a command without validation."""

        class Local(BaseModel):
            name: str

        async def takes(data: Local, stores: Sequence[Any]) -> None:
            return None

        async def gives(data: LevelUpInput, stores: Sequence[Any]) -> Local:
            return Local(name=data.pokemon_id)

        with pytest.raises(TypeError, match="input_schema="):
            Command(command_id="C", handler=takes)
        with pytest.raises(TypeError, match="output_schema="):
            Command(command_id="C", handler=gives)
        assert Command(command_id="C", handler=takes, input_schema=Local).input_schema is Local
        explicit = Command(command_id="C", handler=gives, output_schema=Local)
        assert (explicit.input_schema, explicit.output_schema) == (LevelUpInput, Local)

    @pytest.mark.parametrize(
        "schema", [Levels, LevelsDataclass, dict[str, int], LevelsDataclass | None]
    )
    async def test_json_text_is_read_for_any_object_like_schema(self, schema: Any) -> None:
        """JSON text input is parsed for TypedDict, dataclass and mapping schemas too (it
        was only for models), and still validated."""

        async def handler(data: Any, stores: Sequence[Any]) -> Any:
            return data

        cmd = Command(command_id="C", handler=handler, input_schema=schema)
        result = await cmd.handler('{"levels": 3}')
        assert (result["levels"] if isinstance(result, dict) else result.levels) == 3
        with pytest.raises(ValidationError):
            await cmd.handler('{"levels": "many"}')

    @pytest.mark.parametrize(
        "schema",
        [
            Annotated[LevelsModel | Renamed, Field(discriminator="kind")],
            Annotated[LevelsModel, Field(description="levels to gain")],
            RootModel[LevelsModel],
        ],
    )
    async def test_json_text_is_read_for_annotated_and_root_model_schemas(
        self, schema: Any
    ) -> None:
        """An Annotated schema (a discriminated union) or a RootModel of a model refused JSON
        text, which a plain model accepts: text reached Pydantic as a value."""

        async def handler(data: Any, stores: Sequence[Any]) -> Any:
            return data

        cmd = Command(command_id="C", handler=handler, input_schema=schema)
        result = await cmd.handler('{"kind": "levels", "levels": 3}')
        assert getattr(result, "root", result) == LevelsModel(levels=3)
        with pytest.raises(ValidationError):
            await cmd.handler('{"kind": "levels", "levels": "many"}')

    @pytest.mark.parametrize("schema", [list[LevelsModel], Sequence[LevelsModel]])
    async def test_json_text_is_read_for_array_schemas(self, schema: Any) -> None:
        async def handler(data: Any, stores: Sequence[Any]) -> int:
            return sum(item.levels for item in data)

        cmd = Command(command_id="C", handler=handler, input_schema=schema)
        assert await cmd.handler('[{"levels": 1}, {"levels": 2}]') == 3

    async def test_text_for_a_root_model_of_str_is_the_value_itself(self) -> None:
        """RootModel[str] parsed text as JSON ("Invalid JSON" for pikachu), where str
        itself takes the text as it is."""

        async def handler(data: RootModel[str], stores: Sequence[Any]) -> str:
            return data.root

        assert await Command(command_id="C", handler=handler).handler("pikachu") == "pikachu"

    async def test_text_for_a_str_schema_is_the_value_itself(self) -> None:
        async def handler(data: str, stores: Sequence[Any]) -> str:
            return data

        assert await Command(command_id="C", handler=handler).handler('{"a": 1}') == '{"a": 1}'

    async def test_without_schemas_input_passes_through(self) -> None:
        """Unannotated handlers get their input unchanged."""

        async def handler(data, stores):  # type: ignore[no-untyped-def]
            return data

        cmd: Command[Any, Any] = Command(command_id="C", handler=handler)
        assert cmd.input_schema is None
        assert await cmd.handler({"anything": 1}) == {"anything": 1}
