"""Incremental detokenization with stop strings.

Text grows only by whole characters: a token that ends inside a multi-byte UTF-8 character decodes
to U+FFFD and is held back until the next token completes it. The streamable text also holds back any
tail that could be the start of a stop string, so a client never sees part of a stop string.
"""

from __future__ import annotations

import functools
import re

from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2 byte ↔ char table

# Tokens re-decoded before the new ones so that tokenizers that merge spaces or bytes across token
# boundaries (SentencePiece, byte-level BPE) produce the same text as decoding everything at once.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool, spaces_between_special_tokens: bool):
        self.tokenizer = tokenizer
        self.decode_kwargs = dict(
            skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens
        )
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] is re-decoded as context
        self.read_offset = 0  # ids before this have been turned into text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completed (possibly empty)."""
        self.ids.append(token_id)
        pending = self._pending()
        if pending.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        return self._commit(pending)

    def flush(self) -> str:
        """At the end of a request: whatever is still held back (a dangling partial character shows
        as U+FFFD, as decoding all the ids at once would)."""
        return self._commit(self._pending())

    def _pending(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], **self.decode_kwargs)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], **self.decode_kwargs)
        return full[len(prefix) :]

    def _commit(self, delta: str) -> str:
        self.text += delta
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - _CONTEXT_TOKENS)
        return delta


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.max_len = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_chars: int) -> tuple[int, str] | None:
        """The earliest stop string that ends within the last `new_chars` characters: (start, stop)."""
        if not self.stops or new_chars == 0:
            return None
        window_start = max(0, len(text) - new_chars - self.max_len + 1)
        best = None
        for stop in self.stops:
            pos = text.find(stop, window_start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0


class StopRegexMatcher:
    """SGLang's stop_regex: the output ends at the first match of any pattern, keeping the matched text.
    No text is held back while streaming: a match found now ends in the newest text (an earlier one would
    have stopped an earlier step), so what was streamed stays a prefix of the final text."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = [re.compile(p) for p in patterns]  # validated by SamplingParams

    def find(self, text: str) -> tuple[int, str] | None:
        """(end of the earliest-ending match, its pattern), or None."""
        best = None
        for pattern in self.patterns:
            match = pattern.search(text)
            if match and (best is None or match.end() < best[0]):
                best = (match.end(), pattern.pattern)
        return best


_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.lru_cache(maxsize=None)
def _is_byte_level(tokenizer) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The exact bytes one token stands for, even when it is only part of a UTF-8 character
    (byte-level BPE pieces, or SentencePiece byte fallback `<0xNN>`)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is not None:
        if match := _BYTE_TOKEN.fullmatch(piece):
            return bytes([int(match[1], 16)])
        if _is_byte_level(tokenizer) and all(ch in _BYTE_OF_CHAR for ch in piece):
            return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode()


def token_label(tokenizer, token_id: int) -> str:
    """A token's text for logprob listings; OpenAI's `bytes:\\xNN` form when it is not valid UTF-8."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
