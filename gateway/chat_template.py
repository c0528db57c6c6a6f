"""A model's chat template, rendered the way transformers renders it, with jinja2 alone.

The gateway needs the exact text an engine will see to match prefixes, but not transformers or torch:
loading those would cost the lean process seconds of start-up and hundreds of MB (and every full
garbage collection would walk that heap). The template and the special tokens it may use are read
from the model directory (`chat_template.jinja` or `tokenizer_config.json`), and rendered in a
sandbox with the same options, globals and `tojson` filter as transformers' `apply_chat_template`.
A test checks both render the same text.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens transformers passes to every template (`special_tokens_map`).
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        self.special_tokens = special_tokens
        self._template = _environment().from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._template.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.special_tokens)


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The directory's chat template, or None when it has none (or it cannot be read)."""
    directory = Path(model_dir)
    config = _read_json(directory / "tokenizer_config.json")
    source = config.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text()
    elif isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    special = {**_read_json(directory / "special_tokens_map.json"), **config}
    tokens = {name: _token_text(special.get(name)) for name in SPECIAL_TOKENS}
    return ChatTemplate(source, {name: text for name, text in tokens.items() if text is not None})


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # As transformers: no HTML escaping, and the options templates use.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: render the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
