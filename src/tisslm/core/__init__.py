"""The core layer: what every other layer builds on, and which imports nothing above it.

`model` (TissLM, its config, KV caches, safetensors persistence), `generate` (sampling settings,
logit filters, batched generation), `tokenizer` (byte-level BPE), `config` (the params.yaml
schema, with the model's and the sampler's settings, so that reading params never imports
torch), `io` (atomic writes), `errors` (one-line user errors), `hub` (is the hub reachable), `lazy` (a
package's names loaded on first use).
"""
