"""Caps on what one request may ask for, declared once for the engine and the gateway (docs/sglang-api.md,
"Limits"). Exceeding one is a 400 naming the field.

The body's size is bounded by `max_request_bytes`; these bound what a body of that size may expand
to (sequences, per-token work, output size) and how deep a parser has to go.
"""

from __future__ import annotations

MAX_JSON_DEPTH = 64  # nested arrays / objects in a request body
# A body larger than this is parsed (and a gateway's routing text rendered) in a worker thread, not on
# the event loop: a 16 MB body takes ~0.1 s, which every other request's stream would wait for.
INLINE_BODY_BYTES = 64 << 10
MAX_N = 128  # samples per prompt (OpenAI's cap)
MAX_BATCH = 256  # prompts in one request: a list `text` / `input_ids` / `prompt`
# Sequences one request expands to, prompts × n; an engine also refuses more than its own capacity
# (max_running_requests + max_queued_requests).
MAX_SEQUENCES = 1024
MAX_STOP = 16  # `stop` strings, and `stop_regex` patterns
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # entries (OpenAI's cap)
MAX_ABS_LOGIT_BIAS = 100.0  # each bias in [-100, 100] (OpenAI's range)
MAX_TOP_LOGPROBS = 20  # top_logprobs (chat), logprobs (completions), top_logprobs_num (native); OpenAI's cap
# Token counts, top_k and positions are 32-bit (max_tokens is then clipped to what the context allows);
# seeds are 64-bit.
MAX_COUNT = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
