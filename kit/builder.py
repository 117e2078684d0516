"""Network + BuildConfig + backend -> Engine: the builder, its config and its cache.

As in TensorRT-LLM, an engine is built for limits known in advance: how many sequences
run at once (`max_batch_size`), how many tokens one step may compute (`max_num_tokens`),
the longest prompt (`max_input_len`) and the longest prompt + output (`max_seq_len`).
The builder derives TensorRT optimization profiles (min / opt / max shapes) and the
CUDA-graph batch sizes from them, and the serving side refuses requests beyond them
with a clear error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["BuildConfig", "Builder", "BuildCache", "build", "build_key"]

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_VERBOSITY = ("layer_names_only", "detailed")


@dataclass(frozen=True)
class BuildConfig:
    max_batch_size: int = 64
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    opt_batch_size: int | None = None
    max_beam_width: int = 1
    kv_cache_type: str = "paged"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    use_cuda_graphs: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, 8, then multiples of 8
    profiling_verbosity: str = "layer_names_only"
    block_size: int = 16

    def __post_init__(self) -> None:
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
        if self.max_beam_width != 1:
            raise ValueError(f"BuildConfig.max_beam_width: only 1 (no beam search) is supported, got {self.max_beam_width}")
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
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_seq_len // self.block_size)

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
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["cuda_graph_batch_sizes"] is not None:
            d["cuda_graph_batch_sizes"] = list(d["cuda_graph_batch_sizes"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        d = dict(d)
        if d.get("cuda_graph_batch_sizes") is not None:
            d["cuda_graph_batch_sizes"] = tuple(d["cuda_graph_batch_sizes"])
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
    from kit import __version__

    payload = {
        "identity": {k: identity.get(k) for k in ("source", "sha256")},
        "model_config": model_config.to_dict(),
        "build_config": build_config.to_dict() if build_config is not None else None,
        "quant_config": quant_config.to_dict() if quant_config is not None else None,
        "backend": backend, "dtype": dtype, "kit_version": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class BuildCache:
    """Engine directories under `$KIT_CACHE_DIR/engines/<key>`, written atomically.

    An entry appears only by an atomic rename of a complete engine directory, so a build
    that dies half-way leaves no entry, and two processes building the same key at once
    both succeed: the first rename wins and the other's copy is discarded.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        from kit.loader import cache_dir

        self.root = Path(root) if root is not None else cache_dir() / "engines"

    def path(self, key: str) -> Path:
        return self.root / key[:32]

    def get(self, key: str) -> Path | None:
        p = self.path(key)
        if not (p / "config.json").is_file():
            return None
        try:
            from kit.engine import Engine

            cfg = Engine.read_config(p)
        except (ValueError, FileNotFoundError):
            shutil.rmtree(p, ignore_errors=True)  # a damaged entry is dropped and rebuilt
            return None
        return p if cfg.get("build_key") == key else None

    def put(self, key: str, engine: Any) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=self.root))
        try:
            engine.save(staging / "engine")
            try:
                os.rename(staging / "engine", self.path(key))
            except OSError:
                if self.get(key) is None:  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.path(key)

    def list(self) -> "pd.DataFrame":
        """Columns: `key, model, backend, dtype, max_batch_size, max_seq_len, quantization, size_mib, created`."""
        import pandas as pd

        rows = []
        for p in sorted(self.root.glob("*")) if self.root.exists() else []:
            if p.name.startswith(".") or not (p / "config.json").is_file():
                continue
            try:
                cfg = json.loads((p / "config.json").read_text())
            except json.JSONDecodeError:
                continue
            bc = cfg.get("build_config") or {}
            qc = cfg.get("quant_config") or {}
            rows.append({"key": p.name, "model": cfg["model"].get("name"), "backend": cfg["backend"],
                         "dtype": cfg["dtype"], "max_batch_size": bc.get("max_batch_size"),
                         "max_seq_len": bc.get("max_seq_len"), "quantization": qc.get("quant_algo"),
                         "size_mib": sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20,
                         "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))})
        return pd.DataFrame(rows, columns=["key", "model", "backend", "dtype", "max_batch_size", "max_seq_len",
                                           "quantization", "size_mib", "created"])

    def _repr_html_(self) -> str:
        df = self.list()
        table = df.to_html(index=False, border=0, float_format="%.1f") if len(df) else "<p><i>empty</i></p>"
        return f"<b>BuildCache</b> <code>{self.root}</code>{table}"

    def clear(self) -> int:
        n = len(self.list())
        shutil.rmtree(self.root, ignore_errors=True)
        return n


# ------------------------------------------------------------------------------ builder
class Builder:
    """`Builder(backend).build(network, build_config) -> Engine`, with a build log and a cache.

    torch: the backend prepares the network (fused weights on the device); on CUDA the
    decode CUDA graphs are captured when the engine gets its KV cache (graphs are bound
    to the cache's addresses). tensorrt: the network is lowered to a TensorRT network
    definition and built into a serialized plan.
    """

    BACKENDS = ("torch", "tensorrt")

    def __init__(self, backend: str = "torch", *, device: str | Any = None) -> None:
        import torch

        if backend not in self.BACKENDS:
            raise ValueError(f"Builder backend must be one of {', '.join(self.BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _dtype(self, build_config: BuildConfig | None, network: Any) -> Any:
        import torch

        if build_config is None or build_config.dtype == "auto":
            return network.weights["model.embed_tokens.weight"].dtype  # never quantized
        return getattr(torch, build_config.dtype)

    def key(self, loaded: Any, build_config: BuildConfig, dtype: Any) -> str:
        return build_key(loaded.identity, loaded.config, build_config, loaded.quant_config, self.backend,
                         str(dtype).replace("torch.", ""))

    def build(self, network: Any, build_config: BuildConfig | None = None, *, loaded: Any = None,
              enable_build_cache: bool = True, skip_build_cache: bool = False, progress: bool = True) -> Any:
        """Build (or fetch from the build cache) the engine for `network` under `build_config`."""
        from tqdm.auto import tqdm

        from kit.engine import Engine

        build_config = build_config or BuildConfig()
        dtype = self._dtype(build_config, network)
        use_cache = enable_build_cache and loaded is not None and bool(loaded.identity)
        key = self.key(loaded, build_config, dtype) if loaded is not None else None
        cache = BuildCache()
        if use_cache and not skip_build_cache and (hit := cache.get(key)) is not None:
            t0 = time.perf_counter()
            engine = Engine.from_dir(hit, device=self.device)
            engine.build_log.insert(0, {"step": "build cache hit", "seconds": time.perf_counter() - t0,
                                        "detail": str(hit)})
            return engine
        steps = ["prepare network on the backend"] + (["build TensorRT plan"] if self.backend == "tensorrt" else [])
        steps += ["store in build cache"] if use_cache else []
        log: list[dict[str, Any]] = []
        with tqdm(total=len(steps), desc=f"building {network.name} ({self.backend})", disable=not progress,
                  leave=False) as bar:
            plan = None
            if self.backend == "tensorrt":
                t0 = time.perf_counter()
                plan = self._trt_plan(network, build_config, dtype)
                log.append({"step": "build TensorRT plan", "seconds": time.perf_counter() - t0,
                            "detail": f"{plan.nbytes / 2**20:.1f} MiB, {plan.num_layers} TensorRT layers, "
                                      f"{plan.flavour} {plan.version}"})
                bar.update(1)
            t0 = time.perf_counter()
            engine = self.assemble(loaded, build_config, dtype=dtype, plan=plan, network=network)
            log.insert(0, {"step": "prepare network on the backend", "seconds": time.perf_counter() - t0,
                           "detail": engine.backend.describe()})
            bar.update(1)
            engine.build_key = key
            engine.build_log = log
            if use_cache:
                t0 = time.perf_counter()
                path = cache.put(key, engine)
                log.append({"step": "store in build cache", "seconds": time.perf_counter() - t0, "detail": str(path)})
                bar.update(1)
        return engine

    def assemble(self, loaded: Any, build_config: BuildConfig | None, *, dtype: Any, plan: Any = None,
                 network: Any = None) -> Any:
        """Put an engine together from its parts (used by `build` and by `Engine.from_dir`)."""
        from kit.backends.torch_backend import TorchBackend
        from kit.engine import Engine
        from kit.network import NetworkBuilder

        network = network or NetworkBuilder(loaded).build()
        if self.backend == "torch":
            backend = TorchBackend(network, device=self.device, dtype=dtype)
        else:
            from kit.backends.tensorrt_backend import TensorRTBackend

            if plan is None:
                raise ValueError("a tensorrt engine needs its plan (rank0.engine)")
            backend = TensorRTBackend(plan)
        info = {"name": network.name}
        if loaded is not None:
            info.update({"identity": dict(loaded.identity), "source_format": loaded.source_format,
                         "notes": list(loaded.notes)})
        return Engine(network, backend, build_config=build_config, tokenizer=getattr(loaded, "tokenizer", None),
                      model_info=info)

    def _trt_plan(self, network: Any, bc: BuildConfig, dtype: Any) -> Any:
        from kit.backends.tensorrt_backend import build_plan

        return build_plan(network, bc.optimization_profiles(), dtype=None if bc.dtype == "auto" else dtype,
                          profiling_verbosity=bc.profiling_verbosity)


def build(network: Any, build_config: BuildConfig | None = None, *, backend: str = "torch", device: Any = None,
          **kwargs: Any) -> Any:
    """`kit.build(network, build_config)`: shorthand for `Builder(backend, device=device).build(...)`."""
    return Builder(backend, device=device).build(network, build_config, **kwargs)
