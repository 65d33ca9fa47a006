"""Stop strings across chunk boundaries: the stop text is never emitted, and nothing else is lost."""

from __future__ import annotations

import pytest

from trtllm_peft.serving.stop import StopMatcher


def run(stops, chunks):
    m = StopMatcher(stops)
    out = "".join(m.feed(c) for c in chunks) + m.flush()
    return out, m.matched


@pytest.mark.parametrize(
    ("stops", "chunks", "text", "matched"),
    [
        ([], ["a", "b"], "ab", None),
        (["\n\n"], ["Hello", "\n", "\nWorld"], "Hello", "\n\n"),
        (["####"], ["x ##", "#", "# 50"], "x ", "####"),
        (["END", "STOP"], ["go S", "TOP and END"], "go ", "STOP"),
        (["abc"], ["ab", "x"], "abx", None),  # held back, then released
        (["abc"], ["a", "b"], "ab", None),  # released by flush at the end
        (["x"], ["xyz"], "", "x"),
    ],
)
def test_stop_matching(stops, chunks, text, matched):
    assert run(stops, chunks) == (text, matched)


def test_nothing_after_stop():
    m = StopMatcher(["."])
    assert m.feed("a.b") == "a" and m.feed("more") == "" and m.flush() == "" and m.stopped
