"""The listener pool's monitor restarts each crashed listener process on that slot's own back-off: a slot
that keeps failing and waits out a long pause does not hold up the restart of another."""

from __future__ import annotations

import threading
import time

from dicom_node.receive.listener_pool import ListenerPool


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class _Counts:
    def clear(self, slot: int) -> None:
        pass


def test_each_slot_restarts_on_its_own_pause() -> None:
    pool = ListenerPool(cfg=None, processes=2)  # type: ignore[arg-type]  # _spawn is replaced: no config read
    pool.counts = _Counts()  # type: ignore[assignment]
    spawned: list[tuple[int, float]] = []
    lock = threading.Lock()

    def spawn(slot: int) -> None:
        with lock:
            spawned.append((slot, time.monotonic()))
            pool.procs[slot] = _Proc(1000 + len(spawned))
            pool._started_at[slot] = time.monotonic()

    pool._spawn = spawn  # type: ignore[method-assign]
    now = time.monotonic()
    pool.procs = [_Proc(1), _Proc(2)]  # type: ignore[list-item]
    pool._started_at = [now, now - 60]
    pool._failures = [5, 0]  # slot 0 failed fast 5 times in a row: its next pause is 8 s
    watcher = threading.Thread(target=pool._watch, daemon=True)
    watcher.start()
    try:
        pool.procs[0].returncode = 1  # type: ignore[union-attr]
        time.sleep(0.7)  # the monitor has seen slot 0 exit and is in its 8 s pause
        pool.procs[1].returncode = -9  # type: ignore[union-attr]
        crashed = time.monotonic()
        deadline = crashed + 5
        while time.monotonic() < deadline and not any(slot == 1 for slot, _ in spawned):
            time.sleep(0.05)
        with lock:
            restarts = list(spawned)
        assert [slot for slot, _ in restarts] == [1], restarts
        assert restarts[0][1] - crashed < 4  # its own 0.5 s pause plus one look (~1 s), not slot 0's 8 s
        assert pool.procs[0] is None  # slot 0 still waits out its pause
    finally:
        pool._stop.set()
        watcher.join(5)
    assert not watcher.is_alive()
