"""Request bodies of the OpenAI-compatible API, validated with pydantic, and its error shape.

Fields that specdec cannot honour exactly (several choices, log-probabilities,
presence/frequency penalties, tools...) are declared with their neutral value
as default; :meth:`CompletionFields.unsupported` names the first one a request
sets to anything else, so the server answers 400 instead of silently changing
what the request means. Fields the API does not know at all are ignored (chat
front-ends send many of their own) and listed in the request's log line.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine import message_text
from ..errors import ChatContentError
from ..sampling import SEED_MIN, SEED_MAX

# (field, value that means "off"): anything else is refused with a 400 naming the field
_NEUTRAL: tuple[tuple[str, Any], ...] = (
    ("n", 1),
    ("best_of", 1),
    ("logprobs", None),
    ("top_logprobs", None),
    ("presence_penalty", 0.0),
    ("frequency_penalty", 0.0),
    ("logit_bias", None),
    ("tools", None),
    ("functions", None),
    ("echo", False),
    ("suffix", None),
)
_REASONS = {
    "n": "specdec generates one choice per request",
    "best_of": "specdec generates one choice per request",
    "logprobs": "specdec does not return log-probabilities",
    "top_logprobs": "specdec does not return log-probabilities",
    "presence_penalty": "specdec applies repetition_penalty (transformers' multiplicative penalty) only; "
    "an additive presence/frequency penalty would change what is sampled",
    "frequency_penalty": "specdec applies repetition_penalty (transformers' multiplicative penalty) only; "
    "an additive presence/frequency penalty would change what is sampled",
    "logit_bias": "specdec does not bias logits",
    "tools": "specdec does not call tools",
    "functions": "specdec does not call functions",
    "tool_choice": "specdec does not call tools",
    "function_call": "specdec does not call functions",
    "echo": "specdec does not echo the prompt",
    "suffix": "specdec does not insert text (no suffix)",
    "response_format": "specdec does not constrain the output format",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class CompletionFields(BaseModel):
    """The fields both endpoints share. Defaults are OpenAI's (``temperature`` 1 samples).

    JSON's non-standard ``NaN``/``Infinity`` (and numbers beyond a float, such as ``1e999``) are refused.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, description="0 keeps the likeliest token alone: greedy")
    top_k: int = Field(default=0, ge=0, description="extension: 0 = off")
    repetition_penalty: float = Field(default=1.0, gt=0.0, description="extension: 1 = off")
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = Field(default=False, strict=True)  # "yes" is not a boolean
    stream_options: dict[str, Any] | None = None  # usage is always sent, so include_usage changes nothing
    user: str | None = None
    n: int = 1
    best_of: int = 1
    logprobs: Any = None
    top_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    echo: bool = Field(default=False, strict=True)
    suffix: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's optional fields are nullable: ``null`` asks for the default (``"temperature": null`` is 1)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    def unsupported(self) -> ApiError | None:
        """The 400 for the first field set to something specdec cannot do exactly, else None."""
        for name, neutral in _NEUTRAL:
            value = getattr(self, name)
            if (
                value != neutral
                and not (name in ("logprobs", "top_logprobs") and value in (False, 0))
                and value not in ([], {})
            ):
                return _unsupported(name, value)
        if self.tool_choice not in (None, "none"):
            return _unsupported("tool_choice", self.tool_choice)
        if self.function_call not in (None, "none"):
            return _unsupported("function_call", self.function_call)
        if self.response_format not in (None, {"type": "text"}):
            return _unsupported("response_format", self.response_format)
        return None

    def stops(self) -> list[str]:
        """The stop strings as a list (empty ones dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def ignored_fields(self) -> list[str]:
        """Fields of the request that the API does not define (ignored)."""
        return sorted(self.model_extra or {})


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatRequest(CompletionFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them: ``[{"role", "content"}]`` with text content.

        ``developer`` (OpenAI's newer name for ``system``) becomes ``system``; tool
        results and non-text parts are refused.
        """
        out = []
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise ApiError(
                    400,
                    f"messages[{i}] has role '{m.role}': {_REASONS['tools']}",
                    param=f"messages[{i}].role",
                    code="unsupported_parameter",
                )
            for field in ("tool_calls", "function_call"):
                if (m.model_extra or {}).get(field):  # a tool-using history: its calls cannot be rendered
                    raise ApiError(
                        400,
                        f"messages[{i}] has {field}: {_REASONS['tools']}",
                        param=f"messages[{i}].{field}",
                        code="unsupported_parameter",
                    )
            if m.content is None and m.role != "assistant":  # OpenAI allows null only for an assistant's tool calls
                raise ApiError(
                    400,
                    f"messages[{i}].content is null; a {m.role} message needs its text",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )
            out.append({"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)})
        return out

    def new_tokens_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``; None when neither is given."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


COMPLETION_MAX_TOKENS = 16
"""``max_tokens`` of a ``/v1/completions`` request that gives none: OpenAI's default there (a chat completion
has none: it ends at EOS or the context's end)."""


class CompletionRequest(CompletionFields):
    """``POST /v1/completions``: ``prompt`` is a string or one list of token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]

    def prompt_value(self) -> str | list[int]:
        """The one prompt of the request (a batch of several is refused)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(
                    400,
                    f"prompt holds {len(p)} prompts; specdec takes one per request",
                    param="prompt",
                    code="unsupported_parameter",
                )
            p = p[0]
        if not p:
            raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
        return p

    def new_tokens_limit(self) -> int | None:
        """``max_tokens``, or OpenAI's default for this endpoint (:data:`COMPLETION_MAX_TOKENS`)."""
        return self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS


def parse(model: type[CompletionFields], body: Any) -> CompletionFields:
    """Validate a decoded JSON body; raise :class:`ApiError` 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        request = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = _param(first["loc"])
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise ApiError(
            400, message, param=param or None, code="missing_field" if first["type"] == "missing" else "invalid_value"
        ) from None
    refusal = request.unsupported()
    if refusal is not None:
        raise refusal
    return request


def _param(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "role")`` -> ``messages[0].role``; pydantic's union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[int]", "list[str]", "list[list[int]]", "list[dict[str,any]]") or "[" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _unsupported(name: str, value: Any) -> ApiError:
    return ApiError(
        400, f"{name}={value!r} is not supported: {_REASONS[name]}", param=name, code="unsupported_parameter"
    )


def _text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    """A message's text: a string, or its text parts joined by newlines (a null assistant content: "")."""
    if content is None:
        return ""
    try:
        return message_text(content, index)
    except ChatContentError as error:
        param = f"messages[{index}].content" + ("" if error.part is None else f"[{error.part}].type")
        raise ApiError(400, error.message, param=param, code="unsupported_parameter") from None
