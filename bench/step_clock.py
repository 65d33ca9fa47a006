"""Per-op timers for one engine iteration, shared by bench/decode_profile.py and bench/prefill_profile.py:
seconds per category for the iteration in progress, kept for the iterations of one kind (decode-only, or
those that prefill a chunk)."""

from __future__ import annotations

import time
from collections import defaultdict

import trtllm_peft.executor.torch.executor as executor_mod
import trtllm_peft.executor.torch.step as step_mod
from trtllm_peft.executor.torch import TorchExecutor


class Clock:
    """Seconds per category for the iteration in progress; `steps` keeps those of the iterations whose forward
    had prompt chunks (prefill=True) or had none (prefill=False). timer: wall seconds, or e.g. time.thread_time."""

    def __init__(self, prefill: bool, timer=time.perf_counter) -> None:
        self.prefill, self.timer = prefill, timer
        self.now: dict[str, float] = defaultdict(float)
        self.keep = False  # whether the iteration in progress is of the kind kept
        self.steps: list[dict[str, float]] = []

    def timed(self, name: str, fn):
        def run(*a, **kw):
            t = self.timer()
            try:
                return fn(*a, **kw)
            finally:
                self.now[name] += self.timer() - t

        return run


class TimedLinear:
    """A KernelLinear whose calls are timed under `name` (the model reads .bias; LoRA is off here)."""

    def __init__(self, inner, name: str, clock: Clock) -> None:
        self.bias = inner.bias
        self.call = clock.timed(name, inner.__call__)
        self.add_to = clock.timed(name, inner.add_to)

    def __call__(self, x):
        return self.call(x)


def time_iterations(ex: TorchExecutor, clock: Clock) -> None:
    """Time the executor's iterations ("iteration"), forwards ("forward"), sampling and run_step, and keep each
    iteration of clock's kind in clock.steps."""
    model, step, iteration = ex.model, ex.model.step, ex._iteration

    def model_step(ids, positions, chunks, *a, **kw):
        clock.keep = bool(chunks) == clock.prefill
        return clock.timed("forward", step)(ids, positions, chunks, *a, **kw)

    def timed_iteration(new, cancel):
        clock.now.clear()
        clock.keep = False
        clock.timed("iteration", iteration)(new, cancel)
        if clock.keep:
            clock.steps.append(dict(clock.now))

    model.step = model_step
    step_mod.take = clock.timed("sampling", step_mod.take)
    executor_mod.run_step = clock.timed("run_step", executor_mod.run_step)
    ex._iteration = timed_iteration
