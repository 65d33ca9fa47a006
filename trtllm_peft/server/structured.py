"""Structured output at the HTTP edge: OpenAI's `response_format`, NIM's `nvext.guided_*` (and vLLM's top-level
`guided_*`) become one `GuidedDecodingParams`; a bad or too costly guide is a 400 before anything is queued.

The executor enforces the guide (executor/guided.py); this module only chooses and checks it. Mapping as
vLLM / NIM do: `json_object` → GuideType.JSON, `json_schema` and `guided_json` → JSON_SCHEMA, `guided_regex`
→ REGEX, `guided_choice` → an EBNF alternation of the literal choices, `guided_grammar` → EBNF_GRAMMAR.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from trtllm_peft.executor.api import GuidedDecodingParams, GuideType
from trtllm_peft.executor.guided import MAX_GUIDE_CHARS, GuideError, check_guide
from trtllm_peft.server.http_errors import BadRequestError

MAX_CHOICES = 256


class GuideRequestError(BadRequestError):
    """A structured-output field that cannot be honoured (400)."""


def _nonempty(obj: Any, names: tuple[str, ...], where: str) -> dict[str, Any]:
    return {
        f"{where}{n}": getattr(obj, n) for n in names if obj is not None and getattr(obj, n, None) is not None
    }


def guide_for(body: Any) -> GuidedDecodingParams | None:
    """The one guide a request asks for (None: free text); GuideRequestError when it asks for two."""
    names = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
    asked = _nonempty(body, names, "") | _nonempty(getattr(body, "nvext", None), names, "nvext.")
    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type != "text":
        asked["response_format"] = rf
    if len(asked) > 1:
        raise GuideRequestError(f"only one of {', '.join(sorted(asked))} may be given")
    if not asked:
        return None
    ((name, value),) = asked.items()
    return _to_params(name.removeprefix("nvext."), value)


def _to_params(name: str, value: Any) -> GuidedDecodingParams:
    if name == "response_format":
        if value.type == "json_object":
            return GuidedDecodingParams(GuideType.JSON)
        if value.json_schema is None or value.json_schema.schema_ is None:
            raise GuideRequestError("response_format json_schema needs json_schema.schema")
        return GuidedDecodingParams(GuideType.JSON_SCHEMA, _schema_text(value.json_schema.schema_))
    if name == "guided_json":
        return GuidedDecodingParams(GuideType.JSON_SCHEMA, _schema_text(value))
    if name == "guided_regex":
        return GuidedDecodingParams(GuideType.REGEX, value)
    if name == "guided_grammar":
        return GuidedDecodingParams(GuideType.EBNF_GRAMMAR, value)
    return GuidedDecodingParams(GuideType.EBNF_GRAMMAR, choice_grammar(value))


def _schema_text(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    text = json.dumps(schema)
    if len(text) > MAX_GUIDE_CHARS:
        raise GuideRequestError(f"the JSON schema is {len(text)} characters; at most {MAX_GUIDE_CHARS}")
    return text


def choice_grammar(choices: list[str]) -> str:
    """`root ::= "a" | "b"`: exactly one of the literal strings (JSON escapes are EBNF string escapes)."""
    if not choices or len(choices) > MAX_CHOICES or not all(isinstance(c, str) and c for c in choices):
        raise GuideRequestError(f"guided_choice must be 1 to {MAX_CHOICES} non-empty strings")
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


async def checked(params: GuidedDecodingParams | None, field: str = "response_format") -> None:
    """Refuse a malformed or too costly guide with a 400 naming why (the check runs off the event loop)."""
    if params is None:
        return
    try:
        await asyncio.to_thread(check_guide, params)
    except GuideError as e:
        raise GuideRequestError(f"{field}: {e}") from None
