"""The model's tokenizer, as the engine directory carries it: prompts, chat template, streaming decode.

Prompts are tokenized exactly as the model's own Hugging Face tokenizer does by default (special tokens
included); generated tokens are decoded incrementally, so a multi-byte character split across tokens is
emitted once it is whole, and per-token work stays O(1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtllm_peft.errors import EngineError


@dataclass
class ChatPrompt:
    token_ids: list[int]
    text: str


class Tokenizer:
    """Encode prompts and chats; decode streams. Wraps the engine directory's HF fast tokenizer."""

    def __init__(self, engine_dir: Path):
        from transformers import AutoTokenizer

        try:
            self._hf = AutoTokenizer.from_pretrained(str(engine_dir))
        except (OSError, ValueError) as e:
            raise EngineError(f"{engine_dir}: no usable tokenizer ({e})") from None
        if not getattr(self._hf, "is_fast", False):
            raise EngineError(f"{engine_dir}: the tokenizer must be a fast (tokenizer.json) tokenizer")
        self._backend = self._hf.backend_tokenizer
        self.eos_token_id: int | None = self._hf.eos_token_id
        self.pad_token_id: int | None = self._hf.pad_token_id
        self.has_chat_template = bool(getattr(self._hf, "chat_template", None))
        self.vocab_size: int = len(self._hf)
        # no token stands for more characters than its longest vocabulary string (byte-level and
        # sentencepiece vocabularies spell each input character with at least one character), doubled
        # for normalizers that fold two characters into one: a bound, not an estimate
        self.max_token_chars: int = 2 * max((len(t) for t in self._hf.get_vocab()), default=1)
        self._token_texts: dict[int, str] = {}  # token_text's answers: at most one entry per token id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completion prompt, special tokens as the model's tokenizer adds them (or none)."""
        return list(self._hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    @property
    def chat_template(self) -> str | None:
        """The template's source (tool calling reads which format it uses)."""
        t = getattr(self._hf, "chat_template", None)
        return t if isinstance(t, str) else None

    @property
    def template_knows_tools(self) -> bool:
        return "tools" in (self.chat_template or "")

    def apply_chat_template(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        """The chat prompt with the generation prompt appended (and `tools`, as transformers renders them);
        ValueError for a template error."""
        if not self.has_chat_template:
            raise ValueError("this model has no chat template: use /v1/completions")
        text = self._hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        # the template already holds any BOS: do not add special tokens twice
        ids = list(self._hf(text, add_special_tokens=False)["input_ids"])
        return ChatPrompt(token_ids=ids, text=text)

    def decode(self, token_ids: list[int]) -> str:
        return self._hf.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """Text of one token on its own (for logprobs entries). Remembered: a streamed token asks for it
        once or twice (its entry, its top alternatives), and a decode call costs far more than a lookup."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._hf.decode([token_id], skip_special_tokens=False)
            if 0 <= token_id < self.vocab_size:  # bounded by the vocabulary
                self._token_texts[token_id] = text
        return text

    def stream(self) -> Detokenizer:
        return Detokenizer(self._backend)


class Detokenizer:
    """Incremental decoding of one sequence: feed token ids, get the new text (possibly '')."""

    def __init__(self, backend):
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # tokens fed since the last text (an incomplete UTF-8 character)

    def step(self, token_id: int) -> str:
        text = self._stream.step(self._backend, token_id) or ""
        self._pending = [] if text else [*self._pending, token_id]
        return text

    def flush(self) -> str:
        """At the end of the sequence: the text of tokens still held back (U+FFFD for bytes that never made a
        whole character, as a whole-sequence decode renders them), so the last chunk is not silently short."""
        pending, self._pending = self._pending, []
        return self._backend.decode(pending, skip_special_tokens=True) if pending else ""
