"""The loop of every rank but rank 0: receive the shard, then serve step messages.

    worker_main(rank, world_size, init_method, device_type)   a spawned rank (torch.multiprocessing)
    serve(comm)                                                 the loop itself (spawned or torchrun)

Start-up: rank 0 broadcasts the shard's description (config, layers, quantization,
dtype, message capacity, tensor names / shapes / dtypes, its header ring's name and host)
and scatters each tensor's rank parts; a rank maps the ring if it is on rank 0's host
(kit/parallel/host_channel.py: all ranks or none use it) and builds its `Network`, its
`TensorParallelBackend` and its `Engine`. Then it waits for step messages
(kit/parallel/protocol.py; with the ring, a spin then short sleeps on the host, and nothing
in the loop waits for the device, so the rank's host stays ahead of its GPU): allocate a KV cache,
capture CUDA graphs over one, run a forward (its logits slice goes to rank 0 inside
the lm_head), report its collective timings, shut down. A rank whose peer dies sees its
collective fail (or, waiting on the ring, sees rank 0's process gone) and exits; rank 0
reports which rank died.

Hangs: every stage (start-up, each message, the wait for the next) runs under a
`StageWatchdog` (kit/parallel/watchdog.py); a failure is printed with the rank and the
step before the group is left (NCCL's destroy can wait forever for a peer, and the
traceback would otherwise never be printed); the stacks of every thread go to stderr at
a crash, at SIGTERM / SIGUSR1 and `KIT_TP_STACKS_AFTER` seconds after start; a spawned
rank gets SIGTERM when the process that started it exits.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from kit.engine import Engine
from kit.network import Network
from kit.parallel.comm import TensorParallelComm
from kit.parallel.engine_files import load_rank_weights
from kit.parallel.host_channel import agree_rank, spin_seconds
from kit.parallel.mapping import Mapping
from kit.parallel.protocol import (ALLOC, CAPTURE, FORWARD, KV_DTYPES, NOOP, SHUTDOWN, TIMINGS, StepChannel,
                                   describe, unpack_batch)
from kit.parallel.tp_backend import TensorParallelBackend
from kit.parallel.watchdog import StageWatchdog, abort_group, log

__all__ = ["worker_main", "torchrun_worker", "serve", "send_shards", "receive_shards", "rank_device",
           "group_timeout", "leave_group", "STACKS_ENV"]

STACKS_ENV = "KIT_TP_STACKS_AFTER"  # seconds: every rank dumps its stacks to stderr once, that long after start


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def send_shards(comm: TensorParallelComm, setup: dict[str, Any], shards: list[dict[str, torch.Tensor]]) -> None:
    """Rank 0: broadcast `setup` (with the tensor table added), then scatter every tensor's parts."""
    first = shards[0]
    setup = {**setup, "tensors": [(n, tuple(t.shape), t.dtype) for n, t in first.items()]}
    comm.broadcast_object(setup)
    for name, t in first.items():
        parts = [_as_bytes(s[name]).to(comm.device) for s in shards]
        comm.scatter(torch.empty_like(parts[0]), parts)


def receive_shards(comm: TensorParallelComm) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every other rank: the setup and this rank's tensors (on its device), scattered by rank 0 or read
    from this rank's file of a tensor-parallel engine directory."""
    setup = comm.broadcast_object()
    if "weights_dir" in setup:
        return setup, load_rank_weights(setup["weights_dir"], comm.rank, comm.device)
    weights: dict[str, torch.Tensor] = {}
    for name, shape, dtype in setup["tensors"]:
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        raw = comm.scatter(torch.empty(n, dtype=torch.uint8, device=comm.device), None)
        weights[name] = raw.view(dtype).reshape(shape)
    return setup, weights


def serve(comm: TensorParallelComm, watchdog: StageWatchdog | None = None) -> None:
    """Build this rank's engine from what rank 0 sends, then run step messages until SHUTDOWN.

    With a `watchdog`, each message is a stage ('step 12 FORWARD (...)') and so is the wait for
    the next one: rank 0 sends at least a NOOP every few seconds, so a long wait means rank 0 or
    the last step's collectives are stuck, and the watchdog says which step came last."""
    stage = watchdog.stage if watchdog is not None else _no_stage
    with stage("start-up: receive the shard"):
        setup, weights = receive_shards(comm)  # or only the setup, when every rank reads its own file
        spec = setup.get("host_channel")
        ring = None if spec is None else agree_rank(comm, spec, spin_seconds(comm.device.type))
        mapping = Mapping.tensor_parallel(comm.world_size, comm.rank)
        network = Network(setup["config"], setup["layers"], weights, name=setup["name"],
                          quant_config=setup["quant_config"])
        backend = TensorParallelBackend(network, mapping, comm, setup["full_vocab_size"], device=comm.device,
                                        dtype=setup["dtype"], float32_partial_sums=setup["float32_partial_sums"])
        engine = Engine(network, backend, build_config=setup["build_config"])
        channel = StepChannel(comm, setup["capacity"], ring)
    caches: dict[int, Any] = {}
    last = "start-up"
    while True:
        with stage(f"wait for step {channel.seq + 1} (the last was {last}; rank 0 sends one at least every "
                   f"few seconds, so a long wait means rank 0 or the collectives of the last step are stuck)"):
            header, payload = channel.receive()
        last = describe(header)
        cmd, kv_id, free_id = header[0], header[1], header[11]
        if free_id > 0:
            caches.pop(free_id, None)
        if cmd == SHUTDOWN:  # NOTE: NCCL's destroy waits until no CUDA graph holds its kernels: drop them first
            backend.release_graphs()
            caches.clear()
            channel.close()
            return
        with stage(last):
            if cmd == NOOP:
                continue
            if cmd == ALLOC:
                caches[kv_id] = engine.allocate_kv_cache(header[13], header[14], dtype=KV_DTYPES[header[15]])
            elif cmd == CAPTURE:
                sizes = payload[:header[2] + header[14]].tolist()  # decode batch sizes, then token buckets
                backend.capture_cuda_graphs(caches[kv_id], sizes[:header[2]], header[13],
                                            num_tokens=sizes[header[2]:], max_seqs=header[15])
                comm.note(f"captured CUDA graphs {sizes[:header[2]]}, mixed steps {sizes[header[2]:]}")
            elif cmd == FORWARD:
                batch = unpack_batch(header, payload)
                comm.timing = bool(header[10])
                with torch.inference_mode():
                    if header[9]:  # rank 0 runs with hooks, so eagerly: the same collectives in the same order
                        backend.run_layers(batch, caches[kv_id])
                    else:
                        backend.forward(batch, caches[kv_id])
            elif cmd == TIMINGS:
                comm.gather_object(comm.take_timings())
            else:
                raise RuntimeError(f"rank {comm.rank}: unknown step message {cmd}")


@contextmanager
def _no_stage(name: str) -> Iterator[None]:
    yield


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGTERM this rank when the process that spawned it exits (no rank left behind a killed run)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it exited while this process was still starting
        log(f"the process that started this rank (pid {parent_pid}) is gone; exiting")
        os._exit(1)


def _leave(comm: TensorParallelComm, failed: bool) -> None:
    """Leave the group, waiting at most a few seconds (NCCL's destroy can wait for a peer that never comes)."""
    if failed:
        log(f"rank {comm.rank}: {abort_group()}")
    # NOTE: after a SHUTDOWN, a barrier with rank 0 first (which meets it once it has released its graphs)
    leaving = threading.Thread(target=leave_group, args=(comm, not failed), name="kit-tp-leave", daemon=True)
    leaving.start()
    leaving.join(5.0 if failed else 60.0)
    if leaving.is_alive():
        log(f"rank {comm.rank}: leaving the process group did not finish; exiting without it")
        os._exit(1 if failed else 0)


def leave_group(comm: TensorParallelComm, together: bool) -> None:
    """Leave the default group; with `together`, after a barrier with every other rank (all of them are
    past their last step and have released their CUDA graphs)."""
    if comm.device.type == "cuda":
        torch.cuda.set_device(comm.device)  # NOTE: the current device is per thread
    if together:
        comm.barrier()
    TensorParallelComm.destroy()


def _run_rank(comm: TensorParallelComm, timeout_s: float, errors: Any = None) -> None:
    """Serve under a watchdog; a failure is printed (naming the rank and the step) before leaving the group."""

    def on_timeout(msg: str) -> None:
        if errors is not None:
            errors.put((comm.rank, msg))
        log(f"rank {comm.rank}: {abort_group()}")
        time.sleep(min(10.0, timeout_s))  # the main thread's collective should now fail and exit; if it does not:
        log(f"rank {comm.rank}: still stuck after the abort; exiting")
        os._exit(3)

    watchdog = StageWatchdog(comm.rank, timeout_s, on_timeout)
    failed = True
    try:
        serve(comm, watchdog)
        failed = False
    except BaseException as e:
        stage = watchdog.current[0] if watchdog.current else watchdog.last_finished
        log(f"rank {comm.rank} failed in {stage!r}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        if errors is not None:
            errors.put((comm.rank, f"failed in {stage!r}: {type(e).__name__}: {e}"))
        raise
    finally:
        watchdog.stop()
        _leave(comm, failed)


def _arm(rank: int) -> None:
    """Stacks of every thread on stderr at a crash, at SIGTERM/SIGUSR1, and after `KIT_TP_STACKS_AFTER` s."""
    if os.environ.get(STACKS_ENV):  # NOTE: a dump names no rank: this line maps the pid to it
        log(f"rank {rank}: pid {os.getpid()}")
    faulthandler.enable(all_threads=True)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        faulthandler.register(sig, all_threads=True, chain=sig == signal.SIGTERM)
    after = float(os.environ.get(STACKS_ENV, "0") or 0)
    if after > 0:
        faulthandler.dump_traceback_later(after, exit=False)


def worker_main(rank: int, world_size: int, init_method: str, device_type: str, timeout_s: float = 120.0,
                parent_pid: int = 0, errors: Any = None) -> None:
    """The target of a spawned rank: join the group, serve, leave. `timeout_s` is the stage timeout
    (the process group's is longer, so that the watchdog speaks first). With `parent_pid`, the rank gets
    SIGTERM when that process exits."""
    if parent_pid:
        _die_with_parent(parent_pid)
    _arm(rank)
    if device_type == "cpu":  # NOTE: the ranks share the host's cores; more threads only make them spin
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    comm = TensorParallelComm.init(rank, world_size, rank_device(device_type, rank), init_method,
                                   group_timeout(timeout_s))
    _run_rank(comm, timeout_s, errors)


def torchrun_worker(device_type: str, timeout_s: float = 120.0) -> None:
    """A rank > 0 under torchrun: the same loop, the group from the environment (env://)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _arm(rank)
    comm = TensorParallelComm.init(rank, world, rank_device(device_type, int(os.environ["LOCAL_RANK"])),
                                   "env://", group_timeout(timeout_s))
    _run_rank(comm, timeout_s)


def group_timeout(stage_timeout_s: float) -> float:
    """The process group's timeout: past the stage watchdog's, so that a hang is named by the watchdog first."""
    return 1.5 * stage_timeout_s + 10.0
