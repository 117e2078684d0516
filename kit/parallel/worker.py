"""The loop of every rank but rank 0: receive the shard, then serve step messages.

    worker_main(rank, world_size, init_method, device_type)   a spawned rank (torch.multiprocessing)
    serve(comm)                                                 the loop itself (spawned or torchrun)

Start-up: rank 0 broadcasts the shard's description (config, layers, quantization,
dtype, message capacity, tensor names / shapes / dtypes) and scatters each tensor's
rank parts; a rank builds its `Network`, its `TensorParallelBackend` and its `Engine`.
Then it waits for step messages (kit/parallel/protocol.py): allocate a KV cache,
capture CUDA graphs over one, run a forward (its logits slice goes to rank 0 inside
the lm_head), report its collective timings, shut down. A rank whose peer dies sees its
collective fail and exits; rank 0 reports which rank died.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kit.engine import Engine
from kit.network import Network
from kit.parallel.comm import TensorParallelComm
from kit.parallel.engine_files import load_rank_weights
from kit.parallel.mapping import Mapping
from kit.parallel.protocol import (ALLOC, CAPTURE, FORWARD, KV_DTYPES, SHUTDOWN, TIMINGS, StepChannel,
                                   unpack_batch)
from kit.parallel.tp_backend import TensorParallelBackend

__all__ = ["worker_main", "torchrun_worker", "serve", "send_shards", "receive_shards", "rank_device"]


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


def serve(comm: TensorParallelComm) -> None:
    """Build this rank's engine from what rank 0 sends, then run step messages until SHUTDOWN."""
    setup, weights = receive_shards(comm)  # or only the setup, when every rank reads its own file
    mapping = Mapping.tensor_parallel(comm.world_size, comm.rank)
    network = Network(setup["config"], setup["layers"], weights, name=setup["name"],
                      quant_config=setup["quant_config"])
    backend = TensorParallelBackend(network, mapping, comm, setup["full_vocab_size"], device=comm.device,
                                    dtype=setup["dtype"])
    engine = Engine(network, backend, build_config=setup["build_config"])
    channel = StepChannel(comm, setup["capacity"])
    caches: dict[int, Any] = {}
    while True:
        header, payload = channel.receive()
        cmd, kv_id, free_id = header[0], header[1], header[11]
        if free_id > 0:
            caches.pop(free_id, None)
        if cmd == SHUTDOWN:
            return
        if cmd == ALLOC:
            caches[kv_id] = engine.allocate_kv_cache(header[13], header[14], dtype=KV_DTYPES[header[15]])
        elif cmd == CAPTURE:
            backend.capture_cuda_graphs(caches[kv_id], payload[:header[2]].tolist(), header[13])
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


def worker_main(rank: int, world_size: int, init_method: str, device_type: str, timeout_s: float = 120.0) -> None:
    """The target of a spawned rank: join the group, serve, leave."""
    if device_type == "cpu":  # NOTE: the ranks share the host's cores; more threads only make them spin
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    comm = TensorParallelComm.init(rank, world_size, rank_device(device_type, rank), init_method, timeout_s)
    try:
        serve(comm)
    finally:
        TensorParallelComm.destroy()


def torchrun_worker(device_type: str, timeout_s: float = 120.0) -> None:
    """A rank > 0 under torchrun: the same loop, the group from the environment (env://)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    comm = TensorParallelComm.init(rank, world, rank_device(device_type, int(os.environ["LOCAL_RANK"])),
                                   "env://", timeout_s)
    try:
        serve(comm)
    finally:
        TensorParallelComm.destroy()


