"""TissLM: a small modern decoder-only language model and the pipeline that makes it."""

__version__ = "0.1.0"
