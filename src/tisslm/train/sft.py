"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat template's layout.

Conversations become token ids through `ChatTemplate.encode`, the one function training and
serving share, with a per-token mask of what the assistant wrote; only those tokens carry loss.

Packing: conversations are laid end to end, each followed by <|endoftext|>, into rows of
seq_len + 1 tokens (inputs are a row's first seq_len, targets its last seq_len). A conversation
never straddles two rows: one that does not fit in what is left of a row starts the next, and
the rest of the row is padding without loss. So every answer is learned with its whole prompt
in view. Attention is not masked at conversation boundaries (the next conversation's tokens see
the previous one, as documents do in pretraining); no loss crosses a boundary, since a
conversation's first token is never the assistant's. A conversation longer than a row is cut to
the row and counted as truncated; one with no assistant token left after the cut is dropped.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.core.chat import ChatTemplate
from tisslm.core.config import Params, SftParams
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.instructions import function_examples, read_conversations
from tisslm.train.plan import autocast, uses_cuda

IGNORE = -100  # the target of a position without loss (cross-entropy's ignore_index)
PAD_TOKEN = "<|pad|>"


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the masked tokens of `ids` (B, T) under `model`: (B,).

    mask (B, T) is True on the tokens that count (the assistant's, as `ChatTemplate.encode` marks
    them); token t is scored by the logits at t - 1, so position 0 never counts. The dpo stage
    scores its chosen and rejected answers with this function: SFT and DPO agree on which tokens
    an answer is made of."""
    logits = model(ids[:, :-1]).float()  # (B, T-1, vocab)
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (log_probs * mask[:, 1:].to(log_probs.dtype)).sum(dim=-1)  # (B,)


def encode_conversations(
    template: ChatTemplate, tokenizer: Tokenizer, conversations: Sequence[Sequence[dict[str, str]]]
) -> list[tuple[list[int], list[bool]]]:
    """Each conversation's ids and assistant mask, as `ChatTemplate.encode` gives them."""
    return [template.encode(tokenizer, messages) for messages in conversations]


@dataclass
class Packed:
    """Conversations packed into rows of seq_len + 1 tokens."""

    tokens: torch.Tensor  # (rows, seq_len + 1) int64
    mask: torch.Tensor  # (rows, seq_len + 1) bool: the token is a target with loss (the assistant's)
    conversations: int  # packed, truncated ones included
    truncated: int  # cut to a row's length
    dropped: int  # no assistant token left after the cut: not packed

    @property
    def assistant_tokens(self) -> int:
        return int(self.mask.sum())

    def inputs_targets(self, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, seq_len) and targets (B, seq_len) of `rows`: IGNORE where the target has no loss."""
        tokens, mask = self.tokens[rows], self.mask[rows]
        return tokens[:, :-1], tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE)


def pack(examples: Sequence[tuple[list[int], list[bool]]], seq_len: int, separator: int, pad: int) -> Packed:
    """Pack encoded conversations (ids, mask) in order into rows of seq_len + 1 tokens, each one
    followed by `separator` (no loss), never split across rows; the rest of a row is `pad`."""
    width = seq_len + 1
    rows: list[tuple[list[int], list[bool]]] = []
    row_ids: list[int] = []
    row_mask: list[bool] = []
    packed = truncated = dropped = 0
    for ids, mask in examples:
        ids, mask = [*ids, separator], [*mask, False]
        if len(ids) > width:
            ids, mask = ids[:width], mask[:width]
            if not any(mask):
                dropped += 1
                continue
            truncated += 1
        if len(row_ids) + len(ids) > width:  # does not fit: this row is done
            rows.append((row_ids, row_mask))
            row_ids, row_mask = [], []
        row_ids += ids
        row_mask += mask
        packed += 1
    if row_ids:
        rows.append((row_ids, row_mask))
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (ids, mask) in enumerate(rows):
        tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[r, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return Packed(tokens, loss_mask, packed, truncated, dropped)


def pack_conversations(
    template: ChatTemplate, tokenizer: Tokenizer, conversations: Sequence[Sequence[dict[str, str]]], seq_len: int
) -> Packed:
    """Encode with the chat template and pack, separated by <|endoftext|>, padded with <|pad|>."""
    separator = tokenizer.token_to_id(END_OF_TEXT)
    if separator is None:
        raise TissLMError(f"tokenizer: no {END_OF_TEXT} token to separate packed conversations")
    pad = tokenizer.token_to_id(PAD_TOKEN)
    return pack(encode_conversations(template, tokenizer, conversations), seq_len, separator,
                separator if pad is None else pad)  # fmt: skip


def sft_conversations(
    clean_dir: str | Path, val_fraction: float, p: SftParams
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """(training, held-out) conversations. The default set: the documented functions of the train
    split's documents, and the first `eval_examples` of the val split's (documents split as
    train/val split them). A JSONL (`p.data`): `eval_examples` conversations drawn with `p.seed`
    are held out (at most half of them); `max_examples` caps the training ones."""
    if p.data is None:
        train = [e.messages for e in function_examples(clean_dir, val_fraction, "train", p.max_examples)]
        heldout = [e.messages for e in function_examples(clean_dir, val_fraction, "val", p.eval_examples)]
        return train, heldout
    conversations = read_conversations(p.data)
    held = set(random.Random(p.seed).sample(range(len(conversations)), min(p.eval_examples, len(conversations) // 2)))
    train = [c for i, c in enumerate(conversations) if i not in held]
    return train[: p.max_examples], [c for i, c in enumerate(conversations) if i in held]


def learning_rate(step: int, p: SftParams) -> float:
    """Linear warmup to `lr`, then a cosine down to zero at the last step."""
    if step < p.warmup_steps:
        return p.lr * (step + 1) / p.warmup_steps
    progress = (step - p.warmup_steps) / max(1, p.steps - p.warmup_steps)
    return 0.5 * p.lr * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def heldout_loss(model: nn.Module, data: Packed, batch_size: int, precision: str = "fp32") -> float:
    """Mean cross-entropy per assistant token over all rows of `data` (nan without any)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data.tokens), batch_size):
        x, y = data.inputs_targets(slice(start, start + batch_size))
        n = int((y != IGNORE).sum())
        if n:
            with autocast(precision, device):
                total += model.loss(x.to(device), y.to(device)).float().item() * n
            count += n
    model.train(was_training)
    return total / count if count else float("nan")


def _optimizer(model: nn.Module, p: SftParams) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the adapters, with LoRA); decay on matrices."""
    params = [q for q in model.parameters() if q.requires_grad]
    groups = [
        {"params": [q for q in params if q.dim() >= 2], "weight_decay": p.weight_decay},
        {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95), foreach=False)


def finetune(
    model: nn.Module, train: Packed, heldout: Packed | None, p: SftParams, log: Callable[[dict], None] | None = None
) -> dict:
    """`p.steps` steps of AdamW on `train`'s rows, loss on assistant tokens only, `model` in place.

    Rows are drawn in a fresh permutation per pass over the data, seeded by `p.seed`, so a run is
    a function of its inputs and seed. Returns the run's figures: held-out loss before and after
    (and every `eval_interval` steps in `history`), tokens, seconds, tokens/s."""
    if not len(train.tokens):
        if train.dropped:
            raise TissLMError(
                f"sft: no training rows: all {train.dropped} conversations' prompts are longer than "
                f"sft.seq_len={p.seq_len} tokens (raise it, up to the model's max_seq_len)"
            )
        raise TissLMError("sft: no conversations to train on (sft.data, or documented functions in the corpus)")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(p.seed)
    optimizer = _optimizer(model, p)
    trainable = [q for q in model.parameters() if q.requires_grad]
    order: list[int] = []
    history: list[dict] = []
    before = heldout_loss(model, heldout, p.batch_size, p.precision) if heldout else None
    tokens_seen = assistant_seen = 0
    eval_seconds = 0.0  # held-out scoring: left out of the training throughput
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(p.steps), desc="sft", unit=" step")
    for step in bar:
        while len(order) < p.batch_size:  # a new pass: a fresh permutation of the rows
            order += torch.randperm(len(train.tokens), generator=generator).tolist()
        rows, order = torch.tensor(order[: p.batch_size]), order[p.batch_size :]
        x, y = train.inputs_targets(rows)
        x, y = x.to(device), y.to(device)  # (B, seq_len)
        lr = learning_rate(step, p)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(p.precision, device):
            loss = model.loss(x, y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, p.grad_clip if p.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += x.numel()
        assistant_seen += int((y != IGNORE).sum())
        done = step + 1
        if done % p.eval_interval == 0 or done == p.steps:
            seconds = time.perf_counter() - started - eval_seconds
            record = {"step": done, "train_loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_s": tokens_seen / seconds}  # fmt: skip
            if heldout:
                eval_started = time.perf_counter()
                record["heldout_loss"] = heldout_loss(model, heldout, p.batch_size, p.precision)
                eval_seconds += time.perf_counter() - eval_started
            history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if log:
                log(record)
    bar.close()
    seconds = time.perf_counter() - started - eval_seconds
    model.eval()
    return {
        "steps": p.steps,
        "tokens_seen": tokens_seen,
        "assistant_tokens_seen": assistant_seen,
        "train_seconds": round(seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "tokens_per_s": tokens_seen / seconds if seconds else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "heldout_loss_before": before,
        "heldout_loss_after": history[-1].get("heldout_loss") if history else before,
        "history": history,
    }


def run_sft(params: Params, clean_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> dict:
    """The sft stage: fine-tune the model in `base_dir` on the conversations `params.sft` names
    and write `out_dir` atomically (model.safetensors, config.json, tokenizer.json, the chat
    template it was trained with, and with LoRA the adapter in adapter/). Returns the metrics.
    With sft.steps = 0 the base directory is copied through (its chat template added)."""
    from tisslm.train.lora import ADAPTER_DIR, add_lora, merged, save_adapter

    p, base_dir, out_dir = params.sft, Path(base_dir), Path(out_dir)
    template, tokenizer = ChatTemplate.load(base_dir), load_tokenizer(base_dir)
    if p.steps == 0:
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(base_dir, tmp, dirs_exist_ok=True)
            template.save(tmp)
        return {"steps": 0, "copied_from": str(base_dir)}
    started = time.perf_counter()
    device = torch.device("cuda" if uses_cuda(p.device, torch.cuda.is_available(), "sft.device") else "cpu")
    model = TissLM.from_pretrained(base_dir, device).float()
    if p.seq_len > model.config.max_seq_len:
        raise TissLMError(f"sft.seq_len={p.seq_len} exceeds {base_dir}'s max_seq_len={model.config.max_seq_len}")
    train_chats, heldout_chats = sft_conversations(clean_dir, params.tokenize.val_fraction, p)
    train = pack_conversations(template, tokenizer, train_chats, p.seq_len)
    heldout = pack_conversations(template, tokenizer, heldout_chats, p.seq_len) if heldout_chats else None
    torch.manual_seed(p.seed)  # the adapters' init
    if p.lora:
        add_lora(model, p.lora)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    result = finetune(model, train, heldout, p)
    final = merged(model) if p.lora else model
    with atomic_dir(out_dir) as tmp:
        final.save_pretrained(tmp, tokenizer=tokenizer)  # first: it replaces tmp as a whole
        template.save(tmp)
        if p.lora:
            save_adapter(model, tmp / ADAPTER_DIR)
        for name in ("tokenizer_config.json", "training.json"):  # the imported eos token; train's record
            if (base_dir / name).is_file():
                shutil.copyfile(base_dir / name, tmp / name)
    history = result.pop("history")
    metrics = {
        "data": str(p.data) if p.data else "default: documented functions of the corpus",
        "examples_train": len(train_chats),
        "examples_heldout": len(heldout_chats),
        "packed_rows": len(train.tokens),
        "conversations_packed": train.conversations,
        "conversations_truncated": train.truncated + (heldout.truncated if heldout else 0),
        "conversations_dropped": train.dropped + (heldout.dropped if heldout else 0),
        "assistant_token_share": train.assistant_tokens / train.tokens.numel(),
        **result,
        "seconds": round(time.perf_counter() - started, 1),
        "trainable_parameters": trainable,
        "lora": p.lora.model_dump() if p.lora else None,
        "device": str(device),
        "precision": p.precision,
        "heldout_history": [{k: h[k] for k in ("step", "heldout_loss") if k in h} for h in history],
    }
    return metrics
