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

Logprobs (`schemas`' "Logprobs"): the engine scores only the requests that ask, and the shapes
turn its scores into OpenAI's two formats, naming tokens by the server's `Vocabulary`.
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

from tisslm.core.chat import ChatTemplate
from tisslm.core.config import ServeParams
from tisslm.core.errors import TissLMError
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.kb.context import Grounded, with_context
from tisslm.safety.filters import ContentFilter
from tisslm.safety.watermark import Watermark
from tisslm.serve.attention import attention_for_text
from tisslm.serve.auditing import note
from tisslm.serve.batching import Batcher, Logprob
from tisslm.serve.jobs import Job, Scored, Update, respond
from tisslm.serve.schemas import (
    APIError,
    AttentionRequest,
    AttentionResponse,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatReply,
    ChatRequest,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FilterResult,
    Health,
    KnowledgeBaseInfo,
    ModelCard,
    ModelList,
    RetrievedChunk,
    RetrieveOptions,
    RetrieveRequest,
    RetrieveResponse,
    Source,
    TopLogprob,
    Usage,
)
from tisslm.serve.text import Vocabulary

if TYPE_CHECKING:
    from tisslm.kb import Hit, KnowledgeBase

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class Serving:
    """The engine, the tokenizer, the settings, the chat template and the knowledge base (if any)
    of one server, and one method per endpoint."""

    def __init__(
        self,
        engine: Batcher,
        tokenizer: Tokenizer,
        settings: ServeParams,
        kb: KnowledgeBase | None = None,
        content_filter: ContentFilter | None = None,
        watermark: Watermark | None = None,
        chat_template: ChatTemplate | None = None,
    ):
        """`chat_template`: the served model's (`ChatTemplate.load(model_dir)`); None: the default."""
        self.engine, self.tokenizer, self.settings, self.kb = engine, tokenizer, settings, kb
        self.content_filter = content_filter if content_filter is not None and content_filter.active else None
        self.watermark = watermark
        self.metrics = engine.metrics
        self.max_seq_len = engine.model.config.max_seq_len
        self.end_of_text = tokenizer.token_to_id(END_OF_TEXT)
        self.chat_template = chat_template or ChatTemplate()
        self.end_of_turn = self.chat_template.stop_token_ids(tokenizer)  # where a chat reply ends
        self.vocabulary = Vocabulary(tokenizer)
        self.page = files("tisslm.serve").joinpath("static/index.html").read_text(encoding="utf-8")
        self.started = int(time.time())

    async def complete(self, request: Request, body: CompletionRequest) -> CompletionResponse | StreamingResponse:
        """One choice per prompt, generated together in the engine's batches; with `echo`, after the
        prompt as the model read it (grounded, with `retrieve`)."""
        self.check_model(body.model)
        ids, texts = self.read_prompts(body.prompt)
        read, screened = await self.screen(request, texts, "prompt")
        # Ids a client sent are read as given, unless the filter changed their text: then the text is encoded.
        ids = [given if new == old else None for given, new, old in zip(ids, read, texts, strict=True)]
        texts = read
        max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        grounded = None
        if body.retrieve is not None:
            if len(texts) != 1:
                message = f"retrieve: grounding takes one prompt, got {len(texts)}"
                raise APIError(400, message, param="retrieve", code="invalid_value")
            grounded = await self.ground(body.retrieve, texts[0], texts[0], max_tokens)
            texts, ids = [grounded.text], [None]
        prompts = [given or self.encode(text, "prompt") for given, text in zip(ids, texts, strict=True)]
        params = self.sampling(body, max_tokens, max(map(len, prompts)))
        stop_tokens = [] if self.end_of_text is None else [self.end_of_text]
        echo = texts if body.echo else None
        job = self.start_job(body, prompts, params, stop_tokens, body.stop_strings(), body.logprobs, echo)
        shape = CompletionShape(self.settings.model_name, self.vocabulary, grounded, screened)
        return await respond(request, job, shape, body)

    async def chat(self, request: Request, body: ChatRequest) -> ChatCompletionResponse | StreamingResponse:
        """The assistant's reply to the conversation, rendered by the model's chat template (a 400
        naming `messages` when the template refuses it), ending at the template's end-of-turn tokens."""
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            message = "top_logprobs: only allowed when logprobs is true"
            raise APIError(400, message, param="top_logprobs", code="invalid_value")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens
        contents, screened = await self.screen(request, [m.content for m in body.messages], "messages")
        messages = [{"role": m.role, "content": content} for m, content in zip(body.messages, contents, strict=True)]
        try:
            text = self.chat_template.render(messages)
        except TissLMError as err:
            raise APIError(400, f"messages: {err}", param="messages", code="invalid_value") from None
        grounded = None
        if body.retrieve is not None:
            asked = [c for m, c in zip(body.messages, contents, strict=True) if m.role == "user"] or [contents[-1]]
            reply = max_tokens or min(self.settings.max_tokens, self.max_seq_len // 2)  # kept for the reply
            grounded = await self.ground(body.retrieve, text, asked[-1], reply)
            text = grounded.text
        prompt = self.encode(text, "messages", add_special_tokens=False)  # the template wrote any bos token
        params = self.sampling(body, max_tokens, len(prompt))
        job = self.start_job(body, [prompt], params, self.end_of_turn, body.stop_strings(), self.chat_logprobs(body))
        shape = ChatShape(self.settings.model_name, self.vocabulary, grounded, screened)
        return await respond(request, job, shape, body)

    async def screen(self, request: Request, texts: list[str], param: str) -> tuple[list[str], list[dict]]:
        """The texts as the content filter lets the model read them (redacted), and its decisions;
        a text it blocks refuses the request: 400, code `content_filter`, naming the categories."""
        if self.content_filter is None:
            return texts, []
        verdicts = await run_in_threadpool(lambda: [self.content_filter.apply(text) for text in texts])
        decisions = merge_decisions(v.decisions() for v in verdicts)
        note(request, prompt_filter=decisions)
        blocked = sorted({f.category for v in verdicts for f in v.findings if f.action == "block"})
        if blocked:
            message = f"{param}: refused by the content filter ({', '.join(blocked)})"
            raise APIError(400, message, param=param, code="content_filter")
        return [v.text for v in verdicts], decisions

    async def retrieve(self, body: RetrieveRequest) -> RetrieveResponse:
        """The knowledge base's best chunks for the query; 404 on a server without one."""
        kb = self.knowledge_base(404, None)
        hits = await self.search(kb, body.query, body.k, body.mode, "query")
        return RetrieveResponse(
            data=[RetrievedChunk.model_validate(hit.to_json()) for hit in hits],
            grounding_warning=kb.grounding_warning(),
        )

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
            grounding_warning=kb.grounding_warning(),
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

    def read_prompts(self, prompt: str | list) -> tuple[list[list[int] | None], list[str]]:
        """Each prompt's token ids as the client sent them (None for a text) and its text. Ids must be
        the tokenizer's, within max_prompt_tokens: else a 400 naming `prompt`."""
        if isinstance(prompt, str) or isinstance(prompt[0], str):
            texts = [prompt] if isinstance(prompt, str) else prompt
            return [None] * len(texts), texts
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        vocabulary, limit = len(self.vocabulary.bytes), self.settings.max_prompt_tokens
        for ids in lists:
            if unknown := [t for t in ids if t >= vocabulary]:
                message = f"prompt: token id {unknown[0]} is not in the vocabulary (0 to {vocabulary - 1})"
                raise APIError(400, message, param="prompt", code="invalid_value")
            if len(ids) > limit:
                message = f"prompt: {len(ids)} tokens, more than the limit of {limit}"
                raise APIError(400, message, param="prompt", code="context_length_exceeded")
        return [list(ids) for ids in lists], [self.vocabulary.text(ids) for ids in lists]

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """The prompt's tokens; a 400 naming `param` for text that is empty, too long or not Unicode."""
        limit = self.settings.max_prompt_tokens
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
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
        if (refusal := body.unsupported()) is not None:
            raise refusal
        return body.generate_params(max_tokens)

    @staticmethod
    def chat_logprobs(body: ChatRequest) -> int | None:
        """The alternatives a chat request's tokens are scored with (None: not scored)."""
        return (body.top_logprobs or 0) if body.logprobs else None

    def start_job(
        self,
        body: CompletionRequest | ChatRequest,
        prompts: list[list[int]],
        params: SamplingParams,
        stop_tokens: list[int],
        stops: list[str],
        logprobs: int | None = None,
        echo: list[str] | None = None,
    ) -> Job:
        """Submit `n` choices of each prompt to the engine, prompt by prompt (OpenAI's order of
        choices); they end at `stop_tokens` (end of text; in chat, of the turn) unless the body
        ignores them, or at the `stops` strings. With a `seed`, the j-th choice of a prompt draws
        with seed + j: the first is what a request with n = 1 gets. `logprobs` scores their tokens
        with that many alternatives; `echo` begins their texts with these."""
        stop_tokens = [] if body.ignore_eos else stop_tokens
        timeout_s = self.settings.request_timeout_s
        n = body.n
        seeds = [None if params.seed is None else params.seed + j for j in range(n)]
        choices = [params.model_copy(update={"seed": seed}) for seed in seeds]
        return Job(
            self.engine, self.vocabulary, [p for p in prompts for _ in range(n)], choices * len(prompts),
            stop_tokens, stops, timeout_s, logprobs, None if echo is None else [e for e in echo for _ in range(n)],
            content_filter=self.content_filter, logits_processor=self.watermark,
            prompt_tokens=sum(map(len, prompts)),  # OpenAI counts a prompt once however many choices it has
        )  # fmt: skip


def merge_decisions(decisions) -> list[dict]:
    """Several texts' filter decisions as one list, counts added per category and action."""
    counts: dict[tuple[str, str], int] = {}
    for each in decisions:
        for d in each:
            counts[d["category"], d["action"]] = counts.get((d["category"], d["action"]), 0) + d["count"]
    return [{"category": c, "action": a, "count": n} for (c, a), n in counts.items()]


def extras(grounded: Grounded | None, screened: list[dict]) -> dict[str, Any]:
    """The `sources` and `context_truncated` of a grounded answer, and the `prompt_filter_results`
    of a prompt the filter flagged or redacted; nothing for any other."""
    fields: dict[str, Any] = {}
    if grounded is not None:
        fields["sources"] = [Source.model_validate(hit.to_json()) for hit in grounded.sources]
        fields["context_truncated"] = grounded.truncated
    if screened:
        fields["prompt_filter_results"] = [FilterResult.model_validate(d) for d in screened]
    return fields


def output_filtered(update: Update) -> list[FilterResult] | None:
    return [FilterResult.model_validate(d) for d in update.filter_results] if update.filter_results else None


class CompletionShape:
    """The `text_completion` body and chunks of one /v1/completions request."""

    def __init__(
        self, model: str, vocabulary: Vocabulary, grounded: Grounded | None = None, screened: list[dict] | None = None
    ):
        self.head: dict[str, Any] = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.vocabulary = vocabulary
        self.grounding = extras(grounded, screened or [])

    def opening(self, choices: int) -> list[CompletionChunk]:
        """Nothing; for a grounded prompt, a chunk of empty texts carrying the sources."""
        if not self.grounding:
            return []
        empty = [CompletionChoice(index=i, text="", finish_reason=None) for i in range(choices)]
        return [CompletionChunk(**self.head, choices=empty, **self.grounding)]

    def chunk(self, update: Update) -> CompletionChunk:
        return CompletionChunk(**self.head, choices=[self.choice(update)])

    def usage_chunk(self, usage: Usage) -> CompletionChunk:
        return CompletionChunk(**self.head, choices=[], usage=usage)

    def whole(self, choices: list[Update], usage: Usage) -> CompletionResponse:
        return CompletionResponse(**self.head, choices=[self.choice(c) for c in choices], usage=usage, **self.grounding)

    def choice(self, update: Update) -> CompletionChoice:
        logprobs = self.logprobs(update.tokens)
        return CompletionChoice(
            index=update.index,
            text=update.text,
            logprobs=logprobs,
            finish_reason=update.finish_reason,
            content_filter_results=output_filtered(update),
        )

    def logprobs(self, tokens: list[Scored] | None) -> CompletionLogprobs | None:
        """OpenAI's legacy logprobs of the tokens; an echoed prompt's first has no score (null)."""
        if tokens is None:
            return None
        names = self.vocabulary.names
        return CompletionLogprobs(
            tokens=[names[t.token] for t in tokens],
            token_logprobs=[None if t.logprob is None else t.logprob.logprob for t in tokens],
            top_logprobs=[None if t.logprob is None else self.top(t.token, t.logprob) for t in tokens],
            text_offset=[t.offset for t in tokens],
            entropies=[None if t.logprob is None else t.logprob.entropy for t in tokens],
        )

    def top(self, token: int, scored: Logprob) -> dict[str, float]:
        """The most likely tokens, most likely first, then the token itself if it is not among them: OpenAI's
        legacy completions always show the chosen token's logprob there."""
        names = self.vocabulary.names
        top = {names[alternative]: logprob for alternative, logprob in scored.top}
        top.setdefault(names[token], scored.logprob)
        return top


class ChatShape:
    """The `chat.completion` body and `chat.completion.chunk` chunks of one /v1/chat/completions request."""

    def __init__(
        self, model: str, vocabulary: Vocabulary, grounded: Grounded | None = None, screened: list[dict] | None = None
    ):
        self.head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        self.vocabulary = vocabulary
        self.grounding = extras(grounded, screened or [])

    def opening(self, choices: int) -> list[ChatCompletionChunk]:
        """Each choice's role first, as OpenAI streams it, in a chunk of its own; the first also
        carries the sources of a grounded prompt."""
        return [
            self._chunk(
                index,
                ChatDelta(role="assistant", content=""),
                None,
                None,
                None,
                **(self.grounding if index == 0 else {}),
            )
            for index in range(choices)
        ]

    def chunk(self, update: Update) -> ChatCompletionChunk:
        delta = ChatDelta(content=update.text or None)
        return self._chunk(
            update.index, delta, self.logprobs(update.tokens), update.finish_reason, output_filtered(update)
        )

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.head, choices=[], usage=usage)

    def whole(self, choices: list[Update], usage: Usage) -> ChatCompletionResponse:
        replies = [
            ChatChoice(
                index=c.index,
                message=ChatReply(content=c.text),
                logprobs=self.logprobs(c.tokens),
                finish_reason=c.finish_reason,
                content_filter_results=output_filtered(c),
            )
            for c in choices
        ]
        return ChatCompletionResponse(**self.head, choices=replies, usage=usage, **self.grounding)

    def logprobs(self, tokens: list[Scored] | None) -> ChatLogprobs | None:
        """OpenAI's chat logprobs of the tokens (a chat's tokens are all scored: it has no echo)."""
        if tokens is None:
            return None
        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **self.named(t.token, t.logprob.logprob),
                    top_logprobs=[TopLogprob(**self.named(*alternative)) for alternative in t.logprob.top],
                    entropy=t.logprob.entropy,
                )
                for t in tokens
            ]
        )

    def named(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.vocabulary.names[token], "logprob": logprob, "bytes": list(self.vocabulary.bytes[token])}

    def _chunk(
        self,
        index: int,
        delta: ChatDelta,
        logprobs: ChatLogprobs | None,
        reason: str | None,
        filtered: list[FilterResult] | None,
        **grounding: Any,
    ) -> ChatCompletionChunk:
        choice = ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=reason, content_filter_results=filtered
        )
        return ChatCompletionChunk(**self.head, choices=[choice], **grounding)
