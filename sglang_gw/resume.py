"""How a generation moves to another engine when its engine dies: the wire format the engine writes
and the gateway reads (one definition for both).

The gateway asks for it with RESUMABLE_HEADER. The engine then annotates its answer with the output
token ids behind what it sends, as SSE comment lines (clients ignore them; the gateway strips them):

    : gw <choice>[.] <start> <id> <id> ...      this choice's output ids from position <start> on;
                                                 "." marks the choice's last event
    : gw usage                                   the event holding the usage chunk

A streamed answer carries one annotation line at the head of every event. A non-streamed answer that
runs longer than CHECKPOINT_INTERVAL becomes an event stream too: events of annotation lines only (a
checkpoint of every choice that moved), then the JSON answer as its one data event.

To continue, the gateway sends the request again with RESUME_FIELD: {"<choice>": [output ids]}. The
engine appends those ids as if it had generated them (detokenizer, stop strings and grammar state
follow) without showing them again, then generates the rest with the same sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

RESUMABLE_HEADER = "x-sglang-gw-resumable"
RESUME_FIELD = "resume_output_ids"
CHECKPOINT_INTERVAL = 0.5  # seconds between a non-streamed answer's checkpoints
PREFIX = b": gw "
USAGE = PREFIX + b"usage\n"


@dataclass(frozen=True)
class Annotation:
    choice: int | None  # None: the usage event
    final: bool = False
    start: int = 0
    ids: tuple[int, ...] = ()


def annotation(choice: int, start: int, ids: list[int], final: bool) -> bytes:
    return b"%s%d%s %d%s\n" % (PREFIX, choice, b"." if final else b"", start,
                               b"".join(b" %d" % t for t in ids))


def read_annotation(line: bytes) -> Annotation:
    """One annotation line (PREFIX included, newline excluded); ValueError if it is not one."""
    head, *rest = line[len(PREFIX):].split(b" ")
    if head == b"usage":
        return Annotation(None)
    final = head.endswith(b".")
    return Annotation(int(head.rstrip(b".")), final, int(rest[0]), tuple(map(int, rest[1:])))


class OutputIds:
    """The writer's side: which of each choice's output ids it has annotated already."""

    def __init__(self):
        self._sent: dict[int, int] = {}

    def line(self, choice: int, output_ids: list[int], final: bool = False) -> bytes:
        start = self._sent.get(choice, 0)
        self._sent[choice] = len(output_ids)
        return annotation(choice, start, output_ids[start:], final)
