"""Lower a `Network` to a TensorRT network definition, build a plan, and run it.

What TensorRT does with a network
---------------------------------
TensorRT does not execute Python. It takes a *network definition* (`INetworkDefinition`):
a graph of standard layers (gather, matrix multiply, elementwise, reduce, softmax,
shuffle, concatenation, ...) wired by named tensors, with the weights baked in as
constants. The *builder* then optimises that graph for a GPU and a range of input
shapes: it folds constants, fuses chains of layers into single kernels (a norm into
the GEMM that follows it, the softmax of attention with its two matmuls), picks or
generates a kernel for every fused node ("tactics"), and plans the memory of every
intermediate tensor. The result is a *plan* (a serialized engine, `rank0.engine` in
TensorRT-LLM's layout): bytes that a runtime deserializes into an `ICudaEngine` and
runs through an `IExecutionContext`, with one pointer per named input and output.

Shapes are dynamic within one *optimization profile*: for every input, TensorRT is
told the (min, opt, max) shape; kernels are chosen for `opt` and must stay correct
anywhere in [min, max]. Here batch, new tokens and cached tokens are the dynamic dims.
(TensorRT-RTX goes furthest: for SmolLM2 it fuses all ~2,800 layers of the definition
into one compiled node, and finishes compiling its kernels on the target GPU.)

How the kit's layers are lowered (standard layers only, no plugins)
------------------------------------------------------------------
    input_ids (B, S) int32 ──gather from the (1, V, H) embedding──► hidden (B, S, H)
    rmsnorm:   cast f32 → x*x → reduce AVG → + eps → sqrt → 1/· → × → cast dtype → × weight
    qkv_proj:  one matmul against the fused [Wq; Wk; Wv] constant, then three slices
    rope:      cos/sin of position_ids × inv_freq, computed once (layers.0.rope) and
               reused: x·cos + rotate_half(x)·sin
    attention: present_k = concat(past_key_i, k_new) over the sequence axis;
               GQA by broadcasting: q (B, KVH, G, S, D) @ k^T (B, KVH, 1, D, L), so every
               group of G query heads reads its kv head without copying it;
               scores in float32 × scale, a causal mask built from shapes (key j is
               visible to new token i iff j <= past_len + i), softmax, @ v
    o_proj / mlp: matmuls against constants, SwiGLU = silu(gate) * up, residual adds
    lm_head:   matmul against the embedding constant itself when tied (one copy of it in
               the plan), logits for EVERY new position, cast to float32: (B, S, V)

The KV cache is explicit and contiguous (not paged): each layer `i` reads
`past_key_{i}` / `past_value_{i}` of shape (B, num_kv_heads, past_len, head_dim) and
writes `present_key_{i}` / `present_value_{i}` = concat(past, new), (B, KVH,
past_len + S, D). All rows of a batch share one past_len, and the new tokens follow the
cached ones (position_ids feed RoPE only; the mask comes from the shapes). The profile
gives past_len [0, max_seq_len - 1] and S [1, max_input_len] separately: that
past_len + S <= max_seq_len is the caller's to keep. Every TensorRT layer is
named `<kit layer>/<op>` (`layers.3.mlp/gate_up`), so the engine's layer information
maps back to the kit's `Network`.

`reference_forward` is the same graph written op for op in PyTorch: it is how the
lowering's math (mask, GQA, RoPE) is tested on a machine where the plan cannot run.

Flavours: `tensorrt` (TensorRT proper) or `tensorrt_rtx` (TensorRT-RTX, `pip install
.[tensorrt]`). TensorRT-RTX builds ahead of time without a GPU for the compute
capabilities it is told (`compute_capabilities`), but its runtime refuses Hopper
(compute capability 9.0): there, use the PyTorch backend.
"""

from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from kit.progress import tqdm

from kit.backends.torch_backend import rope_inv_freq
from kit.network import Layer, Network

__all__ = ["import_tensorrt", "TensorRTLowering", "TensorRTPlan", "TensorRTBackend", "build_plan",
           "reference_forward", "kit_layer_of", "DEFAULT_RTX_COMPUTE_CAPABILITIES"]

# every GPU TensorRT-RTX 1.7 builds for ahead of time (Turing to Blackwell, no Hopper); kernels are
# compiled on the target at load time, so more targets cost no plan size
DEFAULT_RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
_NEG = float(np.finfo(np.float32).min)  # "minus infinity" for masked scores, finite to keep softmax NaN-free
KV = tuple[torch.Tensor, torch.Tensor]  # (key, value) of one layer, each (B, KVH, len, D)
_TORCH_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def import_tensorrt() -> tuple[Any, str]:
    """(module, flavour): `tensorrt` if installed, else `tensorrt_rtx`."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]

        return trt, "tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt  # type: ignore[import-not-found]

        return trt, "tensorrt_rtx"
    except ImportError as e:
        raise ImportError("neither `tensorrt` nor `tensorrt_rtx` is installed: pip install .[tensorrt] "
                          "(installs TensorRT-RTX, tensorrt-rtx-cu13)") from e


def kit_layer_of(trt_layer_name: str) -> str:
    """The kit layer a TensorRT layer came from: `layers.3.mlp/gate_up` -> `layers.3.mlp`."""
    return trt_layer_name.split("/", 1)[0]


def _trt_dtype(trt: Any, dtype: torch.dtype) -> Any:
    table = {torch.float16: trt.float16, torch.bfloat16: trt.bfloat16, torch.float32: trt.float32}
    if dtype not in table:
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    return table[dtype]


class TensorRTLowering:
    """Lowers a kit `Network` to `(builder, INetworkDefinition, IBuilderConfig)` with one profile."""

    def __init__(self, network: Network, *, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 opt_batch_size: int | None = None, dtype: torch.dtype = torch.float16,
                 compute_capabilities: Sequence[str] | None = None, progress: bool = False) -> None:
        for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len),
                            ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TensorRTLowering.{name} must be a positive integer, got {value!r}")
        if max_input_len > max_seq_len:
            raise ValueError(f"TensorRTLowering.max_input_len ({max_input_len}) must be <= max_seq_len ({max_seq_len})")
        opt = opt_batch_size if opt_batch_size is not None else max(1, max_batch_size // 2)
        if not 1 <= opt <= max_batch_size:
            raise ValueError(f"TensorRTLowering.opt_batch_size must be in [1, {max_batch_size}], got {opt_batch_size}")
        if network.quant_config is not None:
            raise ValueError(f"TensorRT lowering supports unquantized networks only; {network.name!r} is quantized "
                             f"({network.quant_config})")
        self.trt, self.flavour = import_tensorrt()
        self.network = network
        self.config = network.config
        self.dtype = dtype
        self.trt_dtype = _trt_dtype(self.trt, dtype)
        if compute_capabilities and self.flavour != "tensorrt_rtx":
            raise ValueError("TensorRTLowering.compute_capabilities is a TensorRT-RTX option; TensorRT builds "
                             "for the GPU it runs on")
        if compute_capabilities is None and self.flavour == "tensorrt_rtx":
            # NOTE: Turing (SM75) has no bfloat16: a bf16 plan targets Ampere and later
            compute_capabilities = [cc for cc in DEFAULT_RTX_COMPUTE_CAPABILITIES
                                    if not (dtype == torch.bfloat16 and cc == "SM75")]
        self.compute_capabilities = tuple(compute_capabilities or ())
        self.progress = progress
        # (min, opt, max) of every dynamic dimension
        self.batch_range = (1, opt, max_batch_size)
        self.seq_range = (1, max(1, max_input_len // 2), max_input_len)
        self.past_range = (0, (max_seq_len - 1) // 2, max_seq_len - 1)
        self.max_seq_len = max_seq_len

    # ------------------------------------------------------------------ profile
    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """{input name: (min, opt, max)} of the one optimization profile."""
        c = self.config
        shapes = {}
        tokens = tuple((b, s) for b, s in zip(self.batch_range, self.seq_range))
        shapes["input_ids"] = tokens
        shapes["position_ids"] = tokens
        for i in range(c.num_hidden_layers):
            kv = tuple((b, c.num_key_value_heads, p, c.head_dim) for b, p in zip(self.batch_range, self.past_range))
            shapes[f"past_key_{i}"] = kv
            shapes[f"past_value_{i}"] = kv
        return shapes

    # ----------------------------------------------------------------- helpers
    def _name(self, layer: Any, name: str) -> Any:
        layer.name = name
        if layer.name != name:  # TensorRT refuses a name already in use (and only logs it)
            raise ValueError(f"TensorRT layer name {name!r} is used twice")
        return layer

    def _out(self, layer: Any, name: str) -> Any:
        out = self._name(layer, name).get_output(0)
        out.name = name  # tensors keep "(Unnamed Layer* N)" names otherwise, in the engine's layer info too
        return out

    def _const(self, name: str, value: torch.Tensor | np.ndarray, shape: Sequence[int] | None = None) -> Any:
        """An IConstantLayer whose bytes stay alive until the build is done."""
        if isinstance(value, np.ndarray):
            arr = np.array(value, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
            self._keep.append(arr)
            weights = self.trt.Weights(arr)
            dims = arr.shape
        else:
            t = value.detach().to("cpu").contiguous()
            self._keep.append(t)
            weights = self.trt.Weights(_trt_dtype(self.trt, t.dtype), t.data_ptr(), t.numel())
            dims = tuple(t.shape)
        return self._out(self.net.add_constant(tuple(shape or dims), weights), name)

    def _weight(self, name: str, layer_name: str, shape: Sequence[int] | None = None) -> Any:
        """A network weight in the build dtype, one constant per weight name (tied weights are shared)."""
        if name not in self._weights:
            t = self.network.weights[name].to(self.dtype)
            self._weights[name] = self._const(f"{layer_name}/{name.rsplit('.', 1)[-1]}", t, shape)
        return self._weights[name]

    def _ew(self, a: Any, b: Any, op: str, name: str) -> Any:
        return self._out(self.net.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op)), name)

    def _unary(self, a: Any, op: str, name: str) -> Any:
        return self._out(self.net.add_unary(a, getattr(self.trt.UnaryOperation, op)), name)

    def _cast(self, a: Any, to: Any, name: str) -> Any:
        return self._out(self.net.add_cast(a, to), name)

    def _shuffle(self, a: Any, name: str, reshape: Sequence[int] | None = None,
                 first: Sequence[int] | None = None) -> Any:
        s = self.net.add_shuffle(a)
        if first is not None:
            s.first_transpose = tuple(first)
        if reshape is not None:
            s.reshape_dims = tuple(reshape)
        return self._out(s, name)

    def _matmul_weight(self, x: Any, w: Any, name: str) -> Any:
        """x (..., in) @ W^T with W a (1, out, in) constant: y (..., out)."""
        mm = self.net.add_matrix_multiply(x, self.trt.MatrixOperation.NONE, w, self.trt.MatrixOperation.TRANSPOSE)
        return self._out(mm, name)

    def _i64(self, values: Sequence[int] | np.ndarray, name: str) -> Any:
        return self._const(name, np.asarray(values, dtype=np.int64))

    def _concat(self, tensors: list[Any], axis: int, name: str) -> Any:
        cat = self.net.add_concatenation(tensors)
        cat.axis = axis
        return self._out(cat, name)

    def _f32(self, value: float, rank: int, name: str) -> Any:
        return self._const(name, np.full((1,) * rank, value, dtype=np.float32))

    def _batch_seq(self, layer_name: str) -> Any:
        """(B, S) as a 1-D int64 shape tensor, made once."""
        if self._bs is None:
            self._bs = self._out(self.net.add_shape(self.input_ids), f"{layer_name}/batch_seq_shape")
        return self._bs

    def _slice_last(self, x: Any, lead: Sequence[int], start: int, size: int, name: str) -> Any:
        """x[..., start:start+size] for x of shape (B, S, *lead, n)."""
        rank = 3 + len(lead)
        shape = self._out(self.net.add_concatenation(
            [self._batch_seq(name), self._i64([*lead, size], f"{name}_size")]), f"{name}_shape")
        sl = self.net.add_slice(x, (0,) * (rank - 1) + (start,), (1,) * rank, (1,) * rank)
        sl.set_input(2, shape)
        return self._out(sl, name)

    def _rmsnorm(self, x: Any, weight_name: str, eps: float, name: str, rank: int) -> Any:
        """weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype), reduced over the last axis in float32."""
        xf = self._cast(x, self.trt.float32, f"{name}/to_f32")
        sq = self._ew(xf, xf, "PROD", f"{name}/square")
        mean = self._out(self.net.add_reduce(sq, self.trt.ReduceOperation.AVG, 1 << (rank - 1), True), f"{name}/mean")
        var = self._ew(mean, self._f32(eps, rank, f"{name}/eps"), "SUM", f"{name}/add_eps")
        inv = self._unary(self._unary(var, "SQRT", f"{name}/sqrt"), "RECIP", f"{name}/rsqrt")
        y = self._cast(self._ew(xf, inv, "PROD", f"{name}/scale"), self.trt_dtype, f"{name}/to_dtype")
        dim = self.network.weights[weight_name].shape[0]
        w = self._weight(weight_name, name, (1,) * (rank - 1) + (dim,))
        return self._ew(y, w, "PROD", f"{name}/mul_weight")

    # ----------------------------------------------------------------- lowering
    def lower(self) -> tuple[Any, Any, Any]:
        """(builder, network definition, builder config) for one optimization profile.

        NOTE: TensorRT reads constant weights from memory it does not own; this object keeps
        that memory (`self._keep`), so keep it alive until the build is done (`build_plan` does).
        """
        trt, c = self.trt, self.config
        self.logger = _make_logger(trt)
        builder = trt.Builder(self.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.net = net = builder.create_network(flags)
        net.name = self.network.name
        self._keep: list[Any] = []
        self._weights: dict[str, Any] = {}
        self._bs = None
        self._rope: tuple[Any, Any] | None = None
        self._mask: tuple[int | None, Any] | None = None
        self.presents: list[tuple[Any, Any]] = []
        self.input_ids = net.add_input("input_ids", trt.int32, (-1, -1))
        self.position_ids = net.add_input("position_ids", trt.int32, (-1, -1))
        kv_dims = (-1, c.num_key_value_heads, -1, c.head_dim)  # (B, KVH, past_len, D)
        self.past_inputs = [(net.add_input(f"past_key_{i}", self.trt_dtype, kv_dims),
                             net.add_input(f"past_value_{i}", self.trt_dtype, kv_dims))
                            for i in range(c.num_hidden_layers)]
        env: dict[str, Any] = {}
        for layer in tqdm(self.network.layers, desc=f"lowering {self.network.name}", disable=not self.progress,
                          leave=False):
            self._lower(layer, env)
        logits = env["logits"]
        logits.name = "logits"
        net.mark_output(logits)
        for i, (k, v) in enumerate(self.presents):
            k.name, v.name = f"present_key_{i}", f"present_value_{i}"
            net.mark_output(k)
            net.mark_output(v)

        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in self.profile_shapes().items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if self.compute_capabilities and hasattr(config, "set_compute_capability"):
            # TensorRT-RTX ahead-of-time build: name the target GPUs instead of probing the current one
            config.num_compute_capabilities = len(self.compute_capabilities)
            for i, cc in enumerate(self.compute_capabilities):
                if not config.set_compute_capability(getattr(trt.ComputeCapability, cc), i):
                    raise ValueError(f"compute capability {cc!r} is not accepted by {self.flavour}")
        return builder, net, config

    def _lower(self, layer: Layer, env: dict[str, Any]) -> None:
        c, n, a = self.config, layer.name, layer.attrs
        kind = layer.kind
        if kind == "embedding":
            # NOTE: the table is a (1, V, H) constant so that a tied lm_head multiplies by the very same
            # constant (one copy of the embedding in the plan); gather on axis 1 gives (1, B, S, H)
            table = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
            rows = self._out(self.net.add_gather(table, self.input_ids, 1), f"{n}/gather")
            env["hidden"] = self._shuffle(rows, f"{n}/drop_axis", (0, 0, c.hidden_size), first=(1, 2, 0, 3))
        elif kind == "rmsnorm":
            env[layer.outputs[0]] = self._rmsnorm(env[layer.inputs[0]], layer.weights[0], a["eps"], n, 3)
        elif kind == "qkv_proj":
            attn = layer.weights[0].rsplit(".", 2)[0]
            parts = ("q_proj", "k_proj", "v_proj")
            w = torch.cat([self.network.weights[f"{attn}.{m}.weight"].to(self.dtype) for m in parts], 0)
            qkv = self._matmul_weight(env["x"], self._const(f"{n}/weight", w, (1, *w.shape)), f"{n}/matmul")
            if a["bias"]:
                b = torch.cat([self.network.weights[f"{attn}.{m}.bias"].to(self.dtype) for m in parts], 0)
                qkv = self._ew(qkv, self._const(f"{n}/bias", b, (1, 1, b.shape[0])), "SUM", f"{n}/bias_add")
            sizes = (("q", 0, c.q_size, c.num_attention_heads), ("k", c.q_size, c.kv_size, c.num_key_value_heads),
                     ("v", c.q_size + c.kv_size, c.kv_size, c.num_key_value_heads))
            for key, start, size, heads in sizes:
                flat = self._slice_last(qkv, (), start, size, f"{n}/split_{key}")
                env[key] = self._shuffle(flat, f"{n}/heads_{key}", (0, 0, heads, c.head_dim))  # (B, S, heads, D)
        elif kind == "qk_norm":
            env["q"] = self._rmsnorm(env["q"], layer.weights[0], a["eps"], f"{n}/q", 4)
            env["k"] = self._rmsnorm(env["k"], layer.weights[1], a["eps"], f"{n}/k", 4)
        elif kind == "rope":
            cos, sin = self._cos_sin(n)
            env["q"] = self._apply_rope(env["q"], cos, sin, c.num_attention_heads, f"{n}/q")
            env["k"] = self._apply_rope(env["k"], cos, sin, c.num_key_value_heads, f"{n}/k")
        elif kind == "attention":
            env["attn"] = self._attention(env, a, n)
        elif kind == "o_proj":
            w = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
            y = self._matmul_weight(env["attn"], w, f"{n}/matmul")
            if a["bias"]:
                y = self._ew(y, self._weight(layer.weights[1], n, (1, 1, c.hidden_size)), "SUM", f"{n}/bias_add")
            env["hidden"] = self._ew(env["hidden"], y, "SUM", f"{n}/residual")
        elif kind == "mlp":
            env["hidden"] = self._mlp(env, layer, n)
        elif kind == "lm_head":
            # NOTE: logits for every new position; layer.inputs' `logits_indices` is the serving side's
            # choice of rows, which the caller applies to (B, S, V) afterwards.
            w = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
            logits = self._matmul_weight(env["x"], w, f"{n}/matmul")  # (B, S, V) in dtype
            env["logits"] = self._cast(logits, self.trt.float32, f"{n}/to_f32")
        else:
            raise ValueError(f"TensorRTLowering cannot lower layer kind {kind!r} ({n})")

    def _cos_sin(self, n: str) -> tuple[Any, Any]:
        """cos/sin (B, S, 1, D) in dtype of position_ids * inv_freq; made once, by the first rope layer."""
        if self._rope is None:
            inv = rope_inv_freq(self.config).numpy().astype(np.float32)[None, None, :]  # (1, 1, D/2)
            pos = self._cast(self.position_ids, self.trt.float32, f"{n}/positions_f32")
            pos = self._shuffle(pos, f"{n}/positions_col", (0, 0, 1))  # (B, S, 1)
            freqs = self._ew(pos, self._const(f"{n}/inv_freq", inv), "PROD", f"{n}/freqs")  # (B, S, D/2)
            emb = self._concat([freqs, freqs], 2, f"{n}/emb")  # (B, S, D)
            out = []
            for fn in ("COS", "SIN"):
                t = self._cast(self._unary(emb, fn, f"{n}/{fn.lower()}"), self.trt_dtype, f"{n}/{fn.lower()}_dtype")
                out.append(self._shuffle(t, f"{n}/{fn.lower()}_heads", (0, 0, 1, self.config.head_dim)))
            self._rope = (out[0], out[1])
        return self._rope

    def _apply_rope(self, x: Any, cos: Any, sin: Any, heads: int, n: str) -> Any:
        half = self.config.head_dim // 2
        x1 = self._slice_last(x, (heads,), 0, half, f"{n}_first_half")
        x2 = self._slice_last(x, (heads,), half, half, f"{n}_second_half")
        rotated = self._concat([self._unary(x2, "NEG", f"{n}_neg"), x1], 3, f"{n}_rotate_half")
        return self._ew(self._ew(x, cos, "PROD", f"{n}_cos"), self._ew(rotated, sin, "PROD", f"{n}_sin"),
                        "SUM", f"{n}_rotated")

    def _causal_mask(self, n: str, window: int | None) -> Any:
        """(1, 1, 1, S, L) bool: key j visible to new token i iff j <= past_len + i (and within the window)."""
        key = window
        if self._mask is None or self._mask[0] != key:
            fill = self.trt.FillOperation.LINSPACE
            s_len = self._out(self.net.add_slice(self._batch_seq(n), (1,), (1,), (1,)), f"{n}/mask_seq_len")  # [S]
            past_shape = self._out(self.net.add_shape(self.past_inputs[0][0]), f"{n}/mask_past_shape")
            p_len = self._out(self.net.add_slice(past_shape, (2,), (1,), (1,)), f"{n}/mask_past_len")  # [P]
            total = self._ew(p_len, s_len, "SUM", f"{n}/mask_total_len")  # [L]

            def arange(length: Any, name: str) -> Any:
                f = self.net.add_fill((0,), fill, self.trt.int64)
                f.set_input(0, length)
                f.set_input(1, self._i64(np.array(0), f"{name}_start"))
                f.set_input(2, self._i64(np.array([1]), f"{name}_delta"))
                return self._out(f, name)

            kpos = arange(total, f"{n}/mask_key_pos")
            kpos = self._shuffle(kpos, f"{n}/mask_key_row", (1, 1, 1, 1, -1))  # (1,1,1,1,L)
            qpos = self._ew(arange(s_len, f"{n}/mask_new_pos"), p_len, "SUM", f"{n}/mask_query_pos")  # (S,)
            qpos = self._shuffle(qpos, f"{n}/mask_query_col", (1, 1, 1, -1, 1))  # (1,1,1,S,1)
            one = self._i64(np.ones((1,) * 5), f"{n}/mask_one")
            mask = self._ew(kpos, self._ew(qpos, one, "SUM", f"{n}/mask_query_end"), "LESS", f"{n}/mask_causal")
            if window is not None:
                w = self._i64(np.full((1,) * 5, window), f"{n}/mask_window")
                inside = self._ew(qpos, self._ew(kpos, w, "SUM", f"{n}/mask_window_end"), "LESS", f"{n}/mask_inside")
                mask = self._ew(mask, inside, "AND", f"{n}/mask_sliding")
            self._mask = (key, mask)
        return self._mask[1]

    def _attention(self, env: dict[str, Any], a: dict[str, Any], n: str) -> Any:
        c, i = self.config, a["layer_idx"]
        kvh, d = c.num_key_value_heads, c.head_dim
        g = c.num_attention_heads // kvh
        past_k, past_v = self.past_inputs[i]
        presents = []
        for key, past in (("k", past_k), ("v", past_v)):
            new = self._shuffle(env[key], f"{n}/{key}_bhsd", first=(0, 2, 1, 3))  # (B, KVH, S, D)
            presents.append(self._concat([past, new], 2, f"{n}/present_{key}"))  # (B, KVH, P+S, D)
        self.presents.append((presents[0], presents[1]))
        # (B, S, H, D) -> (B, S, KVH, G, D) -> (B, KVH, G, S, D): query head h reads kv head h // G
        q = self._shuffle(self._shuffle(env["q"], f"{n}/q_groups", (0, 0, kvh, g, d)), f"{n}/q_bkgsd",
                          first=(0, 2, 3, 1, 4))
        k5 = self._shuffle(presents[0], f"{n}/k_broadcast", (0, 0, 1, -1, d))  # (B, KVH, 1, L, D)
        v5 = self._shuffle(presents[1], f"{n}/v_broadcast", (0, 0, 1, -1, d))
        mm = self.trt.MatrixOperation
        scores = self._out(self.net.add_matrix_multiply(q, mm.NONE, k5, mm.TRANSPOSE), f"{n}/qk")  # (B,KVH,G,S,L)
        scores = self._ew(self._cast(scores, self.trt.float32, f"{n}/qk_f32"), self._f32(a["scale"], 5, f"{n}/scale"),
                          "PROD", f"{n}/qk_scaled")
        mask = self._causal_mask(n, a.get("sliding_window"))
        masked = self._out(self.net.add_select(mask, scores, self._f32(_NEG, 5, f"{n}/neg")), f"{n}/mask")
        sm = self.net.add_softmax(masked)
        sm.axes = 1 << 4
        probs = self._cast(self._out(sm, f"{n}/softmax"), self.trt_dtype, f"{n}/probs_dtype")
        out = self._out(self.net.add_matrix_multiply(probs, mm.NONE, v5, mm.NONE), f"{n}/pv")  # (B, KVH, G, S, D)
        return self._shuffle(out, f"{n}/merge_heads", (0, 0, -1), first=(0, 3, 1, 2, 4))  # (B, S, H*D)

    def _mlp(self, env: dict[str, Any], layer: Layer, n: str) -> Any:
        a, inter = layer.attrs, layer.attrs["intermediate_size"]
        mlp = layer.weights[0].rsplit(".", 2)[0]
        w = torch.cat([self.network.weights[f"{mlp}.{m}_proj.weight"].to(self.dtype) for m in ("gate", "up")], 0)
        gu = self._matmul_weight(env["x"], self._const(f"{n}/gate_up_weight", w, (1, *w.shape)), f"{n}/gate_up")
        if a["bias"]:
            b = torch.cat([self.network.weights[f"{mlp}.{m}_proj.bias"].to(self.dtype) for m in ("gate", "up")], 0)
            gu = self._ew(gu, self._const(f"{n}/gate_up_bias", b, (1, 1, 2 * inter)), "SUM", f"{n}/gate_up_bias_add")
        gate = self._slice_last(gu, (), 0, inter, f"{n}/gate")
        up = self._slice_last(gu, (), inter, inter, f"{n}/up")
        sig = self._out(self.net.add_activation(gate, self.trt.ActivationType.SIGMOID), f"{n}/sigmoid")
        act = self._ew(self._ew(gate, sig, "PROD", f"{n}/silu"), up, "PROD", f"{n}/swiglu")
        wd = self.network.weights[f"{mlp}.down_proj.weight"]
        y = self._matmul_weight(act, self._weight(f"{mlp}.down_proj.weight", f"{n}/down", (1, *wd.shape)), f"{n}/down")
        if a["bias"]:
            y = self._ew(y, self._weight(f"{mlp}.down_proj.bias", f"{n}/down", (1, 1, wd.shape[0])), "SUM",
                         f"{n}/down_bias_add")
        return self._ew(env["hidden"], y, "SUM", f"{n}/residual")


# --------------------------------------------------------------------------- build
def _logger_class(trt: Any) -> type:
    class Logger(trt.ILogger):
        """Keeps TensorRT's errors and warnings so a failed build can say why."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                self.messages.append((str(severity).rsplit(".", 1)[-1], msg))

    return Logger


def _make_logger(trt: Any) -> Any:
    return _logger_class(trt)()


def _progress_monitor(trt: Any) -> Any:
    class TqdmProgressMonitor(trt.IProgressMonitor):
        """One tqdm bar per builder phase, nested by depth. TensorRT calls it from its own threads."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", position=depth,
                                              leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                if phase_name in self._bars:
                    self._bars[phase_name].update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    # NOTE: TensorRT announces an upper bound of steps (e.g. tactics it may time) and
                    # often finishes a phase early; a finished phase is complete, not failed, so its
                    # total shrinks to the steps done (a bar closed short of its total reads as an error)
                    if bar.total and bar.n < bar.total:
                        bar.total = bar.n
                        bar.refresh()
                    bar.close()

    return TqdmProgressMonitor()


_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "FP8": "float8"}


def _io(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": _DTYPE_NAMES.get(tensor.dtype.name, tensor.dtype.name),
            "shape": tuple(int(d) for d in tensor.shape)}


@dataclass
class TensorRTPlan:
    """A serialized TensorRT engine plus what is needed to feed it and to read it back."""

    plan: bytes
    flavour: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    inputs: list[dict[str, Any]]  # name, dtype, shape (-1 = dynamic)
    outputs: list[dict[str, Any]]
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]  # name -> (min, opt, max)
    num_layers: int  # TensorRT layers in the network definition
    build_seconds: float  # the builder alone (optimisation + serialization)
    layer_info: dict[str, Any] | None = None  # engine inspector JSON (DETAILED); needs a GPU that runs the plan
    network_name: str = "model"
    dtype: str = "float16"
    compute_capabilities: list[str] = field(default_factory=list)  # AOT targets (TensorRT-RTX)
    layers: list[dict[str, str]] = field(default_factory=list)  # network definition: name, type, kit_layer
    lower_seconds: float = 0.0  # kit Network -> INetworkDefinition

    @property
    def nbytes(self) -> int:
        return len(self.plan)

    def kit_layers(self) -> list[str]:
        """The kit layers the TensorRT layers came from, in order of first appearance."""
        return list(dict.fromkeys(layer["kit_layer"] for layer in self.layers))

    def to_frame(self) -> pd.DataFrame:
        """One row a TensorRT layer of the network definition: `name, type, kit_layer`."""
        return pd.DataFrame(self.layers, columns=["name", "type", "kit_layer"])

    def save(self, path: str | Path) -> Path:
        """Write `rank0.engine` (the plan) and `trt_build.json` (everything else) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "rank0.engine").write_bytes(self.plan)
        meta = {k: v for k, v in asdict(self).items() if k != "plan"}
        meta["plan_bytes"] = self.nbytes
        (path / "trt_build.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TensorRTPlan":
        path = Path(path)
        meta = json.loads((path / "trt_build.json").read_text())
        meta.pop("plan_bytes", None)
        for io in meta["inputs"] + meta["outputs"]:
            io["shape"] = tuple(io["shape"])
        meta["profiles"] = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in meta["profiles"]]
        return cls(plan=(path / "rank0.engine").read_bytes(), **meta)

    def __repr__(self) -> str:
        return (f"TensorRTPlan({self.network_name!r}, {self.flavour} {self.version}, {self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB, {self.num_layers} layers, built in {self.build_seconds:.1f} s)")

    def _repr_html_(self) -> str:
        head = (f"<b>TensorRTPlan</b> <code>{html.escape(self.network_name)}</code> &middot; "
                f"{self.flavour} {html.escape(self.version)} &middot; {self.dtype} &middot; "
                f"{self.nbytes / 2**20:.1f} MiB &middot; {self.num_layers} TensorRT layers from "
                f"{len(self.kit_layers())} kit layers &middot; lowered in {self.lower_seconds:.1f} s, "
                f"built in {self.build_seconds:.1f} s"
                + (f" &middot; targets {', '.join(self.compute_capabilities)}" if self.compute_capabilities else ""))
        profile = self.profiles[0] if self.profiles else {}
        rows = []
        for kind, ios in (("input", self.inputs), ("output", self.outputs)):
            for io in ios:
                rng = profile.get(io["name"])
                rows.append({"io": kind, "name": io["name"], "dtype": io["dtype"], "shape": str(io["shape"]),
                             "min": str(rng[0]) if rng else "", "opt": str(rng[1]) if rng else "",
                             "max": str(rng[2]) if rng else ""})
        df = pd.DataFrame(rows)
        if len(df) > 12:  # many layers: show the first layer's KV tensors and the rest in a line
            keep = ~df["name"].str.match(r"(past|present)_(key|value)_[1-9]")
            note = f"<p><i>... and {int((~keep).sum())} more KV tensors, one pair per layer, same shapes.</i></p>"
            df = df[keep]
        else:
            note = ""
        return f"<div>{head}{df.to_html(index=False, border=0)}{note}</div>"


def build_plan(network: Network, *, max_batch_size: int, max_input_len: int, max_seq_len: int,
               opt_batch_size: int | None = None, dtype: torch.dtype = torch.float16,
               compute_capabilities: Sequence[str] | None = None, progress: bool = True) -> TensorRTPlan:
    """Lower `network` and build a TensorRT plan for one profile (see `TensorRTLowering`)."""
    t0 = time.perf_counter()
    lowering = TensorRTLowering(network, max_batch_size=max_batch_size, max_input_len=max_input_len,
                                max_seq_len=max_seq_len, opt_batch_size=opt_batch_size, dtype=dtype,
                                compute_capabilities=compute_capabilities, progress=progress)
    trt = lowering.trt
    builder, net, config = lowering.lower()
    lower_seconds = time.perf_counter() - t0
    monitor = None
    if progress and hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _progress_monitor(trt)
        config.progress_monitor = monitor
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(net, config)
    build_seconds = time.perf_counter() - t1
    if serialized is None:
        errors = "; ".join(m for s, m in lowering.logger.messages if s != "WARNING" and "cudaError" not in m)[:3000]
        raise RuntimeError(f"TensorRT ({lowering.flavour}) could not build {network.name!r}: {errors or 'no message'}")
    plan = bytes(memoryview(serialized))
    layers = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        layers.append({"name": layer.name, "type": layer.type.name, "kit_layer": kit_layer_of(layer.name)})
    return TensorRTPlan(
        plan=plan, flavour=lowering.flavour, version=trt.__version__,
        inputs=[_io(net.get_input(i)) for i in range(net.num_inputs)],
        outputs=[_io(net.get_output(i)) for i in range(net.num_outputs)],
        profiles=[lowering.profile_shapes()], num_layers=net.num_layers, build_seconds=build_seconds,
        layer_info=_inspect(trt, lowering.flavour, plan, lowering.logger), network_name=network.name,
        dtype=_TORCH_NAMES[dtype], compute_capabilities=list(lowering.compute_capabilities), layers=layers,
        lower_seconds=lower_seconds,
    )


def _inspect(trt: Any, flavour: str, plan: bytes, logger: Any) -> dict[str, Any] | None:
    """The engine inspector's per-layer JSON, where a local GPU can deserialize the plan; else None."""
    if not torch.cuda.is_available() or (flavour == "tensorrt_rtx" and torch.cuda.get_device_capability() == (9, 0)):
        return None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


# ------------------------------------------------------------------------- runtime
class TensorRTBackend:
    """Runs a `TensorRTPlan` on a CUDA GPU: `run(input_ids, position_ids, past_kv) -> (logits, present_kv)`."""

    name = "tensorrt"

    def __init__(self, plan: TensorRTPlan) -> None:
        self.plan = plan
        self._context: Any = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.plan.dtype)

    def forward(self, batch: Any, kv_cache: Any, on_layer: Any = None) -> torch.Tensor:
        """The serving path feeds paged batches; a plan takes a contiguous cache (see `run`)."""
        self.check_runtime()
        raise RuntimeError("a TensorRT plan takes a contiguous KV cache: call engine.backend.run(input_ids, "
                           "position_ids, past_kv); paged serving uses the PyTorch backend (backend='torch')")

    def describe(self) -> str:
        return f"{self.plan.flavour} {self.plan.version} plan ({self.plan.nbytes / 2**20:.1f} MiB)"

    def check_runtime(self) -> None:
        """Raise a clear RuntimeError unless this machine can run the plan; deserialize it once."""
        if self._context is not None:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU and none is visible; the plan can be built "
                               "here but not run: use the PyTorch backend (backend='torch')")
        cc = torch.cuda.get_device_capability()
        if self.plan.flavour == "tensorrt_rtx" and cc == (9, 0):
            raise RuntimeError("TensorRT-RTX does not run on compute capability 9.0 (Hopper); "
                               "use the PyTorch backend (backend='torch')")
        sm = f"SM{cc[0]}{cc[1]}"
        if self.plan.compute_capabilities and sm not in self.plan.compute_capabilities:
            raise RuntimeError(f"this plan was built for {', '.join(self.plan.compute_capabilities)}, the GPU is {sm}: "
                               f"rebuild with compute_capabilities=[{sm!r}]")
        trt, flavour = import_tensorrt()
        if flavour != self.plan.flavour:
            raise RuntimeError(f"the plan was built with {self.plan.flavour}, but {flavour} is installed")
        self._logger = _make_logger(trt)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.plan.plan)
        if self._engine is None:
            raise RuntimeError(f"{flavour} could not deserialize the plan: {self._logger.messages[-3:]}")
        self._context = self._engine.create_execution_context()

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
            past_kv: Sequence[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """input_ids / position_ids (B, S); past_kv[i] = (k, v) of (B, KVH, P, D), None for an empty cache.

        Returns logits (B, S, V) in float32 and present_kv[i] = (k, v) of (B, KVH, P + S, D).
        """
        self.check_runtime()
        dev, dtype = torch.device("cuda"), getattr(torch, self.plan.dtype)
        num_layers = sum(io["name"].startswith("past_key_") for io in self.plan.inputs)
        if past_kv is None:
            _, kvh, _, d = self.plan.inputs[2]["shape"]
            empty = torch.empty(input_ids.shape[0], kvh, 0, d, dtype=dtype, device=dev)
            past_kv = [(empty, empty)] * num_layers
        feeds = {"input_ids": input_ids.to(dev, torch.int32).contiguous(),
                 "position_ids": position_ids.to(dev, torch.int32).contiguous()}
        for i, (k, v) in enumerate(past_kv):
            feeds[f"past_key_{i}"] = k.to(dev, dtype).contiguous()
            feeds[f"past_value_{i}"] = v.to(dev, dtype).contiguous()
        scratch = torch.empty(1, dtype=torch.float32, device=dev)  # an address for zero-size tensors (past_len 0)
        ctx = self._context
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self.plan.profiles[0][name]
                raise ValueError(f"{name} has shape {tuple(t.shape)}, outside the plan's profile [{lo}, {hi}]")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else scratch.data_ptr())
        outs = {}
        for io in self.plan.outputs:
            t = torch.empty(tuple(ctx.get_tensor_shape(io["name"])), dtype=getattr(torch, io["dtype"]), device=dev)
            ctx.set_tensor_address(io["name"], t.data_ptr() if t.numel() else scratch.data_ptr())
            outs[io["name"]] = t
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed: {self._logger.messages[-3:]}")
        torch.cuda.current_stream().synchronize()
        present = [(outs[f"present_key_{i}"], outs[f"present_value_{i}"]) for i in range(num_layers)]
        return outs["logits"], present


# ----------------------------------------------------------------------- reference
def reference_forward(network: Network, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      past_kv: Sequence[KV] | None = None, *,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[KV]]:
    """The lowered graph, op for op, in PyTorch: same inputs, outputs and contiguous KV as the plan.

    input_ids / position_ids (B, S); past_kv[i] = (k, v) of (B, KVH, P, D) or None for an empty
    cache. Returns logits (B, S, V) in float32 and present_kv[i] of (B, KVH, P + S, D).
    """
    c = network.config
    if network.quant_config is not None:
        raise ValueError("reference_forward supports unquantized networks only")
    dtype = dtype or next(iter(network.weights.values())).dtype
    dev = input_ids.device
    bsz, s_len = input_ids.shape
    kvh, d, g = c.num_key_value_heads, c.head_dim, c.num_attention_heads // c.num_key_value_heads

    def w(name: str) -> torch.Tensor:
        return network.weights[name].to(dev, dtype)

    def rms(x: torch.Tensor, weight: str, eps: float) -> torch.Tensor:
        xf = x.float()
        inv = torch.reciprocal(torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps))
        return (xf * inv).to(dtype) * w(weight)

    def cat_w(prefix: str, names: Sequence[str], suffix: str) -> torch.Tensor:
        return torch.cat([w(f"{prefix}.{m}.{suffix}") for m in names], 0)

    if past_kv is None:
        past_kv = [(torch.zeros(bsz, kvh, 0, d, dtype=dtype, device=dev),) * 2 for _ in range(c.num_hidden_layers)]
    past_len = past_kv[0][0].shape[2]
    kpos = torch.arange(past_len + s_len, device=dev)[None, :]  # (1, L)
    qpos = (torch.arange(s_len, device=dev) + past_len)[:, None]  # (S, 1)
    mask = kpos < qpos + 1
    if c.sliding_window is not None:
        mask &= qpos < kpos + c.sliding_window
    inv_freq = rope_inv_freq(c).to(dev)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dtype)[:, :, None, :], emb.sin().to(dtype)[:, :, None, :]  # (B, S, 1, D)
    env: dict[str, torch.Tensor] = {}
    present: list[KV] = []
    for layer in network.layers:
        kind, a = layer.kind, layer.attrs
        if kind == "embedding":
            env["hidden"] = w(layer.weights[0])[input_ids.long()]  # (B, S, H)
        elif kind == "rmsnorm":
            env[layer.outputs[0]] = rms(env[layer.inputs[0]], layer.weights[0], a["eps"])
        elif kind == "qkv_proj":
            attn = layer.weights[0].rsplit(".", 2)[0]
            parts = ("q_proj", "k_proj", "v_proj")
            qkv = env["x"] @ cat_w(attn, parts, "weight").T
            if a["bias"]:
                qkv = qkv + cat_w(attn, parts, "bias")
            q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], -1)
            env["q"] = q.reshape(bsz, s_len, c.num_attention_heads, d)  # (B, S, H, D)
            env["k"] = k.reshape(bsz, s_len, kvh, d)
            env["v"] = v.reshape(bsz, s_len, kvh, d)
        elif kind == "qk_norm":
            env["q"] = rms(env["q"], layer.weights[0], a["eps"])
            env["k"] = rms(env["k"], layer.weights[1], a["eps"])
        elif kind == "rope":
            for key in ("q", "k"):
                x = env[key]
                rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
                env[key] = x * cos + rotated * sin
        elif kind == "attention":
            past_k, past_v = past_kv[a["layer_idx"]]
            k = torch.cat((past_k.to(dtype), env["k"].transpose(1, 2)), 2)  # (B, KVH, L, D)
            v = torch.cat((past_v.to(dtype), env["v"].transpose(1, 2)), 2)
            present.append((k, v))
            q = env["q"].reshape(bsz, s_len, kvh, g, d).permute(0, 2, 3, 1, 4)  # (B, KVH, G, S, D)
            scores = (q @ k[:, :, None].transpose(-1, -2)).float() * a["scale"]  # (B, KVH, G, S, L)
            scores = torch.where(mask, scores, torch.tensor(_NEG, device=dev))
            probs = scores.softmax(-1).to(dtype)
            out = probs @ v[:, :, None]  # (B, KVH, G, S, D)
            env["attn"] = out.permute(0, 3, 1, 2, 4).reshape(bsz, s_len, -1)  # (B, S, H*D)
        elif kind == "o_proj":
            y = env["attn"] @ w(layer.weights[0]).T
            if a["bias"]:
                y = y + w(layer.weights[1])
            env["hidden"] = env["hidden"] + y
        elif kind == "mlp":
            mlp, inter = layer.weights[0].rsplit(".", 2)[0], a["intermediate_size"]
            gu = env["x"] @ cat_w(mlp, ("gate_proj", "up_proj"), "weight").T
            if a["bias"]:
                gu = gu + cat_w(mlp, ("gate_proj", "up_proj"), "bias")
            gate, up = gu.split([inter, inter], -1)
            y = (gate * torch.sigmoid(gate) * up) @ w(f"{mlp}.down_proj.weight").T
            if a["bias"]:
                y = y + w(f"{mlp}.down_proj.bias")
            env["hidden"] = env["hidden"] + y
        elif kind == "lm_head":
            env["logits"] = (env["x"] @ w(layer.weights[0]).T).float()  # (B, S, V)
        else:
            raise ValueError(f"reference_forward cannot run layer kind {kind!r}")
    return env["logits"], present
