"""The MLflow pyfunc that serves a registered TissLM: prompts in, generated text out.

Logged as code ("models from code"), not as a pickled object: MLflow loads this file and the
model directory it was given as an artifact, so nothing is unpickled.
"""

from __future__ import annotations

import mlflow
import pandas as pd

from tisslm.generate import generate
from tisslm.model import TissLM
from tisslm.tokenizer import END_OF_TEXT, load_tokenizer


class TissLMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = TissLM.from_pretrained(context.artifacts["model"]).eval()
        self.tokenizer = load_tokenizer(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        params = params or {}
        prompts = [self.tokenizer.encode(p).ids for p in model_input["prompt"]]
        outputs = generate(
            self.model,
            prompts,
            int(params.get("max_new_tokens", 48)),
            temperature=float(params.get("temperature", 0.0)),
            stop_tokens=[self.tokenizer.token_to_id(END_OF_TEXT)],
            vocab_limit=self.tokenizer.get_vocab_size(),
        )
        return [self.tokenizer.decode(ids) for ids in outputs]


mlflow.models.set_model(TissLMPyfunc())
