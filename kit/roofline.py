"""The roofline of a decode step: the bytes it must move, the FLOPs it must do, and the least time.

A decode step reads every weight once (a token per sequence multiplies each weight by one
activation: ~1 FLOP per byte in bf16), reads each sequence's cached K and V, writes the
new token's K and V, and streams the activations between kernels. On a GPU like the H100
(~790 TFLOP/s of bf16 GEMMs against ~3 TB/s) that is far below the ridge point, so the
least time a step can take is its bytes over the memory bandwidth:

    roofline_ms = max(bytes / bandwidth, flops / peak_flops)
    achieved    = roofline_ms / measured_ms       (1.0 = at the roofline)

`decode_step_cost(config, batch, context, ...)` counts the bytes and FLOPs from the
model's shapes (so it works for any config, dtype and quantization without loading
weights); `roofline_row(...)` turns one measured step into the columns `kit bench` and
the GPU scripts print; `step_roofline(engine, ...)` does it for an engine's measured step, at
the card's measured copy bandwidth (`COPY_BANDWIDTH`: H100, H200), bytes only elsewhere. The default bandwidth is what a large device-to-device copy
reaches on an H100 80GB HBM3 (`bench/roofline.py` measures it: 3.0 TB/s, against the
datasheet's 3.35), the honest ceiling for a kernel that streams weights.

Bytes per step, with B sequences of context L (`elem` bytes per activation):

    weights      every linear weight (q/k/v, o, gate/up/down, lm_head) at its stored width,
                 the norms' weights, and B rows of the embedding table
    kv_read      B * L * 2 * kv_size * layers * kv_elem (+ 4-byte scales per token and kv head if 8-bit)
    kv_write     B * 2 * kv_size * layers * kv_elem
    activations  B * layers * (12 h + 5 q + 4 kv + 6 i) * elem + B * vocab * elem (logits): what the
                 fused kernels of one block read and write besides weights and cache
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from kit.config import ModelConfig
from kit.quantization.config import QUANT_PRESETS

__all__ = ["H100_COPY_BANDWIDTH", "H100_BF16_FLOPS", "COPY_BANDWIDTH", "WEIGHT_BITS", "StepCost", "copy_bandwidth",
           "decode_step_cost", "roofline_row", "describe_row", "step_roofline"]

H100_COPY_BANDWIDTH = 3.0e12  # bytes/s: a large device-to-device copy on an H100 80GB HBM3
H100_BF16_FLOPS = 790e12  # FLOP/s: cuBLAS bf16 GEMMs measured on it (bench/results/quant_gemm_h100.json)
# bytes/s a large device-to-device copy reaches, by GPU name (bench/roofline.py measures it): the H100's
# (bench/results/roofline_h100 runs) and the H200's (bench/results/roofline_h200.json)
COPY_BANDWIDTH = {"H100": H100_COPY_BANDWIDTH, "H200": 4.26e12}
# bits a linear weight takes, scales included (group 128 with a 16-bit scale: +0.125 bit; AWQ/GPTQ zeros too)
WEIGHT_BITS = {
    None: None, "NO_QUANT": None, "FP8": 8.0, "FP8_PER_CHANNEL_PER_TOKEN": 8.0, "W8A16": 8.0, "W8A8": 8.0,
    "W8A8_SQ_PER_CHANNEL": 8.0, "W4A16": 4.125, "W4A16_AWQ": 4.25, "W4A16_GPTQ": 4.25,
}
_ELEM = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class StepCost:
    """Bytes and FLOPs of one decode step (see the module docstring for what each counts)."""

    weight_bytes: float
    kv_read_bytes: float
    kv_write_bytes: float
    activation_bytes: float
    flops: float

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes

    def roofline_ms(self, bandwidth: float = H100_COPY_BANDWIDTH, peak_flops: float = H100_BF16_FLOPS) -> float:
        """The least time of the step: its bytes at `bandwidth` or its FLOPs at `peak_flops`, whichever is longer."""
        _positive("bandwidth", bandwidth)
        _positive("peak_flops", peak_flops)
        return 1e3 * max(self.total_bytes / bandwidth, self.flops / peak_flops)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v / 1e6:,.2f} M</td></tr>"
                       for k, v in {**asdict(self), "total_bytes": self.total_bytes}.items())
        return f"<b>StepCost</b> (bytes and FLOPs of one decode step)<table>{rows}</table>"


def copy_bandwidth(device_name: str) -> float | None:
    """The measured copy bandwidth of a GPU by its name (`torch.cuda.get_device_name`), None if unknown."""
    for key, bandwidth in COPY_BANDWIDTH.items():
        if key in device_name:
            return bandwidth
    return None


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _elem(name: str, dtype: str) -> int:
    key = str(dtype).replace("torch.", "").lower()
    if key not in _ELEM:
        raise ValueError(f"{name} must be one of {', '.join(_ELEM)}, got {dtype!r}")
    return _ELEM[key]


def _algo(quantization: Any) -> tuple[str | None, str | None]:
    """(QuantAlgo name, 8-bit KV cache name or None) of a QuantConfig, an algo name or a preset name."""
    if quantization is None:
        return None, None
    if hasattr(quantization, "quant_algo"):  # a QuantConfig
        kv = quantization.kv_cache_quant_algo
        return str(quantization.quant_algo.value), (str(kv.value).lower() if kv is not None else None)
    name = str(quantization)
    if name.upper() in WEIGHT_BITS:
        return name.upper(), None
    preset = name.lower().replace("-", "_")
    if preset in QUANT_PRESETS:
        return str(QUANT_PRESETS[preset][0].value), None
    allowed = [k for k in WEIGHT_BITS if k] + list(QUANT_PRESETS)
    raise ValueError(f"quantization must be None, a QuantConfig or one of {', '.join(allowed)}, got {quantization!r}")


def decode_step_cost(config: ModelConfig, batch: int, context: int, *, dtype: str = "bfloat16",
                     quantization: Any = None, kv_cache_dtype: str | None = None,
                     quantize_lm_head: bool = False) -> StepCost:
    """Bytes and FLOPs of one decode step: `batch` sequences, each attending over `context` tokens.

    `dtype`: the activations' and unquantized weights' dtype; `quantization`: a `QuantConfig`, a
    `QuantAlgo` name or a preset name such as "fp8" / "int4_awq" (its weight width from `WEIGHT_BITS`;
    the lm_head stays in `dtype` unless `quantize_lm_head`); `kv_cache_dtype`: "int8" / "fp8" for an
    8-bit cache (default: the QuantConfig's KV-cache algorithm, else `dtype`).
    """
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context must be >= 1, got {batch} and {context}")
    elem = _elem("dtype", dtype)
    key, kv_algo = _algo(quantization)
    bits = WEIGHT_BITS[key] or 8.0 * elem
    kv_elem = _elem("kv_cache_dtype", kv_cache_dtype or kv_algo or dtype)
    c = config
    h, i, q, kv, layers, v = c.hidden_size, c.intermediate_size, c.q_size, c.kv_size, c.num_hidden_layers, c.vocab_size
    linear = h * (q + 2 * kv) + q * h + 3 * h * i  # per block
    head = v * h
    small = 2 * h + (q + 2 * kv if c.qkv_bias else 0) + (2 * c.head_dim if c.qk_norm else 0)  # norms, biases
    weight_bytes = (layers * (linear * bits / 8 + small * elem) + h * elem
                    + head * (bits / 8 if quantize_lm_head else elem) + batch * h * elem)
    scales = 2 * 4 * c.num_key_value_heads * layers if kv_elem == 1 else 0  # float32 scale per token, kv head
    kv_read = batch * context * (2 * kv * layers * kv_elem + scales)
    kv_write = batch * (2 * kv * layers * kv_elem + scales)
    activations = batch * (layers * (12 * h + 5 * q + 4 * kv + 6 * i) + v) * elem
    flops = 2.0 * batch * (layers * linear + head) + 4.0 * batch * context * layers * q
    return StepCost(float(weight_bytes), float(kv_read), float(kv_write), float(activations), flops)


def roofline_row(config: ModelConfig, batch: int, context: int, step_ms: float | None = None, *,
                 dtype: str = "bfloat16", quantization: Any = None, kv_cache_dtype: str | None = None,
                 bandwidth: float = H100_COPY_BANDWIDTH, peak_flops: float = H100_BF16_FLOPS) -> dict[str, Any]:
    """One decode step against its roofline, as flat columns (a row of `kit bench` or a results JSON).

    Columns: `bytes_per_step, weight_bytes, kv_bytes, activation_bytes, flops_per_step,
    roofline_ms, roofline_steps_per_s, bandwidth_tb_s`, and with a measured `step_ms`:
    `step_ms, roofline_fraction` (roofline_ms / step_ms), `achieved_tb_s`, `achieved_tflops`.
    """
    cost = decode_step_cost(config, batch, context, dtype=dtype, quantization=quantization,
                            kv_cache_dtype=kv_cache_dtype)
    floor = cost.roofline_ms(bandwidth, peak_flops)
    row: dict[str, Any] = {
        "bytes_per_step": cost.total_bytes, "weight_bytes": cost.weight_bytes,
        "kv_bytes": cost.kv_read_bytes + cost.kv_write_bytes, "activation_bytes": cost.activation_bytes,
        "flops_per_step": cost.flops, "roofline_ms": floor, "roofline_steps_per_s": 1e3 / floor,
        "bandwidth_tb_s": bandwidth / 1e12,
    }
    if step_ms is not None:
        _positive("step_ms", step_ms)
        row.update(step_ms=step_ms, roofline_fraction=floor / step_ms,
                   achieved_tb_s=cost.total_bytes / (step_ms / 1e3) / 1e12,
                   achieved_tflops=cost.flops / (step_ms / 1e3) / 1e12)
    return row


def describe_row(row: dict[str, Any]) -> str:
    """One line for a printed table: bytes, roofline and (if measured) the achieved fraction."""
    text = f"{row['bytes_per_step'] / 1e9:.3f} GB/step, roofline {row['roofline_ms']:.3f} ms"
    if "step_ms" in row:
        text += f", measured {row['step_ms']:.3f} ms = {100 * row['roofline_fraction']:.0f}% of roofline"
    return text


def step_roofline(engine: Any, batch_size: int, context_len: int, step_ms: float) -> dict[str, Any]:
    """`{"roofline": row}` of an engine's measured decode step (`kit.bench.decode_only`): its bytes and floor at
    the device's measured copy bandwidth (tensor parallelism: the whole model over tp GPUs' bandwidth); bytes
    only where the kit has no bandwidth for the device (the CPU, an unmeasured GPU)."""
    dtype = str(engine.dtype).replace("torch.", "")
    name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else ""
    bandwidth = copy_bandwidth(name) if name else None
    mapping = getattr(engine, "mapping", None)  # tensor parallelism: the whole model over tp GPUs' bandwidth
    tp = mapping.tp_size if mapping is not None else 1
    config = getattr(engine, "full_config", None) or engine.config
    kw = {"bandwidth": tp * bandwidth} if bandwidth else {}
    try:
        row = roofline_row(config, batch_size, context_len, step_ms if bandwidth else None, dtype=dtype,
                           quantization=engine.network.quant_config, **kw)
        row["tensor_parallel_size"] = tp
    except ValueError as e:  # a dtype or scheme the byte count does not know: say so, measure on
        return {"roofline": {"error": str(e)}}
    if not bandwidth:  # CPU, or a GPU whose copy bandwidth the kit has not measured: bytes, no fraction
        row = {k: row[k] for k in ("bytes_per_step", "weight_bytes", "kv_bytes", "activation_bytes",
                                   "flops_per_step")}
        row["note"] = f"no measured copy bandwidth for {name or engine.device.type}: bytes only"
    return {"roofline": row}
