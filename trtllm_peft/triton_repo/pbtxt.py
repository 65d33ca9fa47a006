"""A small writer of protobuf text format, the syntax of Triton's `config.pbtxt`.

A message is a list of (field, value) pairs, in order. A value is a str (quoted), an `Enum` (bare), a bool,
an int or float, a nested message, `{}` (an empty message), or a list: a list of scalars is written `[ a, b ]`, a list of messages
`[ {…}, {…} ]`. Map fields (`parameters`) are repeated pairs of the same field name. Tests read the output
back with protobuf's own text parser and Triton's ModelConfig schema.
"""

from __future__ import annotations

from typing import Any

Message = list[tuple[str, Any]]
INDENT = "  "


class Enum(str):
    """An enum value, written without quotes (TYPE_INT32, KIND_CPU)."""


def quote(s: str) -> str:
    """A protobuf text string literal: backslash, quote and control characters escaped, UTF-8 kept."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _scalar(v: Any) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return quote(v)
    if isinstance(v, int | float):
        return repr(v)
    raise TypeError(f"cannot write {type(v).__name__} in protobuf text")


def render(message: Message, depth: int = 0) -> str:
    """The text of `message` (fields at `depth` levels of indentation)."""
    pad = INDENT * depth
    lines = []
    for field, value in message:
        if value == {}:  # an empty message: `dynamic_batching {}`
            lines.append(f"{pad}{field} {{\n{pad}}}\n")
        elif isinstance(value, list) and value and isinstance(value[0], list):  # repeated message
            items = [f"{pad}{INDENT}{{\n{render(m, depth + 2)}{pad}{INDENT}}}" for m in value]
            lines.append(f"{pad}{field} [\n" + ",\n".join(items) + f"\n{pad}]\n")
        elif isinstance(value, list) and (not value or not isinstance(value[0], tuple)):  # repeated scalar
            lines.append(f"{pad}{field}: [ {', '.join(_scalar(v) for v in value)} ]\n")
        elif isinstance(value, list):  # nested message
            lines.append(f"{pad}{field} {{\n{render(value, depth + 1)}{pad}}}\n")
        else:
            lines.append(f"{pad}{field}: {_scalar(value)}\n")
    return "".join(lines)


def parameters(values: dict[str, str]) -> Message:
    """Triton's `parameters` map: every value a `string_value`, as tensorrtllm_backend reads them."""
    return [("parameters", [("key", k), ("value", [("string_value", str(v))])]) for k, v in values.items()]
