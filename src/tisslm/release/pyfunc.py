"""The MLflow pyfunc that serves a registered TissLM: prompts in, generated text out.

Logged as code ("models from code"), not as a pickled object: MLflow loads this file and the
model directory it was given as an artifact, so nothing is unpickled. Its outputs go through the
content filter with the default policy, as the server's do (`mlflow models serve` has no params.yaml).
"""

from __future__ import annotations

import mlflow
import pandas as pd

from tisslm.core.config import ContentFilterParams
from tisslm.core.generate import complete
from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import load_tokenizer
from tisslm.safety.filters import ContentFilter


class TissLMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model = TissLM.from_pretrained(context.artifacts["model"]).eval()
        self.tokenizer = load_tokenizer(context.artifacts["model"])
        self.content_filter = ContentFilter(ContentFilterParams())

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        params = params or {}
        settings = SamplingParams(
            max_new_tokens=int(params.get("max_new_tokens", 48)), temperature=float(params.get("temperature", 0.0))
        )
        outputs = complete(self.model, self.tokenizer, list(model_input["prompt"]), settings)
        return [self.content_filter.apply(text).text for text in outputs]


mlflow.models.set_model(TissLMPyfunc())
