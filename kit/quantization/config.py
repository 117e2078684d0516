"""What to quantize and how: `QuantAlgo`, `KVCacheQuantAlgo` and `QuantConfig`.

The vocabulary follows TensorRT-LLM / ModelOpt (`QuantAlgo.W4A16_AWQ`, ...). A scheme
is named by what it stores and what it computes in:

| QuantAlgo                   | weights                          | activations                     | calibration |
| --------------------------- | -------------------------------- | ------------------------------- | ----------- |
| `NO_QUANT`                  | as loaded                        | as loaded                       | no          |
| `FP8`                       | float8_e4m3, one scale a tensor  | float8_e4m3, static scale       | yes (amax)  |
| `FP8_PER_CHANNEL_PER_TOKEN` | float8_e4m3, one scale a row     | float8_e4m3, one scale a token  | no          |
| `W8A16`                     | int8, one scale a row            | compute dtype (bf16)            | no          |
| `W4A16`                     | int4, one scale a group (RTN)    | compute dtype                   | no          |
| `W4A16_AWQ`                 | int4 groups after AWQ scaling    | compute dtype                   | yes         |
| `W4A16_GPTQ`                | int4 groups, GPTQ error feedback | compute dtype                   | yes         |
| `W8A8_SQ_PER_CHANNEL`       | int8 a row, after SmoothQuant    | int8, one scale a token         | yes (max)   |
| `W8A8`                      | int8 a row (no smoothing)        | int8, one scale a token         | no          |

"A row" is one output channel of the linear (one row of the (out, in) weight); "a
group" is `group_size` consecutive input channels of one row.

Each `QuantAlgo` has one scheme object in `kit.quantization.schemes.SCHEMES`; the
properties below (`is_int4`, `needs_calibration`, `stored_format`, ...) ask it. The
stored format (tensor names, dtypes, shapes of a quantized linear) is part of
`to_dict()`, so an engine directory records how to read its weights.

`CalibConfig` (TensorRT-LLM's `LLM(calib_config=...)`) says how much text calibrates:
`calib_batches x calib_batch_size` windows of `calib_max_seq_length` tokens of the kit's
calibration text (`calib_dataset='kit'`, data/ in the repository); `apply()` writes that into
a QuantConfig's `calib_size` / `calib_max_seq_len`.

`QuantConfig` is frozen and validates itself; `QuantConfig.from_name("int4_awq")`
gives the presets that the CLI and the notebooks use.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from kit.quantization.algo import KVCacheQuantAlgo, QuantAlgo
from kit.quantization.schemes import SCHEMES, QuantScheme, get_scheme

__all__ = ["QuantAlgo", "KVCacheQuantAlgo", "QuantConfig", "CalibConfig", "QUANT_PRESETS"]

# short name -> (algo, extra fields); `from_name` accepts these (the registry's presets)
QUANT_PRESETS: dict[str, tuple[QuantAlgo, dict[str, Any]]] = {
    s.preset: (s.algo, {}) for s in SCHEMES.values() if s.preset is not None}


def _enum(cls: type[Enum], value: Any, field: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).upper())
    except ValueError:
        allowed = ", ".join(m.value for m in cls)  # type: ignore[attr-defined]
        raise ValueError(f"QuantConfig.{field} {value!r} is not one of {allowed}") from None


@dataclass(frozen=True)
class QuantConfig:
    """One quantization recipe: the algorithm and its knobs.

    - `group_size`: input channels that share one scale in the int4 schemes (a power of
      two >= 16; every quantized linear's in_features must be a multiple of it).
    - `has_zero_point`: int4 with an offset (asymmetric, u in 0..15, w = (u - z) * s)
      instead of symmetric (w = (u - 8) * s).
    - `smoothquant_alpha`: migration strength of SmoothQuant, in [0, 1].
    - `exclude_modules`: glob patterns of linears kept in float; a pattern matches the
      module's full name (`model.layers.0.mlp.down_proj`) or its last part (`lm_head`).
    - `quantize_lm_head`: quantize the (untied) lm_head with the same scheme even though
      `exclude_modules` names it (TensorRT-LLM's `quantize_lm_head`, default False). It is
      the largest single linear: Llama-3.1-8B's 128,256 x 4,096 is 1 GB in bf16 that every
      decode step reads, 7 % of the bf16 model's linear bytes but a quarter of an int4
      model's. A tied lm_head reads the embedding, which is never quantized: it stays in float.
    - `calib_size` windows of `calib_max_seq_len` tokens feed the calibration.
    """

    quant_algo: QuantAlgo = QuantAlgo.NO_QUANT
    kv_cache_quant_algo: KVCacheQuantAlgo | None = None
    group_size: int = 128
    has_zero_point: bool = False
    smoothquant_alpha: float = 0.5
    exclude_modules: tuple[str, ...] = ("lm_head",)
    quantize_lm_head: bool = False
    calib_size: int = 32
    calib_max_seq_len: int = 256

    def __post_init__(self) -> None:
        # NOTE: frozen dataclass: normalise through object.__setattr__
        object.__setattr__(self, "quant_algo", _enum(QuantAlgo, self.quant_algo, "quant_algo"))
        if self.kv_cache_quant_algo is not None:
            object.__setattr__(self, "kv_cache_quant_algo",
                               _enum(KVCacheQuantAlgo, self.kv_cache_quant_algo, "kv_cache_quant_algo"))
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g < 16 or g & (g - 1):
            raise ValueError(f"QuantConfig.group_size must be a power of two >= 16 (e.g. 64, 128), got {g!r}")
        if not isinstance(self.has_zero_point, bool):
            raise ValueError(f"QuantConfig.has_zero_point must be a bool, got {self.has_zero_point!r}")
        if not isinstance(self.smoothquant_alpha, (int, float)) or not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"QuantConfig.smoothquant_alpha must lie in [0, 1], got {self.smoothquant_alpha!r}")
        if isinstance(self.exclude_modules, str):
            raise ValueError("QuantConfig.exclude_modules must be a tuple of patterns, not one string "
                             f"(write ({self.exclude_modules!r},))")
        object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        if not isinstance(self.quantize_lm_head, bool):
            raise ValueError(f"QuantConfig.quantize_lm_head must be a bool, got {self.quantize_lm_head!r}")
        if not all(isinstance(p, str) and p for p in self.exclude_modules):
            raise ValueError(f"QuantConfig.exclude_modules must hold non-empty strings, got {self.exclude_modules!r}")
        for name in ("calib_size", "calib_max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"QuantConfig.{name} must be a positive integer, got {v!r}")

    # ----------------------------------------------------------------- derived
    @property
    def scheme(self) -> QuantScheme:
        """The registry's scheme object for `quant_algo` (the one place a QuantAlgo is dispatched)."""
        return get_scheme(self.quant_algo)

    @property
    def stored_format(self) -> dict[str, Any]:
        """What each quantized linear stores (tensor names, dtypes, shapes); saved by `to_dict`."""
        return self.scheme.stored_format(self)

    @property
    def is_int4(self) -> bool:
        return self.scheme.bits == 4

    @property
    def is_weight_only(self) -> bool:
        return self.scheme.weight_only

    @property
    def needs_calibration(self) -> bool:
        """Whether `Quantizer` must run the model on calibration text."""
        return self.scheme.needs_calibration

    @property
    def weight_bits(self) -> int:
        return self.scheme.bits

    def is_excluded(self, module: str) -> bool:
        """True if the linear named `module` (e.g. `model.layers.3.mlp.up_proj`) stays in float."""
        last = module.rsplit(".", 1)[-1]
        if self.quantize_lm_head and module == "lm_head":
            return False
        return any(fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(last, p) for p in self.exclude_modules)

    # ------------------------------------------------------------------- I/O
    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in self.to_dict().items())
        return f"<b>QuantConfig</b><table>{rows}</table>"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quant_algo"] = self.quant_algo.value
        d["kv_cache_quant_algo"] = self.kv_cache_quant_algo.value if self.kv_cache_quant_algo else None
        d["exclude_modules"] = list(self.exclude_modules)
        d["stored_format"] = self.stored_format
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        unknown = set(d) - set(cls.__dataclass_fields__) - {"stored_format"}
        if unknown:
            raise ValueError(f"QuantConfig: unknown field(s) {', '.join(sorted(unknown))}")
        d = dict(d)
        stored = d.pop("stored_format", None)
        if "exclude_modules" in d:
            d["exclude_modules"] = tuple(d["exclude_modules"])
        qc = cls(**d)
        if stored is not None and stored != qc.stored_format:
            raise ValueError(f"QuantConfig.stored_format {stored!r} is not the format this kit reads for "
                             f"{qc.quant_algo.value}: {qc.stored_format!r} (re-quantize the model)")
        return qc

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "QuantConfig":
        """A preset by short name (`fp8`, `int8_wo`, `int4_wo`, `int4_awq`, `int4_gptq`,
        `int8_sq`, `w8a8`, `fp8_pc_pt`), with any field overridden by keyword."""
        key = name.lower().replace("-", "_")
        if key not in QUANT_PRESETS:
            raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(QUANT_PRESETS)}")
        algo, extra = QUANT_PRESETS[key]
        return cls(quant_algo=algo, **{**extra, **overrides})

    def replace(self, **changes: Any) -> "QuantConfig":
        return replace(self, **changes)

    def __str__(self) -> str:
        parts = [self.quant_algo.value]
        if self.is_int4:
            parts.append(f"group {self.group_size}{', zero point' if self.has_zero_point else ''}")
        if self.scheme.calibration == "smoothquant":
            parts.append(f"alpha {self.smoothquant_alpha}")
        if self.quantize_lm_head:
            parts.append("lm_head quantized")
        if self.kv_cache_quant_algo:
            parts.append(f"KV cache {self.kv_cache_quant_algo.value}")
        return ", ".join(parts)


_CALIB_DATASETS = ("kit",)


@dataclass(frozen=True)
class CalibConfig:
    """How calibration runs (TensorRT-LLM's names; the kit's smaller CPU-sized defaults)."""

    device: str = "cpu"  # where calibration runs: "cpu" or "cuda" (the model's device is used either way)
    calib_dataset: str = "kit"
    calib_batches: int = 32
    calib_batch_size: int = 1
    calib_max_seq_length: int = 256
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"CalibConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.calib_dataset not in _CALIB_DATASETS:
            raise ValueError(f"CalibConfig.calib_dataset must be one of {_CALIB_DATASETS} (the kit's own calibration "
                             f"text; no dataset is downloaded), got {self.calib_dataset!r}")
        for name in ("calib_batches", "calib_batch_size", "calib_max_seq_length", "tokenizer_max_seq_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"CalibConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool):
            raise ValueError(f"CalibConfig.random_seed must be an int, got {self.random_seed!r}")

    def apply(self, quant_config: QuantConfig) -> QuantConfig:
        """`quant_config` calibrated as this config says."""
        return quant_config.replace(calib_size=self.calib_batches * self.calib_batch_size,
                                    calib_max_seq_len=self.calib_max_seq_length)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in asdict(self).items())
        return f"<b>CalibConfig</b><table>{rows}</table>"
