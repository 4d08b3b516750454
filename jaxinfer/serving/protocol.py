"""OpenAI API request bodies (validated with pydantic) and the response objects we send.

Only what jaxinfer serves is accepted. Types are strict, as OpenAI's API is: a boolean must
be a JSON boolean, an integer a JSON integer (`"10"` is refused). Unknown fields are ignored,
as OpenAI's own server does; known fields this server does not implement yet (`suffix`)
is refused by name. `top_k`, `min_p`, `stop_token_ids`, `repetition_penalty`,
`min_tokens` and `ignore_eos` are extensions vLLM also accepts.

Logprobs are those of the raw model logits (before temperature, penalties and logit bias),
as vLLM returns by default.

Every number is checked here against the range of the type it ends up in; the server then
checks what depends on the model (token ids against the vocabulary, lengths against the
context):

| field | accepted |
|---|---|
| `max_tokens`, `max_completion_tokens` | integer in [1, 2**31); prompt + it <= the context |
| `temperature` | number in [0, 2] |
| `top_p` | number in (0, 1] |
| `top_k` | integer >= -1; -1, 0 and anything >= the vocabulary size mean all tokens |
| `min_p` | number in [0, 1] |
| `seed` | integer in [-2**63, 2**63) (int64, as vLLM); folded to the engine's 32 bits |
| `stop` | a string or up to 16 non-empty strings |
| `stop_token_ids` | integers in [0, vocabulary size); at most 16 with the model's own |
| `prompt` (token ids) | integers in [0, vocabulary size) |
| `n` | integer in [1, 16]; choice i samples with seed + i (mod 2**32), see the server |
| `presence_penalty`, `frequency_penalty` | number in [-2, 2] |
| `repetition_penalty` | number in (0, 2]; 1 is off |
| `logit_bias` | at most 300 entries, token id (a decimal string) -> number in [-100, 100] |
| `min_tokens` | integer in [0, max_tokens] |
| `ignore_eos` | boolean |
| `logprobs` (completions) | integer in [0, 20] |
| `echo` (completions) | boolean; with `logprobs`, the prompt's tokens get logprobs too |
| `logprobs` (chat) | boolean; `top_logprobs` integer in [0, 20], only with `logprobs: true` |
| `response_format` | `{"type": "text" / "json_object" / "json_schema", "json_schema": {...}}` |
| `guided_json`, `guided_regex`, ... | vLLM's, or `structured_outputs`; one constraint at most |
| `tools`, `tool_choice` (chat) | function tools; `none`, `auto`, `required` or one named |
| `watermark` | boolean; default: on when the server has a `--watermark_key`, which `true` needs |

Text that reaches the tokenizer (`prompt`, message contents, `stop`) must be valid Unicode:
JSON can carry a lone surrogate (`"\\ud800"`), which no tokenizer can encode.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)

INT32_LIMIT = 2**31  # token ids and token counts end up in int32 arrays
SEED_RANGE = (-(2**63), 2**63)  # int64, as vLLM and OpenAI's SDKs type it
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16  # n
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
            f"{e.start}; send UTF-8 text"
        ) from None
    return text


def _one_of(forms: str) -> WrapValidator:
    """Reports a union's failure as one reason, not one per alternative: a check's own reason,
    else an out-of-range item of a list, else the forms allowed."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError as e:
            problems = e.errors()
        reasons = [p["msg"].removeprefix("Value error, ") for p in problems
                   if p["type"] == "value_error"]
        reasons += [f"item {'.'.join(map(str, p['loc'][1:]))}: {p['msg']}" for p in problems
                    if len(p["loc"]) > 1 and not p["type"].endswith("_type")]
        raise ValueError(reasons[0] if reasons else f"must be {forms}") from None

    return WrapValidator(validate)


Text = Annotated[str, AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, lt=INT32_LIMIT)]
TokenCount = Annotated[int, Field(ge=1, lt=INT32_LIMIT)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]


def _absent(value: Any) -> bool:
    """Whether a not-yet-supported field holds only its 'off' value (null, false, empty)."""
    if value is None or value is False:
        return True
    return isinstance(value, str | list | dict) and not value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a `json_schema` object with a `schema`')
        return self


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` (its newer form of the guided_* fields): one of these."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = Field(default=None, min_length=1)
    grammar: Text | None = None


class _SamplingFields(_Strict):
    model: Text
    max_tokens: TokenCount | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: Probability = 1.0
    top_k: int = Field(default=-1, ge=-1)  # -1, 0 or >= the vocabulary: all tokens
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stop: Annotated[Text | list[Text], _one_of("a string or a list of strings")] | None = None
    stop_token_ids: list[TokenId] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_tokens: int = Field(default=0, ge=0, lt=INT32_LIMIT)
    ignore_eos: bool = False
    watermark: bool | None = None  # jaxinfer's green-list watermark; None: the server's default
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs spell tokens "token_id:17"
    user: str | None = None
    # Under a precision route: "high" (float), "fast" (quantized) or "auto" (serving.router).
    precision: Literal["auto", "high", "fast"] | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(default=None, min_length=1)
    guided_grammar: Text | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("suffix", mode="before", check_fields=False)
    @classmethod
    def _not_supported_yet(cls, value: Any, info: ValidationInfo) -> Any:
        if not _absent(value):
            raise ValueError(f"`{info.field_name}` is not supported yet")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if not bias:
            return None
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(bias)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        for token, value in bias.items():
            if not token.isdigit() or int(token) >= INT32_LIMIT:
                raise ValueError(f"key {token!r} is not a token id (a non-negative integer)")
            if not -100 <= value <= 100:
                raise ValueError(f"token {token}: bias {value} is outside [-100, 100]")
        return bias

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_within_max(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_tokens")
        if limit is not None and value > limit:
            raise ValueError(f"min_tokens={value} is more than max_tokens={limit}")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None,
                             info: ValidationInfo) -> StreamOptions | None:
        if options is not None and info.data.get("stream") is not True:
            raise ValueError("stream_options is only allowed with stream: true")
        return options

    @property
    def constraint(self) -> tuple[str, str, Any] | None:
        """(field, kind, spec) of the one structured-output constraint asked for, if any;
        kind is json_schema, json_object, regex, choice or grammar (serving.structured)."""
        found = []
        if self.response_format is not None and self.response_format.type != "text":
            form = self.response_format
            found.append(("response_format", form.type,
                          form.json_schema.schema_ if form.json_schema else None))
        outputs = self.structured_outputs
        for field, kind, spec in [
            ("guided_json", "json_schema", self.guided_json),
            ("guided_regex", "regex", self.guided_regex),
            ("guided_choice", "choice", self.guided_choice),
            ("guided_grammar", "grammar", self.guided_grammar),
            *[("structured_outputs", kind, getattr(outputs, name, None)) for name, kind in
              [("json_", "json_schema"), ("regex", "regex"), ("choice", "choice"),
               ("grammar", "grammar")]],
        ]:
            if spec is not None:
                found.append((field, kind, spec))
        if len(found) > 1:
            raise ValueError(f"{len(found)} structured-output constraints "
                             f"({', '.join(f for f, _, _ in found)}); give at most one")
        field, kind, spec = found[0] if found else (None, None, None)
        if kind == "json_schema" and isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise ValueError(f"{field}: the schema is not valid JSON: {e}") from None
        return (field, kind, spec) if found else None

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Annotated[
        Text | list[Text] | list[TokenId] | list[list[TokenId]],
        _one_of("a string, a list of token ids, or a list holding one of those"),
    ]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: Any = None

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many top logprobs each token gets (None: no logprobs at all)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ValueError(f"{len(prompt)} prompts; this server takes one per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class ContentPart(_Strict):
    type: Literal["text"]
    text: Text


class FunctionCall(_Strict):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        Text | list[ContentPart], _one_of('a string or a list of {"type": "text", "text": ...}')
    ] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool result's call
    name: Text | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it (tool calls as transformers passes them)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class Function(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: Function


class NamedToolChoice(_Strict):
    class _Name(_Strict):
        name: Text

    type: Literal["function"]
    function: _Name


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        tools = info.data.get("tools") or []
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in tools]
            if choice.function.name not in names:
                raise ValueError(f"function {choice.function.name!r} is not among the "
                                 f"tools ({', '.join(names) or 'none given'})")
        elif choice == "required" and not tools:
            raise ValueError('"required" needs at least one tool in `tools`')
        return choice

    @property
    def tool_dicts(self) -> list[dict] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether a tool call is forced, the function's name if one is named)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required", None

    @field_validator("top_logprobs")
    @classmethod
    def _only_with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is not True:
            raise ValueError("top_logprobs is only allowed with logprobs: true")
        return value

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's): a `prompt`, or chat `messages` rendered by the template."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: yes for a prompt, no for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's)."""

    model: Text | None = None
    tokens: list[TokenId]


class WatermarkDetectRequest(_Strict):
    """POST /v1/watermark/detect (jaxinfer's): how strongly `text` carries the watermark of
    `key` (default: the server's own key)."""

    model: Text | None = None
    text: Annotated[Text, Field(min_length=1)]
    key: Annotated[str, Field(min_length=1, max_length=1024)] | None = None

    @field_validator("key")
    @classmethod
    def _key_is_unicode(cls, key: str | None) -> str | None:
        try:
            key is None or key.encode("utf-8")
        except UnicodeEncodeError:  # the message says nothing of the key's contents
            raise ValueError("the key is not valid Unicode (a lone surrogate); send UTF-8 "
                             "text") from None
        return key


# -- responses --------------------------------------------------------------------------------


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion(request_id: str, model: str, text: str, finish_reason: str | None,
               usage_: dict | None, *, chunk: bool = False, index: int = 0,
               logprobs: dict | None = None) -> dict:
    """A text_completion object (one choice), or one streamed chunk of it."""
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs,
                     "finish_reason": finish_reason}],
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_completion(request_id: str, model: str, text: str, finish_reason: str | None,
                    usage_: dict, *, index: int = 0, logprobs: dict | None = None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, delta: dict | None, finish_reason: str | None,
               usage_: dict | None = None, *, index: int = 0,
               logprobs: dict | None = None) -> dict:
    """A chat.completion.chunk; `delta=None` gives the usage-only chunk (no choices)."""
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


# A token's logprob entry: (token id, its logprob or None (a prompt's first token), the top
# (token id, logprob) pairs, most likely first).
LogprobEntry = tuple[int, float | None, list[tuple[int, float]]]


def completion_logprobs(entries: list[LogprobEntry], token_text, text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object; `token_text(id)` spells a token. Each
    top_logprobs dict holds the top tokens and the chosen one, as vLLM's does."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token, logprob, top in entries:
        text = token_text(token)
        offsets.append(text_offset)
        text_offset += len(text)
        tokens.append(text)
        token_logprobs.append(logprob)
        if logprob is None:
            top_logprobs.append(None)
            continue
        top_logprobs.append({token_text(t): lp for t, lp in top} | {text: logprob})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(entries: list[LogprobEntry], token_text) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def spelled(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**spelled(token, logprob),
                         "top_logprobs": [spelled(t, lp) for t, lp in top]}
                        for token, logprob, top in entries]}
