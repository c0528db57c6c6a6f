"""The text a request's prefix is matched on: what the engine will actually see, where we can tell.

For chat, that is the messages rendered with the model's chat template. The gateway learns where
each model's tokenizer lives from a worker's `/get_model_info` and reads its template when that path
exists on this host (the usual single-machine setup); otherwise it falls back to role-tagged message
contents, which still keep one conversation's turns sharing a prefix.

A batch (`text` or `prompt` as a list of strings, `input_ids` as a list of id lists) is routed on
what its items have in common: their longest common prefix. SGLang's frontend sends `select` as
`[s.text_ + choice, ...]` right after caching `s.text_` alone, so that prefix is the one the program's
other calls were routed on. Token ids are rendered as "id," per token, so that a prefix of ids renders
as a prefix of the text.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

import aiohttp
import structlog

from .chat_template import ChatTemplate, load_chat_template

log = structlog.get_logger(__name__)


def _load_template(path: str) -> ChatTemplate | None:
    if not path or not Path(path).is_dir():
        return None
    try:
        return load_chat_template(path)
    except Exception as exc:  # noqa: BLE001 — a broken template only costs routing precision
        log.warning("gateway.chat_template_unavailable", path=path, error=str(exc))
        return None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(_text(part.get("text")) for part in content if isinstance(part, dict))
    return _text(content)


class RoutingText:
    def __init__(self):
        self._templates: dict[str, ChatTemplate | None] = {}  # model → its chat template, or None
        self.paths: dict[str, str] = {}  # model → where its template was looked for (relays load the same)
        self.on_learned: Callable[[], None] = lambda: None

    def add_template(self, model: str, path: str) -> None:
        self._templates[model] = _load_template(path)
        self.paths[model] = path

    async def learn(self, session: aiohttp.ClientSession, url: str, models: set[str],
                    timeout: aiohttp.ClientTimeout) -> None:
        """Called when a worker's models are discovered; loads each new model's template once."""
        new = [m for m in models if m not in self._templates]
        if not new:
            return
        try:
            async with session.get(url + "/get_model_info", timeout=timeout) as resp:
                info = await resp.json() if resp.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            info = {}  # not an sglang-gw / SGLang engine: role-tagged text it is
        path = str(info.get("tokenizer_path") or info.get("model_path") or "")
        for model in new:
            await asyncio.to_thread(self.add_template, model, path)
            log.info("gateway.routing_text", model=model, chat_template=self._templates[model] is not None)
        self.on_learned()

    def __call__(self, path: str, body: dict) -> str:
        """Never raises, whatever the JSON: a malformed body is routed anywhere sane, and the engine refuses it."""
        if path == "/v1/chat/completions":
            messages = body.get("messages")
            messages = [{"role": _text(m.get("role")), "content": _content(m)}
                        for m in (messages if isinstance(messages, list) else []) if isinstance(m, dict)]
            model = body.get("model")
            template = self._templates.get(model) if isinstance(model, str) else None
            if template is not None:
                try:
                    return template.render(messages)
                except Exception:  # noqa: BLE001 — the engine will reject it; route it anywhere sane
                    pass
            return "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return prompt_text(_prompt(path, body))


def _prompt(path: str, body: dict) -> object:
    """Where a completions or /generate request holds its prompt: text, ids, or a batch of either."""
    if path == "/v1/completions":
        return body.get("prompt")
    text = body.get("text")
    return text if text is not None else body.get("input_ids")


def _is_batch_prompt(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(item, (str, list)) for item in prompt)


def is_batch(path: str, body: dict) -> bool:
    """Whether the request carries several prompts (routed on what they share: `prompt_text`)."""
    return path != "/v1/chat/completions" and _is_batch_prompt(_prompt(path, body))


def prompt_text(prompt: object) -> str:
    """A prompt in any of its shapes (text, ids, or a batch of either) as the text to match prefixes on."""
    if _is_batch_prompt(prompt):
        # A batch: what its items share (os.path.commonprefix compares any sequences, not only paths).
        return os.path.commonprefix([_single_prompt_text(item) for item in prompt])
    return _single_prompt_text(prompt)


def _single_prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return "".join(f"{t}," for t in prompt)
    return ""  # malformed: the engine will reject it; route it anywhere sane
