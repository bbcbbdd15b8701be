"""Preference tuning by DPO (Rafailov et al. 2023): raise the likelihood of the chosen answer over
the rejected one, relative to a frozen copy of the starting model.

For a prompt x with answers y_c (chosen) and y_r (rejected), the loss is
    -log σ(β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])
where log π(y|x) sums the log-probabilities of the answer's tokens only: the assistant turn as
`ChatTemplate.encode` marks it, end-of-turn marker included, exactly the tokens SFT trains on.
β (log π - log π_ref) is each answer's implicit reward; on held-out pairs the fraction whose
chosen reward beats the rejected one (reward accuracy) and the mean gap (margin) say whether the
preference generalises beyond the pairs trained on.

Pairs come from a JSONL file, or are made offline (`default_pairs`): each documented function of
the corpus is asked for by its instruction, the model samples an answer, and when that answer
fails to parse as Python, the function's real source (chosen) and the sample (rejected) make a
pair. The model learns to prefer code over its own typical failure, with no labeller involved.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.core.chat import ChatTemplate, validate_messages
from tisslm.core.config import DpoParams, Params
from tisslm.core.errors import TissLMError
from tisslm.core.generate import generate
from tisslm.core.io import atomic_dir, read_jsonl
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import load_tokenizer
from tisslm.data.instructions import FunctionExample, function_examples
from tisslm.data.tokens import is_val
from tisslm.train.lora import ADAPTER_DIR, add_lora, merged, save_adapter
from tisslm.train.plan import autocast, uses_cuda
from tisslm.train.sft import sequence_logprobs

SAMPLE_ROWS = 64  # prompts decoded together when sampling the default pairs' answers
TRAIN_ACCURACY_STEPS = 10  # the train reward accuracy is over the pairs of the last this many steps


@dataclass(frozen=True)
class PreferencePair:
    """A conversation up to the answer, and a better and a worse assistant answer to it."""

    prompt: list[dict[str, str]]  # messages; the answer follows as the next assistant turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class EncodedPair:
    """A pair as token ids, with masks that are True on the answer's tokens (prompt + answer each)."""

    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]


# ---- pairs: from JSONL, or sampled from the model ----


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """A JSONL file of {"prompt": str or messages, "chosen": str, "rejected": str}; a bad line is a
    one-line error naming it. A string prompt is one user message."""
    pairs = []
    for where, record in read_jsonl(path):
        if not isinstance(record, dict) or set(record) != {"prompt", "chosen", "rejected"}:
            raise TissLMError(f'{where}: expected an object with "prompt", "chosen" and "rejected" only')
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = validate_messages(prompt, f"{where}: prompt")
        if prompt[-1]["role"] == "assistant":
            raise TissLMError(f"{where}: the prompt ends with an assistant message; the answers are the next one")
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str):
                raise TissLMError(f"{where}: {key} must be a string (the assistant's answer)")
        pairs.append(PreferencePair(prompt, record["chosen"], record["rejected"]))
    if not pairs:
        raise TissLMError(f"{path}: no preference pairs")
    return pairs


def is_heldout(pair: PreferencePair, val_fraction: float) -> bool:
    """A JSONL pair's split, by a hash of its prompt as documents split: every pair of one prompt
    lands on the same side, so held-out prompts were never trained on."""
    return is_val(json.dumps(pair.prompt, sort_keys=True), val_fraction)


def parses(source: str) -> bool:
    """Whether `source` compiles as a Python module (syntax and scoping, as `compile` checks them;
    nothing is run)."""
    try:
        compile(source, "<sample>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a null byte
        return False
    return True


@dataclass
class Sampled:
    """Default pairs of one split and what it took to find them."""

    pairs: list[PreferencePair]
    sampled: int  # answers sampled
    failed_to_parse: int  # of those, the ones that did not parse


def default_pairs(
    model: TissLM,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    examples: Sequence[FunctionExample],
    max_pairs: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> Sampled:
    """Sample the model's answer to each example's instruction, `SAMPLE_ROWS` at a time, until
    `max_pairs` answers have failed to parse or the examples run out; each failure makes a pair
    with the example's source as the chosen answer. Examples whose prompt leaves no room for
    `max_new_tokens` in the model's context are passed over."""
    room = model.config.max_seq_len - max_new_tokens
    asks = [(e, template.prompt_ids(tokenizer, e.messages[:1])) for e in examples]
    asks = [(e, prompt) for e, prompt in asks if len(prompt) <= room]
    if examples and not asks:
        raise TissLMError(
            f"dpo: no instruction's prompt leaves room for dpo.max_new_tokens={max_new_tokens} "
            f"within the model's max_seq_len={model.config.max_seq_len}"
        )
    stop = template.stop_token_ids(tokenizer)
    result = Sampled([], 0, 0)
    bar = tqdm(total=max_pairs, desc="dpo: sampling", unit=" pair", leave=False)
    for start in range(0, len(asks), SAMPLE_ROWS):
        if len(result.pairs) >= max_pairs:
            break
        batch = asks[start : start + SAMPLE_ROWS]
        answers = generate(
            model,
            [prompt for _, prompt in batch],
            max_new_tokens,
            temperature=temperature,
            seed=seed + start,  # a seed per batch: the samples do not depend on how far sampling went
            stop_tokens=stop,
            vocab_limit=tokenizer.get_vocab_size(),
        )
        for (example, _), answer in zip(batch, answers, strict=True):
            text = tokenizer.decode(answer)
            result.sampled += 1
            if not parses(text):
                result.failed_to_parse += 1
                if len(result.pairs) < max_pairs:
                    result.pairs.append(PreferencePair(example.messages[:1], example.solution, text))
                    bar.update()
    bar.close()
    return result


def encode_pair(template: ChatTemplate, tokenizer: Tokenizer, pair: PreferencePair) -> EncodedPair:
    """Both conversations through the chat template, masks on the final assistant turn alone (a
    prompt's earlier assistant turns are context, not the answer being compared)."""
    encoded = []
    for answer in (pair.chosen, pair.rejected):
        ids, mask = template.encode(tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}])
        encoded += [ids, last_run(mask)]
    return EncodedPair(*encoded)


def last_run(mask: list[bool]) -> list[bool]:
    """`mask` with only its last run of True kept."""
    end = len(mask)
    while end and not mask[end - 1]:
        end -= 1
    start = end
    while start and mask[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(mask))]


def encode_pairs(
    template: ChatTemplate, tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_len: int
) -> tuple[list[EncodedPair], int]:
    """The pairs that fit in `max_len` tokens (both answers), encoded, and how many did not."""
    encoded = [encode_pair(template, tokenizer, pair) for pair in pairs]
    kept = [e for e in encoded if max(len(e.chosen_ids), len(e.rejected_ids)) <= max_len]
    return kept, len(encoded) - len(kept)


# ---- the loss ----


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mean DPO loss over a batch of pairs and the implicit rewards of each answer (B,), from
    the summed answer log-probabilities (B,) under the policy and the reference."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - reference_rejected)  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards, rejected_rewards


def collate(pairs: Sequence[EncodedPair], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the chosen conversations, then the rejected ones: ids and masks (2B, T), padded
    on the right with masked-out zeros (causal attention: padding never reaches earlier tokens)."""
    rows = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (2B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)  # (2B, T)
    for row, (tokens, answer) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(answer)] = torch.tensor(answer)
    return ids.to(device), mask.to(device)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The reference model: a copy of the starting policy that never trains."""
    return copy.deepcopy(model).requires_grad_(False).eval()


def pair_losses(
    policy: nn.Module, reference: nn.Module, pairs: Sequence[EncodedPair], beta: float, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch and, per pair (B,), the chosen and rejected rewards and whether the
    policy alone (no reference) gives the chosen answer the higher log-probability."""
    device = next(policy.parameters()).device
    ids, mask = collate(pairs, device)
    with autocast(precision, device):
        with torch.no_grad():
            reference_logps = sequence_logprobs(reference, ids, mask)  # (2B,)
        policy_logps = sequence_logprobs(policy, ids, mask)  # (2B,)
    policy_chosen, policy_rejected = policy_logps.chunk(2)  # (B,) each
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, *reference_logps.chunk(2), beta)
    return loss, chosen, rejected, policy_chosen > policy_rejected


@torch.no_grad()
def preference_metrics(
    policy: nn.Module, reference: nn.Module, pairs: Sequence[EncodedPair], beta: float, batch_size: int, precision: str
) -> dict | None:
    """Over `pairs`: reward accuracy (chosen reward > rejected), mean reward margin, mean rewards
    of each side (did the chosen answers gain, or the rejected ones only lose?), mean DPO loss,
    and how often the policy alone gives the chosen answer the higher log-probability; None
    without pairs."""
    if not pairs:
        return None
    losses, chosen_rewards, rejected_rewards, logp_wins = [], [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        loss, chosen, rejected, logp_win = pair_losses(policy, reference, batch, beta, precision)
        losses.append(loss * len(batch))
        chosen_rewards.append(chosen)
        rejected_rewards.append(rejected)
        logp_wins.append(logp_win)
    chosen, rejected = torch.cat(chosen_rewards), torch.cat(rejected_rewards)  # (N,) each
    return {
        "reward_accuracy": (chosen > rejected).float().mean().item(),
        "reward_margin": (chosen - rejected).mean().item(),
        "chosen_reward": chosen.mean().item(),
        "rejected_reward": rejected.mean().item(),
        "loss": (torch.stack(losses).sum() / len(pairs)).item(),
        "logp_accuracy": torch.cat(logp_wins).float().mean().item(),
    }


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    train_pairs: Sequence[EncodedPair],
    heldout_pairs: Sequence[EncodedPair],
    p: DpoParams,
) -> dict:
    """`p.steps` AdamW steps of the DPO loss on batches of `train_pairs` (reshuffled each pass,
    seeded), `policy` updated in place; held-out preference metrics before and after.

    Both models stay in eval mode: with dropout on, the policy's and the reference's
    log-probabilities would differ by noise as well as by weights, and the rewards with them."""
    if not train_pairs:
        raise TissLMError("dpo: no training pairs (see the counts above: every sample parsed, or none fit)")
    policy.eval()
    before = preference_metrics(policy, reference, heldout_pairs, p.beta, p.batch_size, p.precision)
    trainable = [param for param in policy.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=p.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(p.seed)
    order: list[int] = []
    losses, wins, seen = [], 0, 0
    for step in tqdm(range(p.steps), desc="dpo", unit=" step"):
        batch = []
        while len(batch) < min(p.batch_size, len(train_pairs)):
            if not order:
                order = torch.randperm(len(train_pairs), generator=generator).tolist()
            batch.append(train_pairs[order.pop()])
        loss, chosen, rejected, _ = pair_losses(policy, reference, batch, p.beta, p.precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, p.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step >= p.steps - TRAIN_ACCURACY_STEPS:
            wins += int((chosen > rejected).sum())
            seen += len(batch)
    after = preference_metrics(policy, reference, heldout_pairs, p.beta, p.batch_size, p.precision)
    return {
        "final_train_loss": losses[-1] if losses else None,
        "train_reward_accuracy": wins / seen if seen else None,
        "heldout_before": before,
        "heldout_after": after,
    }


# ---- the stage ----


def save_model(model: TissLM | None, source_dir: Path, out_dir: Path, adapter: bool = False) -> None:
    """`out_dir`: the model directory `source_dir` with `model`'s weights (None: unchanged),
    atomically; with `adapter`, the merged weights and the LoRA adapter in adapter/. The source's
    other files (tokenizer, chat template, ...) come along; its subdirectories (an SFT adapter)
    only when unchanged, since they belong to the source's weights."""
    with atomic_dir(out_dir) as tmp:
        if model is None:
            shutil.copytree(source_dir, tmp, dirs_exist_ok=True)
            return
        (merged(model) if adapter else model).save_pretrained(tmp)  # atomic itself: swaps the empty tmp
        if adapter:
            save_adapter(model, tmp / ADAPTER_DIR)
        for item in source_dir.iterdir():
            if item.is_file() and not (tmp / item.name).exists():
                shutil.copyfile(item, tmp / item.name)


def run_dpo(params: Params, clean_dir: Path, model_dir: Path, out_dir: Path) -> dict:
    """The dpo stage: pairs (params.dpo.data, or the default ones from `clean_dir`), DPO from the
    model in `model_dir`, the tuned model written to `out_dir`; returns the stage's metrics."""
    p = params.dpo
    start = time.perf_counter()
    if p.steps == 0:
        save_model(None, model_dir, out_dir)
        return {"steps": 0, "seconds": {"total": round(time.perf_counter() - start, 1)}}
    device = torch.device("cuda" if uses_cuda(p.device, torch.cuda.is_available(), "dpo.device") else "cpu")
    policy = TissLM.from_pretrained(model_dir, device).float()
    tokenizer, template = load_tokenizer(model_dir), ChatTemplate.load(model_dir)
    counts: dict = {"sampled": None, "failed_to_parse": None}
    if p.data is not None:
        pairs = read_pairs(p.data)
        train = [pair for pair in pairs if not is_heldout(pair, params.tokenize.val_fraction)][: p.max_pairs]
        heldout = [pair for pair in pairs if is_heldout(pair, params.tokenize.val_fraction)][: p.eval_pairs]
    else:
        val_fraction = params.tokenize.val_fraction

        def sample(split: str, max_pairs: int) -> Sampled:
            examples = function_examples(clean_dir, val_fraction, split) if max_pairs else []
            return default_pairs(
                policy, tokenizer, template, examples, max_pairs, p.max_new_tokens, p.temperature, p.seed
            )

        found = {"train": sample("train", p.max_pairs), "heldout": sample("val", p.eval_pairs)}
        train, heldout = found["train"].pairs, found["heldout"].pairs
        counts = {key: {split: getattr(s, key) for split, s in found.items()} for key in counts}
        sampled = sum(counts["sampled"].values())
        counts["failed_to_parse_fraction"] = sum(counts["failed_to_parse"].values()) / sampled if sampled else None
    pairs_seconds = time.perf_counter() - start
    max_len = policy.config.max_seq_len
    train_encoded, too_long = encode_pairs(template, tokenizer, train, max_len)
    heldout_encoded, heldout_too_long = encode_pairs(template, tokenizer, heldout, max_len)
    reference = frozen_copy(policy)
    if p.lora is not None:
        torch.manual_seed(p.seed)  # the adapters' init
        add_lora(policy, p.lora)
    trained = train_dpo(policy, reference, train_encoded, heldout_encoded, p)
    save_model(policy, model_dir, out_dir, adapter=p.lora is not None)
    return {
        "data": str(p.data) if p.data is not None else "default",
        "pairs": {"train": len(train_encoded), "heldout": len(heldout_encoded)},
        **counts,
        "too_long": too_long + heldout_too_long,  # pairs left out: an answer does not fit max_seq_len
        "steps": p.steps,
        "beta": p.beta,
        **trained,
        "seconds": {
            "pairs": round(pairs_seconds, 1),
            "training": round(time.perf_counter() - start - pairs_seconds, 1),
            "total": round(time.perf_counter() - start, 1),
        },
    }
