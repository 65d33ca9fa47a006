"""Mailbox: the only state the executor's caller threads and engine thread share."""

from __future__ import annotations

import threading
import time

import pytest

from trtllm_peft.errors import TrtllmPeftError
from trtllm_peft.executor.api import Request, Response
from trtllm_peft.executor.torch.mailbox import Mailbox
from trtllm_peft.executor.torch.sequence import Sequence


def seq(i: int) -> Sequence:
    return Sequence(id=i, request=Request([1], 1), sampling=None, max_new=1)


def test_work_flows_in_and_responses_flow_out_per_request():
    box = Mailbox()
    box.post([seq(1), seq(2)])
    box.cancel(2)
    new, cancel = box.take_work(busy=False)
    assert [s.id for s in new] == [1, 2] and cancel == {2}
    box.cancelled({2})
    box.deliver([Response(request_id=1), Response(request_id=2), Response(request_id=1)])
    assert box.num_ready(None) == 3 and box.num_ready(1) == 2
    assert [r.request_id for r in box.collect(1, 0, lambda: True)] == [1, 1]
    assert [r.request_id for r in box.collect(None, 0, lambda: True)] == [2]
    assert box.take_work(busy=True) == ([], set())  # busy: returns at once, the cancellation is gone


def test_an_idle_engine_sleeps_until_work_arrives_and_stop_ends_it():
    box, got = Mailbox(), []
    engine = threading.Thread(target=lambda: got.extend([box.take_work(False), box.take_work(False)]))
    engine.start()
    time.sleep(0.05)
    assert got == []  # asleep: nothing posted
    box.post([seq(7)])
    time.sleep(0.05)
    box.stop()
    engine.join(timeout=5)
    assert [s.id for s in got[0][0]] == [7] and got[1] is None


def test_collect_times_out_empty_and_returns_once_the_engine_has_stopped():
    box = Mailbox()
    t = time.monotonic()
    assert box.collect(None, 0.05, lambda: True) == [] and time.monotonic() - t >= 0.05
    box.stop()
    assert box.collect(None, None, lambda: False) == []  # no hang waiting on a dead engine
    with pytest.raises(TrtllmPeftError, match="shut down"):
        box.post([seq(1)])


def test_stats_are_kept_up_to_a_bound_and_taken_once():
    box = Mailbox(stats_kept=2)
    for i in range(3):
        box.deliver([], stats=i)
    assert box.take_stats() == [1, 2] and box.take_stats() == []
