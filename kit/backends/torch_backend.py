"""Execute a `Network` with PyTorch, layer by layer, on the CPU or a CUDA GPU.

Preparing the backend is a small build step: the weights move to the device in the
compute dtype, the q/k/v projections are fused into one matrix and gate/up into
another (one GEMM instead of three or two), and the RoPE inverse frequencies are
computed once. Each layer then becomes one Python function over an environment of
named tensors, so the profiler can time and name each of them.

Attention reads the paged KV cache through the block tables. This reference version
gathers each sequence's blocks into a padded (num_seqs, max_seq_len) view and runs
`scaled_dot_product_attention` once for the whole batch with a causal mask built from
the token positions, so any mix of prompt chunks and decode tokens is correct.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kit.config import ModelConfig
from kit.network import Layer, Network

__all__ = ["TorchBackend", "DenseLinear", "CUDAGraphRunner", "paged_attention", "rope_inv_freq"]

Env = dict[str, torch.Tensor]


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


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies with linear / llama3 scaling, computed as transformers does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if config.rope_type == "linear":
        return inv / factor
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    # long wavelengths are scaled by `factor`, short ones kept, a smooth ramp between
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # in float32, then back to the input dtype before the weight (as transformers does);
    # F.rms_norm is one fused kernel where PyTorch has one, instead of five elementwise ones
    dtype = x.dtype
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * xf.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (T, H, D); cos/sin (T, 1, D); the two halves of D rotate together (HF layout)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: Any,
                    scale: float, sliding_window: int | None = None,
                    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of the batch's queries over their sequences' cached keys/values.

    q (T, H, D); k_cache / v_cache (num_blocks, block_size, KVH, D) for one layer,
    already holding this step's keys and values. An 8-bit cache passes its scales
    (num_blocks, block_size, KVH) and is dequantized right after the gather. Returns (T, H, D).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, bs = batch.num_seqs, batch.block_size
    max_q, max_len = batch.max_query_len, batch.max_seq_len
    nb = -(-max_len // bs)
    tables = batch.block_tables[:, :nb]  # (S, nb)
    kvh = k_cache.shape[2]
    k = k_cache[tables].reshape(num_seqs, nb * bs, kvh, head_dim)[:, :max_len]  # (S, L, KVH, D)
    v = v_cache[tables].reshape(num_seqs, nb * bs, kvh, head_dim)[:, :max_len]
    if kv_scales is not None:
        ks = kv_scales[0][tables].reshape(num_seqs, nb * bs, kvh)[:, :max_len]
        vs = kv_scales[1][tables].reshape(num_seqs, nb * bs, kvh)[:, :max_len]
        k = (k.float() * ks[..., None]).to(q.dtype)
        v = (v.float() * vs[..., None]).to(q.dtype)
    # scatter the flat queries into a padded (S, max_q) grid
    qlens = batch.query_start_loc[1:] - batch.query_start_loc[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), qlens, output_size=num_tokens)
    row = torch.arange(num_tokens, device=q.device) - batch.query_start_loc[seq_idx]
    qp = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
    qp[seq_idx, row] = q
    qpos = torch.zeros(num_seqs, max_q, dtype=torch.long, device=q.device)  # padded rows see key 0 only
    qpos[seq_idx, row] = batch.positions
    kpos = torch.arange(max_len, device=q.device)
    mask = kpos[None, None, :] <= qpos[:, :, None]  # (S, max_q, L) causal
    if sliding_window is not None:
        mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=kvh != num_heads,
    )  # (S, H, max_q, D)
    return out.transpose(1, 2)[seq_idx, row]  # (T, H, D)


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
        # decode steps (one query per sequence) use the Triton paged kernel on a GPU: it reads only
        # each sequence's own blocks instead of gathering a padded copy of every context
        self.decode_kernel = None
        if attention != "reference" and self.device.type == "cuda":
            from kit.backends import triton_attention

            if triton_attention.triton_available():
                self.decode_kernel = triton_attention.paged_decode_attention
            elif attention == "triton":
                raise RuntimeError("attention='triton' needs the triton package")
        self.inv_freq = rope_inv_freq(self.config).to(self.device)
        self.ops: list[tuple[Layer, Callable[[Env, Any, Any], None]]] = [
            (layer, self._prepare(layer)) for layer in network.layers
        ]

        self.graphs: CUDAGraphRunner | None = None

    def describe(self) -> str:
        mode = f"CUDA graphs for decode batch sizes {list(self.graphs.batch_sizes)}" if self.graphs else "eager"
        attn = "Triton paged decode attention" if self.decode_kernel is not None else "reference attention"
        return f"PyTorch {torch.__version__} ({self.device.type}, {mode}, {attn})"

    # --------------------------------------------------------------- preparing
    def _w(self, name: str) -> torch.Tensor:
        t = self.network.weights[name]
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None)

    def _linear(self, layer: Layer, prefixes: list[str], bias: bool) -> Any:
        if self.network.quant_config is not None:
            from kit.quantization import build_linear

            return build_linear(self.network.weights, prefixes, self.network.quant_config,
                                bias=bias, device=self.device, dtype=self.dtype)
        weights = [self._w(p + ".weight") for p in prefixes]
        biases = [self._w(p + ".bias") for p in prefixes] if bias else None
        return DenseLinear(weights, biases)

    def _prepare(self, layer: Layer) -> Callable[[Env, Any, Any], None]:
        kind, a = layer.kind, layer.attrs
        if kind == "embedding":
            table = self._w(layer.weights[0])
            return lambda env, batch, kv: env.__setitem__("hidden", F.embedding(batch.input_ids, table))
        if kind == "rmsnorm":
            w, eps = self._w(layer.weights[0]), a["eps"]
            src, dst = layer.inputs[0], layer.outputs[0]
            return lambda env, batch, kv: env.__setitem__(dst, rms_norm(env[src], w, eps))
        if kind == "qkv_proj":
            attn = layer.weights[0].rsplit(".", 2)[0]
            lin = self._linear(layer, [f"{attn}.{m}" for m in ("q_proj", "k_proj", "v_proj")], a["bias"])
            c = self.config
            sizes = [c.q_size, c.kv_size, c.kv_size]

            def qkv(env: Env, batch: Any, kv: Any) -> None:
                q, k, v = lin(env["x"]).split(sizes, dim=-1)
                env["q"] = q.reshape(-1, c.num_attention_heads, c.head_dim)  # (T, H, D)
                env["k"] = k.reshape(-1, c.num_key_value_heads, c.head_dim)  # (T, KVH, D)
                env["v"] = v.reshape(-1, c.num_key_value_heads, c.head_dim)
            return qkv
        if kind == "qk_norm":
            qw, kw, eps = self._w(layer.weights[0]), self._w(layer.weights[1]), a["eps"]

            def qk_norm(env: Env, batch: Any, kv: Any) -> None:
                env["q"] = rms_norm(env["q"], qw, eps)
                env["k"] = rms_norm(env["k"], kw, eps)
            return qk_norm
        if kind == "rope":
            inv_freq = self.inv_freq

            def rope(env: Env, batch: Any, kv: Any) -> None:
                if "rope_cos" not in env:  # the same for every layer: computed once per forward
                    freqs = batch.positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
                    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
                    env["rope_cos"], env["rope_sin"] = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
                cos, sin = env["rope_cos"], env["rope_sin"]
                env["q"] = apply_rope(env["q"], cos, sin)
                env["k"] = apply_rope(env["k"], cos, sin)
            return rope
        if kind == "attention":
            from kit.quantization.kv_cache import quantize_kv

            idx, scale, window = a["layer_idx"], a["scale"], a["sliding_window"]

            def attention(env: Env, batch: Any, kv: Any) -> None:
                kc, vc = kv.k[idx], kv.v[idx]  # (num_blocks, block_size, KVH, D)
                kvh, d = kc.shape[2], kc.shape[3]
                if kv.is_quantized:  # 8-bit cache: quantize on write, dequantize after the gather
                    ks, vs = kv.k_scale[idx], kv.v_scale[idx]  # (num_blocks, block_size, KVH)
                    qk, sk = quantize_kv(env["k"], kv.quant_algo)
                    qv, sv = quantize_kv(env["v"], kv.quant_algo)
                    kc.view(-1, kvh, d)[batch.slot_mapping] = qk
                    vc.view(-1, kvh, d)[batch.slot_mapping] = qv
                    ks.view(-1, kvh)[batch.slot_mapping] = sk
                    vs.view(-1, kvh)[batch.slot_mapping] = sv
                    out = paged_attention(env["q"], kc, vc, batch, scale, window, kv_scales=(ks, vs))
                    env["attn"] = out.reshape(out.shape[0], -1)
                    return
                kc.view(-1, kvh, d)[batch.slot_mapping] = env["k"].to(kc.dtype)
                vc.view(-1, kvh, d)[batch.slot_mapping] = env["v"].to(vc.dtype)
                if self.decode_kernel is not None and batch.max_query_len == 1:
                    out = self.decode_kernel(env["q"].to(kc.dtype), kc, vc, batch.block_tables, batch.seq_lens,
                                             scale, window).to(env["q"].dtype)
                else:
                    out = paged_attention(env["q"], kc, vc, batch, scale, window)
                env["attn"] = out.reshape(out.shape[0], -1)  # (T, H*D)
            return attention
        if kind == "o_proj":
            prefix = layer.weights[0].rsplit(".", 1)[0]
            lin = self._linear(layer, [prefix], a["bias"])
            return lambda env, batch, kv: env.__setitem__("hidden", env["hidden"] + lin(env["attn"]))
        if kind == "mlp":
            mlp = layer.weights[0].rsplit(".", 2)[0]
            gate_up = self._linear(layer, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], a["bias"])
            down = self._linear(layer, [f"{mlp}.down_proj"], a["bias"])
            inter = a["intermediate_size"]

            def run_mlp(env: Env, batch: Any, kv: Any) -> None:
                gate, up = gate_up(env["x"]).split([inter, inter], dim=-1)
                env["hidden"] = env["hidden"] + down(F.silu(gate) * up)
            return run_mlp
        if kind == "lm_head":
            prefix = layer.weights[0].rsplit(".", 1)[0]
            head = self._linear(layer, [prefix], False)
            return lambda env, batch, kv: env.__setitem__("logits", head(env["x"][batch.logits_indices]))
        raise ValueError(f"TorchBackend cannot run layer kind {kind!r}")

    def capture_graphs(self, kv_cache: Any, batch_sizes: tuple[int, ...], max_blocks: int) -> None:
        self.graphs = CUDAGraphRunner(self, kv_cache, batch_sizes, max_blocks)

    # ----------------------------------------------------------------- running
    def forward(self, batch: Any, kv_cache: Any, on_layer: Callable[[Layer], Any] | None = None) -> torch.Tensor:
        if on_layer is None and self.graphs is not None and self.graphs.can_run(batch, kv_cache):
            return self.graphs.run(batch)
        return self.run_layers(batch, kv_cache, on_layer)

    def run_layers(self, batch: Any, kv_cache: Any, on_layer: Callable[[Layer], Any] | None = None) -> torch.Tensor:
        env: Env = {}
        if on_layer is None:
            for _, fn in self.ops:
                fn(env, batch, kv_cache)
        else:
            for layer, fn in self.ops:
                with on_layer(layer) or contextlib.nullcontext():
                    fn(env, batch, kv_cache)
        return env["logits"]


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

    def __init__(self, backend: TorchBackend, kv_cache: Any, batch_sizes: tuple[int, ...], max_blocks: int) -> None:
        from kit.batch import ForwardBatch

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
        self.batches: dict[int, Any] = {}
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

    def can_run(self, batch: Any, kv_cache: Any) -> bool:
        return (kv_cache is self.kv_cache and batch.max_query_len == 1 and batch.num_tokens == batch.num_seqs
                and batch.num_seqs <= self.batch_sizes[-1] and batch.logits_indices.shape[0] == batch.num_seqs
                and batch.block_tables.shape[1] <= self.max_blocks
                and batch.max_seq_len <= self.max_blocks * batch.block_size)

    def run(self, batch: Any) -> torch.Tensor:
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
