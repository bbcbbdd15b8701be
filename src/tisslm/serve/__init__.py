"""Serving TissLM: an OpenAI-compatible HTTP server with continuous batching, a web page, a terminal chat.

`engine` batches concurrent generations step by step over a slot KV cache. The HTTP server, laid
out as vLLM's OpenAI server is: `app` makes the FastAPI app, with a `serving.Serving` (engine,
tokenizer, settings; one method per endpoint) on `app.state` and the thin routers of `routes`
over it; `jobs` carries one request's generations from the engine to a JSON body or an SSE
stream; `schemas` holds the request, response, chunk and error models, and `openapi` the parts
of /openapi.json FastAPI cannot infer. `text` turns tokens into streamed text (conversations
become prompts through `tisslm.core.chat`); `metrics` the Prometheus metrics; `attention` the attention maps of the page and
of `tisslm attention`; `access` the API-key check on /v1 routes; `auditing` the per-request
records of the hash-chained audit log (`tisslm.safety.audit`); `terminal` is `tisslm chat`;
`server` is `tisslm serve`.
"""
