"""OpenAI API request bodies (validated with pydantic) and the response objects we send.

Only what jaxinfer serves is accepted: one choice per request (`n=1`), no penalties. Types
are strict, as OpenAI's API is: a boolean must be a JSON boolean, an integer a JSON integer
(`"10"` is refused). Unknown fields are ignored, as OpenAI's own server does; known fields
this server does not implement yet (`logprobs`, `echo`, ...) are refused by name. `top_k`,
`min_p` and `stop_token_ids` are extensions vLLM also accepts.

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
| `n` | 1 |
| `presence_penalty`, `frequency_penalty` | 0 |

Text that reaches the tokenizer (`prompt`, message contents, `stop`) must be valid Unicode:
JSON can carry a lone surrogate (`"\\ud800"`), which no tokenizer can encode.
"""

from __future__ import annotations

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
)

INT32_LIMIT = 2**31  # token ids and token counts end up in int32 arrays
SEED_RANGE = (-(2**63), 2**63)  # int64, as vLLM and OpenAI's SDKs type it
MAX_STOP_STRINGS = 16


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
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: Any = None  # not supported yet, as are the fields _not_supported_yet names

    @field_validator("logit_bias", "logprobs", "top_logprobs", "echo", "suffix", "tools",
                     mode="before", check_fields=False)
    @classmethod
    def _not_supported_yet(cls, value: Any, info: ValidationInfo) -> Any:
        if not _absent(value):
            raise ValueError(f"`{info.field_name}` is not supported yet")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n}; this server returns exactly one choice (n=1)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError(f"{value}: penalties are not supported (only 0)")
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
    echo: Any = None
    logprobs: Any = None
    suffix: Any = None

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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        Text | list[ContentPart], _one_of('a string or a list of {"type": "text", "text": ...}')
    ] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: TokenCount | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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
               usage_: dict | None, *, chunk: bool = False) -> dict:
    """A text_completion object (one choice), or one streamed chunk of it."""
    body = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_completion(request_id: str, model: str, text: str, finish_reason: str | None,
                    usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, delta: dict | None, finish_reason: str | None,
               usage_: dict | None = None) -> dict:
    """A chat.completion.chunk; `delta=None` gives the usage-only chunk (no choices)."""
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
