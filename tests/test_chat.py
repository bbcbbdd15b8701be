"""The chat template (`tisslm.core.chat`): message validation, rendering, the SFT loss mask, loading
a model directory's template, and stop tokens, with the default ChatML and a Llama-3-style one."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from tisslm.core.chat import (
    CHAT_TEMPLATE_FILE,
    DEFAULT_CHAT_TEMPLATE,
    TOKENIZER_CONFIG_FILE,
    TURN_END,
    TURN_START,
    ChatTemplate,
    validate_messages,
)
from tisslm.core.errors import TissLMError
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now subtract."},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
]

# Llama 3's template as its checkpoints ship it: bos first, a header per turn, <|eot_id|> ends each.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tokenizer_with(*special: str) -> Tokenizer:
    """The byte-level tokenizer with `special` added as special tokens (as a trained one has them)."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens(list(special))
    return tokenizer


def masked_text(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ("hi", "must be a non-empty list"),
        ([], "must be a non-empty list"),
        (["hi"], "messages[0] must be an object with 'role' and 'content' only"),
        ([{"role": "user"}], "messages[0] must be an object"),
        ([{"role": "user", "content": "x", "name": "n"}], "messages[0] must be an object"),
        ([{"role": "user", "content": "x"}, {"role": "robot", "content": "x"}], "messages[1].role='robot'"),
        ([{"role": "user", "content": ["x"]}], "messages[0].content must be a string"),
    ],
)
def test_validate_messages_names_where_and_what(messages, fragment):
    with pytest.raises(TissLMError) as error:
        validate_messages(messages, "data/sft.jsonl:3")
    assert str(error.value).startswith("data/sft.jsonl:3: ") and fragment in str(error.value)
    assert validate_messages(CONVERSATION, "x") is CONVERSATION


def test_default_template_renders_chatml():
    template = ChatTemplate()
    assert template.source == DEFAULT_CHAT_TEMPLATE
    assert template.render(CONVERSATION[:2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nAdd two numbers.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.render(CONVERSATION[:3], add_generation_prompt=False).endswith("return a + b<|im_end|>\n")


def test_encode_masks_exactly_the_assistant_turns_and_extends_the_prompt():
    tokenizer = tokenizer_with(TURN_START, TURN_END)
    template = ChatTemplate()
    ids, mask = template.encode(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    assert ids == tokenizer.encode(template.render(CONVERSATION, add_generation_prompt=False)).ids
    # What a server feeds the model for the first question is where training's first answer begins.
    prompt = template.prompt_ids(tokenizer, CONVERSATION[:2])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)]) and mask[len(prompt)]
    # The masked tokens are the answers and their end-of-turn markers, nothing else.
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_text(tokenizer, ids, mask) == "".join(f"{a}{TURN_END}\n" for a in answers)
    first, end = len(prompt), mask.index(False, len(prompt))
    assert tokenizer.decode(ids[first:end], skip_special_tokens=False) == f"{answers[0]}{TURN_END}\n"
    assert tokenizer.token_to_id(TURN_END) in ids[first:end]  # the model learns to end its turn
    # A conversation without an assistant turn trains nothing.
    assert not any(template.encode(tokenizer, CONVERSATION[:2])[1])


def test_a_template_that_is_not_prefix_stable_is_refused():
    # The message count up front: the conversation's rendering does not extend its prefix's.
    counting = "{{ messages | length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TissLMError, match=r"chat template: messages\[2\]: .* does not extend"):
        ChatTemplate(counting).encode(byte_level_tokenizer(), CONVERSATION)


def test_bad_templates_are_one_line_errors():
    with pytest.raises(TissLMError, match="chat template: invalid Jinja"):
        ChatTemplate("{% for m in messages %}")
    refusing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TissLMError, match=r"chat template: rendering failed .*roles must alternate"):
        ChatTemplate(refusing).render(CONVERSATION)
    # Templates run sandboxed: an imported one cannot reach Python's internals.
    with pytest.raises(TissLMError, match="rendering failed"):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATION)


def test_load_reads_the_directorys_template_and_tokens(tmp_path):
    assert ChatTemplate.load(tmp_path).source == DEFAULT_CHAT_TEMPLATE  # nothing there: the default
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(LLAMA3_TEMPLATE)
    config = {"bos_token": {"content": "<|begin_of_text|>", "special": True}, "eos_token": "<|eot_id|>"}
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    template = ChatTemplate.load(tmp_path)
    assert (template.source, template.bos_token, template.eos_token) == (
        LLAMA3_TEMPLATE,
        "<|begin_of_text|>",
        "<|eot_id|>",
    )
    template.save(tmp_path / "copy")
    assert ChatTemplate.load(tmp_path / "copy").source == LLAMA3_TEMPLATE
    (tmp_path / TOKENIZER_CONFIG_FILE).write_text("{not json")
    with pytest.raises(TissLMError, match=f"{TOKENIZER_CONFIG_FILE}: unreadable"):
        ChatTemplate.load(tmp_path)


def test_a_llama3_template_renders_encodes_and_stops_at_eot():
    tokenizer = tokenizer_with(*LLAMA3_SPECIAL)
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert template.render(CONVERSATION[1:2]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAdd two numbers.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    prompt = template.prompt_ids(tokenizer, CONVERSATION[1:2])
    assert prompt[0] == tokenizer.token_to_id("<|begin_of_text|>") and prompt.count(prompt[0]) == 1
    ids, mask = template.encode(tokenizer, CONVERSATION)
    assert ids[: len(template.prompt_ids(tokenizer, CONVERSATION[:2]))] == template.prompt_ids(
        tokenizer, CONVERSATION[:2]
    )
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert masked_text(tokenizer, ids, mask) == "".join(f"{a}<|eot_id|>" for a in answers)
    stops = template.stop_token_ids(tokenizer)
    eot, end = tokenizer.token_to_id("<|eot_id|>"), tokenizer.token_to_id("<|end_of_text|>")
    assert {eot, end} <= set(stops)
    assert tokenizer.token_to_id(TURN_END) is None  # ChatML's marker is no token of this vocabulary


def test_stop_tokens_are_those_the_tokenizer_knows():
    assert ChatTemplate().stop_token_ids(byte_level_tokenizer()) == [byte_level_tokenizer().token_to_id(END_OF_TEXT)]
    tokenizer = tokenizer_with(TURN_START, TURN_END)
    expected = sorted([tokenizer.token_to_id(TURN_END), tokenizer.token_to_id(END_OF_TEXT)])
    assert ChatTemplate().stop_token_ids(tokenizer) == expected
