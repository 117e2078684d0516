"""The `LLM`'s keyword arguments, validated in one place (TensorRT-LLM's `llmapi/llm_args.py`).

`LlmArgs.from_kwargs(**kwargs)` refuses an unknown name (TypeError listing the known ones)
and a bad value (ValueError naming the argument), then answers what the `LLM` needs:

- `build_config()`: the `BuildConfig` to build with: a copy of `build_config=` (or the
  default) with the sizing arguments (`max_batch_size`, `max_seq_len`, `max_num_tokens`,
  `max_input_len`, `max_beam_width`, `dtype`), `kv_cache_config.tokens_per_block` and
  `cuda_graph_config` written into it, validated;
- `quantization()`: `quant_config=` (or the kit's `quantization=` preset name) with
  `calib_config` applied.

`CudaGraphConfig` is TensorRT-LLM's: passing `cuda_graph_config=None` turns CUDA graphs off,
leaving it out keeps the build's default. Arguments that other parts of the LLM API add
(parallelism, speculative decoding) get a field in the marked places of `LlmArgs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

import torch

from kit.build_config import BuildConfig
from kit.kv_cache_config import KvCacheConfig
from kit.quantization import CalibConfig, QuantConfig

__all__ = ["LlmArgs", "CudaGraphConfig", "LLM_KWARGS"]

_UNSET: Any = object()  # "not passed" (None has a meaning for cuda_graph_config)
_DTYPES = {"auto": "auto", "float32": "float32", "float16": "float16", "bfloat16": "bfloat16",
           "fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32",
           torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_POLICIES = ("guaranteed_no_evict", "max_utilization")


@dataclass(frozen=True)
class CudaGraphConfig:
    """Which decode batch sizes get a CUDA graph (TensorRT-LLM's fields).

    `batch_sizes` (None: 1, 2, 4, 8, then multiples of 8 up to `max_batch_size`, or the
    build's max_batch_size when that is 0). `enable_padding` is accepted for compatibility:
    the kit always pads a decode batch up to the next captured size.

    Two fields are the kit's own (TensorRT-LLM graphs pure decode steps only): `mixed_steps`
    also replays the steps that hold prompt tokens from graphs, one per token-count bucket
    (`mixed_num_tokens`), as vLLM's full CUDA graphs do; see kit/backends/mixed_graphs.py.
    None keeps the build config's choice (`cuda_graph_mixed_steps`, on by default;
    `cuda_graph_num_tokens`, None: `BuildConfig.graph_num_tokens`' default buckets).
    """

    batch_sizes: tuple[int, ...] | None = None
    max_batch_size: int = 0
    enable_padding: bool = False
    mixed_steps: bool | None = None
    mixed_num_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "mixed_num_tokens"):  # None, or sorted distinct ints >= 1
            value = getattr(self, name)
            if value is None:
                continue
            sizes = tuple(value)
            if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
                raise ValueError(f"CudaGraphConfig.{name} must be None or a non-empty list of ints >= 1, "
                                 f"got {value!r}")
            object.__setattr__(self, name, tuple(sorted(set(sizes))))
        m = self.max_batch_size
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise ValueError(f"CudaGraphConfig.max_batch_size must be an int >= 0 (0: the build's), got {m!r}")
        if not isinstance(self.enable_padding, bool):
            raise ValueError(f"CudaGraphConfig.enable_padding must be a bool, got {self.enable_padding!r}")
        if self.mixed_steps is not None and not isinstance(self.mixed_steps, bool):
            raise ValueError(f"CudaGraphConfig.mixed_steps must be True, False or None (the build config's), "
                             f"got {self.mixed_steps!r}")

    def batch_sizes_for(self, max_batch_size: int) -> tuple[int, ...]:
        """The captured sizes for a build of `max_batch_size` (sizes above it are refused)."""
        if self.batch_sizes is not None:
            return self.batch_sizes
        top = min(self.max_batch_size or max_batch_size, max_batch_size)
        return BuildConfig(max_batch_size=top).graph_batch_sizes


def _positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"LLM({name}=...) must be an int >= 1 or None, got {value!r}")


@dataclass
class LlmArgs:
    """Every keyword argument of `LLM(...)`; see the module docstring."""

    model: Any
    tokenizer: Any = None  # None: the model's; a path, a kit Tokenizer or a Hugging Face tokenizer
    dtype: Any = "auto"
    device: Any = None
    # ---- sizing (TensorRT-LLM names; None: the build_config's)
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int | None = None
    max_input_len: int | None = None
    max_beam_width: int | None = None
    build_config: BuildConfig | None = None
    # ---- parallelism (kit/parallel)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # ---- runtime
    kv_cache_config: KvCacheConfig | None = None
    cuda_graph_config: Any = _UNSET
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool | None = None  # the kit's shorthand for kv_cache_config.enable_block_reuse
    scheduler_policy: Any = "guaranteed_no_evict"  # a SchedulerPolicy or its value
    overlap: bool | None = None  # overlapped scheduling (kit/executor_loop.py); None: on when on CUDA
    # ---- quantization
    quant_config: QuantConfig | None = None
    calib_config: CalibConfig | None = None
    quantization: Any = None  # the kit's preset name ("int8_wo", ...) or a QuantConfig
    # ---- decoding hooks
    batched_logits_processor: Any = None
    guided_decoding_backend: str | None = None
    # ---- speculative decoding (kit/speculative/: DraftTargetDecodingConfig, NGramDecodingConfig)
    speculative_config: Any = None
    # ---- build cache, backend, statistics
    backend: str = "torch"
    enable_build_cache: bool = True
    skip_build_cache: bool = False
    record_kv_cache: bool = False
    max_stats_rows: int = 1000  # TensorRT-LLM: iter_stats_max_iterations
    trust_remote_code: bool = False  # accepted; nothing remote is ever run (the kit executes its own code only)

    @classmethod
    def from_kwargs(cls, model: Any, **kwargs: Any) -> "LlmArgs":
        known = {f.name for f in fields(cls)} - {"model"}
        aliases = {"iter_stats_max_iterations": "max_stats_rows"}
        kwargs = {aliases.get(k, k): v for k, v in kwargs.items()}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unexpected keyword argument(s) {', '.join(unknown)}; the known ones are: "
                            f"{', '.join(sorted(known))}")
        args = cls(model, **kwargs)
        args.validate()
        return args

    def validate(self) -> None:
        for name in ("max_batch_size", "max_seq_len", "max_num_tokens", "max_input_len", "max_beam_width"):
            _positive(name, getattr(self, name))
        if self.dtype not in _DTYPES:
            raise ValueError(f"LLM(dtype=...) must be one of 'auto', 'float32', 'float16', 'bfloat16' (or the torch "
                             f"dtype), got {self.dtype!r}")
        if self.build_config is not None and not isinstance(self.build_config, BuildConfig):
            raise TypeError(f"LLM(build_config=...) must be a BuildConfig, got {type(self.build_config).__name__}")
        if self.kv_cache_config is not None and not isinstance(self.kv_cache_config, KvCacheConfig):
            raise TypeError(f"LLM(kv_cache_config=...) must be a KvCacheConfig, got "
                            f"{type(self.kv_cache_config).__name__}")
        cg = self.cuda_graph_config
        if cg is not _UNSET and cg is not None and not isinstance(cg, CudaGraphConfig):
            raise TypeError(f"LLM(cuda_graph_config=...) must be a CudaGraphConfig or None (no CUDA graphs), got "
                            f"{type(cg).__name__}")
        if self.quant_config is not None and not isinstance(self.quant_config, QuantConfig):
            raise TypeError(f"LLM(quant_config=...) must be a QuantConfig, got {type(self.quant_config).__name__}")
        if self.quant_config is not None and self.quantization is not None:
            raise ValueError("LLM: pass quant_config= or quantization=, not both")
        if self.calib_config is not None and not isinstance(self.calib_config, CalibConfig):
            raise TypeError(f"LLM(calib_config=...) must be a CalibConfig, got {type(self.calib_config).__name__}")
        if self.guided_decoding_backend not in (None, "xgrammar"):
            raise ValueError(f"LLM(guided_decoding_backend=...) must be None or 'xgrammar', got "
                             f"{self.guided_decoding_backend!r}")
        if getattr(self.scheduler_policy, "value", self.scheduler_policy) not in _POLICIES:
            raise ValueError(f"LLM(scheduler_policy=...) must be one of {_POLICIES}, got {self.scheduler_policy!r}")
        for name in ("enable_chunked_prefill", "enable_build_cache", "skip_build_cache", "record_kv_cache",
                     "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LLM({name}=...) must be a bool, got {getattr(self, name)!r}")
        n = self.max_stats_rows
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"LLM: max_stats_rows must be an int >= 1, got {n!r} (TensorRT-LLM: iter_stats_max_iterations)")
        self.build_config_to_use()  # the merged config must hold together too

    # ------------------------------------------------------------------ derived
    def build_config_to_use(self) -> BuildConfig | None:
        """A validated copy of build_config (or the default) with the sizing arguments written in; None when
        nothing about the build was asked (an engine directory then keeps the configuration it was built with)."""
        if (self.build_config is None and self.cuda_graph_config is _UNSET and self.dtype == "auto"
                and all(getattr(self, n) is None for n in ("max_batch_size", "max_seq_len", "max_num_tokens",
                                                           "max_input_len", "max_beam_width"))
                and (self.kv_cache_config is None or self.kv_cache_config.tokens_per_block is None)):
            return None
        bc = self.build_config.replace() if self.build_config is not None else BuildConfig()
        if self.max_seq_len is not None:
            bc.max_seq_len = self.max_seq_len
            if self.build_config is not None and bc.max_input_len > bc.max_seq_len and self.max_input_len is None:
                bc.max_input_len = None  # follow the new max_seq_len
        for name in ("max_batch_size", "max_num_tokens", "max_input_len", "max_beam_width"):
            if getattr(self, name) is not None:
                setattr(bc, name, getattr(self, name))
        if self.dtype != "auto":
            bc.dtype = _DTYPES[self.dtype]
        kvc = self.kv_cache_config
        if kvc is not None and kvc.tokens_per_block is not None:
            bc.block_size = kvc.tokens_per_block
        cg = self.cuda_graph_config
        if cg is None:
            bc.use_cuda_graphs = False
        elif cg is not _UNSET:
            bc.use_cuda_graphs = True
            bc.cuda_graph_batch_sizes = cg.batch_sizes_for(bc.max_batch_size)
            if cg.mixed_steps is not None:
                bc.cuda_graph_mixed_steps = cg.mixed_steps
            if cg.mixed_num_tokens is not None:
                bc.cuda_graph_num_tokens = cg.mixed_num_tokens
        return bc.validate()

    def kv_cache_config_to_use(self) -> KvCacheConfig:
        kvc = self.kv_cache_config or KvCacheConfig()
        if self.enable_prefix_caching is not None:
            kvc = dataclasses.replace(kvc, enable_block_reuse=self.enable_prefix_caching)
        return kvc

    def quantization_to_use(self) -> Any:
        q = self.quant_config if self.quant_config is not None else self.quantization
        if self.calib_config is not None:
            if q is None:
                raise ValueError("LLM(calib_config=...) needs quant_config= (a scheme to calibrate)")
            q = self.calib_config.apply(q if isinstance(q, QuantConfig) else QuantConfig.from_name(q))
        return q

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not _UNSET}


LLM_KWARGS = tuple(f.name for f in fields(LlmArgs) if f.name != "model")  # the names LLM(...) accepts
