"""Request schemas for the HTTP API (pydantic, strict types), and their translation to SamplingParams.

Unknown top-level fields are ignored, as OpenAI-compatible servers do; unknown *sampling* fields in
SGLang's `sampling_params` are errors, as in SGLang.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import bad_request
from ..limits import MAX_BATCH, MAX_COUNT, MAX_TOP_LOGPROBS, SEED_MAX, SEED_MIN
from ..resume import RESUME_FIELD
from ..validation import describe
from .sampling_params import GRAMMAR_KINDS, InvalidParamError, SamplingParams
from .tool_calls import ANY_OBJECT, ForcedToolCalls


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# Bounded integers (sglang_gw/limits.py), for the fields that SamplingParams does not check under the
# name the client sent (max_tokens becomes max_new_tokens, seed sampling_seed, ...).
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Position = Annotated[int, Field(ge=-1, le=MAX_COUNT)]  # -1: none
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


def _batch(prompts: list, field: str) -> list:
    """A request's prompts, at most MAX_BATCH of them."""
    if not prompts:
        raise bad_request("the batch is empty", field)
    if len(prompts) > MAX_BATCH:
        raise bad_request(f"a batch has at most {MAX_BATCH} prompts (got {len(prompts)})", field, "too_many_prompts")
    return prompts


class _Resumable(_Schema):
    # Output ids another engine generated, by choice index, to continue from (sglang_gw/resume.py).
    resume: dict[str, list[int]] | None = Field(None, alias=RESUME_FIELD)

    def resumed(self, samples: list[int]) -> list[dict[int, list[int]]]:
        """Per prompt (with samples[i] samples each): sample index → the output ids it continues from.
        Choices count prompt by prompt: prompt i's samples follow those of the prompts before it."""
        owner = [(prompt, sample) for prompt, n in enumerate(samples) for sample in range(n)]
        per_prompt: list[dict[int, list[int]]] = [{} for _ in samples]
        for key, ids in (self.resume or {}).items():
            if not key.isdigit() or int(key) >= len(owner):
                raise bad_request(f"{RESUME_FIELD}: {key!r} is not a choice index below {len(owner)}", RESUME_FIELD)
            prompt, sample = owner[int(key)]
            per_prompt[prompt][sample] = ids
        return per_prompt


class StreamOptions(_Schema):
    include_usage: bool = False


class JsonSchemaFormat(_Schema):
    name: str | None = None
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted; the output always matches the schema (unsupported keywords are 400s)


class ResponseFormat(_Schema):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("json_schema.schema is required for type json_schema")
        return self


class _SamplingFields(_Resumable):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's and SGLang's extras). A sampling
    field left out (or null) is unset: the engine fills it with the model's default (Engine.prepare)."""

    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: Count = 0
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    no_stop_trim: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    regex: str | None = None
    json_schema: str | dict | None = None
    ebnf: str | None = None
    stop_regex: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    rid: str | None = None

    def grammar(self) -> tuple[dict, str | None]:
        """The output's grammar as sampling fields ({} or one of regex / json_schema / ebnf), and the
        request field to name when it is invalid."""
        given = {kind: getattr(self, kind) for kind in GRAMMAR_KINDS if getattr(self, kind) is not None}
        fmt = self.response_format
        if fmt is not None and fmt.type != "text":
            schema = ANY_OBJECT if fmt.type == "json_object" else fmt.json_schema.schema_
            if given:
                raise bad_request(f"give either response_format or {next(iter(given))}", "response_format")
            field = "response_format" if fmt.type == "json_object" else "response_format.json_schema.schema"
            return {"json_schema": json.dumps(schema)}, field
        if len(given) > 1:
            raise bad_request(f"give at most one of {', '.join(GRAMMAR_KINDS)}", list(given)[1])
        return given, None

    def sampling_dict(self, max_new_tokens: int | None, grammar: dict) -> dict:
        d = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "n": self.n, "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "min_new_tokens": self.min_tokens,
            "stop": self.stop, "stop_token_ids": self.stop_token_ids, "no_stop_trim": self.no_stop_trim,
            "ignore_eos": self.ignore_eos, "skip_special_tokens": self.skip_special_tokens,
            "sampling_seed": self.seed, "logit_bias": self.logit_bias, "stop_regex": self.stop_regex, **grammar,
        }
        if max_new_tokens is not None:
            d["max_new_tokens"] = max_new_tokens
        return d


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Count | None = 16
    logprobs: TopLogprobs | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """A list of strings or of id lists is a batch; a string or an id list is one prompt."""
        batch = isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        return _batch(list(self.prompt) if batch else [self.prompt], "prompt")


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ChatMessage(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        """The message as chat templates read it (tool fields only where given)."""
        message = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class FunctionDefinition(_Schema):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Schema):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Schema):
    name: str


class NamedToolChoice(_Schema):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def forced_tool_calls(self) -> ForcedToolCalls | None:
        """The tool calls the output is constrained to, or None (tool_choice "none", or no tools)."""
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice != "none":
                raise bad_request("tool_choice needs tools", "tool_choice")
            return None
        if choice == "none":
            return None
        if choice is None or choice == "auto":
            raise bad_request("tool_choice \"auto\" (the default with tools) is not supported: no model family's "
                              "tool-call syntax is parsed yet; pass \"required\" or a named function, whose calls "
                              "are guaranteed by constrained decoding", "tool_choice", "unsupported")
        parameters = {t.function.name: t.function.parameters or ANY_OBJECT for t in self.tools}
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if named is not None and named not in parameters:
            raise bad_request(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        grammar, _ = self.grammar()
        if grammar:
            raise bad_request("a forced tool call cannot also have an output format", "tool_choice")
        return ForcedToolCalls(parameters, named, self.parallel_tool_calls)


class GenerateRequest(_Resumable):
    """SGLang's native /generate. A list `text` (or list of lists `input_ids`) is a batch."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: Position | list[Position] = -1
    top_logprobs_num: TopLogprobs | list[TopLogprobs] = 0
    return_text_in_logprobs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        return self

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or (bool(self.input_ids) and isinstance(self.input_ids[0], list))

    @property
    def prompt_field(self) -> str:
        return "text" if self.text is not None else "input_ids"

    def prompts(self) -> list[str | list[int]]:
        if self.text is not None:
            return _batch(list(self.text) if isinstance(self.text, list) else [self.text], "text")
        return _batch(list(self.input_ids) if self.is_batch else [self.input_ids], "input_ids")

    def per_item(self, name: str, count: int) -> list:
        """A per-request field broadcast over the batch (a list must have one entry per prompt)."""
        value = getattr(self, name)
        if isinstance(value, list):
            if len(value) != count:
                raise bad_request(f"{name} has {len(value)} entries for a batch of {count}", name)
            return value
        return [value] * count


def parse(schema: type[_Schema], body: object) -> _Schema:
    """Validate a JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        param, message = describe(exc)
        raise bad_request(f"{param}: {message}" if param else message, param) from None


def sampling_params(d: dict | None) -> SamplingParams:
    try:
        return SamplingParams.from_dict(d)
    except InvalidParamError as exc:
        raise bad_request(str(exc), exc.param, exc.code) from None
