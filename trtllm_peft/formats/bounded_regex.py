"""Regular expressions from adapter files (adapter_config.json), matched in time linear in the input.

PEFT matches `target_modules` / `exclude_modules` with `re.fullmatch`, `rank_pattern` / `alpha_pattern` keys
with `re.match(rf"(.*\\.)?({key})$", name)` and `layers_pattern` with `re.match` (peft/tuners/tuners_utils.py
check_target_module_exists, peft/utils/other.py get_pattern_key). Python's backtracking engine takes
exponential time on patterns such as `(([a-z_.0-9])+)+X` while holding the GIL, which froze the whole
server (issue #16). We keep PEFT's match/fullmatch semantics but run them on RE2 (google-re2), an automaton
engine whose matching is linear in pattern x input and never backtracks; its memory is capped per pattern
(MAX_MEM) and patterns are capped in length (MAX_PATTERN_CHARS). Measured here (2 loaded cores): Python's
`re` needs 1.3 s to fail `(([a-z_.0-9])+)+X` on the first 22 characters of `model.layers.0.self_attn.q_proj`,
about doubling per character (~10 min for all 31, for each of hundreds of module names); RE2 fails it in
2.3 us.

What RE2 does not have (backreferences `\\1`, lookaround `(?=…)`, possessive quantifiers) is refused with
a precise error; module names are ASCII, so the remaining differences (`\\w`/`\\d` ASCII-only, `$` not
matching before a final newline) cannot change which module a pattern selects.
"""

from __future__ import annotations

import functools

import re2

MAX_PATTERN_CHARS = 16_384  # a PEFT-written exact-name regex for an 80-layer model is ~3 KB
MAX_MEM = 8 << 20  # RE2's memory budget per compiled pattern (its default); 16 cached: <= 128 MB in all

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print each refused pattern to stderr
_OPTIONS.max_mem = MAX_MEM


class RegexError(ValueError):
    """A pattern we refuse; the message says why, in words for the adapter's author."""


@functools.lru_cache(maxsize=16)  # one adapter's patterns, reused across its ~hundreds of module names
def compile_pattern(pattern: str):
    """The compiled pattern, or RegexError (too long, not valid UTF-8, or syntax RE2 lacks)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise RegexError(f"longer than {MAX_PATTERN_CHARS} characters ({len(pattern)})")
    try:
        pattern.encode("utf-8")
    except UnicodeEncodeError:
        raise RegexError("not valid UTF-8 text (a lone surrogate)") from None
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise RegexError(
            f"not a valid regular expression for RE2, the linear-time matcher used ({reason}; RE2 has "
            "no backreferences or lookaround)"
        ) from None


def fullmatch(pattern: str, text: str) -> bool:
    """re.fullmatch(pattern, text) is not None, in linear time. Text that is not UTF-8 never matches."""
    return _safe(compile_pattern(pattern).fullmatch, text) is not None


def match(pattern: str, text: str):
    """re.match(pattern, text) (anchored at the start), in linear time; the match object or None."""
    return _safe(compile_pattern(pattern).match, text)


def _safe(method, text: str):
    try:
        return method(text)
    except UnicodeEncodeError:  # a tensor name with a lone surrogate: it names no module
        return None
