"""The watermark of Kirchenbauer et al. (2023): keyed green lists, the logits processor in generate(),
the z-test (with SWEET's entropy gate), and `tisslm generate --watermark` / `tisslm watermark detect`."""

from __future__ import annotations

import hashlib
import hmac
import inspect
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, make_model
from serving import save_tiny_model

from tisslm.core.config import WatermarkParams
from tisslm.core.errors import TissLMError, run_main
from tisslm.core.generate import generate
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.safety.watermark import KEY_ENV, Detection, Watermark, entropy, token_entropies, watermark_key

KEY = "test-key-1"
SECRET = "s3cret-watermark-key-9d41"  # distinctive, so that finding it in output cannot be chance
PARAMS = WatermarkParams()  # gamma 0.25, delta 2, no entropy gate, z_threshold 4
TOKENIZER = byte_level_tokenizer()
V = TOKENIZER.get_vocab_size()  # 257: 256 bytes and <|endoftext|>
PROMPT = TOKENIZER.encode("def main():").ids


@pytest.fixture(scope="module")
def byte_model():
    """A random model over the byte-level vocabulary: high-entropy output, the watermark's easy case."""
    return make_model(vocab_size=V, max_seq_len=256)


def sample(model, watermark: Watermark | None, seed: int, length: int = 200) -> list[int]:
    """The prompt's last token and `length` new tokens sampled at temperature 1: all of them scorable."""
    new = generate(model, [PROMPT], length, temperature=1.0, seed=seed, vocab_limit=V, logits_processor=watermark)[0]
    return PROMPT[-1:] + new


# ---- green lists ----


def test_green_lists_are_deterministic_gamma_sized_and_keyed():
    a, b = Watermark(KEY, PARAMS, V), Watermark(KEY, PARAMS, V)
    green = a.green_list(10)
    assert green == b.green_list(10)  # a fresh instance, so not the cache answering
    assert len(green) == round(0.25 * V) == 64 and len(set(green)) == 64
    assert all(0 <= t < V for t in green)
    assert a.green_list(11) != green
    assert Watermark("test-key-2", PARAMS, V).green_list(10) != green


def test_green_list_is_the_hmac_seeded_permutation():
    """The scheme pinned: text watermarked today must be detectable after a refactor."""
    digest = hmac.new(KEY.encode(), (42).to_bytes(8, "big", signed=True), hashlib.sha256).digest()
    permutation = torch.randperm(V, generator=torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1))
    assert Watermark(KEY, PARAMS, V).green_list(42) == sorted(permutation[:64].tolist())


@pytest.mark.parametrize("gamma", [0.001, 0.999])
def test_a_gamma_leaving_no_green_or_no_red_token_is_refused(gamma):
    with pytest.raises(TissLMError, match=f"gamma={gamma}"):
        Watermark(KEY, WatermarkParams(gamma=gamma), 100)


# ---- the logits processor ----


def test_processor_raises_exactly_the_green_logits_by_delta():
    watermark = Watermark(KEY, PARAMS, 90)  # a model 7 rows wider than its tokenizer
    logits = torch.randn(3, 97, generator=torch.Generator().manual_seed(0))
    previous = torch.tensor([5, 6, 5])
    out = watermark(logits, previous)
    for row, token in enumerate(previous.tolist()):
        green = torch.zeros(97, dtype=torch.bool)
        green[watermark.green_list(token)] = True
        assert torch.allclose(out[row, green] - logits[row, green], torch.tensor(2.0))
        assert torch.equal(out[row, ~green], logits[row, ~green])  # red ids and ids past V untouched
    assert not torch.equal(out[0] - logits[0], out[1] - logits[1])  # each row keyed by its own token


def test_entropy_threshold_leaves_low_entropy_rows_alone():
    watermark = Watermark(KEY, WatermarkParams(entropy_threshold=1.0), V)
    logits = torch.zeros(2, V)  # row 1 uniform: entropy ln V
    logits[0, 3] = 30.0  # row 0 all but certain: entropy ~0
    out = watermark(logits, torch.tensor([1, 1]))
    assert torch.equal(out[0], logits[0])
    assert (out[1] - logits[1]).sum().item() == pytest.approx(2.0 * 64)
    assert entropy(logits[1]).item() == pytest.approx(math.log(V))


def test_generate_gives_the_processor_each_rows_previous_token_after_the_vocab_limit(tiny_model):
    seen = []

    def record(logits, previous):
        seen.append((previous.tolist(), bool(torch.isinf(logits[:, 90:]).all())))
        return logits

    prompts = [[5, 17, 3], [8]]  # different lengths: the second is left-padded
    out = generate(tiny_model, prompts, 6, temperature=1.0, seed=0, vocab_limit=90, logits_processor=record)
    assert out == generate(tiny_model, prompts, 6, temperature=1.0, seed=0, vocab_limit=90)
    assert [previous for previous, _ in seen] == [[3, 8]] + [[out[0][i], out[1][i]] for i in range(5)]
    assert all(limited for _, limited in seen)


def test_a_processor_changes_greedy_tokens(tiny_model):
    def favour_7(logits, previous):
        return logits + 100.0 * (torch.arange(logits.size(-1)) == 7)

    assert generate(tiny_model, [[1, 2], [3]], 4, temperature=0, logits_processor=favour_7) == [[7] * 4] * 2


# ---- detection ----


def test_watermarked_text_is_detected_and_plain_text_wrong_key_and_human_code_are_not(byte_model):
    watermark = Watermark(KEY, PARAMS, V)
    marked = watermark.detect(sample(byte_model, watermark, seed=0))
    assert marked.watermarked and marked.z >= 4 and marked.tokens_scored > 150
    assert not watermark.detect(sample(byte_model, None, seed=0)).watermarked
    assert not Watermark("test-key-2", PARAMS, V).detect(sample(byte_model, watermark, seed=0)).watermarked
    for source in (inspect.getsource(textwrap), (REPO / "src/tisslm/core/sampling.py").read_text()):
        human = watermark.detect(TOKENIZER.encode(source).ids)
        assert not human.watermarked and abs(human.z) < 3 and human.tokens_scored > 500


def test_repeated_pairs_count_once():
    watermark = Watermark(KEY, PARAMS, V)
    line = TOKENIZER.encode("x = compute(y)  # a line human code repeats\n").ids
    once = watermark.detect(line)
    repeated = watermark.detect(line * 20)
    assert repeated.tokens_scored == once.tokens_scored + 1  # only the pair across the seam is new
    assert repeated.green - once.green in (0, 1)


def walk(watermark: Watermark, greens: int, reds: int) -> list[int]:
    """Token ids whose pairs are all distinct (no token is a previous twice): `greens` green, then `reds` red."""
    ids = [0]
    for want_green in [True] * greens + [False] * reds:
        green = set(watermark.green_list(ids[-1]))
        ids.append(next(t for t in range(watermark.vocab_size) if (t in green) == want_green and t not in ids))
    return ids


@pytest.mark.parametrize("greens, watermarked", [(15, False), (30, True)])
def test_z_and_p_value_match_a_hand_computation(greens, watermarked):
    watermark = Watermark(KEY, PARAMS, 100)  # 25 green ids: gamma exactly 0.25
    result = watermark.detect(walk(watermark, greens, 40 - greens))
    z = (greens - 0.25 * 40) / math.sqrt(40 * 0.25 * 0.75)  # 1.826 or 7.303
    assert (result.tokens_scored, result.green) == (40, greens)
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(1 - statistics.NormalDist().cdf(z), rel=1e-6, abs=1e-12)
    assert result.watermarked is watermarked


def test_sweet_scores_only_the_steps_generation_biased(byte_model):
    gated = Watermark(KEY, WatermarkParams(entropy_threshold=4.0), V)
    ids = sample(byte_model, gated, seed=0)
    with_gate = gated.detect(ids, token_entropies(byte_model, ids, V))
    without = Watermark(KEY, PARAMS, V).detect(ids)
    assert with_gate.watermarked and with_gate.tokens_scored < without.tokens_scored
    # The low-entropy steps were left unbiased: dropping them raises the green share.
    assert with_gate.green / with_gate.tokens_scored > without.green / without.tokens_scored + 0.05
    with pytest.raises(TissLMError, match="needs the model's entropies"):
        gated.detect(ids)


def test_token_entropies_match_a_forward_pass_past_the_context(tiny_model):
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    found = token_entropies(tiny_model, ids, 90)  # the tiny model's context is 64
    assert len(found) == 149
    with torch.no_grad():
        head = entropy(tiny_model(torch.tensor([ids[:64]]))[0, :-1, :90])  # (63,): before tokens 1..63
        last = entropy(tiny_model(torch.tensor([ids[86:149]]))[0, -1, :90])  # before token 149, in the last window
    assert found[:63] == pytest.approx(head.tolist(), abs=1e-5)
    assert found[-1] == pytest.approx(last.item(), abs=1e-5)


def test_nothing_to_score_is_an_error():
    with pytest.raises(TissLMError, match="no token to score"):
        Watermark(KEY, PARAMS, V).detect([5])


# ---- the key ----


def test_key_comes_from_the_environment_first(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert watermark_key(PARAMS) == PARAMS.key
    monkeypatch.setenv(KEY_ENV, SECRET)
    assert watermark_key(PARAMS) == SECRET
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(TissLMError, match=KEY_ENV):
        Watermark(watermark_key(PARAMS), PARAMS, V)


def test_key_is_not_in_the_objects_anyone_might_log():
    watermark = Watermark(SECRET, WatermarkParams(key=SECRET), V)
    result = watermark.detect(TOKENIZER.encode("print('hello')").ids)
    assert SECRET not in repr(watermark) + str(vars(watermark)) + repr(result) + json.dumps(result.to_json())


# ---- the command line ----


def tisslm(*args: str, stdin: bytes | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Bytes in and out: text mode's universal newlines would change the tokens detection scores."""
    command = [sys.executable, "-m", "tisslm.cli", *args]
    env = {**os.environ, KEY_ENV: SECRET}
    return subprocess.run(command, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120)


def test_cli_generate_watermark_then_detect_never_shows_the_key(tmp_path):
    model = str(save_tiny_model(tmp_path / "model"))
    args = ("--model", model, "--prompt", "def main():", "--max-new-tokens", "300", "--temperature", "1", "--seed", "0")
    generated = tisslm("generate", *args, "--watermark", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    (tmp_path / "out.txt").write_bytes(generated.stdout)
    detected = tisslm("watermark", "detect", "--json", "--model", model, str(tmp_path / "out.txt"), cwd=tmp_path)
    assert detected.returncode == 0, detected.stderr
    result = json.loads(detected.stdout)
    assert result["watermarked"] and result["z"] >= 4
    for run in (generated, detected):
        assert SECRET.encode() not in run.stdout + run.stderr


def detect_in_process(capfd, *args: str) -> tuple[int, str, str]:
    """`tisslm watermark detect ARGS` as main() runs it, in this process: (exit status, stdout, stderr)."""
    from tisslm.cli import app

    try:
        run_main(lambda: app(["watermark", "detect", *args], standalone_mode=False))
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out, err = capfd.readouterr()
    return status, out, err


@pytest.fixture
def cli_workdir(tmp_path, monkeypatch):
    """A directory without params.yaml (so the defaults), holding a model, with the key in the environment."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    monkeypatch.chdir(tmp_path)
    save_tiny_model(tmp_path / "model")
    return tmp_path


def test_cli_detect_reads_stdin_and_clears_human_code(cli_workdir, monkeypatch, capfd):
    source = inspect.getsource(textwrap).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(source)))
    status, out, err = detect_in_process(capfd, "--model", "model", "-")
    assert status == 0, err
    assert out.startswith("not watermarked: z = ") and "(threshold 4)" in out
    assert SECRET not in out + err


@pytest.mark.parametrize(
    "content, message", [(None, "no such file"), ("", "empty text"), (" \n", "empty text"), ("a", "no token to score")]
)
def test_cli_detect_bad_input_is_one_line_without_the_key(cli_workdir, capfd, content, message):
    if content is not None:
        (cli_workdir / "in.txt").write_text(content)
    status, out, err = detect_in_process(capfd, "--model", "model", "in.txt")
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert SECRET not in err


def test_a_looping_sample_reports_its_repeats_and_scores_each_pair_once():
    """A degenerate sample (one short loop, all green) carries only its distinct pairs' evidence:
    repeats are counted in `repeated`, not in the z-test, and counting them would inflate z."""
    watermark = Watermark(KEY, PARAMS, 100)
    ids = walk(watermark, 10, 0)  # 10 distinct green pairs
    loop = ids * 20
    found = watermark.detect(loop)
    distinct = len(set(itertools.pairwise(loop)))
    assert (found.tokens_scored, found.repeated) == (distinct, len(loop) - 1 - distinct)
    assert found.distinct_share == pytest.approx(distinct / (len(loop) - 1)) and found.distinct_share < 0.1
    assert found.z <= math.sqrt(distinct * 0.75 / 0.25) + 1e-9  # the most T distinct pairs can say
    counted = watermark.detect(loop, count_repeats=True)
    assert counted.tokens_scored == len(loop) - 1 and counted.z > 2 * found.z


def test_the_stage_measures_repetitive_samples_apart(byte_model, tmp_path):
    """watermark_metrics reports detection on looping samples apart from the others, and what
    counting repeats would have given, on a real (tiny) model's samples."""
    from tisslm.core.config import SafetyParams
    from tisslm.core.sampling import SamplingParams
    from tisslm.safety.measure import repetition_report, watermark_metrics

    safety = SafetyParams(watermark_lengths=[20, 60], watermark_samples=3)
    human = {"val": ["def add(a, b):\n    return a + b\n" * 3, "x = 1\n" * 40]}
    report = watermark_metrics(
        byte_model, TOKENIZER, safety, KEY, SamplingParams(temperature=1.0, top_k=None, top_p=None),
        human, tmp_path / "z.png",
    )  # fmt: skip
    split = report["repetition"]
    assert split["repetitive"]["samples"] + split["others"]["samples"] == 3
    assert set(report["max_z_counting_repeats"]) == {"plain_samples", "val"}
    # `x = 1` forty times: its few distinct pairs scored once; counting repeats inflates z.
    assert report["max_z_counting_repeats"]["val"] >= report["max_z"]["val"]
    assert (tmp_path / "z.png").stat().st_size > 0
    looping = Detection(10, 9, 5.0, 1e-7, True, repeated=90)
    other = Detection(100, 60, 8.0, 1e-15, True, repeated=5)
    missed = Detection(12, 5, 1.2, 0.1, False, repeated=150)
    found = repetition_report([looping, other, missed, None], [other, other, missed, None])
    assert found["repetitive"]["samples"] == 2 and found["repetitive"]["detected"] == 0.5
    assert found["others"] == {
        "samples": 1, "detected": 1.0, "mean_z": 8.0, "mean_z_counting_repeats": 8.0, "mean_distinct_pairs": 100,
    }  # fmt: skip
