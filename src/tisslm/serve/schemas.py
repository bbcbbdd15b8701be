"""The bodies of the OpenAI-compatible API: requests, responses, stream chunks and errors.

Requests are validated strictly, as OpenAI does: a string where a number belongs, or an argument
the server does not know, is a 400 naming the argument rather than a guess. Sampling bounds
are not repeated here: they are `SamplingParams`', the schema `tisslm generate` validates with.

Responses are built from these models too, so the OpenAPI document describes what the server
sends: a field always sent is required in its schema, and one sent only when it has a value (a
stream's `usage`, a chat delta's `role`) is optional there and left out, never null, on the wire.

Knowledge base (`tisslm serve --kb DIR`), TissLM's extensions: POST /v1/retrieve searches it
(`RetrieveRequest` -> `RetrieveResponse`), GET /v1/kb describes it, and a completion or chat
request with `retrieve` (`RetrieveOptions`) is grounded in it: the retrieved chunks are put before
the prompt, and the answer (a stream: its first chunk) carries `sources` and `context_truncated`.
A request without `retrieve` is OpenAI's, and so is its answer: the two fields are left out.

Logprobs, as OpenAI defines them: /v1/completions takes `logprobs` (0 to 5 alternatives) and
`echo`, and answers OpenAI's legacy `CompletionLogprobs`; /v1/chat/completions takes `logprobs`
and `top_logprobs` (0 to 20) and answers `ChatLogprobs`; a stream's chunks carry the scores of the
tokens their text came from. The scores are of the model's own distribution: log_softmax of the
logits over the tokenizer's vocabulary, before temperature, top-k, top-p and any logits processor
(as vLLM reports them by default), so they do not depend on how a token was drawn. TissLM's
extension: the entropy (nats) of that distribution beside each logprob (`entropies`, `entropy`),
sent only when logprobs are asked. `echo` with `max_tokens` 0 and `logprobs` scores a text, the
way lm-evaluation-harness's `local-completions` computes loglikelihoods.

OpenAI's other request fields, as clients send them: `frequency_penalty` and `presence_penalty`
(-2 to 2) are applied (`tisslm.core.sampling.PenalizedSampling`); `user`, `metadata`, `store`
false and `service_tier` are accepted and ignored, as they change nothing in the answer; fields
the server cannot honour are accepted only at their neutral value (`logit_bias` empty,
`response_format` text, no `tools` or `functions`, `tool_choice` none or auto without tools,
`best_of` equal to `n`, no `suffix`, ...) and otherwise refused with a 400 naming the field
(code `unsupported_value`), never silently ignored. A field OpenAI does not define is a 400 too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from tisslm.core.choices import SearchMode
from tisslm.core.sampling import MAX_PENALTY, PenalizedSampling

# ---- errors ----


class ErrorDetail(BaseModel):
    message: str
    type: str  # invalid_request_error, rate_limit_error, timeout or server_error
    param: str | None  # the request argument at fault, when there is one
    code: str | None  # e.g. invalid_value, context_length_exceeded, queue_full


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx, and the last event of a stream that failed mid-way."""

    error: ErrorDetail


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

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


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


# ---- requests ----

MAX_CHOICES = 16  # `n`: each choice is a sequence in the engine's batch


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
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices per prompt
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens even past the end-of-text token
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)  # per earlier occurrence in the output
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)  # once a token occurred in the output
    # Accepted and ignored: they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None  # OpenAI keeps the completion for its dashboard: only false (or null) here
    service_tier: str | None = None
    # Accepted only at their neutral value (`unsupported`): anything else is refused by name.
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> APIError | None:
        """A 400 naming the first field asked at a value this server cannot honour; None when all are."""
        refusals = {
            "logit_bias": "not supported by this server (send {} or leave it out)" if self.logit_bias else None,
            "response_format": (
                f'type {self.response_format.get("type")!r} is not supported: only {{"type": "text"}}'
                if self.response_format is not None and self.response_format.get("type", "text") != "text"
                else None
            ),
            "tools": "tool calling is not supported by this server" if self.tools else None,
            "tool_choice": (
                'tool calling is not supported by this server (only "none" or "auto" without tools)'
                if self.tool_choice not in (None, "none", "auto")
                else None
            ),
            "functions": "function calling is not supported by this server" if self.functions else None,
            "function_call": (
                'function calling is not supported by this server (only "none" or "auto")'
                if self.function_call not in (None, "none", "auto")
                else None
            ),
            "store": "this server does not store completions (send false or leave it out)" if self.store else None,
        }
        refusals |= self._unsupported()
        for param, problem in refusals.items():
            if problem is not None:
                return APIError(400, f"{param}: {problem}", param=param, code="unsupported_value")
        return None

    def _unsupported(self) -> dict[str, str | None]:
        return {}

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop: at most 4 sequences, got {len(stops)}", param="stop", code="invalid_value")
        return stops

    def generate_params(self, max_tokens: int) -> PenalizedSampling:
        """The sampling settings, checked against the bounds `generate` enforces."""
        settings = {"max_new_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        penalties = {"frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty}
        try:
            return PenalizedSampling.model_validate(settings | {"top_k": self.top_k, "seed": self.seed} | penalties)
        except ValidationError as err:
            raise invalid(err, {"max_new_tokens": "max_tokens"}) from None


MAX_RETRIEVE_K = 50


class RetrieveOptions(_Strict):
    """`retrieve` of a completion or chat request: ground the prompt in the server's knowledge base.

    The `k` best chunks for `query` (by default the prompt, in chat the last user message) are put
    before the prompt, the most relevant last, as many as fit the context budget: the smaller of
    the server's max_prompt_tokens and the model's context less `max_tokens` (in chat without
    `max_tokens`, less the server's max_tokens cap or half the context, whichever is smaller). The
    prompt itself is never cut. `{}` asks for the defaults. Only for a server started with `--kb`
    (else 400, code `no_knowledge_base`), and one prompt per request.
    """

    query: str | None = Field(None, min_length=1)
    k: int = Field(5, ge=1, le=MAX_RETRIEVE_K)
    mode: SearchMode = "fused"


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]  # one prompt as the tokenizer's ids


class CompletionRequest(_Sampling):
    """POST /v1/completions: one choice per prompt (`n` is 1); `max_tokens` defaults to 16."""

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        min_length=1,
        description="A text, a list of texts, a list of token ids, or a list of token-id lists (as OpenAI "
        "and lm-evaluation-harness's tokenized requests send them: the model reads the ids as given)",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Score each token: its logprob and this many most likely alternatives (null: no scores)",
    )
    echo: bool = Field(False, description="Begin each choice's text with its prompt (scored too, with `logprobs`)")
    retrieve: RetrieveOptions | None = None  # TissLM's extension: ground the prompt in the knowledge base
    best_of: int | None = None  # accepted only as n (or null): the server returns every choice it draws
    suffix: str | None = None  # insertion after the completion: not supported beyond null or ""

    def _unsupported(self) -> dict[str, str | None]:
        return {
            "best_of": (
                f"only equal to n ({self.n}): this server returns every choice it draws"
                if self.best_of is not None and self.best_of != self.n
                else None
            ),
            "suffix": "text insertion is not supported by this server" if self.suffix else None,
        }


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # OpenAI's participant name: accepted, not shown to the model


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: `max_tokens` defaults to what the server's cap and the context allow."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens in chat
    logprobs: bool = Field(False, description="Score each token of the reply")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With `logprobs`, this many most likely alternatives to each token",
    )
    retrieve: RetrieveOptions | None = None  # TissLM's extension: ground the conversation in the knowledge base


class RetrieveRequest(_Strict):
    """POST /v1/retrieve: the `k` chunks of the server's knowledge base that best match `query`, best first."""

    query: str = Field(min_length=1)
    k: int = Field(5, ge=1, le=MAX_RETRIEVE_K)
    mode: SearchMode = "fused"  # bm25 (words), dense (embeddings) or both fused by reciprocal rank


class AttentionRequest(_Strict):
    """POST /v1/attention: a short text (up to the server's attention_max_tokens tokens)."""

    text: str = Field(min_length=1)


def parse_body(model: type[_Strict], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise invalid(err) from None


# ---- responses ----


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _sent_when_set(description: str | None = None) -> Any:
    """A field left out of the body while it is None: optional in the schema, and never null."""
    return Field(None, exclude_if=lambda value: value is None, json_schema_extra=_drop_default, description=description)


class _Response(BaseModel):
    # A field with a default is still always sent: required in the schema of what the server answers.
    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


# content_filter: the output filter ended the choice before text its policy blocks (as OpenAI's API says).
FinishReason = Literal["stop", "length", "content_filter"]


class FilterResult(_Response):
    """What the content filter did, per category and action (TissLM's extension): `flag` passed the
    text and noted it, `redact` replaced spans by placeholders, `block` refused a prompt or ended
    an output. The policy is params.yaml's `safety.filters.policy`."""

    category: Literal["toxicity", "pii", "secrets", "shell"]
    action: Literal["flag", "redact", "block"]
    count: int  # findings of the category that the action was applied to


PROMPT_FILTERED = (
    "TissLM's extension, only when the content filter flagged or redacted something in the prompt"
    " (in a stream: in its first chunk); a prompt it blocks is refused with 400, code `content_filter`"
)
OUTPUT_FILTERED = (
    "TissLM's extension, only when the content filter flagged, redacted or blocked something in the"
    " choice's text (in a stream: in the choice's last chunk)"
)


class Source(_Response):
    """A chunk of the knowledge base: lines start_line..end_line (1-based, inclusive) of `path`."""

    path: str  # relative to the indexed directory, or the clean corpus's document key
    name: str  # the function, class or heading trail the chunk is, e.g. `module.Class.method`
    start_line: int
    end_line: int
    score: float  # higher is better: reciprocal-rank fusion (fused), BM25 (bm25) or cosine (dense)


class RetrievedChunk(Source):
    text: str  # the chunk as indexed (secrets, emails and the like already replaced by <SECRET>, <EMAIL>, ...)


GROUNDING_WARNING = (
    "Set when the pipeline measured grounding in this knowledge base as worse than none: held-out val"
    " bits/byte with retrieved context above those without (metrics/kb.json context_gain); else null"
)


class RetrieveResponse(_Response):
    object: Literal["list"] = "list"
    data: list[RetrievedChunk]  # best first
    grounding_warning: str | None = Field(None, description=GROUNDING_WARNING)


class KnowledgeBaseInfo(_Response):
    """GET /v1/kb: the knowledge base the server was started with (`--kb`)."""

    object: Literal["knowledge_base"] = "knowledge_base"
    documents: int
    chunks: int
    source_bytes: int  # of the documents indexed
    built_at: str | None  # when the index was last built, ISO 8601
    embedding_model: str | None
    grounding_warning: str | None = Field(None, description=GROUNDING_WARNING)


SOURCES = (
    "TissLM's extension, only in answers to a request with `retrieve` (in a stream: in its first chunk):"
    " the knowledge base's chunks the prompt was grounded in, best first"
)
TRUNCATED = "TissLM's extension, sent with `sources`: true when some retrieved text did not fit the context budget"


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, an end-of-text token included
    total_tokens: int


class _Answer(_Response):
    """The fields every completion and chat body and chunk begins with; one id for all chunks of a stream."""

    id: str
    object: str
    created: int  # Unix seconds
    model: str


ENTROPY = (
    "TissLM's extension: the entropy, in nats, of the distribution the token's logprob is from"
    " (-sum p log p over the vocabulary)"
)


class CompletionLogprobs(_Response):
    """The scores of a completion choice's tokens (OpenAI's legacy format), in the order of its text,
    an echoed prompt's first; in a stream, those of the chunk's text. Logprobs are of the model's
    own distribution: log_softmax of its logits, before temperature, top-k, top-p and any logits
    processor (as vLLM reports them by default)."""

    tokens: list[str] = Field(description="Each token; one that is not UTF-8 on its own as `bytes:\\xNN...`")
    token_logprobs: list[float | None] = Field(description="Each token's logprob; null for an echoed prompt's first")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The `logprobs` most likely tokens at each position, most likely first, and the token"
        " itself when it is not among them; null where token_logprobs is"
    )
    text_offset: list[int] = Field(description="Where each token's text begins in the choice's text, in characters")
    entropies: list[float | None] = Field(description=ENTROPY + "; null where token_logprobs is")


class CompletionChoice(_Response):
    index: int  # prompt i's j-th choice is i * n + j
    text: str  # the whole text (after an echoed prompt), or in a stream the piece that settled since the last chunk
    logprobs: CompletionLogprobs | None = None  # null unless `logprobs` was asked
    finish_reason: FinishReason | None  # null until the choice's last chunk
    content_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(OUTPUT_FILTERED)


class CompletionResponse(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    sources: list[Source] | SkipJsonSchema[None] = _sent_when_set(SOURCES)
    context_truncated: bool | SkipJsonSchema[None] = _sent_when_set(TRUNCATED)
    prompt_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(PROMPT_FILTERED)


class CompletionChunk(_Answer):
    """One event of a streamed completion; the last, with `include_usage`, has no choices and the usage."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | SkipJsonSchema[None] = _sent_when_set()
    sources: list[Source] | SkipJsonSchema[None] = _sent_when_set(SOURCES)
    context_truncated: bool | SkipJsonSchema[None] = _sent_when_set(TRUNCATED)
    prompt_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(PROMPT_FILTERED)


class ChatReply(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(_Response):
    """A token and its logprob."""

    token: str = Field(description="The token's text; one that is not UTF-8 on its own as `bytes:\\xNN...`")
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes (a piece of a character, for some)


class ChatTokenLogprob(TopLogprob):
    """A token of the reply with its logprob and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(description="The `top_logprobs` most likely tokens, most likely first")
    entropy: float = Field(description=ENTROPY)


class ChatLogprobs(_Response):
    """The scores of a chat choice's tokens; in a stream, those of the chunk's text. Logprobs are of
    the model's own distribution: log_softmax of its logits, before temperature, top-k, top-p and
    any logits processor (as vLLM reports them by default)."""

    content: list[ChatTokenLogprob]


class ChatChoice(_Response):
    index: int
    message: ChatReply
    logprobs: ChatLogprobs | None = None  # null unless `logprobs` was asked
    finish_reason: FinishReason | None
    content_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(OUTPUT_FILTERED)


class ChatCompletionResponse(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    sources: list[Source] | SkipJsonSchema[None] = _sent_when_set(SOURCES)
    context_truncated: bool | SkipJsonSchema[None] = _sent_when_set(TRUNCATED)
    prompt_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(PROMPT_FILTERED)


class ChatDelta(_Response):
    """The reply's next piece: the first chunk carries the role and empty content, a last one may be empty."""

    role: Literal["assistant"] | SkipJsonSchema[None] = _sent_when_set()
    content: str | SkipJsonSchema[None] = _sent_when_set()


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None  # null unless `logprobs` was asked (and in the opening chunk)
    finish_reason: FinishReason | None
    content_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(OUTPUT_FILTERED)


class ChatCompletionChunk(_Answer):
    """One event of a streamed chat completion; the last, with `include_usage`, has no choices and the usage."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | SkipJsonSchema[None] = _sent_when_set()
    sources: list[Source] | SkipJsonSchema[None] = _sent_when_set(SOURCES)
    context_truncated: bool | SkipJsonSchema[None] = _sent_when_set(TRUNCATED)
    prompt_filter_results: list[FilterResult] | SkipJsonSchema[None] = _sent_when_set(PROMPT_FILTERED)


class ModelCard(_Response):
    id: str  # what requests pass as `model`
    object: Literal["model"] = "model"
    created: int  # when the server started, in Unix seconds
    owned_by: str
    max_model_len: int  # the context length: prompt and generated tokens together


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    """The engine's state: 200 with status ok while it runs, 503 with status unavailable once it stopped."""

    status: Literal["ok", "unavailable"]
    model: str
    active: int  # generations holding a KV cache slot
    waiting: int  # generations queued for a slot
    max_batch: int
    max_queue: int


class AttentionResponse(_Response):
    """Every layer's and head's attention weights over the text's tokens, rounded to 4 decimals."""

    tokens: list[str]  # each token's text, whitespace made visible
    n_layers: int
    n_heads: int
    weights: list[list[list[list[float]]]]  # [layer][head][query][key]; zero where the key follows the query
