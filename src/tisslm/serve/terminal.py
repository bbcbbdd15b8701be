"""`tisslm chat`: a conversation in the terminal, each reply printed as its tokens arrive.

It runs the serving engine in-process (one slot) with the chat template and stop strings of
/v1/chat/completions, so the terminal answers as the server would. `/reset` forgets the
conversation, `/exit` or the end of input leaves, Ctrl-C cuts a reply short. When the
conversation outgrows the context, its oldest turns are dropped (the system message stays).
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from tokenizers import Tokenizer

from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.serve.engine import Engine, Event, Finished
from tisslm.serve.text import CHAT_STOP, TextStream, render_chat


def chat_session(
    model: TissLM,
    tokenizer: Tokenizer,
    params: SamplingParams,
    system: str | None,
    read: Callable[[str], str],
    write: Callable[[str], None],
) -> None:
    """Read user turns with `read(prompt)` until /exit or EOFError; `write` each reply piece by piece."""
    engine = Engine(model, max_batch=1, max_queue=1, vocab_limit=tokenizer.get_vocab_size()).start()
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    stop_tokens = [] if end_of_text is None else [end_of_text]
    opening = [("system", system)] if system else []
    turns: list[tuple[str, str]] = []
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
            turns.append(("user", line))
            while True:  # drop the oldest exchanges until the prompt leaves room for a reply
                prompt = tokenizer.encode(render_chat(opening + turns)).ids
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
            reply = _reply(engine, tokenizer, prompt, settings, stop_tokens, write)
            write("\n")
            turns.append(("assistant", reply))
    finally:
        engine.stop()


def _reply(engine, tokenizer, prompt, settings, stop_tokens, write) -> str:
    events: queue.Queue[Event] = queue.Queue()
    stream = TextStream(tokenizer, CHAT_STOP)
    request = engine.submit(prompt, settings, events.put, stop_tokens)
    pieces = []
    try:
        while True:
            event = events.get()
            if isinstance(event, Finished):
                if event.reason in ("stop", "length"):
                    pieces.append(stream.finish())
                    write(pieces[-1])
                else:
                    write(f" [{event.reason}{': ' + event.error if event.error else ''}]")
                break
            pieces.append(stream.add(event.id))
            write(pieces[-1])
            if stream.stopped:
                break
    except KeyboardInterrupt:
        write(" [interrupted]")
    finally:
        engine.cancel(request)
    return "".join(pieces)
