"""Serving TissLM: an OpenAI-compatible HTTP server with continuous batching, a web page, a terminal chat.

`engine` batches concurrent generations step by step over a slot KV cache; `app` is the FastAPI
app around it; `text` turns tokens into streamed text (and holds the chat template); `schemas` the
request bodies and error shape; `metrics` the Prometheus metrics; `attention` the attention maps
of the page and of `tisslm attention`; `terminal` is `tisslm chat`; `server` is `tisslm serve`.
"""
