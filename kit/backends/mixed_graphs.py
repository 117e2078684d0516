"""Mixed steps replayed from CUDA graphs: `MixedGraphRunner`, one graph per token-count bucket.

A serving loop with requests arriving at different times rarely runs a pure decode step:
most steps carry a prompt chunk beside the decode tokens. Launched kernel by kernel such
a step costs 2-3x the graphed decode step of a small model (hundreds of launches of a few
microseconds each), so the decode graphs alone leave the GPU waiting on the host
(`bench/results/serving_full_h200.json`: serving / decode-only 0.36-0.51 at concurrency 64).
vLLM's full CUDA graphs and SGLang's do what this module does: capture the whole step for
a few token counts and pad each step up to the next one.

Why the whole step can be captured: every kernel of a step is shaped by the number of
tokens only, except attention, and the varlen prefill kernel (attention_prefill.py) takes
its sequences' boundaries, lengths and block tables from device tensors, with a grid of
num_tokens // BLOCK_Q + num_seqs programs that needs no host sync. So each bucket of T
tokens is captured over static buffers holding T tokens and `max_seqs + 1` sequences:

    rows 0 .. n-1      the step's real tokens (a prompt chunk, decode tokens, in any mix)
    rows n .. T-1      padding: token 0, position 0, K/V written into the scratch block
    seqs 0 .. s-1      the step's sequences
    seqs s .. S-2      empty (no queries: their programs exit at once)
    seq  S-1           the padding sequence: the padding rows as one causal prompt over the
                       scratch block (its block table is all scratch), so every padding row
                       attends to keys it wrote itself in the same layer: finite values, no
                       NaN that could reach a real row through a per-tensor scale

Padding row j writes scratch slot j % block_size and, as query j of the padding sequence,
reads slots 0..j (mod block_size): all written by padding rows of the same step before the
attention of the layer reads them. Logits are computed for `max_logits` gathered rows
(padding indices point at row 0) and the step's first rows are returned.

Attention in these graphs always takes the varlen kernel (decode rows are sequences of one
query), so they need the Triton attention path: a backend with the reference attention, or
an 8-bit cache read by the reference, runs mixed steps eagerly.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any, Callable

import torch

from kit.batch import ForwardBatch, KVCache

if TYPE_CHECKING:  # NOTE: for the annotation only; the backend imports this module
    from kit.backends.torch_backend import TorchBackend

__all__ = ["MixedGraphRunner", "MixedStepInputs"]


class MixedStepInputs:
    """Static input buffers of the mixed-step graphs, and the copy of a real batch into them (any device)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_logits: int, max_blocks: int, block_size: int,
                 scratch_block: int, device: torch.device | str) -> None:
        self.max_tokens, self.max_seqs, self.max_logits = max_tokens, max_seqs, max_logits
        # NOTE: the padding sequence can be longer than any real one: its table covers max_tokens positions
        self.max_blocks = max(max_blocks, -(-max_tokens // block_size))
        self.block_size, self.scratch_block = block_size, scratch_block
        i64 = dict(dtype=torch.long, device=device)
        s = max_seqs + 1  # the last sequence takes the padding rows
        self.ids = torch.zeros(max_tokens, **i64)
        self.pos = torch.zeros(max_tokens, **i64)
        # padding row j (counted from the first padding row) writes scratch slot j % block_size
        self.pad_slots = scratch_block * block_size + torch.arange(max_tokens, **i64) % block_size
        self.slots = self.pad_slots.clone()
        self.qsl = torch.zeros(s + 1, **i64)
        self.seq_lens = torch.zeros(s, **i64)
        self.tables = torch.full((s, self.max_blocks), scratch_block, **i64)
        self.logits = torch.zeros(max_logits, **i64)
        self.loaded: tuple[int, int, int] | None = None  # (bucket, real rows, real sequences) of the last load

    def batch(self, num_tokens: int) -> ForwardBatch:
        """The static batch of the `num_tokens` bucket (views of the buffers)."""
        # NOTE: max_query_len > 1 sends attention to the varlen kernel, whatever the step holds
        # NOTE: a step has at most one logits row per token: a small bucket computes no more logits rows than that
        return ForwardBatch(self.ids[:num_tokens], self.pos[:num_tokens], self.qsl, self.seq_lens, self.tables,
                            self.slots[:num_tokens], self.logits[:min(num_tokens, self.max_logits)], max_query_len=2,
                            max_seq_len=self.max_blocks * self.block_size, block_size=self.block_size)

    def fits(self, batch: ForwardBatch) -> bool:
        return (batch.num_tokens <= self.max_tokens and batch.num_seqs <= self.max_seqs
                and batch.logits_indices.shape[0] <= self.max_logits and batch.block_tables.shape[1] <= self.max_blocks
                and batch.block_size == self.block_size)

    def load(self, batch: ForwardBatch | None, num_tokens: int) -> None:
        """Copy `batch` (None: no real row) into the buffers, padded to `num_tokens` rows (no host sync)."""
        n = 0 if batch is None else batch.num_tokens
        s = 0 if batch is None else batch.num_seqs
        pad = num_tokens - n
        if pad < 0:
            raise ValueError(f"a step of {n} tokens does not fit the {num_tokens}-token bucket")
        last = self.max_seqs  # the padding sequence
        if batch is not None:
            self.ids[:n].copy_(batch.input_ids, non_blocking=True)
            self.pos[:n].copy_(batch.positions, non_blocking=True)
            self.slots[:n].copy_(batch.slot_mapping, non_blocking=True)
            self.qsl[:s + 1].copy_(batch.query_start_loc, non_blocking=True)
            self.seq_lens[:s].copy_(batch.seq_lens, non_blocking=True)
            width = batch.block_tables.shape[1]
            self.tables[:s, :width].copy_(batch.block_tables, non_blocking=True)
            if width < self.max_blocks:  # NOTE: stale entries would point at other sequences' blocks
                self.tables[:s, width:].fill_(self.scratch_block)
            k = batch.logits_indices.shape[0]
            self.logits[:k].copy_(batch.logits_indices, non_blocking=True)
            self.logits[k:].zero_()  # NOTE: a stale index could lie past this bucket's rows
        else:
            self.qsl[:1].zero_()
            self.logits.zero_()
        if pad:
            self.ids[n:num_tokens].zero_()
            self.pos[n:num_tokens].zero_()
            self.slots[n:num_tokens].copy_(self.pad_slots[:pad], non_blocking=True)
        # the sequences after the step's own are empty; the last one holds the padding rows (context 0)
        # NOTE: slices, never `buf[i] = value`: torch assigns one element of a CUDA tensor by a blocking copy
        # from the host, which waits for the stream, so the host would stall until the step in flight ends
        # (every mixed step would lose its overlap); a slice's fill_ is a kernel launch like any other
        self.qsl[s + 1:last + 1].fill_(n)
        self.qsl[last + 1:last + 2].fill_(num_tokens)
        self.seq_lens[s:last].zero_()
        self.seq_lens[last:last + 1].fill_(pad)
        self.tables[s:].fill_(self.scratch_block)
        self.loaded = (num_tokens, n, s)

    def layout(self) -> dict[str, list[dict[str, Any]]]:
        """What the last `load` put in the buffers: one dict per token row and per sequence (reads the device)."""
        if self.loaded is None:
            return {"rows": [], "sequences": []}
        size, n, s = self.loaded
        qsl, lens = self.qsl.tolist(), self.seq_lens.tolist()
        seq_of = [next(i for i in range(len(lens)) if qsl[i] <= r < qsl[i + 1]) for r in range(size)]
        ids, pos, slots = self.ids[:size].tolist(), self.pos[:size].tolist(), self.slots[:size].tolist()
        rows = [{"row": r, "kind": "token" if r < n else "padding", "sequence": seq_of[r], "token id": ids[r],
                 "position": pos[r], "slot": slots[r], "block": slots[r] // self.block_size} for r in range(size)]
        seqs = [{"sequence": i, "kind": "step's" if i < s else ("padding" if i == self.max_seqs else "empty"),
                 "queries": qsl[i + 1] - qsl[i], "seq_len": lens[i],
                 "first blocks": self.tables[i, :4].tolist()} for i in range(len(lens))]
        return {"rows": rows, "sequences": seqs}

    def _repr_html_(self) -> str:
        if self.loaded is None:
            return (f"<b>MixedStepInputs</b>: up to {self.max_tokens} tokens, {self.max_seqs} sequences + 1 padding "
                    f"sequence; nothing loaded yet")
        size, n, s = self.loaded
        lay = self.layout()

        def table(items: list[dict[str, Any]], limit: int = 24) -> str:
            head = "".join(f"<th>{html.escape(k)}</th>" for k in items[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in it.values()) + "</tr>"
                           for it in items[:limit])
            more = f"<tr><td colspan='{len(items[0])}'>... {len(items) - limit} more</td></tr>" if len(items) > limit else ""
            return f"<table><tr>{head}</tr>{body}{more}</table>"
        used = [q for q in lay["sequences"] if q["kind"] != "empty"]
        return (f"<b>MixedStepInputs</b>: bucket of {size} rows, {n} of the step ({size - n} padding), {s} sequences "
                f"of the step, padding in scratch block {self.scratch_block}"
                f"<div style='display:flex;gap:16px;align-items:flex-start'>{table(lay['rows'])}{table(used)}</div>")


class MixedGraphRunner:
    """Captures `backend.run_layers` for each token-count bucket; `run(batch)` replays the right one."""

    def __init__(self, backend: "TorchBackend", kv_cache: KVCache, num_tokens: tuple[int, ...], max_seqs: int,
                 max_blocks: int, step: Callable[[ForwardBatch, KVCache], torch.Tensor] | None = None,
                 on_graph: Callable[[], Any] | None = None) -> None:
        self.backend, self.kv_cache = backend, kv_cache
        self.num_tokens = tuple(sorted(set(num_tokens)))
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        step = step or backend.run_layers
        self.inputs = MixedStepInputs(self.num_tokens[-1], max_seqs, max_seqs + 1, max_blocks, kv_cache.block_size,
                                      kv_cache.scratch_block, backend.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        dev = backend.device
        for size in reversed(self.num_tokens):  # largest first, so smaller graphs reuse its memory pool
            batch = self.inputs.batch(size)
            self.inputs.load(None, size)  # all padding: finite values through every kernel
            for _ in range(2):  # warm up outside the graph (allocator, cuBLAS handles, Triton compiles)
                step(batch, kv_cache)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = step(batch, kv_cache)
            self.pool = graph.pool()
            self.graphs[size] = graph
            if on_graph is not None:  # a progress bar's update
                on_graph()
        torch.cuda.synchronize(dev)

    def can_run(self, batch: ForwardBatch, kv_cache: KVCache) -> bool:
        return kv_cache is self.kv_cache and self.inputs.fits(batch)

    def bucket(self, num_tokens: int) -> int:
        """The smallest captured token count that holds `num_tokens` tokens."""
        return next(t for t in self.num_tokens if t >= num_tokens)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        size = self.bucket(batch.num_tokens)
        self.inputs.load(batch, size)
        self.graphs[size].replay()
        return self.outputs[size][:batch.logits_indices.shape[0]]
