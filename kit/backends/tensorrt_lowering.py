"""Lower a kit `Network` to a TensorRT network definition (standard layers only, no plugins).

See `kit/backends/tensorrt_backend.py` for how each kind of layer is lowered and what
the plan's inputs and outputs are. The optimization profile is the build config's
(`BuildConfig.optimization_profiles()`: (min, opt, max) of `batch_size`, `input_len`
and `past_len`), passed in by the caller. One lowering per kind of
`kit/layer_kinds.py` (`_LOWER` below); every TensorRT layer is named `<kit layer>/<op>`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from kit.progress import tqdm

from kit.backends.tensorrt_common import (DEFAULT_RTX_COMPUTE_CAPABILITIES, NEG, import_tensorrt, make_logger,
                                          trt_dtype)
from kit.layer_kinds import check_covers
from kit.network import Layer, Network
from kit.ops import rope_inv_freq

__all__ = ["TensorRTLowering", "PROFILE_DIMS"]

PROFILE_DIMS = ("batch_size", "input_len", "past_len")  # the dims of the profile the lowering reads
_VERBOSITY = {"layer_names_only": "LAYER_NAMES_ONLY", "detailed": "DETAILED", "none": "NONE"}


class TensorRTLowering:
    """Lowers a kit `Network` to `(builder, INetworkDefinition, IBuilderConfig)` with one profile."""

    def __init__(self, network: Network, profiles: Mapping[str, Sequence[int]], *,
                 dtype: torch.dtype = torch.float16, compute_capabilities: Sequence[str] | None = None,
                 profiling_verbosity: str = "detailed", progress: bool = False) -> None:
        ranges = {}
        for dim in PROFILE_DIMS:
            rng = profiles.get(dim) if isinstance(profiles, Mapping) else None
            low = 0 if dim == "past_len" else 1
            if (rng is None or len(rng) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                    or not low <= rng[0] <= rng[1] <= rng[2]):
                raise ValueError(f"TensorRTLowering.profiles[{dim!r}] must be (min, opt, max) integers with "
                                 f"{low} <= min <= opt <= max (BuildConfig.optimization_profiles()), got {rng!r}")
            ranges[dim] = tuple(rng)
        if ranges["input_len"][2] > ranges["past_len"][2] + 1:
            raise ValueError(f"TensorRTLowering.profiles: input_len max ({ranges['input_len'][2]}) must be <= "
                             f"past_len max + 1 ({ranges['past_len'][2] + 1}), the longest sequence")
        if profiling_verbosity not in _VERBOSITY:
            raise ValueError(f"TensorRTLowering.profiling_verbosity must be one of {', '.join(_VERBOSITY)}, "
                             f"got {profiling_verbosity!r}")
        if network.quant_config is not None:
            raise ValueError(f"TensorRT lowering supports unquantized networks only; {network.name!r} is quantized "
                             f"({network.quant_config})")
        self.trt, self.flavour = import_tensorrt()
        self.network = network
        self.config = network.config
        self.dtype = dtype
        self.trt_dtype = trt_dtype(self.trt, dtype)
        self.profiling_verbosity = profiling_verbosity
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
        self.batch_range = ranges["batch_size"]
        self.seq_range = ranges["input_len"]
        self.past_range = ranges["past_len"]

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
            weights = self.trt.Weights(trt_dtype(self.trt, t.dtype), t.data_ptr(), t.numel())
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
        self.logger = make_logger(trt)
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
            self._LOWER[layer.kind](self, layer, env)
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
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, _VERBOSITY[self.profiling_verbosity])
        if self.compute_capabilities and hasattr(config, "set_compute_capability"):
            # TensorRT-RTX ahead-of-time build: name the target GPUs instead of probing the current one
            config.num_compute_capabilities = len(self.compute_capabilities)
            for i, cc in enumerate(self.compute_capabilities):
                if not config.set_compute_capability(getattr(trt.ComputeCapability, cc), i):
                    raise ValueError(f"compute capability {cc!r} is not accepted by {self.flavour}")
        return builder, net, config

    def _embedding(self, layer: Layer, env: dict[str, Any]) -> None:
        # NOTE: the table is a (1, V, H) constant so that a tied lm_head multiplies by the very same
        # constant (one copy of the embedding in the plan); gather on axis 1 gives (1, B, S, H)
        n = layer.name
        table = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
        rows = self._out(self.net.add_gather(table, self.input_ids, 1), f"{n}/gather")
        env["hidden"] = self._shuffle(rows, f"{n}/drop_axis", (0, 0, self.config.hidden_size), first=(1, 2, 0, 3))

    def _rmsnorm_layer(self, layer: Layer, env: dict[str, Any]) -> None:
        env[layer.outputs[0]] = self._rmsnorm(env[layer.inputs[0]], layer.weights[0], layer.attrs["eps"], layer.name, 3)

    def _qkv_proj(self, layer: Layer, env: dict[str, Any]) -> None:
        c, n = self.config, layer.name
        attn = layer.weights[0].rsplit(".", 2)[0]
        parts = ("q_proj", "k_proj", "v_proj")
        w = torch.cat([self.network.weights[f"{attn}.{m}.weight"].to(self.dtype) for m in parts], 0)
        qkv = self._matmul_weight(env["x"], self._const(f"{n}/weight", w, (1, *w.shape)), f"{n}/matmul")
        if layer.attrs["bias"]:
            b = torch.cat([self.network.weights[f"{attn}.{m}.bias"].to(self.dtype) for m in parts], 0)
            qkv = self._ew(qkv, self._const(f"{n}/bias", b, (1, 1, b.shape[0])), "SUM", f"{n}/bias_add")
        sizes = (("q", 0, c.q_size, c.num_attention_heads), ("k", c.q_size, c.kv_size, c.num_key_value_heads),
                 ("v", c.q_size + c.kv_size, c.kv_size, c.num_key_value_heads))
        for key, start, size, heads in sizes:
            flat = self._slice_last(qkv, (), start, size, f"{n}/split_{key}")
            env[key] = self._shuffle(flat, f"{n}/heads_{key}", (0, 0, heads, c.head_dim))  # (B, S, heads, D)

    def _qk_norm(self, layer: Layer, env: dict[str, Any]) -> None:
        n, eps = layer.name, layer.attrs["eps"]
        env["q"] = self._rmsnorm(env["q"], layer.weights[0], eps, f"{n}/q", 4)
        env["k"] = self._rmsnorm(env["k"], layer.weights[1], eps, f"{n}/k", 4)

    def _rotary(self, layer: Layer, env: dict[str, Any]) -> None:
        c, n = self.config, layer.name
        cos, sin = self._cos_sin(n)
        env["q"] = self._apply_rope(env["q"], cos, sin, c.num_attention_heads, f"{n}/q")
        env["k"] = self._apply_rope(env["k"], cos, sin, c.num_key_value_heads, f"{n}/k")

    def _attention_layer(self, layer: Layer, env: dict[str, Any]) -> None:
        env["attn"] = self._attention(env, layer.attrs, layer.name)

    def _o_proj(self, layer: Layer, env: dict[str, Any]) -> None:
        n = layer.name
        w = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
        y = self._matmul_weight(env["attn"], w, f"{n}/matmul")
        if layer.attrs["bias"]:
            y = self._ew(y, self._weight(layer.weights[1], n, (1, 1, self.config.hidden_size)), "SUM", f"{n}/bias_add")
        env["hidden"] = self._ew(env["hidden"], y, "SUM", f"{n}/residual")

    def _mlp_layer(self, layer: Layer, env: dict[str, Any]) -> None:
        env["hidden"] = self._mlp(env, layer, layer.name)

    def _lm_head(self, layer: Layer, env: dict[str, Any]) -> None:
        # NOTE: logits for every new position; layer.inputs' `logits_indices` is the serving side's
        # choice of rows, which the caller applies to (B, S, V) afterwards.
        n = layer.name
        w = self._weight(layer.weights[0], n, (1, *self.network.weights[layer.weights[0]].shape))
        logits = self._matmul_weight(env["x"], w, f"{n}/matmul")  # (B, S, V) in dtype
        env["logits"] = self._cast(logits, self.trt.float32, f"{n}/to_f32")

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
        masked = self._out(self.net.add_select(mask, scores, self._f32(NEG, 5, f"{n}/neg")), f"{n}/mask")
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

    # one lowering per kind of `kit/layer_kinds.py`
    _LOWER = {"embedding": _embedding, "rmsnorm": _rmsnorm_layer, "qkv_proj": _qkv_proj, "qk_norm": _qk_norm,
              "rope": _rotary, "attention": _attention_layer, "o_proj": _o_proj, "mlp": _mlp_layer,
              "lm_head": _lm_head}


check_covers("TensorRTLowering", TensorRTLowering._LOWER)
