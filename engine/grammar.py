"""Grammar-constrained decoding: a request's regex / JSON schema / EBNF grammar compiled once (and cached),
one matcher per sequence, and each step's allowed tokens as a bitmask for the sampler.

The bitmask is int32 [batch, ceil(vocab / 32)]: bit j of word w allows token 32 * w + j (the layout
llguidance, xgrammar and outlines-core share). Backends sit behind `GrammarBackend`, chosen by name
(the `grammar_backend` setting): llguidance, which docs/structured-output.md measured valid on every
output (1,104 of 1,104) and ~1 ms from a never-seen schema to its first mask.

Threads: compiling happens where requests are prepared (the server's worker threads, hence the
cache's lock), creating matchers where they are submitted (the server's event loop); filling masks and
consuming tokens happen on the scheduler thread, which owns a matcher from then on.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .sampling_params import GrammarSpec
from .settings import GRAMMAR_BACKENDS

COMPILED_CACHE_SIZE = 1024  # compiled grammars kept (LRU); a JSON schema's is a few KB
# JSON as json.dumps writes it: no free whitespace (a small model may otherwise loop on newlines) and
# fewer, more predictable tokens (more of them forced, so more jump-forward).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class InvalidGrammar(ValueError):
    """The grammar cannot be compiled (a bad regex, schema or EBNF, or an unsupported feature)."""


@dataclass
class GrammarStats:
    compiled: int = 0  # cache misses: grammars compiled
    cache_hits: int = 0


class Matcher:
    """One sequence's position in its grammar. `accept` every token the sequence emits, in order."""

    def __init__(self, inner):
        self._inner = inner

    def accept(self, token_id: int) -> bool:
        return self._inner.consume_token(token_id)

    def is_stopped(self) -> bool:
        """Complete: the grammar allows nothing more (only an end-of-sequence token)."""
        return self._inner.is_stopped()

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation, safe to emit without sampling."""
        return self._inner.compute_ff_tokens()

    def error(self) -> str:
        return self._inner.get_error()


class GrammarBackend:
    """Compiles grammars for one tokenizer and fills a batch's bitmask from its matchers."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.vocab_size = vocab_size
        # The model's vocabulary may be larger than the tokenizer's (padded embedding rows): those ids
        # are never allowed.
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(eos_token_ids) or None)
        self._executor = llguidance.LLExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)))
        self._compiled: OrderedDict[GrammarSpec, str] = OrderedDict()
        self._compiled_lock = threading.Lock()  # requests are prepared in several threads at once
        self.stats = GrammarStats()

    @property
    def words_per_mask(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, spec: GrammarSpec) -> str:
        """The grammar, compiled and checked against the tokenizer (cached); InvalidGrammar if it cannot run."""
        with self._compiled_lock:  # held while compiling too: one compile of a grammar asked for twice at once
            return self._compile(spec)

    def _compile(self, spec: GrammarSpec) -> str:
        grammar = self._compiled.get(spec)
        if grammar is not None:
            self._compiled.move_to_end(spec)
            self.stats.cache_hits += 1
            return grammar
        grammar = self._translate(spec)
        failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if failed:
            raise InvalidGrammar(messages[0].strip())
        self.stats.compiled += 1
        self._compiled[spec] = grammar
        if len(self._compiled) > COMPILED_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return grammar

    def _translate(self, spec: GrammarSpec) -> str:
        LLMatcher = self._llg.LLMatcher
        if spec.kind == "regex":
            return LLMatcher.grammar_from_regex(spec.source)
        if spec.kind == "json_schema":
            try:
                schema = json.loads(spec.source)
            except ValueError as exc:
                raise InvalidGrammar(f"not valid JSON: {exc}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidGrammar("a JSON schema is an object (or true / false)")
            try:
                return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            except ValueError as exc:
                raise InvalidGrammar(str(exc)) from None
        if spec.kind == "ebnf":  # GBNF (SGLang's and llama.cpp's `root ::= ...`) or Lark
            try:
                return self._llg.grammar_from("ebnf", spec.source)
            except ValueError as exc:
                raise InvalidGrammar(str(exc)) from None
        raise InvalidGrammar(f"unknown grammar kind {spec.kind!r}")

    def matcher(self, grammar: str) -> Matcher:
        inner = self._llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if inner.is_error():  # compile() validated it: only resource limits can land here
            raise InvalidGrammar(inner.get_error())
        return Matcher(inner)

    def fill_bitmask(self, matchers: list[Matcher], bitmask: torch.Tensor) -> None:
        """Row i of `bitmask` (int32, contiguous, on the CPU) ← the tokens matchers[i] allows next."""
        row_bytes = bitmask.shape[1] * 4
        self._executor.unsafe_compute_mask_ptr([(m._inner, i) for i, m in enumerate(matchers)],
                                               bitmask.data_ptr(), row_bytes, bitmask.shape[0])


def create_grammar_backend(name: str, tokenizer, vocab_size: int,
                           eos_token_ids: tuple[int, ...]) -> GrammarBackend | None:
    """The backend registered under `name`; None for "none" (constrained requests are refused)."""
    if name == "none":
        return None
    if name == "llguidance":
        return GrammarBackend(tokenizer, vocab_size, eos_token_ids)
    raise ValueError(f"unknown grammar backend {name!r}; known: {', '.join(GRAMMAR_BACKENDS)}")


# Bit j of a mask word, as int32 (bit 31 is the sign bit).
_BITS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: every token whose bit is 0 gets -inf. logits [B, V]; bitmask int32 [B, ceil(V/32)]."""
    allowed = (bitmask.to(logits.device).unsqueeze(-1) & _BITS.to(logits.device)) != 0  # [B, W, 32]
    logits.masked_fill_(~allowed.view(allowed.shape[0], -1)[:, : logits.shape[1]], float("-inf"))
