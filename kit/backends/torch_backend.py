"""Execute a `Network` with PyTorch, layer by layer, on the CPU or a CUDA GPU.

Preparing the backend is a small build step: the weights move to the device in the
compute dtype, the q/k/v projections are fused into one matrix and gate/up into
another (one GEMM instead of three or two), and the RoPE inverse frequencies are
computed once. Each layer then becomes one Python function over an environment of
named tensors, so the profiler can time and name each of them.

The math is `kit/ops.py`'s; the kinds of layer and what each computes are
`kit/layer_kinds.py`'s (`_PREPARE` below has one entry per kind). Attention reads the
paged KV cache through the block tables with `ops.paged_attention` (the reference), or
on a GPU with the Triton paged kernels (`triton_attention.py`: decode, and varlen prefill
for prompt chunks and mixed batches), for bf16/fp16/fp32 and int8/fp8 caches alike.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from kit.backends.triton_attention import paged_decode_attention, paged_prefill_attention, triton_available
from kit.backends.base import LayerHook
from kit.batch import ForwardBatch, KVCache
from kit.layer_kinds import check_covers
from kit.network import Layer, Network
from kit.ops import apply_rope, paged_attention, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from kit.quantization import build_linear
from kit.quantization.kv_cache import quantize_kv

__all__ = ["TorchBackend", "DenseLinear", "CUDAGraphRunner", "paged_attention", "rope_inv_freq"]

Env = dict[str, torch.Tensor]
LayerFn = Callable[[Env, ForwardBatch, KVCache], None]
_BATCH_INPUTS = ("input_ids", "positions", "logits_indices")  # layer inputs that come from the batch


class DenseLinear:
    """y = x @ W^T (+ b) for one or several weights concatenated along the output dim."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor] | None = None) -> None:
        self.weight = weights[0] if len(weights) == 1 else torch.cat(weights, 0)  # (out, in)
        self.bias = None
        if biases:
            self.bias = biases[0] if len(biases) == 1 else torch.cat(biases, 0)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class TorchBackend:
    """Runs each layer of a `Network` as a PyTorch function."""

    name = "torch"

    def __init__(self, network: Network, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, attention: str = "auto") -> None:
        if attention not in ("auto", "triton", "reference"):
            raise ValueError(f"attention must be 'auto', 'triton' or 'reference', got {attention!r}")
        self.network = network
        self.config = network.config
        self.device = torch.device(device)
        self.dtype = dtype or network.weights["model.embed_tokens.weight"].dtype  # never quantized
        # on a GPU attention runs in the Triton paged kernels (decode steps; prompt chunks and mixed
        # batches): they read only each sequence's own blocks (8-bit ones too) instead of gathering a
        # padded copy of every context
        # (attention='triton' on the CPU runs them through Triton's interpreter, for tests)
        self.decode_kernel = self.prefill_kernel = None
        if attention == "triton" or (attention == "auto" and self.device.type == "cuda"):
            if triton_available():
                self.decode_kernel, self.prefill_kernel = paged_decode_attention, paged_prefill_attention
            elif attention == "triton":
                raise RuntimeError("attention='triton' needs the triton package")
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"attention='triton' on {self.device} needs TRITON_INTERPRET=1 (Triton's "
                                 f"interpreter); use attention='auto' or 'reference' there")
        self.inv_freq = rope_inv_freq(self.config).to(self.device)
        self.ops: list[tuple[Layer, LayerFn]] = [(layer, self._PREPARE[layer.kind](self, layer))
                                                 for layer in network.layers]
        self.graphs: CUDAGraphRunner | None = None

    can_execute = True

    @property
    def capabilities(self) -> str:
        graphs = "CUDA graphs for decode" if self.device.type == "cuda" else "CUDA graphs on a CUDA device only"
        return (f"executes paged batches (prefill, decode, mixed) on {self.device.type} in "
                f"{str(self.dtype).replace('torch.', '')}; per-layer hooks; {graphs}")

    def describe(self) -> str:
        mode = f"CUDA graphs for decode batch sizes {list(self.graphs.batch_sizes)}" if self.graphs else "eager"
        attn = "Triton paged attention" if self.decode_kernel is not None else "reference attention"
        return f"PyTorch {torch.__version__} ({self.device.type}, {mode}, {attn})"

    # --------------------------------------------------------------- preparing
    def _w(self, name: str) -> torch.Tensor:
        t = self.network.weights[name]
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None)

    def _linear(self, layer: Layer, prefixes: list[str], bias: bool) -> Any:
        if self.network.quant_config is not None:
            return build_linear(self.network.weights, prefixes, self.network.quant_config,
                                bias=bias, device=self.device, dtype=self.dtype)
        weights = [self._w(p + ".weight") for p in prefixes]
        biases = [self._w(p + ".bias") for p in prefixes] if bias else None
        return DenseLinear(weights, biases)

    def _embedding(self, layer: Layer) -> LayerFn:
        table = self._w(layer.weights[0])
        return lambda env, batch, kv: env.__setitem__("hidden", F.embedding(batch.input_ids, table))

    def _rmsnorm(self, layer: Layer) -> LayerFn:
        w, eps = self._w(layer.weights[0]), layer.attrs["eps"]
        src, dst = layer.inputs[0], layer.outputs[0]
        return lambda env, batch, kv: env.__setitem__(dst, rms_norm(env[src], w, eps))

    def _qkv_proj(self, layer: Layer) -> LayerFn:
        attn = layer.weights[0].rsplit(".", 2)[0]
        lin = self._linear(layer, [f"{attn}.{m}" for m in ("q_proj", "k_proj", "v_proj")], layer.attrs["bias"])
        c = self.config
        sizes = [c.q_size, c.kv_size, c.kv_size]

        def qkv(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            q, k, v = lin(env["x"]).split(sizes, dim=-1)
            env["q"] = q.reshape(-1, c.num_attention_heads, c.head_dim)  # (T, H, D)
            env["k"] = k.reshape(-1, c.num_key_value_heads, c.head_dim)  # (T, KVH, D)
            env["v"] = v.reshape(-1, c.num_key_value_heads, c.head_dim)
        return qkv

    def _qk_norm(self, layer: Layer) -> LayerFn:
        qw, kw, eps = self._w(layer.weights[0]), self._w(layer.weights[1]), layer.attrs["eps"]

        def qk_norm(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            env["q"] = rms_norm(env["q"], qw, eps)
            env["k"] = rms_norm(env["k"], kw, eps)
        return qk_norm

    def _rotary(self, layer: Layer) -> LayerFn:
        inv_freq = self.inv_freq

        def rotate(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            if "rope_cos" not in env:  # the same for every layer: computed once per forward
                cos, sin = rope_cos_sin(batch.positions, inv_freq, self.dtype)  # (T, D)
                env["rope_cos"], env["rope_sin"] = cos[:, None, :], sin[:, None, :]  # (T, 1, D)
            cos, sin = env["rope_cos"], env["rope_sin"]
            env["q"] = apply_rope(env["q"], cos, sin)
            env["k"] = apply_rope(env["k"], cos, sin)
        return rotate

    def _attention(self, layer: Layer) -> LayerFn:
        a = layer.attrs
        idx, scale, window = a["layer_idx"], a["scale"], a["sliding_window"]

        def attention(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            kc, vc = kv.k[idx], kv.v[idx]  # (num_blocks, block_size, KVH, D)
            kvh, d = kc.shape[2], kc.shape[3]
            q = env["q"]  # (T, H, D)
            scales = None
            if kv.is_quantized:  # 8-bit cache: quantize on write; the kernels (or the reference) dequantize
                scales = kv.k_scale[idx], kv.v_scale[idx]  # (num_blocks, block_size, KVH)
                qk, sk = quantize_kv(env["k"], kv.quant_algo)
                qv, sv = quantize_kv(env["v"], kv.quant_algo)
                kc.view(-1, kvh, d)[batch.slot_mapping] = qk
                vc.view(-1, kvh, d)[batch.slot_mapping] = qv
                scales[0].view(-1, kvh)[batch.slot_mapping] = sk
                scales[1].view(-1, kvh)[batch.slot_mapping] = sv
            else:
                kc.view(-1, kvh, d)[batch.slot_mapping] = env["k"].to(kc.dtype)
                vc.view(-1, kvh, d)[batch.slot_mapping] = env["v"].to(vc.dtype)
                q = q.to(kc.dtype)
            ks, vs = scales if scales is not None else (None, None)
            if self.decode_kernel is not None and batch.max_query_len == 1:
                out = self.decode_kernel(q, kc, vc, batch.block_tables, batch.seq_lens, scale, window,
                                         k_scale=ks, v_scale=vs)
            elif self.prefill_kernel is not None:  # prompt chunks and mixed batches: varlen, no padding
                out = self.prefill_kernel(q, kc, vc, batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                          scale, window, k_scale=ks, v_scale=vs)
            else:
                out = paged_attention(env["q"], kc, vc, batch, scale, window, kv_scales=scales)
            env["attn"] = out.to(env["q"].dtype).reshape(out.shape[0], -1)  # (T, H*D)
        return attention

    def _o_proj(self, layer: Layer) -> LayerFn:
        prefix = layer.weights[0].rsplit(".", 1)[0]
        lin = self._linear(layer, [prefix], layer.attrs["bias"])
        return lambda env, batch, kv: env.__setitem__("hidden", env["hidden"] + lin(env["attn"]))

    def _mlp(self, layer: Layer) -> LayerFn:
        mlp = layer.weights[0].rsplit(".", 2)[0]
        gate_up = self._linear(layer, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], layer.attrs["bias"])
        down = self._linear(layer, [f"{mlp}.down_proj"], layer.attrs["bias"])
        inter = layer.attrs["intermediate_size"]

        def run_mlp(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            gate, up = gate_up(env["x"]).split([inter, inter], dim=-1)
            env["hidden"] = env["hidden"] + down(swiglu(gate, up))
        return run_mlp

    def _lm_head(self, layer: Layer) -> LayerFn:
        prefix = layer.weights[0].rsplit(".", 1)[0]
        head = self._linear(layer, [prefix], False)
        return lambda env, batch, kv: env.__setitem__("logits", head(env["x"][batch.logits_indices]))

    # one preparation per kind of `kit/layer_kinds.py`
    _PREPARE: dict[str, Callable[["TorchBackend", Layer], LayerFn]] = {
        "embedding": _embedding, "rmsnorm": _rmsnorm, "qkv_proj": _qkv_proj, "qk_norm": _qk_norm, "rope": _rotary,
        "attention": _attention, "o_proj": _o_proj, "mlp": _mlp, "lm_head": _lm_head,
    }

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int], max_blocks: int) -> None:
        """Record one decode step per batch-size bucket over `kv_cache` (CUDA only); see `CUDAGraphRunner`."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this backend runs on {self.device}")
        self.graphs = CUDAGraphRunner(self, kv_cache, tuple(batch_sizes), max_blocks)

    # ----------------------------------------------------------------- running
    def forward(self, batch: ForwardBatch, kv_cache: KVCache,
                hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Logits (num_logits, vocab); a decode batch replays a CUDA graph when one fits and no hook is given."""
        if not hooks and self.graphs is not None and self.graphs.can_run(batch, kv_cache):
            return self.graphs.run(batch)
        return self.run_layers(batch, kv_cache, hooks)

    def run_layers(self, batch: ForwardBatch, kv_cache: KVCache,
                   hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Every layer in order, eagerly (what CUDA graphs record), calling `hooks` around each."""
        env: Env = {}
        if not hooks:
            for _, fn in self.ops:
                fn(env, batch, kv_cache)
        else:
            for layer, fn in self.ops:
                inputs = _named(layer.inputs, env, batch)
                for hook in hooks:
                    hook.before(layer, inputs)
                fn(env, batch, kv_cache)
                outputs = _named(layer.outputs, env, batch)
                for hook in reversed(hooks):
                    hook.after(layer, outputs)
        return env["logits"]


check_covers("TorchBackend", TorchBackend._PREPARE)


def _named(names: Sequence[str], env: Env, batch: ForwardBatch) -> Mapping[str, torch.Tensor]:
    """The tensors `names` refer to now: from the environment, or the batch for its own inputs."""
    out = {n: env[n] for n in names if n in env}
    out.update({n: getattr(batch, n) for n in names if n in _BATCH_INPUTS and n not in out})
    return out


class CUDAGraphRunner:
    """Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

    A decode step of a small model is hundreds of tiny kernels; launched one by one
    from Python, the GPU waits on the CPU between them. A CUDA graph records the whole
    step once and replays it with one launch. Graphs need fixed shapes and addresses,
    so each bucket owns static input buffers: a batch of n sequences is copied into the
    smallest bucket >= n, and the padding rows write their K/V into a scratch block
    that no sequence owns (`KVCache.scratch_block`). Attention runs over the bucket's
    full `max_blocks * block_size` context with the causal mask hiding what is not
    there, which is why the build's `max_seq_len` matters for decode speed.
    """

    def __init__(self, backend: TorchBackend, kv_cache: KVCache, batch_sizes: tuple[int, ...],
                 max_blocks: int) -> None:
        self.backend = backend
        self.kv_cache = kv_cache
        self.batch_sizes = tuple(sorted(batch_sizes))
        self.max_blocks = max_blocks
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
        pool = None
        for size in reversed(self.batch_sizes):  # largest first, so smaller graphs reuse its memory pool
            batch = ForwardBatch(self._ids[:size], self._pos[:size], arange[:size + 1], self._seq_lens[:size],
                                 self._tables[:size], self._slots[:size], arange[:size], max_query_len=1,
                                 max_seq_len=max_blocks * bs, block_size=bs)
            for _ in range(2):  # warm up outside the graph (allocator, cuBLAS handles)
                backend.run_layers(batch, kv_cache)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = backend.run_layers(batch, kv_cache)
            pool = graph.pool()
            self.graphs[size] = graph
            self.batches[size] = batch
        torch.cuda.synchronize(dev)

    def can_run(self, batch: ForwardBatch, kv_cache: KVCache) -> bool:
        return (kv_cache is self.kv_cache and batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs
                and batch.num_seqs <= self.batch_sizes[-1] and batch.logits_indices.shape[0] == batch.num_seqs
                and batch.block_tables.shape[1] <= self.max_blocks
                and batch.max_seq_len <= self.max_blocks * batch.block_size)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        n = batch.num_seqs
        size = next(s for s in self.batch_sizes if s >= n)
        self._ids[:n].copy_(batch.input_ids, non_blocking=True)
        self._pos[:n].copy_(batch.positions, non_blocking=True)
        self._slots[:n].copy_(batch.slot_mapping, non_blocking=True)
        self._seq_lens[:n].copy_(batch.seq_lens, non_blocking=True)
        width = batch.block_tables.shape[1]
        self._tables[:n, :width].copy_(batch.block_tables, non_blocking=True)
        self._tables[:n, width:] = self.kv_cache.scratch_block
        if n < size:  # padding rows: position 0, writing into the scratch block only
            self._ids[n:size] = 0
            self._pos[n:size] = 0
            self._slots[n:size] = self.kv_cache.scratch_block * self.kv_cache.block_size
            self._tables[n:size] = self.kv_cache.scratch_block
        self.graphs[size].replay()
        return self.outputs[size][:n]
