"""Quantization: weights (and activations, and the KV cache) in fewer bits.

Two steps, one class per scheme (gpt-fast's `quantize.py`, TensorRT-LLM / ModelOpt's
vocabulary):

1. `Quantizer(QuantConfig(...)).quantize(loaded)` computes the quantized weights and
   scales, calibrating on text where the scheme needs it, and returns a new
   `LoadedModel` whose linears hold `<prefix>.qweight` + scales instead of
   `<prefix>.weight` and whose `quant_config` says how to read them.
2. `build_linear(weights, prefixes, quant_config, ...)` — called by the engine's
   backend for every linear — swaps `x @ W^T` for the scheme's GEMM: a CPU reference,
   and FP8 / int8 tensor-core GEMMs or a Triton dequantizing kernel on a Hopper GPU.

What differs between schemes lives in one scheme object per `QuantAlgo`, registered in
`schemes.SCHEMES`; `get_scheme(algo)` is the one place an algorithm is dispatched.
Quantized tensors are cached under `$KIT_CACHE_DIR/quantized` (see `cache.py`).

| module                | what it holds                                                     |
| --------------------- | ----------------------------------------------------------------- |
| `algo.py`             | `QuantAlgo`, `KVCacheQuantAlgo`: the names of the schemes         |
| `schemes.py`          | the registry: one `QuantScheme` per `QuantAlgo`; `build_linear`   |
| `config.py`           | `QuantConfig` (+ `from_name`, `stored_format`)                    |
| `quantizer.py`        | `Quantizer`: the block-by-block driver, calibration windows       |
| `cache.py`            | `QuantCache` / `ResultCache` under `$KIT_CACHE_DIR`               |
| `calibration.py`      | the float model block by block, capturing linear inputs           |
| `fp8.py`              | FP8 e4m3 per-tensor / per-channel-per-token                       |
| `int8_weight_only.py` | int8 per-channel weights (W8A16; also W8A8's weights)             |
| `int4.py`             | int4 group-wise round-to-nearest, packing                         |
| `awq.py`              | AWQ's activation-aware scale search                               |
| `gptq.py`             | GPTQ's Hessian-based error compensation                           |
| `smoothquant.py`      | SmoothQuant smoothing factors, the W8A8 reference GEMM            |
| `linear.py`           | the quantized linear layers                                       |
| `weight_layout.py`    | run-time weight layouts (int4 as int32 words, scales by group)    |
| `stream_gemm.py`      | the small-M weight-streaming Triton GEMM (int8 / int4 / fp8)      |
| `stream_ops.py`       | its Triton building blocks (operand loads, exact code conversions) |
| `path_choice.py`      | `PathChooser`: the faster of equivalent fast paths, timed per shape |
| `triton_gemm.py`      | dequantize to bf16 for the prefill GEMM (Triton)                  |
| `kv_cache.py`         | int8 / fp8 KV-cache quantize / dequantize helpers                 |
"""

from kit.quantization.algo import KVCacheQuantAlgo, QuantAlgo
from kit.quantization.cache import QuantCache, ResultCache
from kit.quantization.config import QUANT_PRESETS, CalibConfig, QuantConfig
from kit.quantization.kv_cache import dequantize_kv, kv_cache_dtype, quantize_kv
from kit.quantization.linear import ConcatLinear, FloatLinear, FP8Linear, Int8Linear, QuantLinear, WeightOnlyLinear
from kit.quantization.quantizer import Quantizer, calibration_tokens
from kit.quantization.schemes import SCHEMES, QuantScheme, build_linear, get_scheme

__all__ = [
    "CalibConfig",
    "QuantAlgo", "KVCacheQuantAlgo", "QuantConfig", "QUANT_PRESETS",
    "Quantizer", "calibration_tokens", "QuantCache", "ResultCache",
    "QuantScheme", "SCHEMES", "get_scheme",
    "build_linear", "QuantLinear", "FloatLinear", "WeightOnlyLinear", "FP8Linear", "Int8Linear", "ConcatLinear",
    "quantize_kv", "dequantize_kv", "kv_cache_dtype",
]
