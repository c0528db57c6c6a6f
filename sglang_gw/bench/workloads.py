"""What `sglang-gw bench` sends: each workload is a list of sessions, a session one or more turns.

Prompts are words drawn from a fixed vocabulary (about one token each in common BPE vocabularies), so
nothing is downloaded to build them; lengths given "in tokens" are therefore in words, and the report
counts tokens as the server reports them (usage). A seed fixes every prompt and length: two servers
given the same seed see the same requests (and a server that already saw them reports cache hits).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import ClassVar

# Common English words: short, frequent, one token each in Llama/Qwen/GPT vocabularies (with their space).
VOCABULARY = tuple("""the of and to in is was for that with as on by at from his her they this which but be have had
not are were all their one there an can would when so who more will what out them time about into has up only
other some could its these two then people first than may like been made after over any new very also years
where most much did because through state many each way before great well long between little those under
should world same both life day own house three being last later while water never place small during work
part city found year number back public every still high school without given around river north south early
light night power large order family might country against point since government name second system music
war head hand side road""".split())

# The `structured` workload's output schema: small, with a string, numbers, an enum and an array.
ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "string", "maxLength": 24},
        "items": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
        "total": {"type": "number"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
    },
    "required": ["customer", "items", "total", "status"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class LengthRange:
    """Inclusive [low, high]; a length is drawn uniformly from it."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthRange":
        """`N` or `LOW:HIGH` (positive integers); ValueError says what is wrong."""
        low, _, high = text.partition(":")
        try:
            bounds = cls(int(low), int(high or low))
        except ValueError:
            raise ValueError(f"expected N or LOW:HIGH, got {text!r}") from None
        if bounds.low < 1 or bounds.high < bounds.low:
            raise ValueError(f"expected 1 <= LOW <= HIGH, got {text!r}")
        return bounds

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"


@dataclass(frozen=True)
class Turn:
    text: str          # the user's new text: a user message, or what is appended to a text prompt
    max_tokens: int


@dataclass(frozen=True)
class Session:
    """Turns sent one after another, each extending the previous turn's prompt and answer."""

    turns: tuple[Turn, ...]
    system: str = ""                  # a system message (chat) or the prompt's start (text backends)
    think_time_s: float = 0.0         # between receiving an answer and sending the next turn
    json_schema: dict | None = None   # constrain every answer to it
    ignore_eos: bool = True           # generate exactly max_tokens (off where the grammar must end)


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choices(VOCABULARY, k=count))


@dataclass(frozen=True)
class RandomWorkload:
    """Independent prompts of random words: nothing shared, so a prefix cache should hit ~0."""

    name: ClassVar[str] = "random"
    num_requests: int = 200
    input_len: LengthRange = LengthRange(64, 512)
    output_len: LengthRange = LengthRange(16, 128)

    def sessions(self, rng: random.Random) -> list[Session]:
        # A leading number makes the first word of each prompt differ from the others' too.
        return [Session((Turn(f"{i}. {_words(rng, self.input_len.draw(rng))}", self.output_len.draw(rng)),))
                for i in range(self.num_requests)]


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """`groups` system prompts, each shared by `group_size` requests (questions), in a shuffled order."""

    name: ClassVar[str] = "shared-prefix"
    groups: int = 8
    group_size: int = 16
    system_len: int = 512
    input_len: LengthRange = LengthRange(16, 64)
    output_len: LengthRange = LengthRange(16, 64)

    def sessions(self, rng: random.Random) -> list[Session]:
        systems = [f"Group {g}. {_words(rng, self.system_len)}" for g in range(self.groups)]
        sessions = [Session((Turn(_words(rng, self.input_len.draw(rng)), self.output_len.draw(rng)),), system)
                    for system in systems for _ in range(self.group_size)]
        rng.shuffle(sessions)
        return sessions


@dataclass(frozen=True)
class MultiTurnWorkload:
    """Conversations behind `system_prompts` system prompts (an application's, shared by its users; several:
    tenants), conversation i behind prompt i mod system_prompts: each turn's prompt is the previous turn's
    prompt, its answer and a new user message."""

    name: ClassVar[str] = "multi-turn"
    conversations: int = 16
    turns: int = 4
    system_prompts: int = 1
    system_len: int = 128
    input_len: LengthRange = LengthRange(16, 64)
    output_len: LengthRange = LengthRange(32, 64)
    think_time: float = 0.0

    def sessions(self, rng: random.Random) -> list[Session]:
        systems = [f"Tenant {t}. {_words(rng, self.system_len)}" for t in range(self.system_prompts)]
        return [Session(tuple(Turn(_words(rng, self.input_len.draw(rng)), self.output_len.draw(rng))
                              for _ in range(self.turns)), systems[c % self.system_prompts], self.think_time)
                for c in range(self.conversations)]


@dataclass(frozen=True)
class StructuredWorkload:
    """Requests whose answer must match ORDER_SCHEMA (response_format json_schema / sampling json_schema);
    output_len is max_tokens, and an answer may end sooner, as its grammar allows."""

    name: ClassVar[str] = "structured"
    num_requests: int = 100
    input_len: LengthRange = LengthRange(16, 64)
    output_len: LengthRange = LengthRange(128, 128)

    def sessions(self, rng: random.Random) -> list[Session]:
        return [Session((Turn(f"Write order {i} as JSON. Notes: {_words(rng, self.input_len.draw(rng))}",
                              self.output_len.draw(rng)),), json_schema=ORDER_SCHEMA, ignore_eos=False)
                for i in range(self.num_requests)]


Workload = RandomWorkload | SharedPrefixWorkload | MultiTurnWorkload | StructuredWorkload
WORKLOADS: dict[str, type] = {w.name: w for w in (RandomWorkload, SharedPrefixWorkload, MultiTurnWorkload,
                                                   StructuredWorkload)}


def settings_of(workload_class: type) -> list[str]:
    """The settings a workload takes (its dataclass fields), e.g. for telling a user which flags apply."""
    return [f.name for f in fields(workload_class)]


def planned_requests(sessions: list[Session]) -> int:
    return sum(len(s.turns) for s in sessions)
