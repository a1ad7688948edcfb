"""The index writers' lock excludes other processes and other threads until it is released."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from storage.locks import WriterLock

HOLDER = """
import sys
from pathlib import Path
from storage.locks import WriterLock
with WriterLock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _acquire_in_thread(lock: WriterLock) -> tuple[threading.Event, threading.Event]:
    got, release = threading.Event(), threading.Event()

    def take() -> None:
        with lock:
            got.set()
            release.wait(10)

    threading.Thread(target=take, daemon=True).start()
    return got, release


def test_another_process_holding_it_keeps_us_waiting_until_it_lets_go(tmp_path: Path) -> None:
    path = tmp_path / "node.db.writers.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock = WriterLock(path)
        got, release = _acquire_in_thread(lock)
        assert not got.wait(0.5)  # the other process has it
        holder.communicate("go\n", timeout=10)
        assert got.wait(10)
        release.set()
    finally:
        holder.kill()


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "x.lock")
    first_got, first_release = _acquire_in_thread(lock)
    assert first_got.wait(5)
    second_got, second_release = _acquire_in_thread(lock)
    assert not second_got.wait(0.3)
    first_release.set()
    assert second_got.wait(5)
    second_release.set()
