"""One generation request as the scheduler tracks it, and the outputs it streams back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .detokenizer import IncrementalDetokenizer, StopRegexMatcher, StopStringMatcher
from .grammar import Matcher
from .sampling_params import SamplingParams


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_json(self) -> dict:
        if self.type == "length":
            return {"type": "length", "length": self.length}
        if self.type == "abort":
            return {"type": "abort", "message": self.message}
        return {"type": "stop", "matched": self.matched}


@dataclass(frozen=True)
class LogprobRequest:
    """The logprobs a request asks for (SGLang's /generate fields): prompt logprobs from position
    logprob_start_len on (-1: none), and the top_logprobs_num most likely tokens at each position."""

    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0


NO_LOGPROBS = LogprobRequest()


@dataclass
class RequestOutput:
    """A snapshot sent to the caller after each step that changed the request (and once at the end)."""

    rid: str
    sample_index: int  # which of its request's n samples this is (0 when n == 1)
    text: str  # cumulative streamable text
    output_ids: list[int]  # cumulative
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    e2e_latency: float = 0.0
    time_to_first_token: float | None = None
    # A resumed sequence's first snapshot: the point it continues from, which its caller has shown already.
    replayed: bool = False


class Req:
    def __init__(
        self,
        rid: str,
        input_ids: list[int],
        params: SamplingParams,
        *,
        tokenizer,
        eos_token_ids: tuple[int, ...],
        on_output: Callable[[RequestOutput], None],
        logprobs: LogprobRequest = NO_LOGPROBS,
        sample_index: int = 0,
        grammar: Matcher | None = None,
        resumed: list[int] | None = None,
    ):
        self.rid = rid
        self.sample_index = sample_index
        self.origin_input_ids = list(input_ids)
        self.params = params
        self.on_output = on_output
        self.logprobs = logprobs
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stop_token_ids = frozenset(stop_ids)
        seed = params.sampling_seed
        self.seed = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.generator = torch.Generator()
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, params.spaces_between_special_tokens)
        self.stop_matcher = StopStringMatcher(params.stop)
        self.stop_regex = StopRegexMatcher(params.stop_regex) if params.stop_regex else None
        self.grammar = grammar  # the output's grammar state: it follows output_ids through retraction
        self.resumed = resumed  # output ids generated elsewhere, to continue from (None: a new sequence)

        self.output_ids: list[int] = []
        self.text = ""  # final text so far (stop-trimmed once finished)
        self.finish_reason: FinishReason | None = None
        self.created = time.perf_counter()
        self.first_token_time: float | None = None

        # KV state, owned by the scheduler.
        self.row: int | None = None  # row in the request→slot table
        self.kv_len = 0  # leading tokens of all_ids whose KV is in the row
        self.prefix_len = 0  # leading tokens of the row that the radix cache holds (locked via last_node)
        self.last_node = None
        self.cached_tokens = 0  # prompt tokens served from the cache at first admission
        self.admitted = False
        self.input_logprobs_done = False

        # Logprobs accumulated for the caller.
        self.output_token_logprobs: list[tuple[float, int]] = []
        self.output_top_logprobs: list[list[tuple[int, float]]] = []
        self.input_token_logprobs: list[tuple[float | None, int]] = []
        self.input_top_logprobs: list[list[tuple[int, float]]] = []

    @property
    def all_ids(self) -> list[int]:
        """Prompt plus output. A forward computes KV for all_ids[kv_len:] and samples after the last,
        so a decode step feeds the newest token and a re-prefill after retraction feeds the rest."""
        return self.origin_input_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_input_logprobs(self) -> bool:
        return self.logprobs.return_logprob and self.logprobs.logprob_start_len >= 0

    def reserved_tokens(self, new_token_ratio: float) -> int:
        """KV tokens the scheduler keeps in reserve for this request's future decode steps."""
        remaining = self.params.max_new_tokens - len(self.output_ids)
        return int(min(max(remaining, 0), 4096) * new_token_ratio)

    def draw(self) -> torch.Tensor:
        """A uniform draw in [0, 1) for the next output position. It depends only on the seed and the
        position, so a sequence resumed on another engine draws what it would have drawn here."""
        self.generator.manual_seed(hash((self.seed, len(self.output_ids))) & (2**63 - 1))
        return torch.rand((), generator=self.generator)

    def replay(self) -> None:
        """Append the resumed output ids as forced tokens: text, stop strings and grammar state follow."""
        for token in self.resumed or ():
            self.append_token(token, forced=True)
            if self.finished:
                return

    def append_token(self, token_id: int, forced: bool = False) -> None:
        """Record a token (sampled, or `forced` by the grammar) and decide whether the request has finished."""
        if self.first_token_time is None and not forced:
            self.first_token_time = time.perf_counter()
        self.output_ids.append(token_id)
        if self.grammar is not None and not self.grammar.accept(token_id):  # the mask allowed it: a bug
            self.finish_reason = FinishReason("abort", message=f"grammar rejected token {token_id}: "
                                                                f"{self.grammar.error()}")
            return
        if token_id in self.stop_token_ids:
            self.finish_reason = FinishReason("stop", matched=token_id)
            return
        new_text = self.detok.add(token_id)
        self.text += new_text
        hit = self.stop_matcher.find(self.text, len(new_text))
        regex_hit = self.stop_regex.find(self.text) if self.stop_regex and new_text else None
        if hit is not None:
            pos, stop = hit
            self.text = self.text[: pos + len(stop)] if self.params.no_stop_trim else self.text[:pos]
            self.finish_reason = FinishReason("stop", matched=stop)
        elif regex_hit is not None:
            end, pattern = regex_hit
            self.text = self.text[:end]
            self.finish_reason = FinishReason("stop", matched=pattern)
        elif self.grammar is not None and self.grammar.is_stopped():
            self.text += self.detok.flush()
            self.finish_reason = FinishReason("stop", matched=None)  # the grammar is complete
        elif len(self.output_ids) >= self.params.max_new_tokens:
            self.finish_reason = FinishReason("length", length=len(self.output_ids))
            self.text += self.detok.flush()

    def snapshot(self, replayed: bool = False) -> RequestOutput:
        text = self.text
        if not self.finished:
            held = self.stop_matcher.held_back(text)
            text = text[: len(text) - held] if held else text
        now = time.perf_counter()
        return RequestOutput(
            rid=self.rid,
            sample_index=self.sample_index,
            text=text,
            output_ids=list(self.output_ids),
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.origin_input_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
            output_token_logprobs=list(self.output_token_logprobs),
            output_top_logprobs=list(self.output_top_logprobs),
            input_token_logprobs=list(self.input_token_logprobs),
            input_top_logprobs=list(self.input_top_logprobs),
            e2e_latency=now - self.created,
            time_to_first_token=None if self.first_token_time is None else self.first_token_time - self.created,
            replayed=replayed,
        )
