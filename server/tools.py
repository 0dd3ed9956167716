"""Tool calling: what `tool_choice` asks of the model, and turning its text back into OpenAI tool calls.

* "none": the tools are shown to the chat template, the output is plain text.
* "auto" (needs `--enable-auto-tool-choice --tool-call-parser NAME`): the model writes free text; the
  parser finds the calls its template taught it to write (hermes: `<tool_call>{...}</tool_call>`,
  llama3_json: `{"name": ..., "parameters": ...}` objects, mistral: `[TOOL_CALLS] [...]`).
* "required": structured outputs force a JSON array of `{"name": <one of the tools>, "parameters":
  <its schema>}` (one item when parallel_tool_calls is false), so the arguments always parse and match.
* a named function: structured outputs force that function's parameters object.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from server.errors import APIError

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"chatcmpl-tool-{uuid.uuid4().hex[:24]}"

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    schema: dict | None = None  # structured-outputs JSON schema forcing the calls (required / named)
    name: str | None = None  # the named function


def _functions(tools: list[dict]) -> dict[str, dict]:
    out = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}", 400,
                           param="tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise APIError(f"tools[{i}].function.parameters must be a JSON schema object", 400, param="tools")
        out[fn["name"]] = params
    return out


def plan(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None, *,
         auto_enabled: bool, parser: str | None) -> ToolPlan:
    """Validates the request's tools against its tool_choice (400s name the field)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if tool_choice == "none":
        return ToolPlan("none")
    if not tools:
        raise APIError("tool_choice needs tools", 400, param="tool_choice")
    functions = _functions(tools)
    if tool_choice == "auto":
        if not (auto_enabled and parser):
            raise APIError('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be '
                           "set", 400, param="tool_choice")
        return ToolPlan("auto")
    if tool_choice == "required":
        items = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                            "required": ["name", "parameters"], "additionalProperties": False}
                           for name, schema in functions.items()]}
        schema = {"type": "array", "items": items, "minItems": 1}
        if parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", schema=schema)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise APIError(f"tool_choice names function {name!r}, which is not in tools ({sorted(functions)})", 400,
                           param="tool_choice")
        return ToolPlan("named", schema=functions[name], name=name)
    raise APIError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                   '{"name": ...}}', 400, param="tool_choice")


def calls_from_forced(plan_: ToolPlan, text: str) -> list[ToolCall]:
    """The calls of a structured-outputs-forced answer (its text matches plan_.schema)."""
    if plan_.mode == "named":
        return [ToolCall(plan_.name, text)]
    return [ToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]


# ---- parsers for "auto" --------------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


def _call_from(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any]:
    """Every JSON value that starts where a decoder can read one, left to right."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "[{":
            try:
                value, end = dec.raw_decode(text, i)
                out.append(value)
                i = end
                continue
            except ValueError:
                pass
        i += 1
    return out


def parse_auto(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content left for the user, tool calls) from free text; no calls -> (text, [])."""
    if parser == "hermes":
        if "<tool_call>" not in text:
            return text, []
        calls = []
        for body in _HERMES.findall(text):
            try:
                call = _call_from(json.loads(body))
            except ValueError:
                call = None
            if call:
                calls.append(call)
        content = text[:text.index("<tool_call>")].strip()
        return (content or None, calls) if calls else (text, [])
    if parser == "mistral":
        if "[TOOL_CALLS]" not in text:
            return text, []
        head, tail = text.split("[TOOL_CALLS]", 1)
        values = _json_values(tail)
        calls = [call for v in values for item in (v if isinstance(v, list) else [v]) if (call := _call_from(item))]
        return (head.strip() or None, calls) if calls else (text, [])
    if parser == "llama3_json":
        body = text.replace("<|python_tag|>", "").strip()
        if not body.startswith("{"):
            return text, []
        calls = [call for v in _json_values(body) if (call := _call_from(v))]
        return (None, calls) if calls else (text, [])
    raise ValueError(f"unknown tool call parser {parser!r} (known: {', '.join(TOOL_CALL_PARSERS)})")


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _safe_content(parser: str, text: str) -> int:
    """While streaming "auto": how much of the text so far is certainly content (never part of a call)."""
    if parser in ("hermes", "mistral"):
        marker = "<tool_call>" if parser == "hermes" else "[TOOL_CALLS]"
        if marker in text:
            return text.index(marker)
        return len(text) - _held_suffix(text, marker)
    body = text.replace("<|python_tag|>", "").lstrip()
    if not body or body.startswith("{") or "<|python_tag|>".startswith(text.lstrip()):
        return 0  # a llama3_json call starts the message, or nothing is decided yet
    return len(text)


class ToolStream:
    """One streamed choice under a tool plan: text deltas in, OpenAI delta dicts out."""

    def __init__(self, plan_: ToolPlan, parser: str | None):
        self.plan, self.parser = plan_, parser
        self.text = ""
        self.sent = 0  # content characters already emitted (auto)
        self.call: ToolCall | None = None  # the named call, once its header went out

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        mode = self.plan.mode
        if mode == "none":
            return [{"content": delta}] if delta else []
        if mode == "named":
            if not delta and self.call is not None:
                return []
            if self.call is None:
                self.call = ToolCall(self.plan.name, "")
                return [{"tool_calls": [{"index": 0, "id": self.call.id, "type": "function",
                                         "function": {"name": self.call.name, "arguments": delta}}]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}]
        if mode == "auto":
            safe = _safe_content(self.parser, self.text)
            if safe > self.sent:
                out = [{"content": self.text[self.sent:safe]}]
                self.sent = safe
                return out
        return []

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """Deltas still owed when the choice ends, and the finish_reason to report."""
        mode = self.plan.mode
        if mode in ("none", "named"):
            return [], finish_reason
        if mode == "required":
            try:
                calls = calls_from_forced(self.plan, self.text)
            except ValueError:  # cut off by max_tokens: what there is goes out as text
                return [{"content": self.text}], finish_reason
            return _call_deltas(calls), "tool_calls"
        content, calls = parse_auto(self.parser, self.text)
        out = []
        rest = (content or "")[self.sent:] if calls else self.text[self.sent:]
        if rest:
            out.append({"content": rest})
        if calls:
            out += _call_deltas(calls)
            finish_reason = "tool_calls"
        return out, finish_reason


def _call_deltas(calls: list[ToolCall]) -> list[dict]:
    # Name and id first, then the arguments (in one fragment: they are known whole by now).
    out = []
    for k, c in enumerate(calls):
        out.append({"tool_calls": [{"index": k, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": c.arguments}}]})
    return out


def message_of(plan_: ToolPlan, parser: str | None, text: str,
               finish_reason: str | None) -> tuple[str | None, list[dict] | None, str | None]:
    """Non-streamed: (content, tool_calls, finish_reason) of one choice."""
    if plan_.mode == "none":
        return text, None, finish_reason
    if plan_.mode in ("named", "required"):
        try:
            calls = calls_from_forced(plan_, text)
        except ValueError:
            return text, None, finish_reason
        return None, [c.to_openai() for c in calls], ("tool_calls" if plan_.mode == "required" else finish_reason)
    content, calls = parse_auto(parser, text)
    if not calls:
        return text, None, finish_reason
    return content, [c.to_openai() for c in calls], "tool_calls"
