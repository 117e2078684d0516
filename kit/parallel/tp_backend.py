"""`TensorParallelBackend`: the PyTorch backend running one rank's shard of a network.

The rank's `Network` (kit/parallel/sharding.py) already has the rank's shapes, so the
column-parallel layers (q/k/v, gate/up), RoPE, attention over the rank's KV heads and
the norms run as `TorchBackend` runs them. Four layer kinds are wrapped here:

    embedding   vocab-parallel: look up the ids this rank holds, zero the others, all-reduce
    o_proj      row-parallel: the projection of the rank's heads is a partial sum;
    mlp         fused (the default): the partial sums are all-reduced as the layer's `delta` and the next
                norm adds them to the residual (its fused add + RMSNorm), so a row-parallel layer is its
                GEMM and one all-reduce, nothing else; unfused: the residual is added once, after the
                all-reduce
    lm_head     vocab-parallel: each rank's logits slice, gathered on rank 0

So a block costs exactly two all-reduces of (num_tokens, hidden) each, in the model's dtype (as
TensorRT-LLM and vLLM reduce them). `KIT_TP_PARTIAL_SUMS=float32`: in 16-bit models the row-parallel GEMMs
write float32 partial sums that the all-reduce adds up in float32 (`PartialSumLinear`), rounded to the
model's dtype once where TP=1's single GEMM rounds its output; in the model's dtype each rank's partial is
rounded before the sum and the sum again, which moves about half the outputs of a split GEMM by an ulp.
It costs twice the all-reduce bytes (6 % of the batch-64 decode step of Llama-3.1-8B at TP=2 on H200s)
and brings TP=N's logits only a little closer to TP=1's: a bf16 forward pass carries any one-ulp change to
a near-tied logit (chapter 11). The wrappers
call `TorchBackend`'s own preparation of o_proj / mlp (unfused: handing it a zero
residual), so every fused kernel of that backend runs unchanged inside them; CUDA graphs record the
NCCL all-reduces with the rest of the step; `release_graphs()` destroys them, which must
happen before the group is left (NCCL >= 2.26 waits in its communicator's destroy, and
abort, until every CUDA graph holding its kernels is gone).

Memory: the rank owns its shard, so q/k/v (and gate/up) are concatenated once and the
shard's separate tensors become views of the concatenation: the rank holds them once.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kit.backends.torch_backend import DenseLinear, Env, LayerFn, TorchBackend
from kit.batch import ForwardBatch, KVCache
from kit.network import Layer, Network
from kit.parallel.comm import TensorParallelComm
from kit.parallel.mapping import Mapping

__all__ = ["TensorParallelBackend", "PartialSumLinear", "PARTIAL_SUMS_ENV"]

ROW_PARALLEL = ("o_proj", "down_proj")
PARTIAL_SUMS_ENV = "KIT_TP_PARTIAL_SUMS"  # 'model' (the default) or 'float32': the dtype of the all-reduced sums


def partial_sums_in_float32() -> bool:
    """Whether 16-bit row-parallel layers all-reduce float32 partial sums (`KIT_TP_PARTIAL_SUMS`)."""
    mode = os.environ.get(PARTIAL_SUMS_ENV, "model")
    if mode not in ("float32", "model"):
        raise ValueError(f"{PARTIAL_SUMS_ENV} must be 'float32' or 'model', got {mode!r}")
    return mode == "float32"


class PartialSumLinear:
    """A row-parallel `DenseLinear` of a 16-bit model whose output stays float32: x @ W_rank^T, a partial sum
    that the all-reduce adds up in float32 (on CUDA one GEMM with a float32 output; on the CPU the operands
    are upcast for the product)."""

    def __init__(self, lin: DenseLinear) -> None:
        self.weight, self.bias = lin.weight, lin.bias
        self._weight32: torch.Tensor | None = None  # the CPU's float32 copy, made on first use

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = torch.mm(x, self.weight.t(), out_dtype=torch.float32)
        else:  # NOTE: CPUs have no mm with a float32 output for 16-bit operands
            if self._weight32 is None:
                self._weight32 = self.weight.float()
            y = F.linear(x.float(), self._weight32)
        return y if self.bias is None else y + self.bias


class TensorParallelBackend(TorchBackend):
    """`TorchBackend` over a shard, with the collectives of the Megatron layout."""

    wrappers_take_delta = True  # fused: o_proj / mlp all-reduce their partial `delta`; the next norm adds it

    def __init__(self, network: Network, mapping: Mapping, comm: TensorParallelComm, full_vocab_size: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None, attention: str = "auto",
                 on_capture: Callable[..., None] | None = None, float32_partial_sums: bool | None = None) -> None:
        # NOTE: rank 0 decides (`KIT_TP_PARTIAL_SUMS`, read when the engine starts) and sends the choice to
        # every rank: ranks summing in different dtypes would all-reduce mismatched buffers
        self.mapping, self.comm, self.full_vocab_size = mapping, comm, full_vocab_size
        comm.full_vocab_size = full_vocab_size
        self.on_capture = on_capture  # rank 0: tells the other ranks to capture the same graphs
        self.capture_progress = mapping.rank == 0
        self.float32_partial_sums = (partial_sums_in_float32() if float32_partial_sums is None
                                     else bool(float32_partial_sums))
        super().__init__(network, device=device, dtype=dtype, attention=attention)

    def _linear(self, layer: Layer, prefixes: list[str], bias: bool) -> Any:
        lin = super()._linear(layer, prefixes, bias)
        if (isinstance(lin, DenseLinear) and len(prefixes) == 1 and prefixes[0].endswith(ROW_PARALLEL)
                and lin.weight.dtype in (torch.bfloat16, torch.float16) and self.mapping.tp_size > 1
                and self.float32_partial_sums):
            return PartialSumLinear(lin)
        if isinstance(lin, DenseLinear) and len(prefixes) > 1:
            # NOTE: the parts stay in the network (engine files, profiler) as views of the fused tensor;
            # the separate tensors are then freed, so the shard is held once (not parts + concatenation)
            w = self.network.weights
            for suffix, fused in (("weight", lin.weight), ("bias", lin.bias)):
                parts = [f"{p}.{suffix}" for p in prefixes]
                if fused is None or any(w[n].dtype != fused.dtype or w[n].device != fused.device for n in parts):
                    continue  # a cast or a move already made a copy: the parts are not the fused tensor's
                start = 0
                for n in parts:
                    rows = w[n].shape[0]
                    w[n] = fused[start:start + rows]  # (rows, in) view
                    start += rows
        return lin

    def release_graphs(self) -> None:
        """Destroy the captured CUDA graphs, decode and mixed-step (before leaving the group: NCCL waits for
        them to be gone)."""
        runners, self.graphs, self.mixed_graphs = (self.graphs, self.mixed_graphs), None, None
        for runner in runners:
            if runner is not None:
                for g in runner.graphs.values():
                    g.reset()
                runner.graphs.clear()
                runner.outputs.clear()

    def describe(self) -> str:
        sums = ", float32 partial sums" if self.float32_partial_sums else ""
        return (f"{super().describe()}, tensor-parallel rank {self.mapping.rank} of {self.mapping.tp_size} "
                f"({self.comm.backend}{sums})")

    def _vocab_embedding(self, layer: Layer) -> LayerFn:
        table = self._w(layer.weights[0])  # (vocab / tp, hidden)
        start, n = self.mapping.vocab_range(self.full_vocab_size).start, table.shape[0]
        comm, name = self.comm, layer.name

        def embed(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            local = batch.input_ids - start  # (T,)
            inside = (local >= 0) & (local < n)
            h = F.embedding(torch.where(inside, local, torch.zeros_like(local)), table)  # (T, hidden)
            env["hidden"] = comm.all_reduce(h * inside[:, None].to(h.dtype), name)
        return embed

    def _row_parallel(self, layer: Layer) -> LayerFn:
        fn = TorchBackend._PREPARE[layer.kind](self, layer)  # fused: delta = this rank's part of proj(x)
        comm, name = self.comm, layer.name

        def row_parallel_delta(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            fn(env, batch, kv)
            env["delta"] = comm.all_reduce(env["delta"], name)  # the next norm adds it to the residual

        if self.defer_residual:
            return row_parallel_delta

        def row_parallel(env: Env, batch: ForwardBatch, kv: KVCache) -> None:  # unfused: hidden + proj(x)
            residual = env["hidden"]  # (T, hidden)
            env["hidden"] = torch.zeros_like(residual)
            fn(env, batch, kv)
            env["hidden"] = residual + comm.all_reduce(env["hidden"], name).to(residual.dtype)
        return row_parallel

    def _vocab_lm_head(self, layer: Layer) -> LayerFn:
        fn = TorchBackend._PREPARE["lm_head"](self, layer)
        comm, name = self.comm, layer.name

        def lm_head(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            fn(env, batch, kv)  # (num_logits, vocab / tp)
            env["logits"] = comm.gather_logits(env["logits"], name)  # rank 0: (num_logits, vocab)
        return lm_head

    _PREPARE: dict[str, Callable[[Any, Layer], LayerFn]] = {
        **TorchBackend._PREPARE, "embedding": _vocab_embedding, "o_proj": _row_parallel, "mlp": _row_parallel,
        "lm_head": _vocab_lm_head,
    }

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes, max_blocks: int, num_tokens=(),
                            max_seqs: int = 0) -> None:
        # NOTE: every rank captures the same graphs in the same order (mixed-step buckets, then decode
        # sizes): the collectives of their warm-up steps and captures pair up across ranks
        if self.on_capture is not None:
            self.on_capture(kv_cache, tuple(batch_sizes), max_blocks, tuple(num_tokens), max_seqs)
        super().capture_cuda_graphs(kv_cache, batch_sizes, max_blocks, num_tokens=num_tokens, max_seqs=max_seqs)
