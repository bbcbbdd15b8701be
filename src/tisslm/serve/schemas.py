"""Request bodies of the OpenAI-compatible API, and its error shape.

Requests are validated strictly, as OpenAI does: a string where a number belongs, or an argument
the server does not know, is a 400 naming the argument rather than a guess. Sampling bounds
are not repeated here: they are `GenerateParams`', the schema `tisslm generate` validates with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tisslm.config import GenerateParams


class APIError(Exception):
    """An error answered with its status and an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(err: ValidationError, renamed: dict[str, str] | None = None) -> APIError:
    """A 400 for a failed validation: every problem on one line, the first one's argument as `param`."""
    renamed = renamed or {}
    problems, params = [], []
    for e in err.errors(include_url=False):
        loc = [renamed.get(str(part), str(part)) for part in e["loc"]]
        where = ".".join(loc) or "body"
        if e["type"] == "extra_forbidden":
            problems.append(f"Unrecognized request argument supplied: {where}")
        else:
            problems.append(f"{where}: {e['msg']}")
        params.append(loc[0] if loc else None)
    return APIError(400, "; ".join(problems), param=params[0], code="invalid_value")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # end the stream with a chunk carrying `usage` and no choices


class _Sampling(_Strict):
    """The arguments completions and chat share."""

    model: str | None = None  # must name the served model when given
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # not in OpenAI's API; vLLM and llama.cpp's server take it too
    stop: str | list[str] | None = None  # at most 4 sequences, as OpenAI allows
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens even past the end-of-text token
    user: str | None = None  # accepted for compatibility, unused

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", param="stop", code="invalid_value")
        return stops

    def generate_params(self, max_tokens: int) -> GenerateParams:
        """The sampling settings, checked against the bounds `generate` enforces."""
        settings = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        try:
            return GenerateParams.model_validate(settings | {"top_k": self.top_k, "seed": self.seed})
        except ValidationError as err:
            raise invalid(err, {"max_new_tokens": "max_tokens"}) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens in chat


class AttentionRequest(_Strict):
    text: str = Field(min_length=1)


def parse_body(model: type[_Strict], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise invalid(err) from None
