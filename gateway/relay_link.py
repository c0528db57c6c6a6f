"""The link between the gateway process and a relay process (`gateway.processes` > 1): messages over a
Unix socket, each a dict whose "t" names its kind. The messages one event-loop iteration sends travel as
one frame: a 4-byte big-endian length and an orjson-encoded list of them (one system call, one parse,
however many requests the iteration served).

relay → gateway, per proxied request (request_path.py's hooks):
    hello    {pid}           the relay listens on the port
    choose   {q, a, k, m, s, b, tried, bl}  → chosen {q, lease, w, u, r, mb, pb} | chosen {q} (none left)
                                             | chosen {q, e: {status, message, param, code, headers}} (refused)
             the first of a request (`tried` empty) admits it under the relay's handle `a` (key hash `k`)
             `bl`: [block size, block chain, text bytes] of the routing text, when the policy reads it
    cancel   {q}             the question's request went away (a choice waiting for capacity is dropped)
    ev       {l, e, v}       a health event of lease `l` (HEALTH_EVENTS)
    release  {l}             the attempt's lease ends
    end      {a}             the request's admission ends
    rec      {…}             an attempt to book (metrics, status page; the relay writes its log line)
    book     {w, r, mb, pb, u}  a stream's reported usage
    fin      {p, st, sec}    the request's end: its client's status and duration
    left     {}              a client went away before its answer's end
gateway → relay:
    settings {c, admitting, block, tpl}  the gateway settings, whether it admits requests (not once shutdown
                             begins), the block size of the policy's prefix index (None: it reads no routing
                             text), and the chat template path of
                             each model; sent first and again on each change
"""

from __future__ import annotations

import asyncio
import struct

import orjson

_LENGTH = struct.Struct(">I")
# The health events a relay reports of a leased worker: health.WorkerHealth's request-path methods.
HEALTH_EVENTS = frozenset({"connect_error", "response", "stream_failed", "progress"})


class Link(asyncio.Protocol):
    """One end of the link: `send` a message; `received` is called with each that arrives."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self._inbox = bytearray()
        self._outbox: list[bytes] = []  # this iteration's messages, encoded, sent as one frame at its end
        self.closed = asyncio.get_running_loop().create_future()  # set when the connection is lost

    def received(self, message: dict) -> None:
        raise NotImplementedError

    def send(self, message: dict) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # the link is down: what it would report dies with it (the other end cleans up)
        data = orjson.dumps(message)  # here, so that a message that cannot be encoded fails its sender alone
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(data)

    def _flush(self) -> None:
        data, self._outbox = b"[" + b",".join(self._outbox) + b"]", []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_LENGTH.pack(len(data)) + data)

    # ---- asyncio's callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        inbox = self._inbox
        inbox += data
        start = 0
        while len(inbox) - start >= 4:
            (size,) = _LENGTH.unpack_from(inbox, start)
            if len(inbox) - start - 4 < size:
                break
            messages = orjson.loads(inbox[start + 4:start + 4 + size])
            start += 4 + size
            for message in messages:
                self.received(message)
        del inbox[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
