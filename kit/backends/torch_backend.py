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

With `fuse=True` (the default) a layer launches fewer kernels (`kit/kernels/`: Triton on
CUDA, the same torch ops as the unfused path elsewhere, so CPU numerics do not change):

    o_proj, mlp          write their output as `delta`; the residual add moves into the next norm
                         (unless a subclass wraps o_proj / mlp without passing `delta` on:
                         `defer_residual`, `wrappers_take_delta`)
    rmsnorm              residual += delta; x = rms_norm(residual): one kernel (`fused_add_rms_norm`)
    rope                 rotates q and k and writes k, v into the paged cache (`rope_kv_write`),
                         straight from the qkv GEMM's output (an 8-bit cache: quantized, with its
                         scales, in the same kernel); attention then only reads the cache
    mlp                  silu(gate) * up in one kernel over the gate_up output (`silu_mul`)
    lm_head              a decode batch (every row wants logits) skips the row gather

The profiler's per-layer times follow the kernels: a norm's time includes the residual
add of the layer before it, rope's time includes the K/V cache write (attention's time
is the attention kernel alone). Hooks still see every layer's named outputs: `hidden`
after o_proj / mlp is computed on access (hidden + delta) and `k` after rope is read
back from the cache (dequantized, for an 8-bit cache), so evaluation and the profiler see the
values the layers computed (an 8-bit cache's k: to within its quantization step).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from kit.backends.base import LayerHook
from kit.backends.cuda_graphs import CUDAGraphRunner
from kit.backends.mixed_graphs import MixedGraphRunner
from kit.backends.triton_attention import paged_decode_attention, paged_prefill_attention, triton_available
from kit.batch import ForwardBatch, KVCache
from kit.kernels import fused_add_rms_norm, rope_kv_write, silu_mul
from kit.layer_kinds import check_covers
from kit.network import Layer, Network
from kit.progress import tqdm
from kit.ops import apply_rope, paged_attention, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from kit.quantization import build_linear
from kit.quantization.kv_cache import dequantize_kv, write_kv

__all__ = ["TorchBackend", "DenseLinear", "CUDAGraphRunner", "MixedGraphRunner", "paged_attention", "rope_inv_freq"]

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
                 dtype: torch.dtype | None = None, attention: str = "auto", fuse: bool = True,
                 kernels: str = "auto") -> None:
        if attention not in ("auto", "triton", "reference"):
            raise ValueError(f"attention must be 'auto', 'triton' or 'reference', got {attention!r}")
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {fuse!r}")
        if kernels not in ("auto", "triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {kernels!r}")
        self.network = network
        self.fuse = fuse
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
            if self.device.type != "cuda" and self.dtype == torch.bfloat16:
                raise ValueError(f"attention='triton' on {self.device} runs in Triton's interpreter, whose "
                                 f"bfloat16 dot products are wrong; use dtype=float32 there, or attention='auto' "
                                 f"/ 'reference'")
        self.inv_freq = rope_inv_freq(self.config).to(self.device)
        # the fused ops: Triton kernels on a GPU, their torch references (the unfused math) elsewhere;
        # kernels="triton" on the CPU runs them through Triton's interpreter (TRITON_INTERPRET=1, for tests)
        if kernels == "auto":
            kernels = "triton" if self.device.type == "cuda" and triton_available() else "torch"
        elif kernels == "triton" and not triton_available():
            raise RuntimeError("kernels='triton' needs the triton package")
        self.kernel_impl = kernels
        # NOTE: the residual add moves into the next norm only when o_proj / mlp are prepared by this
        # class itself, or by a subclass whose wrappers pass the `delta` on (`wrappers_take_delta`: tensor
        # parallel all-reduces it); any other subclass that wraps them relies on their
        # `hidden = hidden + proj` and keeps it; its norms, rope and SiLU x up are still fused
        self.defer_residual = fuse and (self.wrappers_take_delta or all(
            self._PREPARE[k] is TorchBackend._PREPARE[k] for k in ("o_proj", "mlp")))
        self.ops: list[tuple[Layer, LayerFn]] = [(layer, self._PREPARE[layer.kind](self, layer))
                                                 for layer in network.layers]
        self.graphs: CUDAGraphRunner | None = None
        self.mixed_graphs: MixedGraphRunner | None = None

    can_execute = True
    wrappers_take_delta = False  # a subclass wrapping o_proj / mlp that handles their `delta` (see __init__)
    supports_mixed_graphs = True  # capture_cuda_graphs takes num_tokens= (kit/backends/mixed_graphs.py)
    capture_progress = True  # a progress bar while capturing (tensor parallelism: rank 0's only)

    @property
    def capabilities(self) -> str:
        graphs = "CUDA graphs for decode" if self.device.type == "cuda" else "CUDA graphs on a CUDA device only"
        return (f"executes paged batches (prefill, decode, mixed) on {self.device.type} in "
                f"{str(self.dtype).replace('torch.', '')}; per-layer hooks; {graphs}")

    def describe(self) -> str:
        mode = f"CUDA graphs for decode batch sizes {list(self.graphs.batch_sizes)}" if self.graphs else "eager"
        if self.mixed_graphs is not None:
            t = self.mixed_graphs.num_tokens
            mode += f" and mixed steps of {t[0]}..{t[-1]} tokens ({len(t)} buckets)"
        attn = "Triton paged attention" if self.decode_kernel is not None else "reference attention"
        fused = f"fused norm/rope/activation ({self.kernel_impl})" if self.fuse else "unfused"
        return f"PyTorch {torch.__version__} ({self.device.type}, {mode}, {attn}, {fused})"

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
        if not self.fuse:
            return lambda env, batch, kv: env.__setitem__(dst, rms_norm(env[src], w, eps))
        impl = self.kernel_impl

        def add_norm(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            # the residual update the o_proj / mlp before left in `delta`, added in place here
            env[dst] = fused_add_rms_norm(env.pop("delta", None), env[src], w, eps, impl)
        return add_norm

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
        inv_freq, idx, impl = self.inv_freq, layer.attrs["layer_idx"], self.kernel_impl

        def tables(env: Env, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
            if "rope_cos" not in env:  # the same for every layer: computed once per forward
                cos, sin = rope_cos_sin(batch.positions, inv_freq, self.dtype)  # (T, D)
                env["rope_cos"], env["rope_sin"] = cos[:, None, :], sin[:, None, :]  # (T, 1, D)
            return env["rope_cos"], env["rope_sin"]

        def rotate(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            cos, sin = tables(env, batch)
            env["q"] = apply_rope(env["q"], cos, sin)
            env["k"] = apply_rope(env["k"], cos, sin)

        def rotate_and_write(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            kc, vc = kv.k[idx], kv.v[idx]  # (num_blocks, block_size, KVH, D)
            ks, vs = (kv.k_scale[idx], kv.v_scale[idx]) if kv.is_quantized else (None, None)  # 8-bit: quantized on write
            cos_sin = tables(env, batch) if impl == "torch" else None  # the Triton kernel makes its own
            env["q"] = rope_kv_write(env["q"], env["k"], env["v"], batch.positions, inv_freq, kc, vc,
                                     batch.slot_mapping, cos_sin, impl, k_scale=ks, v_scale=vs)
            # NOTE: the rotated k lives in the cache only; a hook asking for it reads it back (dequantized)
            kvh, d, dtype = kc.shape[2], kc.shape[3], self.dtype
            if ks is None:
                env["k"] = _Deferred(lambda: kc.view(-1, kvh, d)[batch.slot_mapping])
            else:
                env["k"] = _Deferred(lambda: dequantize_kv(kc.view(-1, kvh, d)[batch.slot_mapping],
                                                           ks.view(-1, kvh)[batch.slot_mapping], dtype))
            env["kv_written"] = True
        return rotate_and_write if self.fuse else rotate

    def _attention(self, layer: Layer) -> LayerFn:
        a = layer.attrs
        idx, scale, window = a["layer_idx"], a["scale"], a["sliding_window"]

        def attention(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            kc, vc = kv.k[idx], kv.v[idx]  # (num_blocks, block_size, KVH, D)
            q = env["q"]  # (T, H, D)
            # 8-bit cache: quantized on write, one scale per (token, kv head); the kernels (or the reference) dequantize
            scales = (kv.k_scale[idx], kv.v_scale[idx]) if kv.is_quantized else None  # (num_blocks, block_size, KVH)
            ks, vs = scales or (None, None)
            if not env.pop("kv_written", False):  # the fused rope wrote K/V already
                write_kv(kc, vc, batch.slot_mapping, env["k"], env["v"], ks, vs)
            if not kv.is_quantized:
                q = q.to(kc.dtype)
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
        if self.defer_residual:  # the next norm adds it into the residual stream
            return lambda env, batch, kv: env.__setitem__("delta", lin(env["attn"]))
        return lambda env, batch, kv: env.__setitem__("hidden", env["hidden"] + lin(env["attn"]))

    def _mlp(self, layer: Layer) -> LayerFn:
        mlp = layer.weights[0].rsplit(".", 2)[0]
        gate_up = self._linear(layer, [f"{mlp}.gate_proj", f"{mlp}.up_proj"], layer.attrs["bias"])
        down = self._linear(layer, [f"{mlp}.down_proj"], layer.attrs["bias"])
        inter = layer.attrs["intermediate_size"]

        impl = self.kernel_impl

        def run_mlp(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            gate, up = gate_up(env["x"]).split([inter, inter], dim=-1)
            env["hidden"] = env["hidden"] + down(swiglu(gate, up))

        def run_mlp_fused(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            out = down(silu_mul(gate_up(env["x"]), impl))
            if self.defer_residual:
                env["delta"] = out  # the next norm adds it
            else:
                env["hidden"] = env["hidden"] + out
        return run_mlp_fused if self.fuse else run_mlp

    def _lm_head(self, layer: Layer) -> LayerFn:
        prefix = layer.weights[0].rsplit(".", 1)[0]
        head = self._linear(layer, [prefix], False)

        def logits(env: Env, batch: ForwardBatch, kv: KVCache) -> None:
            x = env["x"]
            # NOTE: in a decode batch with a logits row per token the rows are 0..T-1: no gather kernel
            if not (batch.max_query_len == 1 and batch.logits_indices.shape[0] == x.shape[0]):
                x = x[batch.logits_indices]
            env["logits"] = head(x)
        return logits

    # one preparation per kind of `kit/layer_kinds.py`
    _PREPARE: dict[str, Callable[["TorchBackend", Layer], LayerFn]] = {
        "embedding": _embedding, "rmsnorm": _rmsnorm, "qkv_proj": _qkv_proj, "qk_norm": _qk_norm, "rope": _rotary,
        "attention": _attention, "o_proj": _o_proj, "mlp": _mlp, "lm_head": _lm_head,
    }

    def mixed_graph_sizes(self, kv_cache: KVCache, num_tokens: Sequence[int]) -> tuple[int, ...]:
        """The buckets of `num_tokens` a capture over `kv_cache` takes: () unless attention runs in the varlen
        Triton kernel."""
        if self.prefill_kernel is None:
            return ()
        return tuple(sorted({int(t) for t in num_tokens}))

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int], max_blocks: int,
                            num_tokens: Sequence[int] = (), max_seqs: int = 0) -> None:
        """Record one decode step per batch-size bucket over `kv_cache` (CUDA only); see `CUDAGraphRunner`.

        With `num_tokens`, also one mixed step per token-count bucket for up to `max_seqs`
        sequences (`MixedGraphRunner`), when attention allows it (`mixed_graph_sizes`).
        """
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this backend runs on {self.device}")
        self.graphs = self.mixed_graphs = None  # NOTE: the old graphs' memory goes before the new ones take theirs
        sizes = self.mixed_graph_sizes(kv_cache, num_tokens) if max_seqs >= 1 else ()
        with tqdm(total=len(sizes) + len(batch_sizes), desc="capturing CUDA graphs", unit="graph", leave=False,
                  disable=not self.capture_progress) as bar:
            if sizes:
                self.mixed_graphs = MixedGraphRunner(self, kv_cache, sizes, max_seqs, max_blocks, on_graph=bar.update)
            pool = self.mixed_graphs.pool if self.mixed_graphs is not None else None
            self.graphs = CUDAGraphRunner(self, kv_cache, tuple(batch_sizes), max_blocks, pool=pool,
                                          on_graph=bar.update)

    # ----------------------------------------------------------------- running
    def forward(self, batch: ForwardBatch, kv_cache: KVCache,
                hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Logits (num_logits, vocab); a step replays a CUDA graph when one fits and no hook is given."""
        if not hooks:
            if self.graphs is not None and self.graphs.can_run(batch, kv_cache):
                return self.graphs.run(batch)
            if self.mixed_graphs is not None and self.mixed_graphs.can_run(batch, kv_cache):
                return self.mixed_graphs.run(batch)
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
                inputs = _Named(layer.inputs, env, batch)
                for hook in hooks:
                    hook.before(layer, inputs)
                fn(env, batch, kv_cache)
                outputs = _Named(layer.outputs, env, batch)
                for hook in reversed(hooks):
                    hook.after(layer, outputs)
        return env["logits"]


check_covers("TorchBackend", TorchBackend._PREPARE)


class _Deferred:
    """A tensor a fused layer did not materialise; computed if a hook asks for it."""

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self.make = make


class _Named(Mapping[str, torch.Tensor]):
    """The tensors `names` refer to now, from the environment or the batch; computed on access.

    With fusion, `hidden` after o_proj / mlp is `hidden + delta` (the add happens in the next
    norm) and `k` after rope sits in the cache: a hook that reads them gets the unfused values.
    """

    def __init__(self, names: Sequence[str], env: Env, batch: ForwardBatch) -> None:
        self._env, self._batch = env, batch
        self._names = [n for n in names if n in env or n in _BATCH_INPUTS]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._env:
            return getattr(self._batch, name)
        value = self._env[name]
        if isinstance(value, _Deferred):
            return value.make()
        if name == "hidden" and "delta" in self._env:
            return value + self._env["delta"].to(value.dtype)  # a tensor-parallel delta may be float32
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
