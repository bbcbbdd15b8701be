"""The serving object: what the API does, over the engine, the tokenizer and the server's settings.

One `Serving` is made per app and kept on `app.state`, as vLLM keeps its `OpenAIServing`
objects: the routers in `routes` only take requests apart and call its methods, so the rules of
every endpoint (limits, defaults, which errors) are read here, in one place, and can be called
without HTTP. Its answers are the models of `schemas`, which the OpenAPI document describes.

With a knowledge base (`tisslm serve --kb`), `retrieve` searches it and a request's `retrieve`
grounds its prompt (`ground`: `tisslm.kb.context.with_context` within the context budget); the
searches run on worker threads, as `KnowledgeBase` is safe to share between them. Without one,
/v1/retrieve and /v1/kb answer 404 and a request's `retrieve` 400, both with code
`no_knowledge_base`.
"""

from __future__ import annotations

import time
import uuid
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from tokenizers import Tokenizer

from tisslm.core.config import ServeParams
from tisslm.core.errors import TissLMError
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.kb.context import Grounded, with_context
from tisslm.serve.attention import attention_for_text
from tisslm.serve.engine import Engine
from tisslm.serve.jobs import Job, Update, respond
from tisslm.serve.schemas import (
    APIError,
    AttentionRequest,
    AttentionResponse,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatReply,
    ChatRequest,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Health,
    KnowledgeBaseInfo,
    ModelCard,
    ModelList,
    RetrievedChunk,
    RetrieveOptions,
    RetrieveRequest,
    RetrieveResponse,
    Source,
    Usage,
)
from tisslm.serve.text import CHAT_STOP, render_chat

if TYPE_CHECKING:
    from tisslm.kb import Hit, KnowledgeBase

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Serving:
    """The engine, the tokenizer, the settings and the knowledge base (if any) of one server, and
    one method per endpoint."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, settings: ServeParams, kb: KnowledgeBase | None = None):
        self.engine, self.tokenizer, self.settings, self.kb = engine, tokenizer, settings, kb
        self.metrics = engine.metrics
        self.max_seq_len = engine.model.config.max_seq_len
        self.end_of_text = tokenizer.token_to_id(END_OF_TEXT)
        self.page = files("tisslm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        self.started = int(time.time())

    async def complete(self, request: Request, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        """One choice per prompt, generated together in the engine's batches."""
        self.check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        grounded = None
        if body.retrieve is not None:
            if len(texts) != 1:
                message = f"retrieve: grounding takes one prompt, got {len(texts)}"
                raise APIError(400, message, param="retrieve", code="invalid_value")
            grounded = await self.ground(body.retrieve, texts[0], texts[0], max_tokens)
            texts = [grounded.text]
        prompts = [self.encode(text, "prompt") for text in texts]
        params = self.sampling(body, max_tokens, max(map(len, prompts)))
        job = self.start_job(body, prompts, params, body.stop_strings())
        return await respond(request, job, CompletionShape(self.settings.model_name, grounded), body)

    async def chat(self, request: Request, body: ChatRequest) -> ChatCompletionResponse | StreamingResponse:
        """The assistant's reply to the conversation, rendered with the chat template of `text`."""
        self.check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens
        text = render_chat((m.role, m.content) for m in body.messages)
        grounded = None
        if body.retrieve is not None:
            asked = [m.content for m in body.messages if m.role == "user"] or [body.messages[-1].content]
            reply = max_tokens or min(self.settings.max_tokens, self.max_seq_len // 2)  # kept for the reply
            grounded = await self.ground(body.retrieve, text, asked[-1], reply)
            text = grounded.text
        prompt = self.encode(text, "messages")
        params = self.sampling(body, max_tokens, len(prompt))
        job = self.start_job(body, [prompt], params, [*body.stop_strings(), *CHAT_STOP])
        return await respond(request, job, ChatShape(self.settings.model_name, grounded), body)

    async def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """The knowledge base's best chunks for the query; 404 on a server without one."""
        kb = self.knowledge_base(404, None)
        hits = await self.search(kb, body.query, body.k, body.mode, "query")
        return RetrieveResponse(data=[RetrievedChunk.model_validate(hit.to_json()) for hit in hits])

    async def kb_info(self) -> KnowledgeBaseInfo:
        """What the knowledge base holds (the page shows its grounding option when this answers 200)."""
        kb = self.knowledge_base(404, None)
        stats = await run_in_threadpool(kb.stats)
        return KnowledgeBaseInfo(
            documents=stats["documents"],
            chunks=stats["chunks"],
            source_bytes=stats["bytes"],
            built_at=stats["built_at"],
            embedding_model=stats["embedding_model"],
        )

    async def ground(self, options: RetrieveOptions, prompt: str, query: str, max_tokens: int) -> Grounded:
        """`prompt` preceded by the chunks retrieved for `options.query` (else `query`), as many as
        fit the context budget: max_prompt_tokens, and the model's context less `max_tokens`."""
        kb = self.knowledge_base(400, "retrieve")
        hits = await self.search(kb, options.query or query, options.k, options.mode, "retrieve")
        special = len(self.tokenizer.encode("").ids)  # tokens encoding adds (with_context counts without them)
        budget = min(self.settings.max_prompt_tokens, self.max_seq_len - max_tokens) - special
        return await run_in_threadpool(with_context, prompt, hits, self.tokenizer, max(0, budget))

    def knowledge_base(self, status: int, param: str | None) -> KnowledgeBase:
        if self.kb is None:
            message = "this server has no knowledge base (start it with `tisslm serve --kb DIR`)"
            raise APIError(status, message, param=param, code="no_knowledge_base")
        return self.kb

    @staticmethod
    async def search(kb: KnowledgeBase, query: str, k: int, mode: str, param: str) -> list[Hit]:
        """`kb.search` on a worker thread; its refusals (a query of blanks) as 400s naming `param`."""
        try:
            return await run_in_threadpool(kb.search, query, k, mode)
        except TissLMError as err:
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_value") from None

    def models(self) -> ModelList:
        card = ModelCard(
            id=self.settings.model_name, created=self.started, owned_by="tisslm", max_model_len=self.max_seq_len
        )
        return ModelList(data=[card])

    def health(self) -> Health:
        engine = self.engine
        return Health(
            status="ok" if engine.alive else "unavailable",
            model=self.settings.model_name,
            active=engine.active_count,
            waiting=engine.waiting_count,
            max_batch=engine.max_batch,
            max_queue=engine.max_queue,
        )

    async def attention(self, body: AttentionRequest) -> AttentionResponse:
        """The maps of the web page's attention view; a thread computes them, so the engine keeps stepping."""
        limit = self.settings.attention_max_tokens
        try:
            maps = await run_in_threadpool(attention_for_text, self.engine.model, self.tokenizer, body.text, limit)
        except TissLMError as err:
            raise APIError(400, str(err), param="text", code="invalid_value") from None
        return AttentionResponse.model_validate(maps.to_json())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            message = f"The model `{name}` does not exist; this server serves `{self.settings.model_name}`"
            raise APIError(404, message, param="model", code="model_not_found")

    def encode(self, text: str, param: str) -> list[int]:
        """The prompt's tokens; a 400 naming `param` for text that is empty, too long or not Unicode."""
        limit = self.settings.max_prompt_tokens
        try:
            ids = self.tokenizer.encode(text).ids
        except TypeError:  # tokenizers' answer to a lone surrogate, from a "\\ud800" escape in the JSON
            raise APIError(400, f"{param}: not valid Unicode text", param=param, code="invalid_encoding") from None
        if not ids:
            raise APIError(400, f"{param}: empty", param=param, code="invalid_value")
        if len(ids) > limit:
            message = f"{param}: {len(ids)} tokens, more than the limit of {limit}"
            raise APIError(400, message, param=param, code="context_length_exceeded")
        return ids

    def sampling(
        self, body: CompletionRequest | ChatRequest, max_tokens: int | None, longest_prompt: int
    ) -> SamplingParams:
        """The request's sampling settings, within the server's max_tokens cap."""
        cap = self.settings.max_tokens
        if max_tokens is None:  # chat: as long as the cap and the context allow
            max_tokens = max(0, min(cap, self.max_seq_len - longest_prompt))
        if max_tokens > cap:
            message = f"max_tokens={max_tokens} exceeds this server's limit of {cap}"
            raise APIError(400, message, param="max_tokens", code="invalid_value")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
        return body.generate_params(max_tokens)

    def start_job(
        self, body: CompletionRequest | ChatRequest, prompts: list[list[int]], params: SamplingParams, stops: list[str]
    ) -> Job:
        """Submit the prompts to the engine; they end at the end-of-text token unless the body ignores it."""
        stop_tokens = [] if body.ignore_eos or self.end_of_text is None else [self.end_of_text]
        return Job(self.engine, self.tokenizer, prompts, params, stop_tokens, stops, self.settings.request_timeout_s)


def grounding(grounded: Grounded | None) -> dict[str, Any]:
    """The `sources` and `context_truncated` of a grounded answer; nothing for any other."""
    if grounded is None:
        return {}
    sources = [Source.model_validate(hit.to_json()) for hit in grounded.sources]
    return {"sources": sources, "context_truncated": grounded.truncated}


class CompletionShape:
    """The `text_completion` body and chunks of one /v1/completions request."""

    def __init__(self, model: str, grounded: Grounded | None = None):
        self.head: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.grounding = grounding(grounded)

    def opening(self, choices: int) -> list[CompletionChunk]:
        """Nothing; for a grounded prompt, a chunk of empty texts carrying the sources."""
        if not self.grounding:
            return []
        empty = [CompletionChoice(index=i, text="", finish_reason=None) for i in range(choices)]
        return [CompletionChunk(**self.head, choices=empty, **self.grounding)]

    def chunk(self, update: Update) -> CompletionChunk:
        choice = CompletionChoice(index=update.index, text=update.text, finish_reason=update.finish_reason)
        return CompletionChunk(**self.head, choices=[choice])

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return CompletionChunk(**self.head, choices=[], usage=usage)

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage) -> CompletionResponse:
        choices = [
            CompletionChoice(index=i, text=text, finish_reason=reason)
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return CompletionResponse(**self.head, choices=choices, usage=usage, **self.grounding)


class ChatShape:
    """The `chat.completion` body and `chat.completion.chunk` chunks of one /v1/chat/completions request."""

    def __init__(self, model: str, grounded: Grounded | None = None):
        self.head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.grounding = grounding(grounded)

    def opening(self, choices: int) -> list[ChatCompletionChunk]:
        """Each choice's role first, as OpenAI streams it, in a chunk of its own; the first also
        carries the sources of a grounded prompt."""
        return [
            self._chunk(index, ChatDelta(role="assistant", content=""), None, **(self.grounding if index == 0 else {}))
            for index in range(choices)
        ]

    def chunk(self, update: Update) -> ChatCompletionChunk:
        return self._chunk(update.index, ChatDelta(content=update.text or None), update.finish_reason)

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=usage)

    def whole(self, texts: list[str], reasons: list[str | None], usage: Usage) -> ChatCompletionResponse:
        choices = [
            ChatChoice(index=i, message=ChatReply(content=text), finish_reason=reason)
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
        ]
        return ChatCompletionResponse(**self.head, choices=choices, usage=usage, **self.grounding)

    def _chunk(self, index: int, delta: ChatDelta, reason: str | None, **grounding: Any) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason)
        return ChatCompletionChunk(**self.head, choices=[choice], **grounding)
