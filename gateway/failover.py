"""What a client has been given of one generation, so that another engine can continue it when its
engine dies (the wire format is sglang_gw/resume.py).

The gateway passes an engine's answer through whole events at a time, never a part of one: what the
client has is always a sequence of complete events, and each choice's output ids behind them (read
from the annotations, which are stripped) are exactly what a continuation must start from. After a
failover the new engine's events are made to look like the first engine's: its ids and `created`
replaced by those the client saw, and the events of choices the client already saw finish dropped.
"""

from __future__ import annotations

import json

from ..resume import PREFIX, RESUME_FIELD, read_annotation


class NotContinued(Exception):
    """A worker answered a continuation without annotations: it regenerates from the start (it does not
    take RESUME_FIELD), so its events would repeat what the client has."""


class Progress:
    """One request's: its body as sent, what its client has been sent, and the client's stream once begun."""

    def __init__(self, body: dict, raw: bytes):
        self._raw = raw  # as the client sent it (`body` is as read for routing): a continuation is made from it
        self.stream = body.get("stream") is True
        self.ids: dict[int, list[int]] = {}  # choice index → output ids behind what the client has
        self.finished: set[int] = set()  # choices whose last event the client has
        self.usage_sent = False
        self.done = False  # the client has the stream's last event ([DONE]): nothing is left to continue
        self._annotated = False  # an engine wrote annotations: a continuation can start where it stopped
        self.client = None  # the client's event stream (web.StreamResponse), once begun
        self.client_gone = False  # the client disconnected: its stream ended there
        self._pending = b""  # the start of an event not complete yet
        self._first_data: dict[int | None, bytes] = {}  # each choice's first data event as the client got it
        self._dropped: frozenset[int] = frozenset()  # set at a failover: choices the client has whole
        self._identity: dict | None = None  # set at a failover: the ids the client saw, to put in new events

    @property
    def continuable(self) -> bool:
        """Whether an engine said what it had generated, so that another can continue from there."""
        return self._annotated

    def feed(self, chunk: bytes) -> bytes:
        """The complete events that `chunk` ends, as the client must get them (annotations read and
        stripped); the start of an incomplete one waits for the next chunk."""
        data = self._pending + chunk
        if self._identity is None and PREFIX not in data:  # nothing to read or rewrite: whole events as they are
            end = data.rfind(b"\n\n") + 2  # 1: no event complete yet
            events, self._pending = (data[:end], data[end:]) if end > 1 else (b"", data)
            if events and None not in self._first_data:
                self._first_data[None] = events[:events.find(b"\n\n")]
            self.done = self.done or events.endswith(b"data: [DONE]\n\n")
            return events
        *events, self._pending = data.split(b"\n\n")
        out = []
        for event in events:
            choice, keep, noted = None, True, False
            while event.startswith(PREFIX):
                line, _, rest = event.partition(b"\n")
                try:
                    note = read_annotation(line)
                except (ValueError, IndexError):  # some other comment: the client's, as it is
                    break
                event, noted, self._annotated = rest, True, True
                if note.choice is None:
                    keep, self.usage_sent = not self.usage_sent, True
                    continue
                choice = note.choice
                if choice in self._dropped:
                    keep = False
                    continue
                ids = self.ids.setdefault(choice, [])
                del ids[note.start:]
                ids.extend(note.ids)
                if note.final:
                    self.finished.add(choice)
            if not (keep and event):
                continue
            if not noted and self._identity is not None and event.startswith(b"data: {"):
                raise NotContinued("a continuation answered without annotations")
            self.done = self.done or event == b"data: [DONE]"
            if self._identity is not None and event.startswith(b"data: {"):
                event = self._as_first_engine(event, choice)
            self._first_data.setdefault(choice, event)
            out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """At the end of the answer: an event its worker did not end with a blank line, as it is."""
        rest, self._pending = self._pending, b""
        return self.feed(rest + b"\n\n") if rest.strip() else b""

    def resume_body(self) -> bytes:
        """The request again, continuing from what the client has: the next engine's request body."""
        if self.stream and self._identity is None:
            self._identity = self._identity_seen()
        self._dropped = frozenset(self.finished)
        self._pending = b""
        resume = {str(c): ids for c, ids in self.ids.items()}
        return json.dumps(dict(json.loads(self._raw), **{RESUME_FIELD: resume})).encode()

    def _identity_seen(self) -> dict:
        """The ids the client saw: the OpenAI object's id and created; /generate's id per choice."""
        identity: dict = {"rids": {}}
        for choice, data in self._first_data.items():
            if not data.startswith(b"data: {"):
                continue
            event = json.loads(data[len(b"data: "):])
            if "meta_info" in event:
                identity["rids"][choice] = event["meta_info"].get("id")
            elif "id" in event:
                identity.update(id=event["id"], created=event.get("created"))
        return identity

    def _as_first_engine(self, event: bytes, choice: int | None) -> bytes:
        data = json.loads(event[len(b"data: "):])
        if isinstance(data.get("meta_info"), dict) and choice in self._identity["rids"]:
            data["meta_info"]["id"] = self._identity["rids"][choice]
        elif "id" in self._identity:
            data.update(id=self._identity["id"], created=self._identity["created"])
        return b"data: " + json.dumps(data, ensure_ascii=False).encode()
