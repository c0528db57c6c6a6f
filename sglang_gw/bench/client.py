"""The load generator's HTTP side: one request of a session, sent through one aiohttp pool, timed.

Three APIs (backends): OpenAI chat completions, OpenAI completions and SGLang's native /generate. Streams
are read as raw bytes and split into SSE `data:` lines here (cheaper than aiohttp's line reader); each
event is parsed once. A request's output tokens are what the server reports in its usage (the last
chunk's, with stream_options.include_usage; meta_info on /generate), else the number of chunks that
carried output.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp
import orjson

from sglang_gw.bench.workloads import Session, Turn


@dataclass(frozen=True, slots=True)
class RequestResult:
    start: float                      # time.perf_counter() when sent
    end: float                        # when the answer ended (or failed)
    error: str | None                 # the kind (http_503, timeout, connect, ...); None: completed
    error_detail: str = ""
    chunk_times: tuple[float, ...] = ()   # arrival of each chunk with output (streaming only)
    prompt_tokens: int | None = None  # as reported
    output_tokens: int = 0            # as reported, else chunks with output
    cached_tokens: int | None = None  # as reported
    text: str = ""                    # the answer (the next turn of a conversation carries it)

    @property
    def ttft(self) -> float | None:
        """Seconds to the first chunk with output (streaming only)."""
        return self.chunk_times[0] - self.start if self.chunk_times else None


class _Reply:
    """What a response has said so far (mutable: filled in event by event)."""

    __slots__ = ("pieces", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason")

    def __init__(self):
        self.pieces: list[str] = []
        self.prompt_tokens = self.completion_tokens = self.cached_tokens = None
        self.finish_reason: str | None = None

    def take_usage(self, usage: dict | None) -> None:
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
            self.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")


def _text_prompt(session: Session, history: list[tuple[str, str]], turn: Turn) -> str:
    """A conversation as one text: each turn's prompt is the previous one, its answer and the new text."""
    parts = [session.system + "\n\n"] if session.system else []
    parts += [f"{user}{answer}\n\n" for user, answer in history]
    return "".join(parts) + turn.text


def _openai_extras(body: dict, session: Session, stream: bool, sampling: dict) -> dict:
    body.update(sampling)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if session.ignore_eos:
        body["ignore_eos"] = True  # SGLang's and vLLM's extension: exactly max_tokens
    if session.json_schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": session.json_schema}}
    return body


class OpenAIChat:
    name, path = "openai-chat", "/v1/chat/completions"

    def body(self, model: str, session: Session, history: list[tuple[str, str]], turn: Turn, stream: bool,
             sampling: dict) -> dict:
        messages = [{"role": "system", "content": session.system}] if session.system else []
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": turn.text})
        return _openai_extras({"model": model, "messages": messages, "max_tokens": turn.max_tokens,
                               "stream": stream}, session, stream, sampling)

    def take(self, event: dict, reply: _Reply) -> bool:
        """Fold one event (or a whole answer) into `reply`; True when it carried output."""
        reply.take_usage(event.get("usage"))
        carried = False
        for choice in event.get("choices") or ():
            if text := self.text_of(choice):
                reply.pieces.append(text)
                carried = True
            reply.finish_reason = choice.get("finish_reason") or reply.finish_reason
        return carried

    @staticmethod
    def text_of(choice: dict) -> str | None:
        return (choice.get("delta") or choice.get("message") or {}).get("content")


class OpenAICompletions(OpenAIChat):
    name, path = "openai-completions", "/v1/completions"

    def body(self, model: str, session: Session, history: list[tuple[str, str]], turn: Turn, stream: bool,
             sampling: dict) -> dict:
        return _openai_extras({"model": model, "prompt": _text_prompt(session, history, turn),
                               "max_tokens": turn.max_tokens, "stream": stream}, session, stream, sampling)

    @staticmethod
    def text_of(choice: dict) -> str | None:
        return choice.get("text")


class SGLangNative:
    """POST /generate: every event holds the whole text so far and meta_info with the token counts."""

    name, path = "sglang", "/generate"

    def body(self, model: str, session: Session, history: list[tuple[str, str]], turn: Turn, stream: bool,
             sampling: dict) -> dict:
        params = {"max_new_tokens": turn.max_tokens, "ignore_eos": session.ignore_eos, **sampling}
        if session.json_schema is not None:
            params["json_schema"] = json.dumps(session.json_schema)
        return {"text": _text_prompt(session, history, turn), "sampling_params": params, "stream": stream}

    def take(self, event: dict, reply: _Reply) -> bool:
        meta = event["meta_info"]
        before = reply.completion_tokens or 0
        reply.prompt_tokens, reply.cached_tokens = meta.get("prompt_tokens"), meta.get("cached_tokens")
        reply.completion_tokens = meta.get("completion_tokens", 0)
        reply.pieces = [event["text"]]  # cumulative
        if finish := meta.get("finish_reason"):
            reply.finish_reason = finish["type"] if isinstance(finish, dict) else str(finish)
        return reply.completion_tokens > before


BACKENDS = {b.name: b for b in (OpenAIChat(), OpenAICompletions(), SGLangNative())}


async def _sse_payloads(content: aiohttp.StreamReader):
    """The payload of each SSE `data:` line, as bytes, as the bytes arrive."""
    pending = b""
    async for data in content.iter_any():
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()


def _error_of(event: dict) -> str | None:
    error = event.get("error")
    if error is None:
        return None
    return json.dumps(error) if not isinstance(error, str) else error


class Client:
    """Sends turns to one server through `http` (one connection pool for the whole run)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, backend, model: str, stream: bool,
                 api_key: str | None, sampling: dict):
        self.http, self.backend, self.model, self.stream, self.sampling = http, backend, model, stream, sampling
        self.endpoint = url.rstrip("/") + backend.path
        self.headers = {"Content-Type": "application/json",
                        **({"Authorization": f"Bearer {api_key}"} if api_key else {})}

    async def send(self, session: Session, history: list[tuple[str, str]], turn: Turn) -> RequestResult:
        body = self.backend.body(self.model, session, history, turn, self.stream, self.sampling)
        reply, times = _Reply(), []
        start = time.perf_counter()
        try:
            async with self.http.post(self.endpoint, data=orjson.dumps(body), headers=self.headers) as resp:
                if resp.status != 200:
                    return RequestResult(start, time.perf_counter(), f"http_{resp.status}", (await resp.text())[:300])
                if self.stream:
                    async for payload in _sse_payloads(resp.content):
                        if payload == b"[DONE]":
                            break
                        event = orjson.loads(payload)  # a fifth of the stdlib's cost per event
                        if (error := _error_of(event)) is not None:
                            return RequestResult(start, time.perf_counter(), "stream_error", error[:300])
                        if self.backend.take(event, reply):
                            times.append(time.perf_counter())
                else:
                    self.backend.take(orjson.loads(await resp.read()), reply)
        except asyncio.TimeoutError:
            return RequestResult(start, time.perf_counter(), "timeout")
        except aiohttp.ClientConnectorError as exc:
            return RequestResult(start, time.perf_counter(), "connect", str(exc))
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            return RequestResult(start, time.perf_counter(), "disconnected", str(exc))
        except aiohttp.ClientError as exc:
            return RequestResult(start, time.perf_counter(), "client_error", f"{type(exc).__name__}: {exc}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # not the API's JSON
            return RequestResult(start, time.perf_counter(), "bad_response", f"{type(exc).__name__}: {exc}")
        end = time.perf_counter()
        text = "".join(reply.pieces)
        error = _check_answer(session, reply, text)
        return RequestResult(
            start, end, error[0] if error else None, error[1] if error else "",
            chunk_times=tuple(times), prompt_tokens=reply.prompt_tokens,
            output_tokens=reply.completion_tokens if reply.completion_tokens is not None else len(times),
            cached_tokens=reply.cached_tokens, text=text)


def _check_answer(session: Session, reply: _Reply, text: str) -> tuple[str, str] | None:
    """(kind, detail) when an answer that arrived whole is still wrong: it never said how it finished (a
    stream cut short), or a constrained answer that finished is not JSON."""
    if reply.finish_reason is None:
        return "incomplete", "the answer ended without a finish_reason"
    if session.json_schema is not None and reply.finish_reason == "stop":
        try:
            json.loads(text)
        except ValueError:
            return "invalid_json", text[:300]
    return None
