"""`tisslm chat`: a conversation in the terminal, each reply printed as its tokens arrive.

It runs the serving engine in-process (one slot) with the model's chat template and end-of-turn
tokens, as /v1/chat/completions does (`tisslm.core.chat`), so the terminal answers as the server
would. `/reset` forgets the
conversation, `/exit` or the end of input leaves, Ctrl-C cuts a reply short. When the
conversation outgrows the context, its oldest turns are dropped (the system message stays).
With a content filter, what the user types is screened as the server screens prompts, and each
reply leaves a line at a time through the same `OutputGuard`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from tokenizers import Tokenizer

from tisslm.core.chat import ChatTemplate
from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.safety.filters import ContentFilter, OutputGuard
from tisslm.serve.batching import Batcher, Event, Finished
from tisslm.serve.text import TextStream


def chat_session(
    model: TissLM,
    tokenizer: Tokenizer,
    params: SamplingParams,
    system: str | None,
    read: Callable[[str], str],
    write: Callable[[str], None],
    content_filter: ContentFilter | None = None,
    template: ChatTemplate | None = None,
) -> None:
    """Read user turns with `read(prompt)` until /exit or EOFError; `write` each reply piece by piece.
    `template`: the model's (`ChatTemplate.load(model_dir)`); None: the default."""
    template = template or ChatTemplate()
    engine = Batcher(model, max_batch=1, max_queue=1, vocab_limit=tokenizer.get_vocab_size()).start()
    stop_tokens = template.stop_token_ids(tokenizer)
    opening = [{"role": "system", "content": system}] if system else []
    turns: list[dict[str, str]] = []
    try:
        while True:
            try:
                line = read("you> ")
            except EOFError:
                break
            command = line.strip()
            if command == "/exit":
                break
            if command == "/reset":
                turns.clear()
                continue
            if not command:
                continue
            if content_filter is not None:
                screened = content_filter.apply(line)
                if screened.blocked:
                    categories = sorted({f.category for f in screened.findings if f.action == "block"})
                    write(f"(refused by the content filter: {', '.join(categories)})\n")
                    continue
                line = screened.text
            turns.append({"role": "user", "content": line})
            while True:  # drop the oldest exchanges until the prompt leaves room for a reply
                prompt = template.prompt_ids(tokenizer, opening + turns)
                room = model.config.max_seq_len - len(prompt)
                if room > 0 or len(turns) == 1:
                    break
                turns = turns[2:] if len(turns) > 2 else turns[-1:]
            if room <= 0:
                write(
                    f"(message too long: {len(prompt)} tokens leave no room in a context of {model.config.max_seq_len})\n"
                )
                turns.pop()
                continue
            settings = params.model_copy(update={"max_new_tokens": min(params.max_new_tokens, room)})
            write("tisslm> ")
            guard = OutputGuard(content_filter) if content_filter is not None else None
            reply = _reply(engine, tokenizer, prompt, settings, stop_tokens, write, guard)
            write("\n")
            turns.append({"role": "assistant", "content": reply})
    finally:
        engine.stop()


def _reply(engine, tokenizer, prompt, settings, stop_tokens, write, guard: OutputGuard | None) -> str:
    """The reply as written: what the guard (if any) let out of the generated text."""
    events: queue.Queue[Event] = queue.Queue()
    stream = TextStream(tokenizer)
    request = engine.submit(prompt, settings, events.put, stop_tokens)
    pieces = []

    def emit(text: str, last: bool = False) -> None:
        if guard is not None:
            text = guard.add(text) + (guard.finish() if last and not guard.blocked else "")
        pieces.append(text)
        write(text)

    try:
        while True:
            event = events.get()
            if isinstance(event, Finished):
                if event.reason in ("stop", "length"):
                    emit(stream.finish(), last=True)
                else:
                    write(f" [{event.reason}{': ' + event.error if event.error else ''}]")
                break
            emit(stream.add(event.id), last=stream.stopped)
            if stream.stopped or (guard is not None and guard.blocked):
                break
        if guard is not None and guard.blocked:
            write(" [ended by the content filter]")
    except KeyboardInterrupt:
        write(" [interrupted]")
    finally:
        engine.cancel(request)
    return "".join(pieces)
