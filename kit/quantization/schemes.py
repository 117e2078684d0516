"""The scheme registry: one `QuantScheme` object per `QuantAlgo`, in one table.

Everything that differs between quantization schemes is asked of the scheme object,
and the only place that maps a `QuantAlgo` to its behaviour is `get_scheme(algo)`:

* what calibration it needs (`calibration`: none, the activations' max, AWQ's scale
  search, SmoothQuant's migration, GPTQ's Hessians) and `smooth(x, weights, config)`,
  the per-input-channel scale `s` of AWQ / SmoothQuant (W * s, x / s);
* `quantize(weights, x, config)`: the stored tensors and scales of each linear, plus the
  dequantized weight (for the report, and GPTQ's sequential calibration);
* `stored_format(config)`: what a quantized linear stores, recorded in `QuantConfig`
  (and so in an engine directory's config) instead of being guessed from tensor names;
* `build(parts, config, ...)`: the `QuantLinear` that runs the stored tensors.

`build_linear(weights, prefixes, quant_config, ...)` is what the engine's backend calls
for every linear; it reads each prefix's tensors as the stored format names them.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from kit.quantization import awq, fp8, gptq, int4, int8_weight_only, smoothquant
from kit.quantization.algo import QuantAlgo
from kit.quantization.linear import ConcatLinear, FloatLinear, FP8Linear, Int8Linear, QuantLinear, WeightOnlyLinear

__all__ = ["QuantRecipe", "QuantScheme", "SCHEMES", "STORED_FORMAT_VERSION", "get_scheme", "build_linear"]

STORED_FORMAT_VERSION = 1  # bump when a scheme's stored tensors change meaning


class QuantRecipe(Protocol):
    """The fields of `QuantConfig` a scheme reads (a Protocol: the config imports the registry)."""

    quant_algo: QuantAlgo
    group_size: int
    has_zero_point: bool
    smoothquant_alpha: float
    quantize_lm_head: bool


Stored = dict[str, torch.Tensor]  # tensor name after "<prefix>." -> tensor


class QuantScheme:
    """One quantization scheme. Subclasses fill in the class attributes and the two steps."""

    algo: QuantAlgo = QuantAlgo.NO_QUANT
    preset: str | None = None  # short name for `QuantConfig.from_name`
    bits: int = 16  # bits per stored weight code
    weight_only: bool = False  # activations stay in the compute dtype
    calibration: str = "none"  # none | amax | awq | smoothquant | gptq
    sequential: bool = False  # GPTQ: later linears of a block see the quantized earlier ones

    @property
    def quantizes_weights(self) -> bool:
        """False only for NO_QUANT (which may still quantize the KV cache)."""
        return self.algo is not QuantAlgo.NO_QUANT

    @property
    def needs_calibration(self) -> bool:
        """Whether the Quantizer must run the model on calibration text."""
        return self.calibration != "none"

    # ---------------------------------------------------------- the format
    def tensors(self, config: QuantRecipe) -> dict[str, str]:
        """Stored tensor name -> its dtype and shape, for one quantized linear."""
        return {}

    def optional_tensors(self, config: QuantRecipe) -> dict[str, str]:
        return {}

    def stored_format(self, config: QuantRecipe) -> dict[str, Any]:
        """What a quantized linear stores: a plain dict, saved with the config."""
        if self.algo is QuantAlgo.NO_QUANT:
            return {"version": STORED_FORMAT_VERSION, "scheme": self.algo.value, "weight": "float", "tensors": {}}
        fmt = {"version": STORED_FORMAT_VERSION, "scheme": self.algo.value, "weight": self.weight_kind(),
               "tensors": self.tensors(config), "optional": self.optional_tensors(config)}
        if self.bits == 4:
            fmt["group_size"] = config.group_size
            fmt["has_zero_point"] = config.has_zero_point
        return fmt

    def weight_kind(self) -> str:
        return "float"

    def read_stored(self, weights: dict[str, torch.Tensor], prefix: str, config: QuantRecipe,
                    device: torch.device) -> Stored:
        """The stored tensors of linear `prefix`, as this format names them (missing ones: an error)."""
        names = list(self.tensors(config))
        missing = [n for n in names if f"{prefix}.{n}" not in weights]
        if missing:
            raise ValueError(f"{prefix}: stored format {self.algo.value} needs {', '.join(prefix + '.' + n for n in names)}"
                             f"; missing {', '.join(missing)}")
        names += [n for n in self.optional_tensors(config) if f"{prefix}.{n}" in weights]
        return {n: weights[f"{prefix}.{n}"].to(device) for n in names}

    # ---------------------------------------------------------- step one
    def smooth(self, x: torch.Tensor | None, weights: list[torch.Tensor],
               config: QuantRecipe) -> tuple[torch.Tensor, float] | None:
        """Per-input-channel scale s (in,) and AWQ's alpha (NaN otherwise), or None: no smoothing."""
        return None

    def quantize(self, weights: list[torch.Tensor], x: torch.Tensor | None,
                 config: QuantRecipe) -> list[tuple[Stored, torch.Tensor]]:
        """(stored tensors, dequantized float32 weight) for each (out_i, in) weight reading x (T, in)."""
        return [self.quantize_one(w, x, config) for w in weights]

    def quantize_one(self, w: torch.Tensor, x: torch.Tensor | None, config: QuantRecipe) -> tuple[Stored, torch.Tensor]:
        raise ValueError(f"quant_algo {self.algo.value} quantizes no weights")

    # ---------------------------------------------------------- step two
    def build(self, parts: list[Stored], config: QuantRecipe, **kw: Any) -> QuantLinear:
        raise ValueError(f"build_linear: quant_algo {self.algo.value} stores no quantized linears")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.algo.value})"


class NoQuant(QuantScheme):
    """Weights as loaded (the KV cache may still be quantized)."""


class FP8Scheme(QuantScheme):
    """FP8 e4m3 weights and activations: per tensor (static input scale) or per channel per token."""

    bits = 8

    def __init__(self, per_channel: bool) -> None:
        self.per_channel = per_channel
        self.algo = QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN if per_channel else QuantAlgo.FP8
        self.preset = "fp8_pc_pt" if per_channel else "fp8"
        self.calibration = "none" if per_channel else "amax"

    def weight_kind(self) -> str:
        return "float8_e4m3fn"

    def tensors(self, config):
        if self.per_channel:
            return {"qweight": "float8_e4m3fn (out, in)", "weight_scale": "float32 (out,)"}
        return {"qweight": "float8_e4m3fn (out, in)", "weight_scale": "float32 (1,)", "input_scale": "float32 (1,)"}

    def quantize_one(self, w, x, config):
        st = fp8.quantize_linear(w, per_channel=self.per_channel, input_amax=None if x is None else x.abs().amax())
        return st, fp8.dequantize(st["qweight"], st["weight_scale"])

    def build(self, parts, config, **kw):
        qweight = torch.cat([st["qweight"] for st in parts], 0)
        input_scale = None if self.per_channel else torch.stack([st["input_scale"].float() for st in parts]).amax(0)
        return FP8Linear(qweight, [st["weight_scale"].float() for st in parts], input_scale,
                         per_channel=self.per_channel, **kw)


class WeightOnlyScheme(QuantScheme):
    """W8A16 (int8 a row) and the int4 group schemes: codes and scales, activations in the compute dtype."""

    weight_only = True

    def __init__(self, algo: QuantAlgo, preset: str, bits: int, calibration: str = "none") -> None:
        self.algo, self.preset, self.bits, self.calibration = algo, preset, bits, calibration
        self.sequential = calibration == "gptq"

    def weight_kind(self) -> str:
        return "int8" if self.bits == 8 else "int4"

    def tensors(self, config):
        if self.bits == 8:
            return {"qweight": "int8 (out, in)", "weight_scale": "float32 (out,)"}
        g = f"in/{config.group_size}"
        out = {"qweight": "uint8 (out, in/2), two codes a byte", "weight_scale": f"float16 (out, {g})"}
        if config.has_zero_point:
            out["weight_zero"] = f"uint8 (out, {g})"
        return out

    def optional_tensors(self, config):
        # AWQ of a linear with no norm before it (o_proj, down_proj): x / s is applied at run time
        return {"pre_quant_scale": "float32 (in,)"} if self.calibration == "awq" else {}

    def smooth(self, x, weights, config):
        if self.calibration != "awq":
            return None
        res = awq.search_scale(x, weights, config.group_size, config.has_zero_point)
        return res.scale, res.alpha

    def quantize(self, weights, x, config):
        if self.calibration != "gptq":
            return super().quantize(weights, x, config)
        # GPTQ: the group's linears read the same x, so they share one Hessian; quantize them stacked
        stacked = torch.cat(weights, 0)
        stored, deq = gptq.gptq_quantize(stacked, gptq.hessian(x), config.group_size, config.has_zero_point)
        out, row = [], 0
        for w in weights:
            n = w.shape[0]
            out.append(({k: v[row:row + n] for k, v in stored.items()}, deq[row:row + n]))
            row += n
        return out

    def quantize_one(self, w, x, config):
        if self.bits == 8:
            st = int8_weight_only.quantize_linear(w)
            return st, int8_weight_only.dequantize_weight(st["qweight"], st["weight_scale"])
        st = int4.quantize_linear(w, config.group_size, config.has_zero_point)
        return st, int4.dequantize_weight(st["qweight"], st["weight_scale"], st.get("weight_zero"), config.group_size)

    def build(self, parts, config, **kw):
        qweight = torch.cat([st["qweight"] for st in parts], 0)
        zero = torch.cat([st["weight_zero"] for st in parts], 0) if "weight_zero" in parts[0] else None
        scale = torch.cat([st["weight_scale"] for st in parts], 0)
        pqs = parts[0].get("pre_quant_scale")  # fused prefixes read the same x: one smoothing vector
        return WeightOnlyLinear(qweight, scale, zero, pqs, bits=self.bits, group_size=config.group_size, **kw)


class W8A8Scheme(QuantScheme):
    """int8 weights a row, int8 activations a token; with or without SmoothQuant's migration."""

    bits = 8

    def __init__(self, smoothed: bool) -> None:
        self.smoothed = smoothed
        self.algo = QuantAlgo.W8A8_SQ_PER_CHANNEL if smoothed else QuantAlgo.W8A8
        self.preset = "int8_sq" if smoothed else "w8a8"
        self.calibration = "smoothquant" if smoothed else "none"

    def weight_kind(self) -> str:
        return "int8"

    def tensors(self, config):
        return {"qweight": "int8 (out, in)", "weight_scale": "float32 (out,)"}

    def optional_tensors(self, config):
        return {"pre_quant_scale": "float32 (in,)"} if self.smoothed else {}

    def smooth(self, x, weights, config):
        if not self.smoothed:
            return None
        return smoothquant.smooth_scales(x.abs().amax(0), weights, config.smoothquant_alpha), float("nan")

    def quantize_one(self, w, x, config):
        st = int8_weight_only.quantize_linear(w)
        return st, int8_weight_only.dequantize_weight(st["qweight"], st["weight_scale"])

    def build(self, parts, config, **kw):
        qweight = torch.cat([st["qweight"] for st in parts], 0)
        scale = torch.cat([st["weight_scale"] for st in parts], 0)
        return Int8Linear(qweight, scale, parts[0].get("pre_quant_scale"), smoothed=self.smoothed, **kw)


# The one table: every QuantAlgo has exactly one scheme (the order is the presets' order).
SCHEMES: dict[QuantAlgo, QuantScheme] = {s.algo: s for s in (
    NoQuant(),
    FP8Scheme(per_channel=False),
    FP8Scheme(per_channel=True),
    WeightOnlyScheme(QuantAlgo.W8A16, "int8_wo", 8),
    WeightOnlyScheme(QuantAlgo.W4A16, "int4_wo", 4),
    WeightOnlyScheme(QuantAlgo.W4A16_AWQ, "int4_awq", 4, "awq"),
    WeightOnlyScheme(QuantAlgo.W4A16_GPTQ, "int4_gptq", 4, "gptq"),
    W8A8Scheme(smoothed=True),
    W8A8Scheme(smoothed=False),
)}


def get_scheme(algo: QuantAlgo | str) -> QuantScheme:
    """The scheme object of `algo` (a `QuantAlgo` or its value)."""
    try:
        return SCHEMES[algo if isinstance(algo, QuantAlgo) else QuantAlgo(str(algo).upper())]
    except (KeyError, ValueError):
        raise ValueError(f"quant_algo {algo!r} is not one of {', '.join(a.value for a in SCHEMES)}") from None


def build_linear(weights: dict[str, torch.Tensor], prefixes: list[str], quant_config: QuantRecipe, *,
                 bias: bool, device: torch.device | str, dtype: torch.dtype,
                 force_reference: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear(s) named by `prefixes` as one callable, outputs concatenated in order.

    A linear kept in float (excluded, or a tied lm_head) stores `<prefix>.weight`; a
    quantized one stores the tensors of `quant_config`'s stored format. With
    `quant_config.quantize_lm_head` an untied lm_head must be stored quantized.
    """
    device = torch.device(device)
    biases = [weights[f"{p}.bias"] for p in prefixes] if bias else None
    bias_t = torch.cat(biases, 0) if biases else None
    floats = [f"{p}.weight" in weights for p in prefixes]
    if (getattr(quant_config, "quantize_lm_head", False) and quant_config.quant_algo is not QuantAlgo.NO_QUANT
            and "lm_head" in prefixes and floats[prefixes.index("lm_head")]):
        raise ValueError("build_linear: QuantConfig.quantize_lm_head is set but lm_head is stored in float "
                         "(lm_head.weight): quantize the model with this QuantConfig first")
    if all(floats):
        return FloatLinear([weights[f"{p}.weight"] for p in prefixes], bias_t, device, dtype, prefixes)
    if any(floats):  # mixed formats: one linear per prefix
        return ConcatLinear([build_linear(weights, [p], quant_config, bias=bias, device=device, dtype=dtype,
                                          force_reference=force_reference) for p in prefixes])
    scheme = get_scheme(quant_config.quant_algo)
    if scheme.algo is QuantAlgo.NO_QUANT:
        raise ValueError(f"{prefixes[0]}: no {prefixes[0]}.weight, and quant_algo NO_QUANT stores no quantized linears")
    parts = [scheme.read_stored(weights, p, quant_config, device) for p in prefixes]
    return scheme.build(parts, quant_config, prefixes=list(prefixes), out_features=[st["qweight"].shape[0] for st in parts],
                        bias=bias_t, device=device, dtype=dtype, force_reference=force_reference)
