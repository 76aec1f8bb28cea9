"""Serving, one module per part: `http` (the OpenAI-compatible server and its routes), `api` (its request and
answer bodies), `scheduler` (continuous batching), `sampler` and `detokenizer` (shared with `loramix generate`),
`lora` (the gathered LoRA pass over many adapters) and `packed` (the packed-weight CPU kernel)."""
