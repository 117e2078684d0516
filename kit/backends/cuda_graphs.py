"""Decode steps replayed from CUDA graphs: `CUDAGraphRunner`, one graph per batch-size bucket.

A decode step of a small model is hundreds of tiny kernels; launched one by one from
Python, the GPU waits on the CPU between them. A CUDA graph records the whole step once
and replays it with one launch. Graphs need fixed shapes and addresses, so each bucket
owns static input buffers: a batch of n sequences is copied into the smallest bucket
>= n, and the padding rows write their K/V into a scratch block that no sequence owns
(`KVCache.scratch_block`). Attention runs over the bucket's full `max_blocks * block_size`
context with the causal mask hiding what is not there, which is why the build's
`max_seq_len` matters for decode speed.

The replay path does no host work beyond the input copies: the static buffers are
updated with device-to-device copies (no synchronisation), padding rows are reset only
when the batch does not fill its bucket, and the output is a view of the graph's own
logits buffer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from kit.batch import ForwardBatch, KVCache

if TYPE_CHECKING:  # NOTE: for the annotation only; the backend imports this module
    from kit.backends.torch_backend import TorchBackend

__all__ = ["CUDAGraphRunner"]


class CUDAGraphRunner:
    """Captures `backend.run_layers` for each decode batch size; `run(batch)` replays the right one."""

    def __init__(self, backend: "TorchBackend", kv_cache: KVCache, batch_sizes: tuple[int, ...],
                 max_blocks: int, step: Callable[[ForwardBatch, KVCache], torch.Tensor] | None = None,
                 pool: Any = None, on_graph: Callable[[], Any] | None = None) -> None:
        self.backend = backend
        self.kv_cache = kv_cache
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_blocks = max_blocks
        step = step or backend.run_layers
        dev = backend.device
        n = self.batch_sizes[-1]
        bs = kv_cache.block_size
        i64 = dict(dtype=torch.long, device=dev)
        self._ids = torch.zeros(n, **i64)
        self._pos = torch.zeros(n, **i64)
        self._slots = torch.full((n,), kv_cache.scratch_block * bs, **i64)
        self._tables = torch.full((n, max_blocks), kv_cache.scratch_block, **i64)
        self._seq_lens = torch.ones(n, **i64)
        arange = torch.arange(n + 1, **i64)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.batches: dict[int, ForwardBatch] = {}
        # NOTE: `pool` shares the memory of graphs captured before (the mixed-step ones): graphs replay one at a time
        for size in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
            batch = ForwardBatch(self._ids[:size], self._pos[:size], arange[:size + 1], self._seq_lens[:size],
                                 self._tables[:size], self._slots[:size], arange[:size], max_query_len=1,
                                 max_seq_len=max_blocks * bs, block_size=bs)
            for _ in range(2):  # warm up outside the graph (allocator, cuBLAS handles, Triton compiles)
                step(batch, kv_cache)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = step(batch, kv_cache)
            pool = graph.pool()
            self.graphs[size] = graph
            self.batches[size] = batch
            if on_graph is not None:  # a progress bar's update
                on_graph()
        torch.cuda.synchronize(dev)
        self._scratch_slot = kv_cache.scratch_block * bs

    def can_run(self, batch: ForwardBatch, kv_cache: KVCache) -> bool:
        return (kv_cache is self.kv_cache and batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs
                and batch.num_seqs <= self.batch_sizes[-1] and batch.logits_indices.shape[0] == batch.num_seqs
                and batch.block_tables.shape[1] <= self.max_blocks
                and batch.max_seq_len <= self.max_blocks * batch.block_size)

    def bucket(self, num_seqs: int) -> int:
        """The smallest captured batch size that holds `num_seqs` sequences."""
        return next(s for s in self.batch_sizes if s >= num_seqs)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_seqs
        size = self.bucket(n)
        self._ids[:n].copy_(batch.input_ids, non_blocking=True)
        self._pos[:n].copy_(batch.positions, non_blocking=True)
        self._slots[:n].copy_(batch.slot_mapping, non_blocking=True)
        self._seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        width = batch.block_tables.shape[1]
        self._tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        if width < self.max_blocks:  # NOTE: stale entries past the table would point at other sequences' blocks
            self._tables[:n, width:].fill_(self.kv_cache.scratch_block)
        if n < size:  # padding rows: position 0, writing into the scratch block only
            self._ids[n:size].zero_()
            self._pos[n:size].zero_()
            self._slots[n:size].fill_(self._scratch_slot)
            self._seq_lens[n:size].fill_(1)
            self._tables[n:size].fill_(self.kv_cache.scratch_block)
        self.graphs[size].replay()
        return self.outputs[size][:n]
