"""Request bodies of the HTTP API (pydantic, strict types: ``"5"`` is not a number) and OpenAI's error shape.

OpenAI fields this server does not compute are refused when they would change the answer (``n`` > 1, ``logprobs``,
``logit_bias``, ``tools``, a ``response_format`` other than text, ...), never silently ignored; other unknown fields
(``user``, ``metadata``, ...) are accepted and have no effect, as with OpenAI's own API.
"""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

Number = Annotated[float, Field(strict=True)]

# field -> (the values that leave the answer as this server computes it, what is said when another is given)
UNSUPPORTED = {
    "n": ((None, 1), "only n = 1 is supported"),
    "best_of": ((None, 1), "only best_of = 1 is supported"),
    "echo": ((None, False), "echo is not supported"),
    "logprobs": ((None, False), "logprobs are not supported"),
    "top_logprobs": ((None, 0), "logprobs are not supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
    "tools": ((None, []), "tools are not supported"),
    "functions": ((None, []), "functions are not supported"),
    "tool_choice": ((None, "none"), "tools are not supported"),
    "response_format": ((None, {"type": "text"}), "only response_format {'type': 'text'} is supported"),
}


class APIError(Exception):
    """An answer that is an error: HTTP ``status`` with OpenAI's ``{"error": {...}}`` body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """The options completions and chat completions share."""
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)           # not OpenAI's; llama.cpp's and vLLM's
    seed: StrictInt | None = Field(None, ge=-2 ** 63, lt=2 ** 64)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)

    @model_validator(mode="after")
    def _supported(self):
        for name, (fine, message) in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in fine:
                raise ValueError(f"{name}: {message}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or "" in stops:
            raise ValueError("stop: expected up to 4 non-empty strings")
        return self

    def stops(self) -> tuple:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionBody(Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    max_tokens: StrictInt | None = Field(16, ge=1)      # OpenAI's default for completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")       # name, ...
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def as_template_messages(self) -> list:
        # OpenAI's "developer" is the system turn of chat templates.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class ExtractBody(BaseModel):
    """``POST /v1/extract``: what ``knowlm extract`` takes, as JSON (one ``text``, or ``records`` with ids)."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: StrictStr | None = None
    text: StrictStr | None = None
    records: list[dict[str, Any]] | None = None
    task: Literal["re", "ner", "ee"] = "re"
    schema_: Any = Field(alias="schema")
    family: Literal["knowlm", "oneke"] | None = None
    language: StrictStr = "auto"
    template: StrictInt | Literal["random"] = 0
    format: StrictStr | None = None
    split_num: StrictInt | None = None
    chat: Literal["alpaca", "llama2"] | None = None
    max_tokens: StrictInt = Field(256, ge=1)          # knowlm extract's --max-new-tokens
    constrained: StrictBool = False                   # knowlm extract's --constrained

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.records is None):
            raise ValueError("expected exactly one of 'text' (a string) and 'records' (a list of {id, text})")
        return self


def validation_message(errors) -> tuple:
    """``(one line, param)`` for pydantic's errors of a request body (the first error speaks for the rest)."""
    error = errors[0]
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"request body: not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})", None
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if not location:
        if error.get("type") == "model_type":
            return "request body: expected a JSON object", None
        return message, None
    param = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location).lstrip(".")
    return (message if message.startswith(f"{location[0]}:") else f"{param}: {message}"), location[0]
