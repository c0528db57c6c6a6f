"""The gateway's HTTP/1.1 client to its workers (gateway/upstream.py), against raw sockets that answer
exactly the bytes each case needs: framings, keep-alive reuse, a stale idle connection, failures."""

from __future__ import annotations

import asyncio
import gzip

import pytest

from sglang_gw.gateway.upstream import PAUSE_BYTES, Upstream, UpstreamError

HEADERS = {"Content-Type": "application/json", "x-request-id": "r1"}


class RawServer:
    """A TCP server whose every request is answered by `answer(request_bytes, writer)`; it counts the
    connections it accepted and keeps the requests it read."""

    def __init__(self, answer):
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.answer(request, writer) == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def json_answer(body: bytes = b'{"ok": true}', extra: bytes = b""):
    async def answer(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                     % (len(body), extra, body))
    return answer


async def post(upstream: Upstream, url: str, body: bytes = b"{}", timeout: float | None = 5) -> tuple:
    answer = await upstream.post(url, "/v1/completions", body, HEADERS, timeout)
    try:
        return answer.status, dict(answer.headers), await answer.read()
    finally:
        answer.close()


def test_a_request_carries_host_length_headers_and_body_and_its_connection_is_kept_alive():
    async def main():
        server = RawServer(json_answer())
        async with server as url:
            upstream = Upstream()
            for _ in range(3):
                assert await post(upstream, url, b'{"a": 1}') == (200, {"Content-Type": "application/json",
                                                                        "Content-Length": "12"}, b'{"ok": true}')
            upstream.close()
        assert server.connections == 1  # kept alive and reused
        head, body = server.requests[0].split(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/completions HTTP/1.1" and body == b'{"a": 1}'
        assert {b"Host: " + url.removeprefix("http://").encode(), b"Content-Length: 8",
                b"x-request-id: r1", b"Content-Type: application/json"} <= set(lines[1:])
    asyncio.run(main())


def test_chunked_and_close_delimited_bodies_are_read_whole_and_gzip_is_decoded():
    async def chunked(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n0\r\n\r\n")

    async def until_close(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()
        return "close"

    async def main():
        upstream = Upstream()
        for answer, expected in ((chunked, b"data: 1data: 2"), (until_close, b"all of it"),
                                 (json_answer(gzip.compress(b'{"z": 1}'), b"Content-Encoding: gzip\r\n"),
                                  b'{"z": 1}')):
            async with RawServer(answer) as url:
                assert (await post(upstream, url))[2] == expected
        upstream.close()
    asyncio.run(main())


def test_a_connection_the_worker_closed_while_idle_is_replaced_and_the_request_is_sent_once():
    async def answer_then_close(request, writer):
        await json_answer()(request, writer)
        await writer.drain()
        return "close"  # without saying so (no Connection: close): the client's pooled connection is stale

    async def main():
        server = RawServer(answer_then_close)
        async with server as url:
            upstream = Upstream()
            await post(upstream, url)
            await asyncio.sleep(0.1)
            assert (await post(upstream, url))[0] == 200
            upstream.close()
        assert server.connections == 2 and len(server.requests) == 2
    asyncio.run(main())


@pytest.mark.parametrize("failure", ["refused", "dies", "timeout", "malformed", "cut"])
def test_failures_raise_upstream_error_saying_which(failure):
    async def dies(request, writer):
        return "close"

    async def silent(request, writer):
        await asyncio.sleep(10)

    async def malformed(request, writer):
        writer.write(b"HTTP/1.1 abc\r\n\r\n")

    async def cut(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return "close"

    async def main():
        upstream = Upstream()
        if failure == "refused":
            async with RawServer(dies) as url:
                pass  # closed: nothing listens there now
            with pytest.raises(UpstreamError, match="ConnectionRefusedError"):
                await post(upstream, url)
            return
        answer = {"dies": dies, "timeout": silent, "malformed": malformed, "cut": cut}[failure]
        async with RawServer(answer) as url:
            message = {"dies": "closed the connection", "timeout": "timeout", "malformed": "malformed answer",
                       "cut": "closed the connection"}[failure]
            with pytest.raises(UpstreamError, match=message):
                await post(upstream, url, timeout=0.3)
        upstream.close()
    asyncio.run(main())


def test_a_client_slower_than_the_worker_pauses_reading_and_an_abandoned_answer_closes_its_connection():
    big = b"x" * (PAUSE_BYTES // 4)
    cut = []

    async def flood(request, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(64):  # 16x the pause threshold
                writer.write(b"%x\r\n%s\r\n" % (len(big), big))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            cut.append(True)
            return "close"

    async def main():
        async with RawServer(flood) as url:
            upstream = Upstream()
            answer = await upstream.post(url, "/generate", b"{}", HEADERS, 30)
            first = await answer.chunk()
            await asyncio.sleep(0.3)  # the worker writes on until the client's side stops reading
            held = answer._buffered
            assert len(first) > 0 and held <= 2 * PAUSE_BYTES
            answer.close()  # abandoned half-read: the connection is dropped, not pooled
            await asyncio.sleep(0.3)
            assert answer.closed and not upstream._idle[url]
            upstream.close()
        assert cut  # the worker saw the connection go
    asyncio.run(main())
