"""Tensor parallelism over `torch.distributed` (NCCL on GPUs, gloo on the CPU).

    LLM(model, tensor_parallel_size=2)        rank 0 here, rank 1 a spawned process

| module | what |
| --- | --- |
| `mapping.py` | `Mapping`: which rank holds which heads, KV heads, MLP columns, vocabulary rows |
| `sharding.py` | how every weight (float or quantized) is split: `shard_network`, `sharding_frame` |
| `comm.py` | the process group and the collectives (all-reduce, logits gather), timed per layer |
| `tp_backend.py` | `TensorParallelBackend`: the PyTorch backend over one rank's shard |
| `protocol.py` | the step message rank 0 sends (one per step): header, then the batch by broadcast |
| `host_channel.py` | the shared-memory ring that carries the step headers when every rank is on rank 0's host |
| `worker.py` | the loop of ranks 1..N-1 |
| `ranks.py` | rank 0's side of the processes: start, send a step, keep alive, stop |
| `watchdog.py` | a stage watchdog per rank: a hang becomes an error naming the rank and the step |
| `distributed_engine.py` | `DistributedEngine`: rank 0's engine, what the executor runs over |
"""

from kit.parallel.distributed_engine import (COLLECTIVE_COLUMNS, DistributedEngine, build_parallel_engine,
                                             check_parallel_sizes)
from kit.parallel.mapping import Mapping
from kit.parallel.sharding import SHARD_COLUMNS, shard_network, sharding_frame
from kit.parallel.tp_backend import TensorParallelBackend

__all__ = ["Mapping", "DistributedEngine", "build_parallel_engine", "TensorParallelBackend", "check_parallel_sizes", "shard_network",
           "sharding_frame", "SHARD_COLUMNS", "COLLECTIVE_COLUMNS"]
