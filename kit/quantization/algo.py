"""The two enums that name a quantization scheme: `QuantAlgo` and `KVCacheQuantAlgo`.

They sit below everything else of `kit.quantization` (the scheme registry, the config,
the KV-cache helpers) so that each of those can name a scheme without importing the
others. The vocabulary follows TensorRT-LLM / ModelOpt.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["QuantAlgo", "KVCacheQuantAlgo"]


class QuantAlgo(str, Enum):
    """How the linear layers' weights (and maybe activations) are quantized."""

    NO_QUANT = "NO_QUANT"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8 = "W8A8"

    def __str__(self) -> str:
        return self.value


class KVCacheQuantAlgo(str, Enum):
    """How the KV cache is stored (see `kit.quantization.kv_cache`)."""

    INT8 = "INT8"
    FP8 = "FP8"

    def __str__(self) -> str:
        return self.value
