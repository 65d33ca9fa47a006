"""Tool calling in chat: `tools` / `tool_choice` checked at once (400), tools rendered through the chat template,
calls parsed out of the output by a parser named as vLLM names them (`hermes`, `llama3_json`, `mistral`).

As vLLM's serving_chat does: `tool_choice` `required` and a named function are forced with a JSON-schema guide
(named: the output *is* the arguments; required: an array of {name, parameters}), so those calls always parse;
`auto` leaves the model free and parses what it wrote (vllm/entrypoints/openai/tool_parsers/: hermes
`<tool_call>{…}</tool_call>`, llama3_json `{"name", "parameters"}` after an optional `<|python_tag|>`,
mistral `[TOOL_CALLS][…]`). A template that knows no tools (SmolLM2's) gets them in Hermes' system prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from trtllm_peft.executor.api import GuidedDecodingParams, GuideType
from trtllm_peft.server.http_errors import BadRequestError

PARSERS = ("hermes", "llama3_json", "mistral")
MARKERS = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
HERMES_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call>"
)


class ToolRequestError(BadRequestError):
    """tools / tool_choice that cannot be honoured together (400)."""


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI's {"type": "function", "function": {...}}
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None
    parser: str

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def guide(self) -> GuidedDecodingParams | None:
        """The JSON schema that forces `required` / named calls (None for auto / none)."""
        params = {
            t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in self.tools
        }
        if self.choice == "named":
            return GuidedDecodingParams(GuideType.JSON_SCHEMA, json.dumps(params[self.named]))
        if self.choice != "required":
            return None
        calls = [
            {
                "type": "object",
                "properties": {"name": {"enum": [name]}, "parameters": schema},
                "required": ["name", "parameters"],
            }
            for name, schema in params.items()
        ]
        return GuidedDecodingParams(
            GuideType.JSON_SCHEMA, json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": calls}})
        )


def default_parser(template: str | None) -> str:
    """The parser the model's chat template implies (hermes, the format of our fallback prompt, otherwise)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return "hermes"


def plan(tools: list[Any] | None, tool_choice: Any, parser: str) -> ToolPlan | None:
    """Validate `tools` and `tool_choice` together; None when no tool may be called."""
    tools = [t if isinstance(t, dict) else t.model_dump(exclude_none=True) for t in tools or []]
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolRequestError(f"tool_choice {_show(tool_choice)} needs a non-empty `tools` list")
        return None
    names = _check_tools(tools)
    if tool_choice in (None, "auto", "none", "required"):
        return ToolPlan(tools, tool_choice or "auto", None, parser)
    name = _named(tool_choice)
    if name not in names:
        raise ToolRequestError(
            f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})"
        )
    return ToolPlan(tools, "named", name, parser)


def _check_tools(tools: list[dict[str, Any]]) -> list[str]:
    if len(tools) > MAX_TOOLS:
        raise ToolRequestError(f"at most {MAX_TOOLS} tools")
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if t.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ToolRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': …}}}}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ToolRequestError(f"tools[{i}].function.parameters must be a JSON schema object")
        if fn["name"] in names:
            raise ToolRequestError(f"tools[{i}]: function {fn['name']!r} is given twice")
        names.append(fn["name"])
    return names


def _named(choice: Any) -> str:
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolRequestError(
            f"tool_choice must be none, auto, required or {{'type': 'function', 'function': {{'name': …}}}}, "
            f"got {_show(choice)}"
        )
    return fn["name"]


def _show(v: Any) -> str:
    return json.dumps(v)[:200]


# ---- rendering ---------------------------------------------------------------------------------------------


def render_messages(
    messages: list[dict[str, Any]], plan: ToolPlan | None, native: bool
) -> list[dict[str, Any]]:
    """Messages for a template that knows no tools: the Hermes system prompt, and tool calls / results as
    the Hermes text they stand for. A template that knows tools (`native`) gets them unchanged."""
    if native:  # HF templates read arguments as objects (vLLM converts them the same way)
        return [_with_object_arguments(m) for m in messages]
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]})
                + "\n</tool_call>"
                for c in m.pop("tool_calls")
            ]
            m["content"] = "\n".join([m.get("content") or "", *calls]).strip()
        if m["role"] == "tool":
            m = {"role": "tool", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append({"role": m["role"], "content": m.get("content") or ""})
    if plan is not None and plan.choice != "none":
        listing = "\n".join(json.dumps(t) for t in plan.tools)
        prompt = HERMES_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _with_object_arguments(m: dict[str, Any]) -> dict[str, Any]:
    if not m.get("tool_calls"):
        return m
    calls = []
    for c in m["tool_calls"]:
        fn = dict(c.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            fn["arguments"] = _loads(fn["arguments"]) or {}
        calls.append({**c, "function": fn})
    return {**m, "tool_calls": calls}


def message(plan: ToolPlan | None, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice (with `tool_calls` when the output holds calls) and its
    finish_reason (`tool_calls` then, unless the output was cut at max_tokens)."""
    if plan is None or plan.choice == "none":
        return {"role": "assistant", "content": text}, finish_reason
    content, calls = parse(plan, text)
    if not calls:
        return {"role": "assistant", "content": content}, finish_reason
    reason = finish_reason if finish_reason == "length" else "tool_calls"
    return {"role": "assistant", "content": content, "tool_calls": calls}, reason


# ---- parsing -------------------------------------------------------------------------------------------------


def parse(plan: ToolPlan, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls in OpenAI's shape) of a finished output."""
    if plan.choice == "named":
        return None, [_call(plan.named, text)]
    if plan.choice == "required":
        calls = _loads(text)
        if isinstance(calls, list):
            return None, [_call(c["name"], json.dumps(c["parameters"])) for c in calls]
        return text, []  # cut short (max_tokens): what there is, as text
    found = {"hermes": _hermes, "llama3_json": _llama3, "mistral": _mistral}[plan.parser](text)
    if found is None:
        return text, []
    content, raw = found
    return (content or None), [
        _call(c["name"], json.dumps(c.get("arguments", c.get("parameters", {})))) for c in raw
    ]


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _valid(objs: Any) -> list[dict[str, Any]] | None:
    objs = objs if isinstance(objs, list) else [objs]
    ok = all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in objs)
    return objs if objs and ok else None


def _hermes(text: str):
    start = text.find("<tool_call>")
    if start < 0:
        return None
    bodies = re.findall(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", text[start:], re.S)
    calls = _valid([_loads(b) for b in bodies])
    return None if calls is None else (text[:start].strip(), calls)


def _llama3(text: str):
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return None
    calls = _valid([_loads(part) for part in body.split(";")])
    return None if calls is None else ("", calls)


def _mistral(text: str):
    start = text.find("[TOOL_CALLS]")
    if start < 0:
        return None
    calls = _valid(_loads(text[start + len("[TOOL_CALLS]") :].strip()))
    return None if calls is None else (text[:start].strip(), calls)


class StreamGate:
    """While streaming `auto`: text goes out as content until the parser's marker (or a prefix of it) shows;
    from there it is held back and parsed at the end."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent, self.held = plan, "", 0, plan.forced

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held:
            return ""
        marker = MARKERS[self.plan.parser]
        at = self.text.find(marker, self.sent)
        if at < 0 and self.plan.parser == "llama3_json" and self.text.lstrip().startswith("{"):
            at = self.sent
        if at >= 0:
            self.held = True
            out, self.sent = self.text[self.sent : at], at
            return out
        safe = len(self.text)
        for k in range(min(len(marker) - 1, len(self.text)), 0, -1):  # a marker may be starting
            if marker.startswith(self.text[-k:]):
                safe = len(self.text) - k
                break
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, tool calls)."""
        content, calls = parse(self.plan, self.text)
        if calls:
            return (content or "")[self.sent :] if content and len(content) > self.sent else "", calls
        return self.text[self.sent :], []
