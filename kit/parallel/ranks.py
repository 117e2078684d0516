"""Rank 0's side of the tensor-parallel processes: start them, talk to them, stop them.

    comm, procs, errors = launch_ranks(tp, device, timeout_s, from_torchrun=False)
    ranks = Ranks(comm, procs, StepChannel(comm, capacity), timeout_s, errors)
    ranks.send(header, payload)   # one step message (kit/parallel/protocol.py)
    ranks.shutdown()              # SHUTDOWN, leave the group, join or kill every rank

`DistributedEngine` (kit/parallel/distributed_engine.py) holds one `Ranks`; its finalizer
calls `shutdown`, so it must not reference the engine. A spawned rank that fails puts
`(rank, why)` on `errors` first, and `dead_rank()` quotes it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from kit.parallel.comm import TensorParallelComm, free_port
from kit.parallel.protocol import CAPTURE, HEADER, NOOP, SHUTDOWN, StepChannel
from kit.parallel.watchdog import StageWatchdog, abort_group, log
from kit.parallel.worker import group_timeout, leave_group, rank_device, torchrun_worker, worker_main

__all__ = ["Ranks", "launch_ranks"]


class Ranks:
    """The spawned processes, the group and the channel: what the finalizer must be able to stop.

    Also rank 0's watchdog (every engine call is a stage) and its keepalive: a thread that sends
    a NOOP when no message has gone out for `keepalive_s`, so that a waiting rank's receive never
    outlives the process group's timeout while rank 0 is merely idle (a notebook, an empty queue)."""

    def __init__(self, comm: TensorParallelComm, procs: list[Any], channel: StepChannel, timeout_s: float,
                 errors: Any = None) -> None:
        self.comm, self.procs, self.channel, self.errors = comm, procs, channel, errors
        self.lock = threading.RLock()
        self.broken: str | None = None
        self.closed = False
        self.pending_free: list[int] = []
        self.reported: dict[int, str] = {}
        # rank 0's backend's `release_graphs` (set by the engine; it references no engine, so the
        # engine's finalizer that holds this object can still run when the engine is collected)
        self.release_graphs: Callable[[], None] | None = None
        self.watchdog = StageWatchdog(0, timeout_s, self._on_timeout)
        self.keepalive_s = min(30.0, timeout_s / 4)
        self.last_send = time.monotonic()
        self._quiet = threading.Event()
        self._keepalive = threading.Thread(target=self._keep_alive, name="kit-tp-keepalive", daemon=True)
        self._keepalive.start()

    def _on_timeout(self, msg: str) -> None:
        self.broken = self.broken or f"tensor-parallel {msg}"
        log(f"rank 0: {abort_group()}")

    def _keep_alive(self) -> None:
        if self.comm.device.type == "cuda":
            torch.cuda.set_device(self.comm.device)  # NOTE: the current device is per thread
        while not self._quiet.wait(self.keepalive_s / 4):
            if time.monotonic() - self.last_send < self.keepalive_s or not self.lock.acquire(timeout=0.1):
                continue
            try:
                if self.closed or self.broken is not None:
                    return
                if time.monotonic() - self.last_send >= self.keepalive_s:
                    with self.watchdog.stage(f"send step {self.channel.seq + 1} NOOP (keepalive)"):
                        self.send([NOOP])
            except Exception as e:  # noqa: BLE001 - the next engine call reports the broken rank
                self.broken = self.broken or self.dead_rank(wait_s=5.0) or f"keepalive failed on rank 0 ({e})"
                return
            finally:
                self.lock.release()

    def _reports(self) -> None:
        while self.errors is not None and not self.errors.empty():
            rank, text = self.errors.get()
            self.reported.setdefault(rank, text)  # the first word of a rank is the cause

    def dead_rank(self, wait_s: float = 0.0) -> str | None:
        """A message naming the first rank whose process has exited, waiting up to `wait_s` for one."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if not p.is_alive():
                    self._reports()
                    why = f": {self.reported[rank]}" if rank in self.reported else ""
                    return f"tensor-parallel rank {rank} (pid {p.pid}) died with exit code {p.exitcode}{why}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def send(self, header: list[int], payload: torch.Tensor | None = None) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel engine is shut down")
        if self.broken is None:
            self.broken = self.dead_rank()
        if self.broken is not None:
            raise RuntimeError(f"{self.broken}; this engine cannot run any more (shut it down and start a new one)")
        header = list(header) + [0] * (HEADER - len(header))
        if self.pending_free:
            header[11] = self.pending_free.pop()
        self.channel.send(header, payload)
        self.last_send = time.monotonic()

    def send_capture(self, kv_cache: Any, sizes: tuple[int, ...], max_blocks: int, num_tokens: tuple[int, ...] = (),
                     max_seqs: int = 0) -> None:
        """Tell the other ranks to capture the same CUDA graphs over their cache `kv_cache.tp_id`: the decode
        batch sizes, then the mixed-step token buckets (for up to `max_seqs` sequences) in the payload."""
        self.send([CAPTURE, kv_cache.tp_id, len(sizes)] + [0] * 10 + [max_blocks, len(num_tokens), max_seqs],
                  torch.tensor(list(sizes) + list(num_tokens), dtype=torch.long))

    def fail(self, error: BaseException) -> RuntimeError:
        """The error a failed step raises: the dead rank's name if one died, else rank 0's own error."""
        self.broken = self.dead_rank(wait_s=5.0) or self.broken or f"a tensor-parallel step failed on rank 0 ({error})"
        return RuntimeError(self.broken)

    def shutdown(self, timeout: float = 30.0) -> None:
        self._quiet.set()
        said_bye = False
        with self.lock:
            if self.closed:
                return
            if self.broken is None and self.dead_rank() is None:
                try:
                    with self.watchdog.stage(f"send step {self.channel.seq + 1} SHUTDOWN"):
                        self.channel.send([SHUTDOWN])
                    said_bye = True
                except Exception:  # noqa: BLE001 - a peer gone at exit: the processes are stopped below
                    pass
            self.closed = True
            release, self.release_graphs = self.release_graphs, None
            if release is not None:
                try:  # NOTE: NCCL's destroy (and abort) waits until no CUDA graph holds its kernels
                    release()
                except Exception as e:  # noqa: BLE001 - the group is still left below
                    log(f"rank 0: releasing the CUDA graphs failed ({type(e).__name__}: {e})")
        self.watchdog.stop()
        # NOTE: every rank releases its graphs, meets the others in a barrier (after the SHUTDOWN, so all of
        # them are past their last step) and leaves the group together with them (not after joining them,
        # which deadlocks), in a thread so that a rank that never arrives cannot hang this process
        leaving = threading.Thread(target=leave_group, args=(self.comm, said_bye), name="kit-tp-destroy",
                                   daemon=True)
        leaving.start()
        leaving.join(timeout if self.broken is None else 1.0)
        if leaving.is_alive():
            log("rank 0: leaving the process group did not finish; the ranks are stopped without it")
        for p in self.procs:
            p.join(timeout if self.broken is None else 1.0)
            if p.is_alive():
                p.kill()
                p.join(10.0)


def launch_ranks(tp: int, device: torch.device, timeout_s: float,
            from_torchrun: bool) -> tuple[TensorParallelComm, list, Any]:
    """Start ranks 1..tp-1 (spawned, or already running under torchrun) and join the group as rank 0.
    Returns (rank 0's comm, the spawned processes, the queue on which a failing rank says why)."""
    if from_torchrun:
        if int(os.environ["WORLD_SIZE"]) != tp:
            raise ValueError(f"tensor_parallel_size={tp} must equal torchrun's WORLD_SIZE={os.environ['WORLD_SIZE']}")
        if int(os.environ["RANK"]) != 0:  # this process is a worker rank: serve rank 0, then exit
            torchrun_worker(device.type, timeout_s)
            sys.exit(0)
        comm = TensorParallelComm.init(0, tp, rank_device(device.type, int(os.environ["LOCAL_RANK"])), "env://",
                                       group_timeout(timeout_s))
        return comm, [], None
    init_method = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    # NOTE: a rank dies with the process that spawned it only when the main thread spawned it (the death
    # signal follows the spawning thread, and a notebook's or a server's start-up thread may end first)
    parent = os.getpid() if threading.current_thread() is threading.main_thread() else 0
    procs = []
    for rank in range(1, tp):
        p = ctx.Process(target=worker_main, args=(rank, tp, init_method, device.type, timeout_s, parent, errors),
                        daemon=True, name=f"kit-tp-rank{rank}")
        p.start()
        procs.append(p)
    try:
        return TensorParallelComm.init(0, tp, rank_device(device.type, 0), init_method,
                                       group_timeout(timeout_s)), procs, errors
    except BaseException:
        for p in procs:
            p.kill()
            p.join(10.0)
        raise
