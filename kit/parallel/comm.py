"""The tensor-parallel process group and the collectives a sharded model calls.

`TensorParallelComm` wraps `torch.distributed` (NCCL on GPUs, gloo on the CPU) with the
three collectives tensor parallelism needs, each named after the layer that calls it:

    all_reduce(partial, layer)    row-parallel o_proj / down, vocab-parallel embedding
    gather_logits(logits, layer)  the lm_head's vocabulary slices -> rank 0's full logits
    broadcast(buffer)             rank 0's step message to every rank (kit/parallel/protocol.py)

With `timing` on, each collective is timed (CUDA events on a GPU, `perf_counter` on the
CPU, where gloo is synchronous) and `take_timings()` returns one row per call:
`layer, op, latency_ms, bytes`. Inside a CUDA-graph capture nothing is timed.

Every collective issued from Python is counted (`count`; the step message carries rank
0's count, so a rank that ran different collectives is caught at the next message) and,
with `KIT_TP_TRACE=DIR` set, written as one flushed line to `DIR/rank{r}.log`:
`seconds  #count  op  layer  shape  dtype` (step messages too), so after a hang the
last line of each rank's file says where it stopped. Collectives replayed inside a CUDA
graph are not issued from Python: they are counted when the graph is captured.

NOTE: the logits are gathered with `gather` (to rank 0 only) on gloo; NCCL uses
`all_gather_into_tensor`, which CUDA graphs capture (its bytes over NVLink are the same).
NOTE: NCCL's NVLink-multicast settings (`NCCL_NVLS_ENABLE`) are left as the machine has them.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["TensorParallelComm", "free_port", "launched_by_torchrun", "TIMING_COLUMNS", "TRACE_ENV"]

TIMING_COLUMNS = ("layer", "op", "latency_ms", "bytes")
TRACE_ENV = "KIT_TP_TRACE"  # a directory: every rank writes its collectives to rank{r}.log there


def free_port() -> int:
    """A TCP port free on this host now (the rendezvous of a spawned group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelComm:
    """One rank's handle on the default process group of `world_size` ranks."""

    def __init__(self, rank: int, world_size: int, device: torch.device, full_vocab_size: int | None = None) -> None:
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.full_vocab_size = full_vocab_size  # set once the model is known: logits are cut to it
        self.timing = False
        self._records: list[tuple[str, str, Any, int]] = []
        self.count = 0  # collectives issued from Python on this rank (the same on every rank, or a bug)
        self._t0 = time.monotonic()
        trace_dir = os.environ.get(TRACE_ENV)
        self._trace = None
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            self._trace = open(os.path.join(trace_dir, f"rank{rank}.log"), "a", buffering=1)
            self.note(f"rank {rank} of {world_size} on {self.device} ({self.backend}), pid {os.getpid()}")

    @property
    def tracing(self) -> bool:
        """True when `KIT_TP_TRACE` gave this rank a trace file."""
        return self._trace is not None

    def note(self, text: str) -> None:
        """A line in this rank's trace file (when `KIT_TP_TRACE` is set)."""
        if self._trace is not None:
            self._trace.write(f"{time.monotonic() - self._t0:10.4f}  {text}\n")

    def _issue(self, op: str, layer: str, t: torch.Tensor | None = None) -> None:
        self.count += 1
        if self._trace is not None:
            shape = "" if t is None else f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            self.note(f"#{self.count} {op} {layer} {shape}{' (graph capture)' if capturing else ''}")

    @classmethod
    def init(cls, rank: int, world_size: int, device: torch.device | str, init_method: str = "env://",
             timeout_s: float = 120.0) -> "TensorParallelComm":
        """Join (create) the default process group: NCCL for a CUDA device, gloo for the CPU."""
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw: dict[str, Any] = {}
        if backend == "nccl":
            kw["device_id"] = device  # eager NCCL communicator on this rank's GPU
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
        return cls(rank, world_size, device)

    @staticmethod
    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ collectives
    def _timed(self) -> bool:
        return self.timing and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    def _start(self) -> Any:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _stop(self, layer: str, op: str, start: Any, nbytes: int) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._records.append((layer, op, (start, end), nbytes))
        else:
            self._records.append((layer, op, 1e3 * (time.perf_counter() - start), nbytes))

    def all_reduce(self, t: torch.Tensor, layer: str = "") -> torch.Tensor:
        """Sum `t` over the ranks, in place; returns it (inside an NVTX range `rank{r}/{layer}/all_reduce`)."""
        self._issue("all_reduce", layer, t)
        timed = self._timed()
        start = self._start() if timed else None
        ranged = self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
        if ranged:  # NOTE: per rank, so Nsight Systems shows which rank waited in which layer
            torch.cuda.nvtx.range_push(f"rank{self.rank}/{layer}/all_reduce")
        dist.all_reduce(t)
        if ranged:
            torch.cuda.nvtx.range_pop()
        if timed:
            self._stop(layer, "all_reduce", start, t.numel() * t.element_size())
        return t

    def gather_logits(self, logits: torch.Tensor, layer: str = "lm_head") -> torch.Tensor:
        """(n, vocab / tp) on every rank -> (n, vocab) on rank 0 (other ranks get their own slice back)."""
        self._issue("gather", layer, logits)
        timed = self._timed()
        start = self._start() if timed else None
        logits = logits.contiguous()
        n, part = logits.shape
        if self.backend == "nccl":
            out = torch.empty((self.world_size, n, part), dtype=logits.dtype, device=logits.device)
            dist.all_gather_into_tensor(out, logits)
        else:
            out = torch.empty((self.world_size, n, part), dtype=logits.dtype) if self.rank == 0 else None
            dist.gather(logits, list(out.unbind(0)) if out is not None else None, dst=0)
        if timed:
            self._stop(layer, "gather", start, logits.numel() * logits.element_size() * self.world_size)
        if self.rank != 0:
            return logits
        full = out.permute(1, 0, 2).reshape(n, self.world_size * part)  # (n, padded vocab)
        return full[:, :self.full_vocab_size] if self.full_vocab_size else full

    def broadcast(self, t: torch.Tensor, what: str = "step message") -> torch.Tensor:
        self._issue("broadcast", what, t)
        dist.broadcast(t, src=0)
        return t

    def scatter(self, out: torch.Tensor, parts: list[torch.Tensor] | None) -> torch.Tensor:
        """Rank 0 hands part r to rank r (each rank's weights at start-up)."""
        self._issue("scatter", "weights", out)
        dist.scatter(out, parts if self.rank == 0 else None, src=0)
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        box = [obj]
        self._issue("broadcast_object", "setup")
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def gather_object(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == 0 else None
        self._issue("gather_object", "timings")
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        self._issue("barrier", "")
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    # ----------------------------------------------------------------- timing
    def take_timings(self) -> list[dict[str, Any]]:
        """The timed collectives since the last call, as rows (`TIMING_COLUMNS`)."""
        if self.device.type == "cuda" and self._records:
            torch.cuda.synchronize(self.device)
        rows = [{"layer": layer, "op": op,
                 "latency_ms": v[0].elapsed_time(v[1]) if isinstance(v, tuple) else v, "bytes": b}
                for layer, op, v, b in self._records]
        self._records = []
        return rows

    def __repr__(self) -> str:
        return f"TensorParallelComm(rank {self.rank} of {self.world_size}, {self.backend}, {self.device})"


def launched_by_torchrun() -> bool:
    """True in a process started by torchrun (it sets these variables for every rank)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))

