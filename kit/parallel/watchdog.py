"""A stage watchdog per rank: a hang becomes a message naming the rank and the step.

Every blocking thing a rank does (joining the group, receiving its shard, waiting for a
step message, running a step, capturing graphs) runs inside `watchdog.stage(name)`. A
thread checks once a second; a stage older than `timeout_s` is reported once on stderr:

    [kit-tp 12:03:04] rank 1: 'step 57 FORWARD (decode, 64 seqs)' has not finished after 120.0 s
                      (last finished: 'step 56 FORWARD (decode, 64 seqs)'); stacks of every thread follow

followed by the stacks of every thread (`faulthandler`), then `on_timeout(message)` runs
(rank 0 marks its engine broken and aborts the NCCL communicator so that a rank blocked
in a collective returns with an error; a worker rank does the same, then exits).

NOTE: why our own thread and not only the process group's timeout: collectives recorded
in a CUDA graph are invisible to NCCL's watchdog (a replay that waits for a peer that
never comes spins on the GPU forever), and a rank blocked in `cudaStreamSynchronize` or
in a host copy behind such a replay never returns to Python.
"""

from __future__ import annotations

import faulthandler
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.distributed as dist

__all__ = ["StageWatchdog", "log", "abort_group"]


def log(text: str) -> None:
    """One timestamped line on stderr, flushed (a hang leaves every line before it)."""
    print(f"[kit-tp {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def abort_group() -> str:
    """Abort the default group's NCCL communicators (a rank blocked in a collective then returns with an
    error); returns what was done. Gloo needs nothing: its collectives time out by themselves."""
    if not dist.is_initialized():
        return "no process group"
    try:
        if dist.get_backend() != "nccl":
            return f"{dist.get_backend()} group left as it is (its collectives time out)"
        # NOTE: the group's own abort (ncclCommAbort): in-flight NCCL kernels, graph-replayed ones too,
        # return and the blocked rank gets an error; the group stays registered, so shutdown still runs
        dist.group.WORLD.abort()
        return "NCCL communicators aborted"
    except Exception as e:  # noqa: BLE001 - best effort: the message and the stacks are already out
        return f"could not abort the NCCL communicators ({type(e).__name__}: {e})"


class StageWatchdog:
    """Times the current stage of one rank; reports a stage that outlives `timeout_s` (once)."""

    def __init__(self, rank: int, timeout_s: float, on_timeout: Callable[[str], None] | None = None,
                 poll_s: float = 1.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"StageWatchdog: timeout_s must be > 0, got {timeout_s}")
        self.rank, self.timeout_s, self.on_timeout, self.poll_s = rank, timeout_s, on_timeout, poll_s
        self.current: tuple[str, float] | None = None
        self.last_finished = "(none)"
        self.fired: list[str] = []  # the messages of the stages reported
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"kit-tp-watchdog-rank{rank}", daemon=True)
        self._thread.start()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        outer = self.current
        self.current = (name, time.monotonic())
        try:
            yield
        finally:
            self.last_finished = name
            self.current = outer

    def _watch(self) -> None:
        reported: tuple[str, float] | None = None
        while not self._stop.wait(self.poll_s):
            cur = self.current
            if cur is None or cur is reported:
                continue
            age = time.monotonic() - cur[1]
            if age < self.timeout_s:
                continue
            reported = cur
            msg = (f"rank {self.rank}: {cur[0]!r} has not finished after {age:.1f} s "
                   f"(last finished: {self.last_finished!r})")
            self.fired.append(msg)
            log(msg + "; stacks of every thread follow")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            if self.on_timeout is not None:
                try:
                    self.on_timeout(msg)
                except Exception as e:  # noqa: BLE001 - a watchdog must keep watching
                    log(f"rank {self.rank}: the timeout handler failed: {type(e).__name__}: {e}")

    def stop(self) -> None:
        self._stop.set()

    def __repr__(self) -> str:
        cur = "idle" if self.current is None else repr(self.current[0])
        return f"StageWatchdog(rank {self.rank}, timeout {self.timeout_s} s, now {cur})"
