"""The schema of params.yaml: one pydantic model per section, and `load_params`.

params.yaml holds every knob; this module says what each may be. Stages, the CLI and the flows
read parameters only through `load_params`, so a bad value is caught in one place with one
message (`params.yaml: model.n_heads=0: Input should be greater than 0`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, NonNegativeInt, PositiveInt, Tag, model_validator

from tisslm.core.choices import SearchMode
from tisslm.core.errors import ConfigError, parse

DEFAULT_PARAMS = Path("params.yaml")
# The dtype a model computes in: bf16 autocast while training, the weights' and activations' dtype
# while decoding (`tisslm.core.decode.PRECISIONS` maps each to its torch dtype).
Precision = Literal["fp32", "bf16"]


# The model's and the sampler's settings live here, not beside the code that uses them, so that
# reading params.yaml (every command, every stage) never imports torch. `tisslm.core.model` and
# `tisslm.core.sampling` re-export them.
class ModelConfig(BaseModel):
    """Architecture hyper-parameters; the `model` section of params.yaml and a model's config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: PositiveInt = 8192  # rows of the embedding; may exceed the tokenizer's vocabulary
    d_model: PositiveInt = 128  # width of the residual stream
    n_layers: PositiveInt = 6  # number of transformer blocks
    n_heads: PositiveInt = 4  # query heads; head_dim = d_model // n_heads
    n_kv_heads: PositiveInt = 2  # key/value heads shared by groups of query heads (1 = MQA)
    d_ff: PositiveInt = 384  # hidden width of the SwiGLU feed-forward
    max_seq_len: PositiveInt = 512  # longest context: sizes the RoPE tables and the KV cache
    rope_theta: float = Field(10000.0, gt=0)  # RoPE base; larger stretches the longest wavelength
    norm_eps: float = Field(1e-5, gt=0)  # added to the mean square in RMSNorm
    dropout: float = Field(0.0, ge=0, lt=1)  # on embeddings, attention weights and residual branches
    tie_embeddings: bool = True  # share the embedding matrix with the output head
    attention_bias: bool = False  # biases on the q, k, v projections, Qwen2-style (never on o_proj)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class SamplingParams(BaseModel):
    """How the next token is drawn; params.yaml's `generate` section holds the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: NonNegativeInt = 128  # tokens to add after the prompt
    temperature: float = Field(0.8, ge=0)  # softmax temperature; 0 is greedy
    top_k: PositiveInt | None = 50  # sample among the k most likely tokens (None: all)
    top_p: float | None = Field(0.95, gt=0, le=1)  # nucleus mass (None or 1: no nucleus cut)
    seed: int | None = None  # fixes the sampled tokens; None draws fresh randomness


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SourceSection(_Section):
    # More to learn from without moving the val set: the held-out documents stay the same ones.
    train_only: bool = False  # this source's documents never enter the val split


class StdlibSource(_SourceSection):
    """The running interpreter's standard-library .py files: the library (its test suites and
    site-packages excluded), or the test suites alone (`Lib/test`, `idle_test`, ...)."""

    type: Literal["stdlib"] = "stdlib"
    part: Literal["library", "tests"] = "library"


class SitePackagesSource(_SourceSection):
    """The .py files of the installed distributions (this environment's site-packages, or `paths`),
    each tagged with its distribution's name, version and license; a distribution whose license is
    not in `licenses` has its files skipped as license_excluded, counted per license."""

    type: Literal["site_packages"]
    # Allow-list of license names, compared case-insensitively with each distribution's license,
    # normalised to an SPDX-like name (License-Expression, else a trove classifier, else a short
    # License field; else "unknown"). An expression is allowed when it holds: "MIT OR GPL-3.0" needs
    # MIT listed, "MIT AND Zlib" needs both. Default: permissive licenses only (no GPL, LGPL, MPL, EPL);
    # "BSD" is what a bare "BSD License" classifier or field becomes.
    licenses: list[str] = Field(
        default_factory=lambda: [
            "MIT",
            "MIT-0",
            "MIT-CMU",
            "BSD",
            "BSD-2-Clause",
            "BSD-3-Clause",
            "0BSD",
            "Apache-2.0",
            "PSF-2.0",
            "Python-2.0",
            "CNRI-Python",
            "ISC",
            "Zlib",
            "Unlicense",
            "CC0-1.0",
            "HPND",
            "BSL-1.0",
        ],
        min_length=1,
    )
    exclude_tests: bool = True  # leave out files under test/ and tests/ directories (not seen)
    paths: list[Path] | None = None  # directories to search for *.dist-info; None: this environment's site-packages


class DirSource(_SourceSection):
    """Files under a directory, chosen by gitignore-style globs relative to it."""

    type: Literal["dir"]
    path: Path  # the directory; relative paths are taken from the repo root
    include: list[str] = ["**/*"]  # globs of files to take
    exclude: list[str] = []  # globs of files to leave out, applied after include


class FilesSource(_SourceSection):
    """Listed files: .txt (one document each), .jsonl and .parquet (one document per record)."""

    type: Literal["files"]
    paths: list[Path] = Field(min_length=1)
    text_field: str = "text"  # the record field holding the text (.jsonl, .parquet)


class HFSource(_SourceSection):
    """A dataset read through `datasets.load_dataset(..., streaming=True)`: a hub id or a local path."""

    type: Literal["hf"]
    name: str  # hub id (needs the network) or local dataset directory / builder name
    config_name: str | None = None
    data_files: list[str] | None = None  # for builders such as "json" or "parquet"
    split: str = "train"
    text_field: str = "text"
    max_docs: PositiveInt | None = None  # stop after this many records


Source = Annotated[StdlibSource | SitePackagesSource | DirSource | FilesSource | HFSource, Field(discriminator="type")]


class IngestParams(_Section):
    sources: list[Source] = Field(
        default_factory=lambda: [StdlibSource(), StdlibSource(part="tests", train_only=True)], min_length=1
    )
    max_file_bytes: PositiveInt = 1_000_000  # larger documents are skipped as too_large
    shard_rows: PositiveInt = 500  # documents per shard of data/raw and data/clean (clean tasks read whole raw shards)
    min_rows: NonNegativeInt = 100  # validation: fewer kept documents fail the stage


class FilterParams(_Section):
    """Quality filters, after BigCode's: a document failing any is dropped and counted."""

    min_chars: NonNegativeInt = 100  # shorter documents carry little to learn from
    max_chars: PositiveInt = 500_000
    max_line_length: PositiveInt = 1_000  # minified or data-like files have huge lines
    min_alnum_fraction: float = Field(0.25, ge=0, le=1)  # letters and digits over all characters
    autogenerated_markers: list[str] = [
        "auto-generated",
        "autogenerated",
        "generated by",
        "do not edit",
        "with gencodec.py",
    ]
    marker_lines: PositiveInt = 5  # markers count only in the first lines, where tools put them


class DedupParams(_Section):
    exact: bool = True  # drop documents whose cleaned text is identical to an earlier one
    near: bool = True  # drop near-duplicates (datatrove's MinHash LSH), keeping one document of each cluster
    num_perm: PositiveInt = 128  # MinHash permutations: more is more precise and slower
    threshold: float = Field(0.85, gt=0, le=1)  # LSH bands are chosen so this Jaccard similarity is found half the time
    shingle_size: PositiveInt = 5  # tokens per shingle
    seed: int = 1  # MinHash permutation seed


class AnonymizeParams(_Section):
    emails: bool = True
    ip_addresses: bool = True  # public IPv4 and IPv6 only; private and loopback stay
    phone_numbers: bool = True  # national and international numbers that phonenumbers finds valid
    payment_cards: bool = True  # card numbers that pass the Luhn check
    ibans: bool = True  # IBANs whose mod-97 checksum holds
    secrets: bool = True  # keys, tokens, private key blocks, passwords (detect-secrets plugins)


class CleanParams(_Section):
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFC"
    filters: FilterParams = FilterParams()
    dedup: DedupParams = DedupParams()
    anonymize: AnonymizeParams = AnonymizeParams()
    executor: Literal["local", "ray"] = "local"  # ray: the cluster RAY_ADDRESS names (a local one when unset)
    tasks: PositiveInt = 4  # partitions of the corpus (raw shards rank::tasks): they, not workers, fix the output
    workers: PositiveInt = 2  # tasks run at once: processes of the local executor, Ray tasks on a cluster
    min_rows: NonNegativeInt = 100  # validation: fewer clean documents fail the stage


class TokenizerParams(_Section):
    vocab_size: PositiveInt = 8192  # tokens including the special ones; model.vocab_size must hold them
    min_frequency: PositiveInt = 2  # a pair must occur this often to be merged
    # The first ends every document; <|im_start|> and <|im_end|> mark the default chat template's turns.
    special_tokens: list[str] = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


class TokenizeParams(_Section):
    val_fraction: float = Field(0.05, gt=0, lt=1)  # share of documents (by id hash) held out for validation
    batch_docs: PositiveInt = 256  # documents per encode_batch call
    baseline_context_bytes: NonNegativeInt = 4_000_000  # train text xz may see before the val bytes


LoraTarget = Literal[
    "qkv", "o_proj", "gate_up", "down"
]  # the blocks' linears (the output head is tied to the embedding)


class LoraParams(_Section):
    """LoRA (Hu et al. 2021): the base weights stay frozen and each targeted linear learns a
    low-rank update B @ A, B starting at zero, so training starts from the base model exactly."""

    rank: PositiveInt = 8  # r: rows of A, columns of B
    alpha: float = Field(16.0, gt=0)  # the update is scaled by alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapter's input
    targets: list[LoraTarget] = Field(default_factory=lambda: ["qkv", "o_proj", "gate_up", "down"], min_length=1)
    # int8: QLoRA-style, the frozen base linears stored int8 (torchao weight-only), the adapters in
    # float; sft only (train's checkpoints hold plain tensors). fp32: a plain base.
    base: Literal["fp32", "int8"] = "fp32"


class TrainParams(_Section):
    seed: int = 1337  # fixes init, batches (a function of seed and step) and dropout
    # A TissLM model directory (e.g. from `tisslm import`): its weights, architecture and tokenizer
    # replace random init, params.yaml's `model` section and the trained BPE; continued pretraining
    # then runs `train.max_steps` steps on the corpus. None: train from scratch.
    init_from: Path | None = None
    max_steps: PositiveInt = 1100  # optimizer steps
    batch_size: PositiveInt = 16  # the global batch: sequences per optimizer step, over all processes
    # Sequences one process puts through one forward; None: its whole share (batch_size / processes).
    # Smaller saves memory, by gradient accumulation; it never changes what is learned.
    micro_batch_size: PositiveInt | None = None
    seq_len: PositiveInt = 256  # tokens per sequence (at most model.max_seq_len)
    optimizer: Literal["adamw", "muon"] = "muon"  # muon: Muon on the blocks' matrices, AdamW on the rest
    lr: float = Field(4e-3, gt=0)  # peak learning rate (Muon's updates are scaled to AdamW's RMS, so one serves both)
    schedule: Literal["cosine", "wsd"] = "wsd"  # after warmup: cosine decay, or warmup-stable-decay
    min_lr: float = Field(0.0, ge=0)  # where the decay ends, at max_steps
    warmup_steps: NonNegativeInt = 50  # linear warmup from 0 to lr
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: the last fraction of max_steps, decayed linearly
    weight_decay: float = Field(0.1, ge=0)  # decoupled decay, on matrices only
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    precision: Precision = "bf16"  # bf16 autocast on CPU and CUDA
    compile: bool | Literal["auto"] = "auto"  # torch.compile each block; auto: on CUDA (pays a compile up front)
    eval_interval: PositiveInt = 200  # steps between validations
    eval_batches: PositiveInt = 10  # batches per validation
    log_interval: PositiveInt = 10  # steps between logged metrics
    checkpoint_interval: PositiveInt = 200  # steps between checkpoints
    keep_checkpoints: PositiveInt = 2  # newest complete checkpoints kept
    # Processes on this host (> 1 relaunches the stage under torchrun); auto: one per visible GPU,
    # else 2 on a CPU of 2 or more cores. The model does not depend on it: batch_size is global.
    nproc: PositiveInt | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    mlflow: bool = True  # log to MLflow (MLFLOW_TRACKING_URI, default sqlite at the repo root)
    # Distillation (Hinton et al. 2015): a TissLM model directory whose next-token distributions
    # the model also learns from. It must share the tokenizer (same vocabulary); None: data alone.
    teacher: Path | None = None
    distill_weight: float = Field(0.5, ge=0, le=1)  # share of the loss that is the KL to the teacher; 1 - it: data loss
    distill_temperature: float = Field(1.0, gt=0)  # softens both distributions; the KL is scaled by its square
    # LoRA adapters instead of full training (the base frozen); the final model holds the merged
    # weights and the adapter in its adapter/ subdirectory. None: every weight trains.
    lora: LoraParams | None = None


class DpoParams(_Section):
    """The dpo stage: preference tuning by DPO (Rafailov et al. 2023) of the sft model (tisslm.train.dpo)."""

    # A JSONL file of {"prompt": str or messages, "chosen": str, "rejected": str}. None: the default
    # pairs, made offline from the corpus: each documented function's source (chosen) against the
    # model's own answer to its instruction when that answer fails to parse (rejected).
    data: Path | None = None
    max_pairs: PositiveInt = 128  # training pairs at most (default pairs: sampling stops once this many are found)
    eval_pairs: NonNegativeInt = 32  # held-out pairs at most (val split), scored before and after training
    steps: NonNegativeInt = 32  # optimizer steps; 0: the input model passes through unchanged
    batch_size: PositiveInt = 8  # pairs per optimizer step
    lr: float = Field(1e-5, gt=0)  # AdamW, constant
    beta: float = Field(0.1, gt=0)  # strength of the pull toward the reference model: rewards are beta x log-ratio
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    max_new_tokens: PositiveInt = 128  # default pairs: longest sampled answer, in tokens
    temperature: float = Field(0.8, gt=0)  # default pairs: sampling temperature of the model's answers
    seed: int = 0  # fixes the sampled answers, the order of the pairs and the adapters' init
    # fp32 by default: rewards are differences of log-probabilities summed over whole answers, where
    # bf16's rounding adds noise of the size of the early margins. bf16 about halves a CPU step.
    precision: Precision = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    lora: LoraParams | None = None  # LoRA adapters (the sft model frozen, and the reference) instead of full tuning


class SftParams(_Section):
    """The sft stage: supervised fine-tuning of models/base on conversations, loss on the
    assistant's tokens only (tisslm.train.sft)."""

    # A JSONL file of {"messages": [...]} records; None: the default set made from the corpus (each
    # documented stdlib function: "Write a Python function `f(args)`: <summary>" -> its source).
    data: Path | None = None
    max_examples: PositiveInt | None = None  # training conversations used, the first N (None: all)
    steps: NonNegativeInt = 200  # optimizer steps; 0: models/base is copied through unchanged
    batch_size: PositiveInt = 16  # packed rows per step
    seq_len: PositiveInt = 256  # tokens per packed row (at most the model's max_seq_len)
    lr: float = Field(1e-3, gt=0)  # peak learning rate (AdamW)
    warmup_steps: NonNegativeInt = 20  # linear warmup, then a cosine down to 0 at the last step
    weight_decay: float = Field(0.0, ge=0)  # decoupled decay, on matrices only
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 turns clipping off
    precision: Precision = "bf16"  # bf16 autocast on CPU and CUDA
    eval_interval: PositiveInt = 50  # steps between held-out losses (and one at the end)
    # Held-out conversations scored: the first N of the val split's functions for the default
    # set; for a JSONL, N conversations drawn with `seed` and kept out of training.
    eval_examples: PositiveInt = 64
    seed: int = 0  # fixes the adapters' init, the held-out draw and the batches
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    lora: LoraParams | None = None  # LoRA adapters (the base frozen) instead of full fine-tuning


class HumanEvalParams(_Section):
    """The evaluate stage's coding checks: HumanEval (completion style) and the held-out functions
    (chat style), every program run in the bubblewrap sandbox (tisslm.agent.code_eval)."""

    problems: PositiveInt | None = None  # the first N of HumanEval's 164 problems (None: all)
    samples: NonNegativeInt = 10  # sampled completions per problem for pass@k, k <= samples (0: greedy only)
    temperature: float = Field(0.8, gt=0)  # of the sampled completions (pass@1 itself is greedy)
    top_p: float = Field(0.95, gt=0, le=1)  # nucleus mass of the sampled completions
    # Among the k most likely tokens (None: all, as the Codex paper): the nucleus then sorts k logits a
    # step, not the whole vocabulary, which on a CPU costs several times the small model's own step.
    top_k: PositiveInt | None = 50
    max_new_tokens: PositiveInt = 128  # per completion; stop sequences usually end it earlier
    batch_size: PositiveInt = 64  # prompts decoded together
    # torch threads while decoding: a small model's step is too small to share between cores, and
    # threads that wait on each other crawl (10x) when anything else runs on the machine.
    decode_threads: PositiveInt = 1
    seed: int = 0  # of the sampled completions
    workers: PositiveInt = 2  # sandboxed checks run side by side
    timeout_s: float = Field(10.0, gt=0)  # per check: wall clock, and CPU seconds (rounded up)
    memory_mb: PositiveInt = 2048  # per check: address space
    sft_examples: NonNegativeInt = 64  # held-out documented functions asked for in chat form (0: off)


class EvaluateParams(_Section):
    batch_size: PositiveInt = 16  # windows scored per forward pass
    prompts: list[str] = ["def ", "import os\n", "class Config:\n    def __init__(self"]  # completed greedily
    max_new_tokens: PositiveInt = 64  # length of each completion
    calibration_bins: PositiveInt = 15  # equal-width confidence bins of the expected calibration error
    humaneval: HumanEvalParams = HumanEvalParams()  # can it code? HumanEval pass@k, held-out functions


class ExportParams(_Section):
    parity_text: str = "def main():\n    import os\n    return os.getcwd()\n"  # compared across formats
    logit_atol: float = Field(1e-4, gt=0)  # largest logit difference an HF or ONNX export may show


class QuantizeGoals(_Section):
    linear_weight_size_ratio: float = Field(3.0, gt=0)  # fp32 linear weights over quantized ones, at least
    decode_speedup: float = Field(1.5, gt=0)  # batch-1 greedy decode, quantized over fp32, at least
    bits_per_byte_relative_increase: float = Field(0.02, ge=0)  # quality lost on val, at most


class QuantizeParams(_Section):
    schemes: list[Literal["int8_weight_only", "int8_dynamic_activation"]] = [
        "int8_weight_only",
        "int8_dynamic_activation",
    ]
    decode_tokens: PositiveInt = 128  # tokens per timed greedy decode (batch 1)
    eval_documents: PositiveInt | None = None  # val documents for the bits-per-byte delta (None: all)
    goals: QuantizeGoals = QuantizeGoals()  # what a scheme must reach to count as worth it (reported, not enforced)


class KnowledgeBaseFieldWeights(_Section):
    """bm25() weight of each full-text field of a chunk (tisslm.kb.store.FIELDS)."""

    name: float = Field(4.0, ge=0)  # qualified name + its identifiers' words
    signature: float = Field(2.0, ge=0)  # a def's or class's header lines
    doc: float = Field(2.0, ge=0)  # its docstring
    text: float = Field(1.0, ge=0)  # the whole chunk
    terms: float = Field(0.25, ge=0)  # the words of the text's compound identifiers


class KnowledgeBaseRerankWeights(_Section):
    """Fused mode: the weight of each feature of a candidate file in its rerank score
    (tisslm.kb.index.RERANK_FEATURES; fit by tools/fit_kb_rerank.py on queries.jsonl). All 0: no reranking."""

    lexical: float = 1.0  # its best chunk's lexical score over the query's best
    dense: float = 0.173  # its best chunk's WordLlama cosine
    card: float = 0.463  # MiniLM cosine of its path and module docstring
    definition: float = 1.021  # best MiniLM cosine of its documented definitions


class KnowledgeBaseRanking(_Section):
    """How searches of the index rank chunks (stored in the index: the server, CLI and TissLang use it)."""

    split_identifiers: bool = True  # query identifiers also search their words; the terms field counts
    field_weights: KnowledgeBaseFieldWeights = KnowledgeBaseFieldWeights()
    file_weight: float = Field(0.3, ge=0)  # a chunk's score + this x its file's score (0: no aggregation)
    test_weight: float = Field(0.3, ge=0, le=1)  # test files' chunk scores x this (0: left out)
    test_evidence: float = Field(0.15, ge=0)  # a file's chunks + this x the scores of its tests' chunks
    deprecated_weight: float = Field(0.5, ge=0, le=1)  # deprecated modules' chunk scores x this
    dense_weight: float = Field(0.25, ge=0)  # fused mode: the dense ranking's weight against the lexical one's
    rerank_weights: KnowledgeBaseRerankWeights = KnowledgeBaseRerankWeights()


class KnowledgeBaseParams(_Section):
    """The knowledge_base stage: what it indexes from the train split of data/clean, how the index
    ranks, and what it measures."""

    k: PositiveInt = 8  # chunks retrieved per held-out document for the context-gain figure
    mode: SearchMode = "fused"  # ranking used for that retrieval
    context_documents: PositiveInt = 16  # val documents scored with and without retrieved context
    index_tests: bool = True  # index test files (down-weighted by ranking.test_weight); false leaves them out
    ranking: KnowledgeBaseRanking = KnowledgeBaseRanking()


class BiasHubSource(_Section):
    name: str = "nyu-mll/crows_pairs"  # a dataset in CrowS-Pairs' format (sent_more, sent_less, bias_type)
    split: str = "test"


class BiasParams(_Section):
    hub: BiasHubSource | None = None  # also score a public set when a hub is reachable (offline: skipped, noted)
    bootstrap: PositiveInt = 1000  # resamples for the 95% intervals
    seed: int = 0


class RegisterParams(_Section):
    min_improvement: float = Field(0.01, ge=0, lt=1)  # relative bits-per-byte gain a challenger needs
    max_bias_shift: float = Field(5.0, ge=0)  # points pct_stereotype may move further from 50
    max_pass_at_1_drop: float = Field(0.0, ge=0, le=1)  # HumanEval pass@1 the challenger may lose to the champion


class PipelineParams(_Section):
    stage_timeout_s: PositiveInt = 4 * 3600  # a stage running longer is killed and the flow fails
    retries: int = Field(1, ge=0)  # extra attempts for a stage that failed transiently (lock, kill)
    retry_delay_s: float = Field(10.0, ge=0)  # wait before such an attempt


class FloatRange(_Section):
    low: float  # inclusive bounds of a float parameter
    high: float
    log: bool = False  # sample on a log scale (learning rates)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(
                f"needs 0 < low < high on a log scale, low < high otherwise (low={self.low}, high={self.high})"
            )
        return self


class Choices(_Section):
    choices: list[int | float | str | bool] = Field(min_length=1)  # the values a categorical parameter takes


def _dimension_kind(value: Any) -> str:
    keys = value if isinstance(value, dict) else vars(value)
    return "choices" if "choices" in keys else "range"


# Tagged so that a bad entry's error names the one shape it was meant to have, not both.
SearchDimension = Annotated[
    Annotated[FloatRange, Tag("range")] | Annotated[Choices, Tag("choices")], Discriminator(_dimension_kind)
]


class HpoParams(_Section):
    n_trials: PositiveInt = 12  # finished (complete or pruned) trials the study stops at, across restarts
    seed: int = 0  # TPE sampler seed
    study_name: str = "tisslm"
    # Optuna journal file (one worker; a restarted study resumes from it), or a database URL
    # (postgresql://user:pass@host/db, sqlite:///file.db) that several workers share;
    # $TISSLM_HPO_STORAGE overrides it (keep a password out of params.yaml)
    storage: str = "models/hpo/study.journal"
    heartbeat_s: PositiveInt = 60  # database storage: seconds between a running trial's heartbeats;
    # one silent for twice as long (its worker killed) is marked failed and retried with its params
    max_retries: int = Field(2, ge=0)  # database storage: reruns of a trial whose worker died
    trial_steps: PositiveInt = 150  # train.max_steps of each trial
    eval_interval: PositiveInt = 25  # steps between the val losses the pruner sees
    startup_trials: int = Field(3, ge=0)  # trials run in full before the median pruner acts
    warmup_steps: int = Field(50, ge=0)  # steps of each trial before it may be pruned
    # param path (as for --set) -> range or choices; every sampled value is validated as params.yaml is
    search_space: dict[str, SearchDimension] = {
        "train.lr": FloatRange(low=1e-3, high=1e-2, log=True),
        "train.weight_decay": FloatRange(low=0.0, high=0.2),
        "train.warmup_steps": Choices(choices=[10, 50]),
    }


FilterAction = Literal["allow", "flag", "redact", "block"]


class FilterPolicy(_Section):
    """What the content filter does with each category it finds, in prompts and in outputs alike.

    allow: nothing; flag: pass the text, record the finding; redact: replace the span with a
    placeholder; block: refuse the prompt, or end the output before the span (finish_reason
    content_filter). Toxicity cannot be redacted (its score is the whole text's): redact acts as block.
    """

    toxicity: FilterAction = "block"  # offensive language (alt-profanity-check's classifier)
    pii: FilterAction = "redact"  # emails, phone numbers, public IPs, payment cards, IBANs
    secrets: FilterAction = "redact"  # API keys, tokens, private keys, assigned passwords
    shell: FilterAction = "flag"  # destructive shell commands: rm -rf /, fork bombs, curl | sh


class ContentFilterParams(_Section):
    policy: FilterPolicy = FilterPolicy()
    # Classifier probability from which a line is toxic. Lines of the standard library (the default
    # corpus) reach 0.5 once in 800, 0.8 once in 4000: a 20-line reply of code would be blocked 2.5%
    # of the time at 0.5, 0.5% at 0.8. The safety stage reports precision and recall at others.
    toxicity_threshold: float = Field(0.8, gt=0, lt=1)


class WatermarkParams(_Section):
    """Kirchenbauer et al. (2023): a green list keyed by the previous token, its logits raised by delta."""

    enabled: bool = False  # watermark what the server and `tisslm generate` sample
    key: str = "tisslm-public-demo-key"  # TISSLM_WATERMARK_KEY overrides it; set that to keep the key secret
    gamma: float = Field(0.25, gt=0, lt=1)  # share of the vocabulary that is green at each step
    delta: float = Field(2.0, ge=0)  # added to green logits
    entropy_threshold: float = Field(0.0, ge=0)  # nats; steps of lower entropy are neither biased nor scored (SWEET)
    z_threshold: float = Field(4.0, gt=0)  # detection: z-scores at or above this say "watermarked"


class SafetyGoals(_Section):
    """What the safety stage's measurements should reach (reported in metrics/safety.json, not enforced)."""

    filter_f1: float = Field(0.9, ge=0, le=1)  # at least: the filter's F1 over the labelled set (harmful or not)
    filter_false_positive_rate: float = Field(0.02, ge=0, le=1)  # at most, on benign code that looks alarming
    watermark_detection: float = Field(0.95, ge=0, le=1)  # at least, at the longest of watermark_lengths
    watermark_false_positive_rate: float = Field(0.01, ge=0, le=1)  # at most, on human-written code and plain samples


class SafetyParams(_Section):
    """Safety on what leaves the system: the content filter, the watermark, and what the safety stage measures."""

    filters: ContentFilterParams = ContentFilterParams()
    watermark: WatermarkParams = WatermarkParams()
    watermark_lengths: list[PositiveInt] = [50, 100, 200]  # generated tokens at which detection is measured
    watermark_samples: PositiveInt = 40  # generations per length (watermarked, and plain for the quality cost)
    red_team_max_tokens: PositiveInt = 48  # tokens the server generates per red-team prompt
    goals: SafetyGoals = SafetyGoals()  # what the measurements should reach (reported, not enforced)


class ServeParams(_Section):
    """`tisslm serve`: where it listens and the limits that keep one CPU server responsive."""

    host: str = "127.0.0.1"  # loopback only; 0.0.0.0 exposes the server to the network
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (the address is printed at start)
    model_name: str = Field("tisslm", min_length=1)  # the id clients pass as `model`
    max_batch: PositiveInt = 8  # sequences decoded together: the KV cache's slots
    backend: Literal["torch", "llama.cpp"] = "torch"  # decode engine; llama.cpp (the `llama` extra) is faster on CPUs
    compile: bool = False  # torch backend: compile the decode step at start (seconds, cached on disk)
    precision: Precision = "fp32"  # torch backend: the weights' and activations' dtype while serving
    lookahead: NonNegativeInt = (
        0  # speculative decoding: tokens drafted by prompt lookup per step of a lone greedy request
    )
    max_queue: NonNegativeInt = 64  # requests waiting for a slot; one more gets 429
    max_prompt_tokens: PositiveInt = 384  # longer prompts get 400 (prompt + max_tokens must fit max_seq_len too)
    max_tokens: PositiveInt = 256  # the largest max_tokens a request may ask for
    request_timeout_s: float = Field(120.0, gt=0)  # from arrival to the last token; then 504 (or an error event)
    max_body_bytes: PositiveInt = 1_000_000  # larger request bodies get 413
    attention_max_tokens: PositiveInt = 64  # longest text the attention view draws (T x T per head)

    @model_validator(mode="after")
    def _torch_settings_on_torch(self) -> ServeParams:
        # llama.cpp decodes the model's GGUF export in that file's own types, uncompiled by torch:
        # these settings would be silently ignored there, so they are refused.
        if self.backend == "llama.cpp" and (self.compile or self.precision != "fp32"):
            raise ValueError(
                "compile and precision apply to the torch backend; llama.cpp decodes its GGUF export "
                f"as exported (compile={self.compile}, precision={self.precision})"
            )
        return self


class Params(_Section):
    """All of params.yaml."""

    model: ModelConfig = ModelConfig()
    generate: SamplingParams = SamplingParams()
    ingest: IngestParams = IngestParams()
    clean: CleanParams = CleanParams()
    tokenizer: TokenizerParams = TokenizerParams()
    tokenize: TokenizeParams = TokenizeParams()
    train: TrainParams = TrainParams()
    sft: SftParams = SftParams()
    dpo: DpoParams = DpoParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()
    quantize: QuantizeParams = QuantizeParams()
    bias: BiasParams = BiasParams()
    knowledge_base: KnowledgeBaseParams = KnowledgeBaseParams()
    # `register` itself would shadow BaseModel's (ABCMeta's) classmethod of that name.
    register_: RegisterParams = Field(RegisterParams(), alias="register")
    pipeline: PipelineParams = PipelineParams()
    hpo: HpoParams = HpoParams()
    serve: ServeParams = ServeParams()
    safety: SafetyParams = SafetyParams()


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw_value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.path=value, e.g. model.d_model=512")
    try:
        value = yaml.safe_load(raw_value) if raw_value else None
    except yaml.YAMLError:
        value = raw_value  # not YAML: take it as the string it is
    _set_path(data, key, value, override)


def _set_path(data: dict[str, Any], key: str, value: Any, said: str) -> None:
    """data["a"]["b"] = value for key "a.b"; `said` is how the user wrote it, for the error."""
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {said!r}: {where} is a value, not a section")
        node = child
    node[leaf] = value


def with_updates(params: Params, updates: Mapping[str, Any]) -> Params:
    """`params` with {"train.lr": 0.01, ...} applied and validated as params.yaml is: typed values in,
    typed params out, without a round trip through key=value text."""
    data = params.model_dump(mode="json", by_alias=True)
    for key, value in updates.items():
        _set_path(data, key, value, f"{key}={value}")
    return parse(Params, data, "updates")


def load_params(path: str | Path | None = DEFAULT_PARAMS, overrides: Sequence[str] = ()) -> Params:
    """Read and validate params.yaml (None: the defaults), after applying `key.sub=value` overrides."""
    data: Any = {}
    source = "defaults" if path is None else str(path)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: unreadable ({err})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    return parse(Params, data, source)


def project_params(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Params:
    """The params a command runs with: `path` if given, else ./params.yaml when there is one, else
    the defaults; `key.sub=value` overrides applied. The one place that rule is written."""
    if path is None and DEFAULT_PARAMS.is_file():
        path = DEFAULT_PARAMS
    return load_params(path, overrides)
