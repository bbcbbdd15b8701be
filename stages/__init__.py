"""One thin entry point per DVC stage: `python -m stages.<name>` reads params.yaml, calls the
library in `tisslm`, and writes the stage's outputs and metrics. Nothing worth testing lives here."""
