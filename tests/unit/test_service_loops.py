"""The service's loops: a step that did something wakes the next loop instead of leaving it to its poll."""

from __future__ import annotations

import threading

from dicom_node.service import _loop, _then_wake


def test_a_queued_job_wakes_the_worker_loop_long_before_its_poll() -> None:
    stop = threading.Event()
    wake_assembler, wake_worker = threading.Event(), threading.Event()
    queued = iter([0, 1])  # the assembler's first pass finds nothing, its second queues a job
    worker_ran = threading.Event()
    calls = {"worker": 0}

    def assembler() -> int:
        return next(queued, 0)

    def worker() -> bool:
        calls["worker"] += 1
        if calls["worker"] > 1:  # the first call is the loop's start; the second can only come from the wake
            worker_ran.set()
        return False

    threads = [
        threading.Thread(
            target=_loop,
            args=("assembler", _then_wake(assembler, wake_worker), 0.05, stop, wake_assembler),
            daemon=True,
        ),
        threading.Thread(target=_loop, args=("worker", worker, 3600.0, stop, wake_worker), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        assert worker_ran.wait(10), "the worker slept through its hour-long poll"
    finally:
        stop.set()
        wake_assembler.set()
        wake_worker.set()
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)


def test_an_idle_step_wakes_nobody() -> None:
    other = threading.Event()
    assert _then_wake(lambda: 0, other)() == 0 and not other.is_set()
    assert _then_wake(lambda: True, other)() is True and other.is_set()
