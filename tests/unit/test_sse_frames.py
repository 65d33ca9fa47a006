"""The streamed chunks' framing: a chunk built from the per-stream head equals the whole chunk encoded."""

from __future__ import annotations

import json

import pytest

from trtllm_peft.server.openai_routes import _ChoiceFrames, _sse

BASES = [
    {"id": "cmpl-1", "object": "text_completion", "created": 1733356800, "model": "smollm2"},
    {"id": 'chatcmpl-x"y', "object": "chat.completion.chunk", "created": 0, "model": "lora-ünï/😀"},
]
CHOICES = [
    {"index": 0, "text": "", "logprobs": None, "finish_reason": None, "stop_reason": None},
    {
        "index": 3,
        "text": 'caf\u00e9 \u2028 "q" \\ \n',
        "logprobs": {
            "tokens": ["a"],
            "token_logprobs": [-0.5],
            "top_logprobs": [{"a": -0.5}],
            "text_offset": [0],
        },
        "finish_reason": "length",
        "stop_reason": None,
    },
    {"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None},
]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("choice", CHOICES)
def test_a_frame_is_the_whole_chunk_encoded(base, choice):
    frame = _ChoiceFrames(base)(choice)
    assert frame == _sse({**base, "choices": [choice]})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {**base, "choices": [choice]}
