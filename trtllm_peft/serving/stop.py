"""Stop strings on streamed text: cut at the first match, and never emit text that may begin one."""

from __future__ import annotations


class StopMatcher:
    """Feed text chunks; get back what is safe to emit, and whether a stop string was hit.

    While no stop string has matched, the last `longest - 1` characters are held back, because they may
    be the start of a stop string that the next chunk completes (OpenAI semantics: the stop string itself
    is never returned).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text that can be emitted now."""
        if self.stopped:
            return ""
        self._pending += text
        if not self.stops:
            out, self._pending = self._pending, ""
            return out
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            index, self.matched = min(hits)
            self.stopped = True
            out, self._pending = self._pending[:index], ""
            return out
        cut = max(len(self._pending) - self._hold, 0)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail, once the sequence ended without a match."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
