"""`Mailbox`: everything the executor's caller threads and its engine thread share, under one condition.

Callers post requests and cancellations and collect responses and iteration stats; the engine thread takes
new work (sleeping while it has none) and delivers responses. Nothing else crosses threads, so the engine's
own state (batch, KV cache, PEFT cache) needs no lock.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import IdType, IterationStats, Response
from trtllm_peft.executor.torch.sequence import Sequence


class Mailbox:
    def __init__(self, stats_kept: int = 1000) -> None:
        self._cv = threading.Condition()
        self._new: collections.deque[Sequence] = collections.deque()
        self._cancel: set[int] = set()
        self._responses: dict[int, list[Response]] = collections.defaultdict(list)
        self._stats: collections.deque[IterationStats] = collections.deque(maxlen=stats_kept)
        self.stopped = False

    # ---- caller side ---------------------------------------------------------------------------------

    def post(self, seqs: list[Sequence]) -> None:
        with self._cv:
            if self.stopped:
                raise TrtllmPeftError("the executor has been shut down")
            self._new.extend(seqs)
            self._cv.notify_all()

    def cancel(self, id: IdType) -> None:
        with self._cv:
            self._cancel.add(id)
            self._cv.notify_all()

    def collect(
        self, id: IdType | None, timeout: float | None, engine_alive: Callable[[], bool]
    ) -> list[Response]:
        """Responses ready (for all requests, or request `id`), waiting up to `timeout` s for the first one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self._ready(id):
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or (self.stopped and not engine_alive()):
                    return []
                self._cv.wait(left)
            if id is not None:
                return self._responses.pop(id, [])
            out = [r for rs in self._responses.values() for r in rs]
            self._responses.clear()
            return out

    def num_ready(self, id: IdType | None) -> int:
        with self._cv:
            if id is not None:
                return len(self._responses.get(id, []))
            return sum(len(r) for r in self._responses.values())

    def take_stats(self) -> list[IterationStats]:
        with self._cv:
            out = list(self._stats)
            self._stats.clear()
            return out

    def stop(self) -> None:
        with self._cv:
            self.stopped = True
            self._cv.notify_all()

    def _ready(self, id: IdType | None) -> bool:
        return bool(self._responses.get(id)) if id is not None else any(self._responses.values())

    # ---- engine side ---------------------------------------------------------------------------------

    def take_work(self, busy: bool) -> tuple[list[Sequence], set[int]] | None:
        """New requests and pending cancellations; sleeps while there are none and the engine is idle
        (`busy` False). None once stopped."""
        with self._cv:
            while not (self._new or busy or self.stopped):
                self._cv.wait()
            if self.stopped:
                return None
            new = list(self._new)
            self._new.clear()
            return new, set(self._cancel)

    def cancelled(self, ids: set[int]) -> None:
        """The engine has acted on these cancellations."""
        with self._cv:
            self._cancel -= ids

    def deliver(self, responses: list[Response], stats: IterationStats | None = None) -> None:
        with self._cv:
            for r in responses:
                self._responses[r.request_id].append(r)
            if stats is not None:
                self._stats.append(stats)
            if responses:
                self._cv.notify_all()
