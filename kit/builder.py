"""Network + BuildConfig + backend -> Engine: the builder, and "an engine for this model" from the cache.

`Builder(backend).build(network, build_config)` prepares a network on a backend (and, for
TensorRT, builds a serialized plan). `Builder.get_engine(model, build_config, ...)` is what
`LLM` asks: it resolves the model (engine directory, checkpoint or LoadedModel), computes
the build key once, answers from the build cache or loads, quantizes, builds and stores.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kit.backends.tensorrt_backend import build_plan
from kit.build_cache import BuildCache
from kit.build_config import BuildConfig, build_key, fit_build_config
from kit.engine import Engine
from kit.engine_dir import assemble_engine, load_engine
from kit.loader import LoadedModel, ModelLoader
from kit.network import Network, NetworkBuilder
from kit.progress import tqdm
from kit.quantization import QuantConfig, Quantizer

__all__ = ["BuildConfig", "Builder", "BuildCache", "EngineResult", "build", "build_key"]


@dataclass(frozen=True)
class EngineResult:
    """What `Builder.get_engine` answers: the engine, the model it was built from (None after a
    cache hit or for an engine directory), and whether the build cache answered."""

    engine: Engine
    loaded: LoadedModel | None
    cache_hit: bool


def _fit_group_size(qc: QuantConfig, config: Any) -> QuantConfig:
    """A preset's group size (128) halved until it divides every linear's input width.

    SmolLM2's hidden size is 576 = 9 x 64, so its int4 presets use groups of 64. An
    explicit QuantConfig is taken as it is (and refused clearly if it does not fit).
    """
    dims = (config.hidden_size, config.intermediate_size, config.q_size)
    g = qc.group_size
    while g > 16 and any(d % g for d in dims):
        g //= 2
    return qc if g == qc.group_size else dataclasses.replace(qc, group_size=g)


def _quant_config(quantization: Any, model_config: Any) -> QuantConfig | None:
    if quantization is None:
        return None
    if isinstance(quantization, QuantConfig):
        return quantization
    return _fit_group_size(QuantConfig.from_name(quantization), model_config)


class Builder:
    """`Builder(backend).build(network, build_config) -> Engine`, with a build log and a cache.

    torch: the backend prepares the network (fused weights on the device); on CUDA the
    decode CUDA graphs are captured when the engine gets its KV cache (graphs are bound
    to the cache's addresses). tensorrt: the network is lowered to a TensorRT network
    definition and built into a serialized plan.
    """

    BACKENDS = ("torch", "tensorrt")

    def __init__(self, backend: str = "torch", *, device: str | torch.device | None = None) -> None:
        if backend not in self.BACKENDS:
            raise ValueError(f"Builder backend must be one of {', '.join(self.BACKENDS)}, got {backend!r}")
        self.backend = backend
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def _dtype(self, build_config: BuildConfig | None, network: Network) -> torch.dtype:
        own = network.weights["model.embed_tokens.weight"].dtype  # never quantized
        return self._build_dtype(build_config, own)

    def _build_dtype(self, build_config: BuildConfig | None, own: torch.dtype) -> torch.dtype:
        """The engine's dtype for a model whose weights are `own`: the build key names this one."""
        if build_config is None or build_config.dtype == "auto":
            # NOTE: TensorRT-RTX cannot compile float32 GEMMs: an "auto" TensorRT build of a float32
            # network is a float16 plan, and the build key must say so (or the saved engine's key,
            # computed from the plan's dtype, would not match on load)
            return torch.float16 if self.backend == "tensorrt" and own == torch.float32 else own
        return getattr(torch, build_config.dtype)

    def key(self, loaded: LoadedModel, build_config: BuildConfig, dtype: torch.dtype) -> str:
        return build_key(loaded.identity, loaded.config, build_config, loaded.quant_config, self.backend,
                         str(dtype).replace("torch.", ""))

    # -------------------------------------------------------------- get_engine
    def get_engine(self, model: str | os.PathLike | LoadedModel, build_config: BuildConfig | None = None, *,
                   quantization: Any = None, enable_build_cache: bool = True, skip_build_cache: bool = False,
                   progress: bool = True) -> EngineResult:
        """An engine for `model` under `build_config`: from an engine directory, the build cache, or a build.

        `model`: a registered name, a GGUF file, a Hugging Face directory, an engine directory
        (str or Path), or a LoadedModel (never cached: an object in memory has no stable identity).
        `quantization`: a preset name (its group size fitted to the model) or a QuantConfig.
        """
        if isinstance(model, LoadedModel):
            bc = fit_build_config(build_config or BuildConfig(), model.config)
            return EngineResult(*self._build_loaded(model, bc, quantization, None, None, progress), False)
        if not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a name, a path or a LoadedModel, got {type(model).__name__}")
        bc = build_config or BuildConfig()
        loader = ModelLoader(model, dtype=None if bc.dtype == "auto" else bc.dtype, device=self.device)
        fmt, path = loader.resolve()
        if fmt == "engine":
            return EngineResult(load_engine(path, device=self.device, build_config=build_config), None, False)
        identity, mcfg = loader.peek()
        bc = fit_build_config(bc, mcfg)
        qc = _quant_config(quantization, mcfg)
        key = build_key(identity, mcfg, bc, qc, self.backend,
                        str(self._build_dtype(bc, loader.dtype)).replace("torch.", ""))
        cache = BuildCache() if enable_build_cache else None
        engine = self._from_cache(cache, key) if cache is not None and not skip_build_cache else None
        if engine is not None:
            return EngineResult(engine, None, True)
        engine, loaded = self._build_loaded(loader.load(), bc, qc, key, cache, progress)
        return EngineResult(engine, loaded, False)

    def _build_loaded(self, loaded: LoadedModel, bc: BuildConfig, quantization: Any, key: str | None,
                      cache: BuildCache | None, progress: bool) -> tuple[Engine, LoadedModel]:
        qc = _quant_config(quantization, loaded.config)
        if qc is not None:
            loaded = Quantizer(qc).quantize(loaded, tokenizer=loaded.tokenizer)
        network = NetworkBuilder(loaded).build()
        return self._build(network, bc, loaded, self._dtype(bc, network), key, cache, progress), loaded

    # ------------------------------------------------------------------- build
    def build(self, network: Network, build_config: BuildConfig | None = None, *, loaded: LoadedModel | None = None,
              enable_build_cache: bool = True, skip_build_cache: bool = False, progress: bool = True) -> Engine:
        """Build (or fetch from the build cache) the engine for `network` under `build_config`."""
        build_config = build_config or BuildConfig()
        dtype = self._dtype(build_config, network)
        key = self.key(loaded, build_config, dtype) if loaded is not None else None
        use_cache = enable_build_cache and loaded is not None and bool(loaded.identity)
        cache = BuildCache() if use_cache else None
        engine = self._from_cache(cache, key) if cache is not None and not skip_build_cache else None
        if engine is not None:
            return engine
        return self._build(network, build_config, loaded, dtype, key, cache, progress)

    def _from_cache(self, cache: BuildCache, key: str) -> Engine | None:
        """The cached engine for `key` (its build log opening with the hit), or None on a miss."""
        t0 = time.perf_counter()
        engine = cache.load(key, device=self.device)
        if engine is not None:
            engine.build_log.insert(0, {"step": "build cache hit", "seconds": time.perf_counter() - t0,
                                        "detail": str(cache.path(key))})
        return engine

    def _build(self, network: Network, build_config: BuildConfig, loaded: LoadedModel | None, dtype: torch.dtype,
               key: str | None, cache: BuildCache | None, progress: bool) -> Engine:
        steps = ["prepare network on the backend"] + (["build TensorRT plan"] if self.backend == "tensorrt" else [])
        steps += ["store in build cache"] if cache is not None else []
        log: list[dict[str, Any]] = []
        with tqdm(total=len(steps), desc=f"building {network.name} ({self.backend})", disable=not progress,
                  leave=False) as bar:
            plan = None
            if self.backend == "tensorrt":
                t0 = time.perf_counter()
                # "auto" on a float32 network: build_plan picks float16 and records why (see _dtype)
                plan = build_plan(network, build_config.optimization_profiles(),
                                  dtype=None if build_config.dtype == "auto" else dtype,
                                  profiling_verbosity=build_config.profiling_verbosity, progress=progress)
                log.append({"step": "build TensorRT plan", "seconds": time.perf_counter() - t0,
                            "detail": f"{plan.nbytes / 2**20:.1f} MiB, {plan.num_layers} TensorRT layers, "
                                      f"{plan.flavour} {plan.version}"})
                bar.update(1)
            t0 = time.perf_counter()
            engine = assemble_engine(loaded, build_config, backend=self.backend, device=self.device, dtype=dtype,
                                     plan=plan, network=network)
            log.insert(0, {"step": "prepare network on the backend", "seconds": time.perf_counter() - t0,
                           "detail": engine.backend.describe()})
            bar.update(1)
            engine.build_key = key
            engine.build_log = log
            if cache is not None:
                t0 = time.perf_counter()
                path = cache.put(key, engine)
                log.append({"step": "store in build cache", "seconds": time.perf_counter() - t0,
                            "detail": str(path) if path is not None else "not cached: the cache could not be "
                                                                         "written (see the warning)"})
                bar.update(1)
        return engine

    def assemble(self, loaded: LoadedModel | None, build_config: BuildConfig | None, *, dtype: torch.dtype,
                 plan: Any = None, network: Network | None = None) -> Engine:
        """Put an engine together from its parts on this builder's backend and device."""
        return assemble_engine(loaded, build_config, backend=self.backend, device=self.device, dtype=dtype,
                               plan=plan, network=network)

    @staticmethod
    def load(path: str | os.PathLike, *, device: str | torch.device | None = None,
             build_config: BuildConfig | None = None) -> Engine:
        """Open an engine directory (see `kit.engine_dir.load_engine`)."""
        return load_engine(Path(path), device=device, build_config=build_config)


def build(network: Network, build_config: BuildConfig | None = None, *, backend: str = "torch",
          device: str | torch.device | None = None, **kwargs: Any) -> Engine:
    """`kit.build(network, build_config)`: shorthand for `Builder(backend, device=device).build(...)`."""
    return Builder(backend, device=device).build(network, build_config, **kwargs)
