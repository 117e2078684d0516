"""`DistributedEngine`: rank 0's engine over a tensor-parallel group.

    engine = DistributedEngine.start(network, tensor_parallel_size=2)   # spawns ranks 1..N-1
    llm = LLM(engine)   or   LLM(model, tensor_parallel_size=2)

It is an `Engine` (the `Executor` runs over it unchanged, on rank 0, with the scheduler,
the KV-cache manager and the outputs): `forward` sends the step's `ForwardBatch`
(kit/parallel/protocol.py: the header through shared memory when every rank is on this
host, the batch by broadcast) and runs rank 0's shard; the other ranks run theirs
(kit/parallel/worker.py); the logits come back gathered on rank 0. `allocate_kv_cache`
and `capture_cuda_graphs` happen on every rank, each cache holding the rank's KV heads.
`config` is the whole model's (the executor checks token ids against the full vocabulary);
`network` is rank 0's shard.

Processes: `start` spawns one process per rank > 0 with `torch.multiprocessing` (spawn);
under `torchrun` (every rank runs the same script) ranks > 0 enter the same worker loop
inside `start` and exit when rank 0 shuts down:

    torchrun --nproc-per-node 2 my_script.py     # my_script: LLM(model, tensor_parallel_size=2)

Step channel: `step_channel=` (or `KIT_TP_CHANNEL`) 'auto' (shared memory if every rank
mapped rank 0's segment, else broadcast), 'shared-memory' (an error if a rank could not)
or 'broadcast'; `engine.step_channel` says which one runs. The segment's name is unlinked
as soon as every rank has answered, so none is left in /dev/shm whichever process dies.

Failure: a rank that dies makes the step fail with `RuntimeError` naming the rank (the
executor then fails every pending request with it) and the engine refuses further steps;
`shutdown()` stops every rank (killing any that does not stop) and leaves the process group:
every rank destroys its CUDA graphs first (NCCL's destroy waits until none holds its kernels),
then they meet in a barrier and leave together, so a new engine can start in the same process.

Hangs: `timeout_s` is each rank's stage timeout (kit/parallel/watchdog.py): an engine call,
or a worker's step or wait for one, that outlives it is reported on stderr with the rank,
the step and every thread's stack, and the NCCL communicators are aborted, so the blocked
call fails (naming the rank and the step) instead of waiting forever. The process group's
own timeout is longer (`group_timeout`). An idle engine sends a NOOP every `timeout_s / 4`
(30 s at most), so an engine may sit idle for any time.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist

from kit.batch import ForwardBatch, KVCache
from kit.cache_entry import CacheEntryError
from kit.build_config import BuildConfig, fit_build_config
from kit.builder import Builder, EngineResult
from kit.loader import LoadedModel
from kit.engine import Engine
from kit.network import Network, NetworkBuilder
from kit.tokenizer import Tokenizer
from kit.parallel.comm import TIMING_COLUMNS, launched_by_torchrun
from kit.parallel.engine_files import (is_tp_engine_dir, load_rank_weights, read_tp_config, save_tp_engine,
                                      tp_build_key, tp_cache_path)
from kit.parallel.mapping import Mapping
from kit.parallel.host_channel import HeaderRing, agree_rank0, channel_mode, spin_seconds
from kit.parallel.protocol import (ALLOC, FORWARD, HEADER, KV_DTYPES, SEQ, TIMINGS, StepChannel, describe,
                                   message_capacity, pack_batch)
from kit.parallel.sharding import shard_network
from kit.parallel.tp_backend import TensorParallelBackend, partial_sums_in_float32
from kit.parallel.ranks import Ranks, launch_ranks
from kit.parallel.worker import group_timeout, send_shards

__all__ = ["DistributedEngine", "build_parallel_engine", "check_parallel_sizes", "COLLECTIVE_COLUMNS"]

COLLECTIVE_COLUMNS = ("rank",) + TIMING_COLUMNS


def check_parallel_sizes(tensor_parallel_size: Any, pipeline_parallel_size: Any = 1,
                         device: torch.device | str | None = None) -> None:
    """Refuse sizes that cannot run here, before any process starts."""
    for name, v in (("tensor_parallel_size", tensor_parallel_size), ("pipeline_parallel_size", pipeline_parallel_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if pipeline_parallel_size != 1:
        raise ValueError(f"pipeline_parallel_size={pipeline_parallel_size}: pipeline parallelism is not supported; "
                         "use pipeline_parallel_size=1 and tensor_parallel_size to split a model")
    if device is not None and torch.device(device).type == "cuda" and not launched_by_torchrun():
        have = torch.cuda.device_count()
        if tensor_parallel_size > have:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} GPUs, "
                             f"this machine has {have}")


class DistributedEngine(Engine):
    """Rank 0's engine: its own shard plus the other ranks, driven one step message at a time."""

    def __init__(self, network: Network, backend: TensorParallelBackend, ranks: Ranks, full_config: Any,
                 mapping: Mapping, **engine_kw: Any) -> None:
        super().__init__(network, backend, **engine_kw)
        self.ranks, self.full_config, self.mapping = ranks, full_config, mapping
        self._kv_ids = itertools.count(1)
        self._finalizer = weakref.finalize(self, _stop, ranks)

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, network: Network | None, tensor_parallel_size: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None, build_config: Any = None, tokenizer: Any = None,
              model_info: dict[str, Any] | None = None, build_key: str | None = None,
              weights_dir: str | os.PathLike | None = None, timeout_s: float = 120.0,
              step_channel: str | None = None) -> "DistributedEngine":
        """Shard `network` over `tensor_parallel_size` ranks (checked first) and start them.

        With `weights_dir` (a tensor-parallel engine directory, kit/parallel/engine_files.py) and no
        network, every rank loads its own `rank{r}.safetensors` instead of receiving its shard.
        `step_channel`: 'auto', 'shared-memory' or 'broadcast' (default: `KIT_TP_CHANNEL`, else 'auto')."""
        mode = channel_mode(step_channel)
        float32_sums = partial_sums_in_float32()  # NOTE: read (and checked) once, here; every rank gets rank 0's
        from_torchrun = launched_by_torchrun()
        device = torch.device(device)
        check_parallel_sizes(tensor_parallel_size, 1, device)
        mapping = Mapping.tensor_parallel(tensor_parallel_size)
        if weights_dir is not None:
            cfg = read_tp_config(weights_dir, tensor_parallel_size)["_parsed"]
            full_config, build_config = cfg["model_config"], build_config or cfg["build_config"]
            dtype, quant_config = dtype or cfg["dtype"], cfg["quant_config"]
            name = (model_info or {}).get("name", Path(weights_dir).name)
        else:
            full_config, quant_config, name = network.config, network.quant_config, network.name
            dtype = dtype or network.weights["model.embed_tokens.weight"].dtype
        mapping.check_model(full_config)
        if build_config is None:
            raise ValueError("DistributedEngine.start: build_config is required (it sizes the step messages)")
        if dist.is_initialized() and not from_torchrun:
            raise RuntimeError("a tensor-parallel engine is already running in this process: shut it down "
                               "(LLM.shutdown()) before starting another")
        shards = None
        if weights_dir is None:  # NOTE: split before the ranks start, so that they do not wait for it
            shards = [shard_network(network, mapping.for_rank(r)) for r in range(tensor_parallel_size)]
        comm, procs, errors = launch_ranks(tensor_parallel_size, device, timeout_s, from_torchrun)
        capacity = message_capacity(build_config)
        ranks = Ranks(comm, procs, StepChannel(comm, capacity), timeout_s, errors)
        ring = None
        try:
            if mode != "broadcast":
                ring = HeaderRing.create(tensor_parallel_size, HEADER, spin_s=spin_seconds(device.type),
                                         timeout_s=group_timeout(timeout_s))
            setup = {"name": name, "quant_config": quant_config, "dtype": dtype,
                     "full_vocab_size": full_config.vocab_size, "build_config": build_config, "capacity": capacity,
                     "host_channel": None if ring is None else ring.spec(), "float32_partial_sums": float32_sums}
            with ranks.watchdog.stage("start-up: send the shards"), ranks.lock:
                if shards is None:
                    own = Network(cfg["shard_config"], cfg["layers"], load_rank_weights(weights_dir, 0, comm.device),
                                  name=name, quant_config=quant_config)
                    comm.broadcast_object({**setup, "config": own.config, "layers": own.layers,
                                           "weights_dir": str(weights_dir)})
                else:
                    send_shards(comm, {**setup, "config": shards[0].config, "layers": shards[0].layers},
                                [s.weights for s in shards])
                    # rank 0's shard on rank 0's device (the network may live on another GPU, or the CPU)
                    own = Network(shards[0].config, shards[0].layers,
                                  {n: t.to(comm.device) for n, t in shards[0].weights.items()},
                                  name=name, quant_config=quant_config)
                    del shards
                if ring is not None:  # every rank says whether it mapped the ring; the name is unlinked
                    ranks.channel.ring, _ = agree_rank0(comm, ring, mode)
                    ring.stop_when = lambda: ranks.broken
                ranks.last_send = time.monotonic()
            backend = TensorParallelBackend(own, mapping, comm, full_config.vocab_size, device=comm.device,
                                            dtype=dtype, float32_partial_sums=float32_sums)
            engine = cls(own, backend, ranks, full_config, mapping, build_config=build_config,
                         tokenizer=tokenizer, model_info=model_info or {"name": name}, build_key=build_key)
        except BaseException:
            ranks.broken = ranks.broken or "start-up failed"
            ranks.shutdown()
            ranks.channel.close()
            if ring is not None:
                ring.close()
            raise
        backend.on_capture = ranks.send_capture
        ranks.release_graphs = backend.release_graphs
        return engine

    # ------------------------------------------------------------- the model
    @property
    def config(self) -> Any:
        """The whole model's config (the shard's is `network.config`)."""
        return self.full_config

    @property
    def step_channel(self) -> str:
        """How step headers reach the other ranks: 'shared memory' or 'broadcast'."""
        return self.ranks.channel.path

    @property
    def tensor_parallel_size(self) -> int:
        return self.mapping.tp_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes in ONE rank's cache (its KV heads only)."""
        c = self.network.config
        if getattr(self.network.quant_config, "kv_cache_quant_algo", None) is not None:
            return 2 * c.num_hidden_layers * (c.kv_size + 4 * c.num_key_value_heads)
        return c.kv_bytes_per_token(torch.empty(0, dtype=self.dtype).element_size())

    # ------------------------------------------------------------ every rank
    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None,
                          capture_graphs: bool = False) -> KVCache:
        """A paged pool on every rank (each holding its KV heads); rank 0's is returned."""
        if dtype not in KV_DTYPES:
            raise ValueError(f"allocate_kv_cache: dtype must be one of {KV_DTYPES}, got {dtype}")
        with self.ranks.lock, self.ranks.watchdog.stage(f"step {self.ranks.channel.seq + 1} ALLOC ({num_blocks} "
                                                         f"blocks of {block_size})"):
            kv_id = next(self._kv_ids)
            self.ranks.send([ALLOC, kv_id] + [0] * 11 + [num_blocks, block_size, KV_DTYPES.index(dtype)])
            qc = self.network.quant_config
            kv = KVCache(self.network.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device,
                         quant_algo=getattr(qc, "kv_cache_quant_algo", None))
        kv.tp_id = kv_id
        weakref.finalize(kv, self.ranks.pending_free.append, kv_id)
        if capture_graphs:
            self.capture_cuda_graphs(kv)
        return kv

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes=None) -> tuple[int, ...]:
        with self.ranks.lock, self.ranks.watchdog.stage(  # the backend calls ranks.send_capture, then captures its own
                f"step {self.ranks.channel.seq + 1} CAPTURE (batch sizes {batch_sizes or 'of the build config'})"):
            return super().capture_cuda_graphs(kv_cache, batch_sizes)

    def forward(self, batch: ForwardBatch, kv_cache: KVCache, hooks=None) -> torch.Tensor:
        """Broadcast the step, run rank 0's shard; logits (num_logits, vocab) gathered here."""
        # NOTE: everything that can refuse the step is checked before the message goes out: once it has,
        # the other ranks are inside the step's collectives and rank 0 must run them too
        if batch.block_size != kv_cache.block_size:
            raise ValueError(f"batch was built for block_size {batch.block_size}, cache has {kv_cache.block_size}")
        kv_id = getattr(kv_cache, "tp_id", None)
        if kv_id is None:
            raise ValueError("forward: kv_cache was not allocated by this tensor-parallel engine "
                             "(use engine.allocate_kv_cache)")
        head, payload = pack_batch(batch)
        header = [FORWARD, kv_id] + head + [int(bool(hooks)), int(self.backend.comm.timing)]
        with self.ranks.lock:
            name = describe(header + [0] * (SEQ - len(header)) + [self.ranks.channel.seq + 1])
            with self.ranks.watchdog.stage(name):
                refused = self.ranks.closed or self.ranks.broken is not None
                try:
                    self.ranks.send(header, payload)  # a closed or broken engine refuses here, as it is
                    return super().forward(batch, kv_cache, hooks)
                except Exception as e:  # noqa: BLE001 - a collective failed: name the rank that died
                    if refused:
                        raise
                    raise self.ranks.fail(e) from e

    # ---------------------------------------------------------------- timing
    def time_collectives(self, on: bool = True) -> None:
        """Time every all-reduce / gather of the following steps, on every rank."""
        self.backend.comm.timing = on

    def collective_timings(self) -> pd.DataFrame:
        """Timed collectives since the last call, every rank: columns `COLLECTIVE_COLUMNS`."""
        with self.ranks.lock, self.ranks.watchdog.stage(f"step {self.ranks.channel.seq + 1} TIMINGS"):
            self.ranks.send([TIMINGS])
            per_rank = self.backend.comm.gather_object(self.backend.comm.take_timings())
        rows = [{"rank": r, **row} for r, rows in enumerate(per_rank) for row in rows]
        return pd.DataFrame(rows, columns=list(COLLECTIVE_COLUMNS))

    # ------------------------------------------------------------- lifecycle
    @property
    def is_alive(self) -> bool:
        return not self.ranks.closed and self.ranks.broken is None and self.ranks.dead_rank() is None

    @property
    def pids(self) -> list[int]:
        """The process ids of ranks 1..N-1 (spawned ones; none under torchrun)."""
        return [p.pid for p in self.ranks.procs]

    def shutdown(self) -> None:
        """Stop every rank and leave the process group (also at collection and at exit)."""
        self._finalizer()

    def __repr__(self) -> str:
        return (f"DistributedEngine({self.network.name!r}, tensor_parallel_size={self.mapping.tp_size}, "
                f"{self.backend.comm.backend}, {self.device}, {self.dtype})")


def _stop(ranks: Ranks) -> None:
    """The engine's finalizer: stop the ranks, then unmap the header ring (it references no engine)."""
    try:
        ranks.shutdown()
    finally:
        ranks.channel.close()


def build_parallel_engine(model: Any, tensor_parallel_size: int, *, device: torch.device | str = "cpu",
                          build_config: BuildConfig | None = None, quantization: Any = None,
                          enable_build_cache: bool = True, skip_build_cache: bool = False) -> EngineResult:
    """`LLM(model, tensor_parallel_size=N)`'s engine: the whole network (build cache, quantization), split.

    A tensor-parallel engine directory is started as it is (each rank reads its file). A checkpoint
    or name is built on the CPU by the `Builder` (so the build cache and the quantized-model cache
    answer as for one device); with the build cache on, its split is stored once under a key that
    includes the mapping (kit/parallel/engine_files.py) and each rank reads its own file from there.
    A LoadedModel without quantization (e.g. a synthetic one made on the GPU) is split in memory.
    """
    mapping = Mapping.tensor_parallel(tensor_parallel_size)
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:  # a worker rank: nothing to build, serve rank 0
        check_parallel_sizes(tensor_parallel_size, 1, device)
        launch_ranks(tensor_parallel_size, torch.device(device), 120.0, True)  # exits when rank 0 shuts down
    if is_tp_engine_dir(model):
        return EngineResult(DistributedEngine.start(None, tensor_parallel_size, device=device, weights_dir=model,
                                                    tokenizer=_tokenizer_of(Path(model))), None, False)
    bc = build_config or BuildConfig()
    if isinstance(model, LoadedModel) and quantization is None:
        bc = fit_build_config(bc, model.config)
        network, info, key, tokenizer = NetworkBuilder(model).build(), {"name": model.name}, None, model.tokenizer
        loaded, hit = model, False
    else:
        result = Builder("torch", device="cpu").get_engine(model, bc, quantization=quantization,
                                                           enable_build_cache=enable_build_cache,
                                                           skip_build_cache=skip_build_cache, progress=False)
        e = result.engine
        network, info, key, tokenizer, bc = e.network, e.model_info, e.build_key, e.tokenizer, e.build_config or bc
        loaded, hit = result.loaded, result.cache_hit
    mapping.check_model(network.config)  # before anything is written or started
    dtype = None if bc.dtype == "auto" else getattr(torch, bc.dtype)
    weights_dir = None
    if enable_build_cache and key is not None:
        weights_dir = tp_cache_path(tp_build_key(key, mapping))
        try:
            if skip_build_cache or not is_tp_engine_dir(weights_dir):
                raise CacheEntryError("missing")
            read_tp_config(weights_dir, tensor_parallel_size)
        except (CacheEntryError, ValueError):
            shutil.rmtree(weights_dir, ignore_errors=True)  # a missing, stale or damaged split: write it again
            save_tp_engine(network, tensor_parallel_size, weights_dir, build_config=bc, build_key=key,
                           dtype=dtype or network.weights["model.embed_tokens.weight"].dtype, model_info=info,
                           tokenizer=tokenizer)
        network = None  # every rank reads its own file
    engine = DistributedEngine.start(network, tensor_parallel_size, device=device, dtype=dtype, build_config=bc,
                                     tokenizer=tokenizer, model_info=info, build_key=key, weights_dir=weights_dir)
    return EngineResult(engine, loaded, hit)


def _tokenizer_of(path: Path) -> Any:
    return Tokenizer.from_dir(path / "tokenizer") if Tokenizer.dir_has_tokenizer(path / "tokenizer") else None
