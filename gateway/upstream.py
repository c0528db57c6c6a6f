"""The gateway's HTTP/1.1 client to its workers: a pool of keep-alive connections per worker, no more.

aiohttp's ClientSession cost a quarter of a proxied request's CPU (URL objects, header multidicts,
tracing hooks, timer contexts, a payload object per body) for features a proxy between fixed hosts
does not use. Here a request is one write of bytes, and the answer is parsed by llhttp (httptools,
the parser uvicorn uses) into a status, headers and body bytes. The control calls and probes stay on
aiohttp: they are few.

A connection goes back to its pool only when its answer was read to the end and both sides kept it
alive; an answer abandoned half-read closes its connection, which is how an engine learns that the
client went away (it aborts the generation). A reused connection that the worker had closed while it
sat idle fails before any byte of an answer: that request is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# Read no further from a worker while this much of its answer waits for the client (backpressure).
PAUSE_BYTES = 1 << 20
CLOSED = "the worker closed the connection"
DECODED = (b"gzip", b"x-gzip", b"deflate")  # encodings decoded here (zlib reads both framings)


class UpstreamError(Exception):
    """The worker failed this request: unreachable (the message is the OS error's name), closed the
    connection, sent a malformed answer, or took longer than the request's timeout; in a few words."""


@dataclass(frozen=True)
class Origin:
    """Where a worker listens, parsed once per worker URL."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        return cls(parts.hostname or "", port, ssl.create_default_context() if secure else None,
                   parts.netloc)


class Answer(asyncio.Protocol):
    """One connection to a worker, and the answer to the request on it now (one at a time: HTTP/1.1
    without pipelining). Fields are llhttp's callbacks' results."""

    def __init__(self, pool: list[Answer]):
        self._pool = pool  # where this connection waits between requests
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._body: list[bytes] = []
        self._buffered = 0
        self._framed = False  # a length or chunked framing: otherwise the body ends when the connection does
        self._decoder = None
        self._headed = False
        self._complete = False
        self._failure: str | None = None
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._keep_alive = False  # both sides keep the connection open after this answer
        self._busy = False  # a request is on this connection
        self._received = False  # any byte of its answer came
        self.reused = False  # it served an earlier request
        self.closed = False

    # ---- the request --------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, timeout: float | None) -> None:
        self.status, self.headers, self._body, self._buffered = 0, [], [], 0
        self._framed = self._headed = self._complete = self._received = False
        self._decoder = self._failure = None
        self._busy = True
        if timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._fail, "timeout", True)
        self.transport.write(head + body)

    async def head(self) -> None:
        """Until the status and headers are in; UpstreamError if the worker fails first."""
        while not self._headed:
            if self._failure is not None:
                raise UpstreamError(self._failure)
            await self._wait()

    async def chunk(self) -> bytes:
        """The next bytes of the body (decoded), b"" at its end; UpstreamError if the worker fails first."""
        while not self._body:
            if self._complete:
                return b""
            if self._failure is not None:
                raise UpstreamError(self._failure)
            await self._wait()
        data = b"".join(self._body) if len(self._body) > 1 else self._body[0]
        self._body, self._buffered = [], 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while data := await self.chunk():
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Done with the answer: the connection waits in the pool for the next request if the answer was
        read to its end and both sides keep it alive, and is closed otherwise. Once per request: the
        connection may carry another request after it."""
        if not self._busy:
            return
        self._busy = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._complete and not self._body and not self.closed and self._keep_alive:
            self.reused = True
            self._pool.append(self)
        else:
            self.abort()

    # ---- llhttp's callbacks --------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self._framed = True
        elif lowered == b"content-encoding" and value.lower() in DECODED:
            self._decoder = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, either
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    # They only record: the reader is woken once per data_received, not once per chunk of the body (an
    # event stream's every event is a chunk).

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._framed = self._framed or self.status in (204, 304)
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it once the message is complete
        self._headed = True

    def on_body(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.decompress(data)
        if data:
            self._body.append(data)

    def on_message_complete(self) -> None:
        if self._decoder is not None and (rest := self._decoder.flush()):
            self._body.append(rest)
        self._complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- asyncio's callbacks -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._busy:  # nothing was asked: the connection is out of step
            self.abort()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed answer: {exc}", True)
            return
        self._buffered += len(data)
        if self._buffered > PAUSE_BYTES and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self in self._pool:
            self._pool.remove(self)
        if self._headed and not self._framed and not self._complete and not self._failure:
            self.on_message_complete()  # a body that ends with its connection
            self._wake()
        else:
            self._fail(CLOSED + (f" ({type(exc).__name__})" if exc else ""))

    # ---- ending -----------------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """Whether the request failed because the worker had closed this idle connection: it was reused,
        and it was closed with no byte of an answer (so the request never reached the worker's handler)."""
        return self.reused and not self._received and self.closed and self._failure is not None \
            and self._failure.startswith(CLOSED)

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def _fail(self, why: str, abort: bool = False) -> None:
        if not self._complete and self._failure is None:
            self._failure = why
            self._wake()
        if abort:
            self.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Upstream:
    """Keep-alive connections to the workers, by worker URL."""

    def __init__(self):
        self._origins: dict[str, Origin] = {}
        self._idle: dict[str, list[Answer]] = {}

    async def post(self, url: str, path: str, body: bytes, headers: dict[str, str],
                   timeout: float | None) -> Answer:
        """POST `body` to the worker at `url`; the answer once its status and headers are in. Raises
        UpstreamError when it cannot be sent or the worker fails before its headers. The caller reads
        the body from the answer, then `close()`s it."""
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin.parse(url)
        head = (f"POST {path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        pool = self._idle.setdefault(url, [])
        while True:
            answer = pool.pop() if pool else await self._connect(origin, pool)
            answer.send(head, body, timeout)
            try:
                await answer.head()
                return answer
            except UpstreamError:
                answer.close()
                if not answer.stale:
                    raise
                # The worker closed it while it was idle: the request never reached it. Again, on a new one.

    async def _connect(self, origin: Origin, pool: list[Answer]) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            _, answer = await loop.create_connection(lambda: Answer(pool), origin.host, origin.port, ssl=origin.ssl)
        except OSError as exc:
            raise UpstreamError(type(exc).__name__) from None
        return answer

    def close(self) -> None:
        for pool in self._idle.values():
            for answer in list(pool):
                answer.abort()
        self._idle.clear()
