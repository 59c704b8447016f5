"""Peak memory of a process and of the processes it starts, from /proc's VmHWM: the
high-water mark of a process's resident memory since its exec.

Not getrusage's `ru_maxrss`: Linux keeps that across execve, so a child started from a
large process reports its parent's size (a child of a 500 MB Python process reads 514
MB there and 15 MB in VmHWM), and RUSAGE_CHILDREN's is the largest of those inherited
figures. The bench's children are started from a process that has grown by then."""
from __future__ import annotations

import os
import threading


def high_water_mb(pid="self") -> float:
    """The process's peak resident memory since its exec, in MB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as children:
                    kids = [int(k) for k in children.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


class DescendantsPeak:
    """While open, the peak of each process this one starts (its workers), polled
    every `every_s`: a process's high-water mark only rises, so the last poll before
    it exits misses at most what it added in its last `every_s`."""

    def __init__(self, every_s: float = 0.2):
        self._every = every_s
        self._stop = threading.Event()
        self.peaks: dict[int, float] = {}
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "DescendantsPeak":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self._every):
            for pid in descendants(me):
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), high_water_mb(pid))

    @property
    def largest_mb(self) -> float:
        return max(self.peaks.values(), default=0.0)
