"""Forced tool calls (OpenAI `tool_choice: "required"` or a named function) as constrained output.

The output is constrained by a JSON schema built from the tools' parameter schemas, so it always parses
into calls: for a named function, its arguments object; for "required", a non-empty array of
{"name", "parameters"} objects, one per call, each matching its function (vLLM's format).
`tool_choice: "auto"` needs a model family's own tool-call syntax and is refused (docs/sglang-api.md).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

ANY_OBJECT = {"type": "object"}  # a function declared without parameters takes any arguments object


@dataclass(frozen=True)
class ForcedToolCalls:
    parameters: dict[str, dict]  # function name → its parameters schema, in the request's order
    named: str | None = None  # the one function tool_choice names; None: "required" (any, one or more)
    parallel: bool = True  # "required" may make several calls (OpenAI's parallel_tool_calls)

    def schema(self) -> dict:
        if self.named is not None:
            return self.parameters[self.named]
        calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, params in self.parameters.items()]
        return {"type": "array", "minItems": 1, **({} if self.parallel else {"maxItems": 1}),
                "items": {"anyOf": calls}}

    def calls(self, text: str) -> list[dict] | None:
        """The OpenAI `tool_calls` of a complete output; None if it does not parse (it ended early)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.named is not None:
            return [tool_call(self.named, text)]
        return [tool_call(call["name"], json.dumps(call["parameters"], ensure_ascii=False)) for call in value]


def tool_call(name: str, arguments: str) -> dict:
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
