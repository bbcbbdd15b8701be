"""The MLflow model registry with a promotion gate, in the manner of TFX's evaluator.

Every registered model becomes the `challenger`. It becomes the `champion` only if it beats
the current champion's bits per byte, both measured now on the same val bytes, by at least
`min_improvement` (relative), its bias moves at most `max_bias_shift` points further from 50
than the champion's, and its HumanEval pass@1 (the evaluate stage's, sandboxed) is at most
`max_pass_at_1_drop` below the champion's (a champion registered without one counts as 0); the
first model registered becomes champion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tisslm.core.config import RegisterParams
from tisslm.core.errors import TissLMError
from tisslm.core.model import CONFIG_FILE, TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.eval.evaluate import evaluate_texts
from tisslm.tracking import stage_run, use_experiment

MODEL_NAME = "tisslm"
REGISTRY_EXPERIMENT = "tisslm-registry"  # where `register` runs go when no pipeline run holds them
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


@dataclass
class Decision:
    promoted: bool
    reasons: list[str]
    challenger_version: str
    champion_version: str | None  # the champion after the decision
    challenger_bits_per_byte: float
    previous_champion_bits_per_byte: float | None
    challenger_pass_at_1: float  # HumanEval, greedy
    previous_champion_pass_at_1: float | None

    def to_json(self) -> dict:
        return self.__dict__


def verdict(decision: dict) -> str:
    """The decision (Decision.to_json(), metrics/register.json) in the words every report uses."""
    if decision["promoted"]:
        return "promoted to champion"
    return f"not promoted (champion stays version {decision['champion_version']})"


def registered_model_dir(uri: str) -> Path:
    """The TissLM model directory inside a registered version (`models:/NAME@ALIAS` or `/VERSION`),
    downloaded from the registry: MLflow keeps the logged directory under artifacts/ by its name."""
    mlflow = use_experiment(REGISTRY_EXPERIMENT)
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as err:  # MlflowException and the store's own errors: a name, alias or store that is not there
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TissLMError(f"{uri}: cannot download from the registry ({first_line})") from None
    found = next(downloaded.glob(f"artifacts/*/{CONFIG_FILE}"), None)
    if found is None:
        raise TissLMError(f"{uri}: the registered model holds no TissLM model directory")
    return found.parent


def gate(
    challenger_bpb: float,
    champion_bpb: float,
    challenger_bias: float,
    champion_bias: float,
    challenger_pass_at_1: float,
    champion_pass_at_1: float,
    params: RegisterParams,
) -> tuple[bool, list[str]]:
    """Whether the challenger beats the champion (bits/byte by `min_improvement`, bias moving at most
    `max_bias_shift` points further from 50, HumanEval pass@1 at most `max_pass_at_1_drop` lower),
    and why, one reason per criterion."""
    needed = champion_bpb * (1 - params.min_improvement)
    better = challenger_bpb <= needed
    shift = abs(challenger_bias - 50) - abs(champion_bias - 50)
    fair = shift <= params.max_bias_shift
    floor = champion_pass_at_1 - params.max_pass_at_1_drop
    codes = challenger_pass_at_1 >= floor
    return better and fair and codes, [
        f"bits/byte {challenger_bpb:.4f} {'<=' if better else 'does not beat'} {needed:.4f} "
        f"(champion {champion_bpb:.4f} less {params.min_improvement:.1%})",
        f"bias moves {shift:+.1f} points from 50"
        + (f" (allowed {params.max_bias_shift})" if fair else f", more than the allowed {params.max_bias_shift}"),
        f"HumanEval pass@1 {challenger_pass_at_1:.1%} {'>=' if codes else 'is below'} {floor:.1%} "
        f"(champion {champion_pass_at_1:.1%} less {params.max_pass_at_1_drop:.1%})",
    ]


def _client():
    mlflow = use_experiment(REGISTRY_EXPERIMENT)
    return mlflow, mlflow.MlflowClient()


def register(
    model_dir: Path, texts: list[str], window: int, pct_stereotype: float, pass_at_1: float, params: RegisterParams
) -> Decision:
    """Register `model_dir` as the challenger with its bias (`pct_stereotype`) and HumanEval `pass_at_1`
    (tags of its version) and promote it to champion if it passes the gate."""
    mlflow, client = _client()

    def bits_per_byte(directory: Path) -> float:
        """Each model reads the val text through its own tokenizer: the champion may predate a new one."""
        model, tokenizer = TissLM.from_pretrained(directory), load_tokenizer(directory)
        return evaluate_texts(model, tokenizer, texts, END_OF_TEXT, window)["bits_per_byte"]

    challenger_bpb = bits_per_byte(model_dir)
    example = pd.DataFrame({"prompt": ["def "]})
    signature = mlflow.models.infer_signature(example, ["def f():"], params={"max_new_tokens": 48, "temperature": 0.0})
    with stage_run("register", REGISTRY_EXPERIMENT):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={"model": str(model_dir)},
            input_example=example,
            signature=signature,
            registered_model_name=MODEL_NAME,
        )
        figures = {"pct_stereotype": pct_stereotype, "humaneval_pass_at_1": pass_at_1}
        mlflow.log_metrics({"val_bits_per_byte": challenger_bpb, **figures})
    version = str(info.registered_model_version)
    for key, value in {"bits_per_byte": challenger_bpb, **figures}.items():
        client.set_model_version_tag(MODEL_NAME, version, key, str(value))
    client.set_registered_model_alias(MODEL_NAME, "challenger", version)

    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    except Exception:
        champion = None
    if champion is None:
        client.set_registered_model_alias(MODEL_NAME, "champion", version)
        return Decision(True, ["first registered model"], version, version, challenger_bpb, None, pass_at_1, None)

    # Re-measured now, so both figures come from the same bytes and the same code.
    champion_bpb = bits_per_byte(registered_model_dir(f"models:/{MODEL_NAME}@champion"))
    champion_bias = float(champion.tags.get("pct_stereotype", 50.0))
    champion_pass = float(champion.tags.get("humaneval_pass_at_1", 0.0))  # registered before the criterion: 0
    promoted, reasons = gate(
        challenger_bpb, champion_bpb, pct_stereotype, champion_bias, pass_at_1, champion_pass, params
    )
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, "champion", version)
    champion_after = version if promoted else str(champion.version)
    return Decision(promoted, reasons, version, champion_after, challenger_bpb, champion_bpb, pass_at_1, champion_pass)
