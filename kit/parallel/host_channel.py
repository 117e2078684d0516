"""A ring of step headers in shared memory: rank 0 writes, the ranks on its host read.

    ring = HeaderRing.create(world_size, width=20)          # rank 0 (a new /dev/shm segment)
    ring.spec()                                              # name, host, pid: what the other ranks need
    ring, why = HeaderRing.attach(spec, rank)                # rank r > 0 (None, why when it cannot)
    ring.write(header)                                       # rank 0: one message of `width` int64 words
    header = ring.read()                                     # rank r: the next message, in order

It carries the 20-slot step header of kit/parallel/protocol.py, so that a rank learns of
a step from its host (a few microseconds) instead of from a device-to-host copy of a
broadcast queued behind rank 0's previous step.

Layout (int64 words, in rows of 8 words = one cache line each):

    row 0          magic, slots, world size, width
    row 1 + r      rank r's read counter (messages it has read; rank 0's row is unused)
    then `slots` slots, each `ceil((1 + width) / 8)` rows: the ready word, then the header

Message w (1, 2, ...) goes to slot (w - 1) % slots. Rank 0 waits until every reader's
counter is >= w - slots (so it never overwrites a slot that a rank has not read), writes
the header words, then the ready word = w, last. A reader waiting for message w waits for
the ready word == w, copies the header, checks the ready word again (still w: not
overwritten while it read) and sets its counter to w.

NOTE: a memory fence between the header and the ready word (and between reading the ready
word and the header): CPython has none to call, so it takes a `threading.Lock` (its atomic
instructions order the stores and loads around them on x86 and Arm alike, as vLLM's
shared-memory queue does).

Waiting: a busy spin for `spin_s` (a rank in a run of steps answers within microseconds),
then sleeps doubling from 20 us to 1 ms (an idle rank does not burn a core). While asleep,
a reader checks that rank 0's process is still there, and rank 0 checks the readers it
waits for (a process gone raises `PeerGone`, naming it); rank 0 gives up after `timeout_s`, or
as soon as `stop_when()` gives a reason (its watchdog has marked the engine broken).
A process is named by its pid and its start time (/proc/PID/stat), so a reused pid, or a
rank in another pid namespace, is not mistaken for it.

Start-up (`agree_rank0` / `agree_rank`, after the setup that carries `spec()`): every rank
tries to attach and says so (`gather_object`); rank 0 uses the ring only if all did (ranks
on several hosts under torchrun fall back to the broadcast path) and broadcasts the verdict.
`KIT_TP_CHANNEL=broadcast` skips the ring, `=shared-memory` makes a failed attach an error.

Lifetime: rank 0 creates the segment (`multiprocessing.shared_memory`, which also unlinks
it if rank 0 dies before the ranks attach); every rank maps it; once all have reported,
rank 0 unlinks the name (`unlink`). The mappings stay valid, and nothing is left in
/dev/shm however any process ends later. Linux only: elsewhere `attach` says why not and
the step headers travel by broadcast.
"""

from __future__ import annotations

import mmap
import os
import secrets
import socket
import threading
import time
from multiprocessing import shared_memory
from typing import Any, Callable

import numpy as np

__all__ = ["HeaderRing", "PeerGone", "process_start_time", "channel_mode", "spin_seconds", "agree_rank0",
           "agree_rank", "SHM_PREFIX", "CHANNEL_ENV", "CHANNEL_MODES"]

SHM_PREFIX = "kit-tp-"  # /dev/shm/kit-tp-<pid>-<hex>
CHANNEL_ENV = "KIT_TP_CHANNEL"  # auto (default) | shared-memory | broadcast: how step headers travel
CHANNEL_MODES = ("auto", "shared-memory", "broadcast")
MAGIC = 0x6B69747470310001  # "kittp1", version 1
ROW = 8  # int64 words in a cache line
_FENCE = threading.Lock()


def _fence() -> None:
    with _FENCE:
        pass


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process `pid`, or None (gone, a zombie, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()  # NOTE: the name before ')' may hold spaces
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class PeerGone(RuntimeError):
    """The process on the other side of the ring has exited."""


class HeaderRing:
    """One process's mapping of the ring: rank 0 writes, rank r > 0 reads."""

    def __init__(self, words: np.ndarray, keep: Any, rank: int, name: str, *, spin_s: float,
                 timeout_s: float | None, peers: dict[int, tuple[int, int]] | None = None,
                 owner: shared_memory.SharedMemory | None = None) -> None:
        self.words, self._keep, self._owner = words, keep, owner
        self.rank, self.name = rank, name
        self.slots, self.world_size, self.width = int(words[1]), int(words[2]), int(words[3])
        self._slot_words = ROW * -(-(1 + self.width) // ROW)
        self._base = ROW * (1 + self.world_size)
        self.spin_s, self.timeout_s = spin_s, timeout_s
        self.peers = dict(peers or {})  # rank -> (pid, start time): the processes whose death ends a wait
        self.done = 0  # messages written (rank 0) or read (rank r)
        # a wait that is asleep also ends (RuntimeError with its text) once this says why: rank 0's watchdog
        # marking the engine broken, so a wait behind a stuck rank ends with the watchdog, not at `timeout_s`
        self.stop_when: Callable[[], str | None] | None = None
        self.unlinked = owner is None

    # ------------------------------------------------------------------ start
    @classmethod
    def create(cls, world_size: int, width: int, slots: int = 8, *, spin_s: float = 0.02,
               timeout_s: float | None = None) -> "HeaderRing":
        """Rank 0: a new segment for `world_size` ranks and messages of `width` words."""
        if slots < 2:
            raise ValueError(f"HeaderRing: slots must be >= 2, got {slots}")
        n = ROW * (1 + world_size) + slots * ROW * -(-(1 + width) // ROW)
        name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=8 * n)
        words = np.ndarray((n,), dtype=np.int64, buffer=shm.buf)
        words[:] = 0
        words[1:4] = (slots, world_size, width)
        _fence()
        words[0] = MAGIC
        return cls(words, shm, 0, name, spin_s=spin_s, timeout_s=timeout_s, owner=shm)

    def spec(self) -> dict[str, Any]:
        """What another rank needs to attach (sent in the start-up setup)."""
        return {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "start_time": process_start_time(os.getpid()), "words": int(self.words.shape[0])}

    @classmethod
    def attach(cls, spec: dict[str, Any], rank: int, *, spin_s: float = 0.02) -> tuple["HeaderRing | None", str]:
        """Rank r > 0: map rank 0's segment; (None, why) when this rank is not on rank 0's host (or cannot map it)."""
        if spec["host"] != socket.gethostname():
            return None, f"rank {rank} is on host {socket.gethostname()!r}, rank 0 on {spec['host']!r}"
        if spec["start_time"] is None or process_start_time(spec["pid"]) != spec["start_time"]:
            return None, f"rank {rank} does not see rank 0's process (pid {spec['pid']}) in /proc"
        try:  # NOTE: mapped by hand: a SharedMemory here would register it with a resource tracker that
            # spawned ranks share with rank 0, whose unlink would then be reported twice
            fd = os.open(f"/dev/shm/{spec['name']}", os.O_RDWR)
            try:
                mem = mmap.mmap(fd, 8 * spec["words"])
            finally:
                os.close(fd)
        except (OSError, ValueError) as e:
            return None, f"rank {rank} cannot map /dev/shm/{spec['name']} ({type(e).__name__}: {e})"
        words = np.ndarray((spec["words"],), dtype=np.int64, buffer=mem)
        if int(words[0]) != MAGIC or rank >= int(words[2]):
            del words
            mem.close()
            return None, f"rank {rank}: /dev/shm/{spec['name']} is not this group's ring"
        ring = cls(words, mem, rank, spec["name"], spin_s=spin_s, timeout_s=None,
                   peers={0: (spec["pid"], spec["start_time"])})
        return ring, "attached"

    # ------------------------------------------------------------- messages
    def _slot(self, w: int) -> int:
        return self._base + ((w - 1) % self.slots) * self._slot_words

    def _counter(self, rank: int) -> int:
        return ROW * (1 + rank)

    def write(self, header: list[int]) -> None:
        """Rank 0: the next message; waits only while a reader is a whole ring behind."""
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")
        if len(header) != self.width:
            raise ValueError(f"HeaderRing.write: a message has {self.width} words, got {len(header)}")
        w = self.done + 1
        words, oldest = self.words, w - self.slots
        counters = [self._counter(r) for r in range(1, self.world_size)]
        if oldest > 0 and any(words[c] < oldest for c in counters):
            self._wait(lambda: all(words[c] >= oldest for c in counters),
                       lambda: [r for r in range(1, self.world_size) if words[self._counter(r)] < oldest],
                       f"rank 0 waits for message {oldest} to be read before it writes message {w}")
        at = self._slot(w)
        words[at + 1:at + 1 + self.width] = header
        _fence()
        words[at] = w  # the ready word, last
        self.done = w

    def read(self) -> list[int]:
        """Rank r: the next message (its `width` words)."""
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")
        w = self.done + 1
        words, at = self.words, self._slot(w)
        if words[at] != w:
            self._wait(lambda: words[at] == w, lambda: [0], f"rank {self.rank} waits for message {w}")
        _fence()
        header = words[at + 1:at + 1 + self.width].tolist()
        _fence()
        if words[at] != w:
            raise RuntimeError(f"rank {self.rank}: message {w} was overwritten while this rank read it (slot "
                               f"{(w - 1) % self.slots} now holds message {int(words[at])})")
        words[self._counter(self.rank)] = w
        self.done = w
        return header

    def _wait(self, ready, lagging, what: str) -> None:
        """Spin on `ready()` for `spin_s`, then sleep in growing naps, checking the `lagging()` ranks' processes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.spin_s:
            if ready():
                return
        nap = 20e-6
        while not ready():
            time.sleep(nap)
            nap = min(2 * nap, 1e-3)
            for r in lagging():
                pid, start = self.peers.get(r, (None, None))
                if pid is not None and process_start_time(pid) != start:
                    raise PeerGone(f"rank {r} (pid {pid}) has exited: {what}")
            why = self.stop_when() if self.stop_when is not None else None
            if why:
                raise RuntimeError(f"{what}: given up ({why})")
            if self.timeout_s is not None and time.monotonic() - t0 > self.timeout_s:
                raise TimeoutError(f"{what}: nothing after {self.timeout_s:.0f} s")

    # ------------------------------------------------------------- lifetime
    def unlink(self) -> None:
        """Rank 0: remove the name from /dev/shm (every mapping stays valid)."""
        if self._owner is not None:
            try:
                self._owner.unlink()
            except FileNotFoundError:
                pass
        self.unlinked = True

    def close(self) -> None:
        """Unmap this process's view (rank 0 also unlinks the name, if not done yet)."""
        if self._keep is None:
            return
        if not self.unlinked:
            self.unlink()
        keep, self._keep = self._keep, None
        self.words = np.zeros(0, dtype=np.int64)  # NOTE: the view must go before the mapping can close
        try:
            keep.close()
        except BufferError:  # a view still held somewhere: the mapping goes with the process
            pass

    @property
    def closed(self) -> bool:
        return self._keep is None

    def __repr__(self) -> str:
        role = "writer" if self.rank == 0 else f"reader rank {self.rank}"
        return (f"HeaderRing(/dev/shm/{self.name}, {self.slots} slots of {self.width} words, {role}, "
                f"{self.done} messages)")


def channel_mode(value: str | None = None) -> str:
    """The step-channel mode: `value`, else `KIT_TP_CHANNEL`, else 'auto'; checked."""
    v = value if value is not None else (os.environ.get(CHANNEL_ENV) or "auto")
    if v not in CHANNEL_MODES:
        raise ValueError(f"step channel {v!r} ({CHANNEL_ENV} or step_channel=): must be one of {CHANNEL_MODES}")
    return v


def spin_seconds(device_type: str) -> float:
    """How long a wait spins before it sleeps: a GPU step's worth (a rank in a run of steps answers at once);
    on the CPU hardly at all (the ranks share the host's cores with the work itself)."""
    return 0.02 if device_type == "cuda" else 0.0005


def _me(rank: int, attached: bool, why: str) -> dict[str, Any]:
    return {"rank": rank, "attached": attached, "why": why, "pid": os.getpid(),
            "start_time": process_start_time(os.getpid())}


def agree_rank0(comm: Any, ring: HeaderRing, mode: str) -> tuple["HeaderRing | None", str]:
    """Rank 0: gather whether every rank attached, broadcast the verdict, unlink the name (always).
    Returns (the ring, or None for the broadcast path; why)."""
    try:
        reports = comm.gather_object(_me(0, True, "created"))
        missing = [r for r in reports if not r["attached"]]
        why = "every rank mapped the ring" if not missing else "; ".join(r["why"] for r in missing)
        comm.broadcast_object({"use": not missing, "why": why})
    finally:
        ring.unlink()
    if missing:
        ring.close()
        if mode == "shared-memory":
            raise RuntimeError(f"{CHANNEL_ENV}=shared-memory, but {why}")
        return None, why
    ring.peers = {r["rank"]: (r["pid"], r["start_time"]) for r in reports[1:]}
    return ring, why


def agree_rank(comm: Any, spec: dict[str, Any], spin_s: float) -> HeaderRing | None:
    """Rank r > 0: attach, report, and keep the ring only if rank 0 says every rank attached."""
    ring, why = HeaderRing.attach(spec, comm.rank, spin_s=spin_s)
    comm.gather_object(_me(comm.rank, ring is not None, why))
    verdict = comm.broadcast_object()
    if not verdict["use"] and ring is not None:
        ring.close()
        return None
    return ring
