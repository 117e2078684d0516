"""`BuildConfig`: the limits an engine is built for, and `build_key`: what identifies a built engine.

As in TensorRT-LLM, an engine is built for limits known in advance: how many sequences
run at once (`max_batch_size`), how many tokens one step may compute (`max_num_tokens`),
the longest prompt (`max_input_len`) and the longest prompt + output (`max_seq_len`).
The builder derives TensorRT optimization profiles (min / opt / max shapes) and the
CUDA-graph batch sizes from them, and the serving side refuses requests beyond them
with a clear error.

`BuildConfig` is mutable, as TensorRT-LLM's is (`build_config.max_beam_width = 4` before
passing it to `LLM`): it validates when made and again when used (`validate()`, called by
the `LLM` and the builder, which keep their own copy). `max_input_len` left unset follows
`max_seq_len` (at most 1024), so `BuildConfig(max_seq_len=256)` alone is valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from kit.version import __version__

__all__ = ["BuildConfig", "build_key", "fit_build_config"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_VERBOSITY = ("layer_names_only", "detailed")


_DEFAULT_MAX_INPUT_LEN = 1024


@dataclass
class BuildConfig:
    max_batch_size: int = 64
    max_input_len: int | None = None  # None: min(1024, max_seq_len), following max_seq_len while unset
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    opt_batch_size: int | None = None
    max_beam_width: int = 1
    kv_cache_type: str = "paged"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    use_cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, 8, then multiples of 8
    # mixed steps (prompt chunks with or without decode tokens) replayed from graphs too, per token-count bucket
    cuda_graph_mixed_steps: bool = True
    cuda_graph_num_tokens: tuple[int, ...] | None = None  # None: `graph_num_tokens`' default buckets
    profiling_verbosity: str = "layer_names_only"
    block_size: int = 16

    def __post_init__(self) -> None:
        # NOTE: __init__ assigns through __setattr__, which resolves an unset max_input_len
        self.validate()

    def _auto_input_len(self) -> Any:
        s = self.max_seq_len
        return min(_DEFAULT_MAX_INPUT_LEN, s) if isinstance(s, int) and not isinstance(s, bool) else s

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "max_input_len":
            object.__setattr__(self, "_input_len_auto", value is None)
            if value is None:
                object.__setattr__(self, "max_input_len", self._auto_input_len())
        elif name == "max_seq_len" and getattr(self, "_input_len_auto", False):
            object.__setattr__(self, "max_input_len", self._auto_input_len())

    def validate(self) -> "BuildConfig":
        """Check every field (ValueError naming the field and what is allowed); return self."""
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "max_beam_width", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BuildConfig.{name} must be an integer >= 1, got {value!r}")
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"BuildConfig.max_input_len ({self.max_input_len}) must be <= max_seq_len "
                             f"({self.max_seq_len})")
        if self.opt_batch_size is not None and not 1 <= self.opt_batch_size <= self.max_batch_size:
            raise ValueError(f"BuildConfig.opt_batch_size must be in [1, max_batch_size={self.max_batch_size}], "
                             f"got {self.opt_batch_size}")
        # max_beam_width > 1 enables beam search (SamplingParams(use_beam_search=True, best_of=<= this))
        if self.kv_cache_type != "paged":
            raise ValueError(f"BuildConfig.kv_cache_type must be 'paged', got {self.kv_cache_type!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"BuildConfig.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.profiling_verbosity not in _VERBOSITY:
            raise ValueError(f"BuildConfig.profiling_verbosity must be one of {', '.join(_VERBOSITY)}, "
                             f"got {self.profiling_verbosity!r}")
        if self.cuda_graph_batch_sizes is not None:
            sizes = tuple(self.cuda_graph_batch_sizes)
            if not sizes or any(not 1 <= s <= self.max_batch_size for s in sizes):
                raise ValueError(f"BuildConfig.cuda_graph_batch_sizes must lie in [1, {self.max_batch_size}], got {sizes}")
            object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(sizes))))
        if not isinstance(self.cuda_graph_mixed_steps, bool):
            raise ValueError(f"BuildConfig.cuda_graph_mixed_steps must be True or False, got {self.cuda_graph_mixed_steps!r}")
        if self.cuda_graph_num_tokens is not None:
            sizes = tuple(self.cuda_graph_num_tokens)
            if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= self.max_num_tokens
                                for s in sizes):
                raise ValueError(f"BuildConfig.cuda_graph_num_tokens must be integers in [1, max_num_tokens="
                                 f"{self.max_num_tokens}], got {self.cuda_graph_num_tokens!r}")
            object.__setattr__(self, "cuda_graph_num_tokens", tuple(sorted(set(sizes))))
        return self

    # ----------------------------------------------------------------- derived
    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """Decode batch-size buckets that get a CUDA graph (a batch pads up to the next one)."""
        if self.cuda_graph_batch_sizes is not None:
            return self.cuda_graph_batch_sizes
        sizes = [s for s in (1, 2, 4, 8) if s <= self.max_batch_size]
        sizes += list(range(16, self.max_batch_size + 1, 8))
        if sizes[-1] != self.max_batch_size:
            sizes.append(self.max_batch_size)
        return tuple(sizes)

    @property
    def graph_num_tokens(self) -> tuple[int, ...]:
        """Token-count buckets of the mixed-step CUDA graphs (a step pads up to the next one); () when off.

        The default steps by 32 tokens up to 256, by 64 to 512, by 128 to 1,024 and by 256 to
        2,048, capped at max_num_tokens: a step of a few hundred tokens (decode rows plus a
        prompt chunk) pads by at most a few percent of its weight-bound GEMM time, and steps
        above 2,048 tokens are compute-bound, where launching kernels one by one costs little.
        """
        if not self.cuda_graph_mixed_steps:
            return ()
        if self.cuda_graph_num_tokens is not None:
            return self.cuda_graph_num_tokens
        top = min(self.max_num_tokens, 2048)
        steps = [*range(32, 257, 32), *range(320, 513, 64), *range(640, 1025, 128), *range(1280, 2049, 256)]
        sizes = [s for s in steps if s <= top]
        if not sizes or sizes[-1] != top:
            sizes.append(top)
        return tuple(sizes)

    def optimization_profiles(self) -> dict[str, tuple[int, int, int]]:
        """min / opt / max of each dynamic dimension, as a TensorRT optimization profile."""
        opt_bs = self.opt_batch_size or max(1, self.max_batch_size // 2)
        return {
            "batch_size": (1, opt_bs, self.max_batch_size),
            "num_tokens": (1, min(self.max_num_tokens, max(opt_bs, self.max_input_len // 2)), self.max_num_tokens),
            "input_len": (1, max(1, self.max_input_len // 2), self.max_input_len),
            "past_len": (0, self.max_seq_len // 2, self.max_seq_len - 1),
        }

    def replace(self, **changes: Any) -> "BuildConfig":
        """A validated copy with `changes` (an unset max_input_len keeps following max_seq_len)."""
        if self._input_len_auto and "max_input_len" not in changes:
            changes["max_input_len"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("cuda_graph_batch_sizes", "cuda_graph_num_tokens"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        d = dict(d)
        for name in ("cuda_graph_batch_sizes", "cuda_graph_num_tokens"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in self.to_dict().items())
        prof = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
                       for k, v in self.optimization_profiles().items())
        return (f"<b>BuildConfig</b><table>{rows}</table><b>Optimization profile</b> (min, opt, max)"
                f"<table>{prof}</table>")


# ---------------------------------------------------------------------------- build key
def build_key(identity: dict[str, Any], model_config: Any, build_config: BuildConfig | None, quant_config: Any,
              backend: str, dtype: str) -> str:
    """sha256 of everything that determines an engine: change any of it and the cache misses."""
    payload = {
        "identity": {k: identity.get(k) for k in ("source", "sha256")},
        "model_config": model_config.to_dict(),
        "build_config": build_config.to_dict() if build_config is not None else None,
        "quant_config": quant_config.to_dict() if quant_config is not None else None,
        "backend": backend, "dtype": dtype, "kit_version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def fit_build_config(build_config: BuildConfig, config: Any) -> BuildConfig:
    """Cap max_seq_len (and max_input_len) at the model's context length."""
    max_pos = config.max_position_embeddings
    if build_config.max_seq_len > max_pos:
        return build_config.replace(max_seq_len=max_pos, max_input_len=min(build_config.max_input_len, max_pos))
    return build_config
