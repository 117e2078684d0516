"""The engine: a built network that computes logits for a `ForwardBatch` (see `kit/batch.py`).

A runtime object: a `Network` prepared by a `Backend` (kit/backends/base.py), plus the
build config it was built for. What it does at run time:

    kv = engine.allocate_kv_cache(num_blocks, block_size)    the paged pool
    engine.capture_cuda_graphs(kv)                           decode CUDA graphs over it (CUDA)
    logits = engine.forward(batch, kv, hooks=None)           (num_logits, vocab)
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from kit.backends.base import Backend, LayerHook
from kit.backends.torch_backend import TorchBackend
from kit.batch import ForwardBatch, KVCache, SequenceInput
from kit.config import ModelConfig
from kit.network import Network

__all__ = ["ForwardBatch", "KVCache", "Engine", "SequenceInput"]


ENGINE_FORMAT = 1
_ENGINE_CONFIG = "config.json"
_ENGINE_WEIGHTS = "model.safetensors"


class Engine:
    """A network prepared by a backend: `forward(batch, kv_cache) -> logits`."""

    def __init__(self, network: Network, backend: Backend, *, build_config: Any = None,
                 build_log: list[dict[str, Any]] | None = None, tokenizer: Any = None,
                 model_info: dict[str, Any] | None = None, build_key: str | None = None) -> None:
        self.network = network
        self.backend = backend
        self.build_config = build_config
        self.build_log = build_log or []
        self.tokenizer = tokenizer
        self.model_info = model_info or {"name": network.name}
        self.build_key = build_key
        self.source_dir: Path | None = None  # set when loaded from an engine directory

    @classmethod
    def from_network(cls, network: Network, *, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> "Engine":
        """Prepare `network` with the PyTorch backend (no graphs, no build cache)."""
        return cls(network, TorchBackend(network, device=device, dtype=dtype))

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None,
                          capture_graphs: bool = True) -> KVCache:
        """The paged pool of `num_blocks` blocks of `block_size` tokens, in the engine's dtype by default.

        `capture_graphs=True` (kept for existing callers) also calls `capture_cuda_graphs(kv)`;
        the explicit call is the way: allocate with `capture_graphs=False`, then capture.
        Scratch caches (profiler, evaluation) never capture, so the serving cache keeps its graphs.
        """
        qc = self.network.quant_config
        kv = KVCache(self.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device,
                     quant_algo=getattr(qc, "kv_cache_quant_algo", None))
        if capture_graphs:
            self.capture_cuda_graphs(kv)
        return kv

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
        """Capture the decode CUDA graphs over `kv_cache`; returns the batch sizes captured.

        `batch_sizes` defaults to the build config's `graph_batch_sizes` when it enables
        `use_cuda_graphs`; with the default, an engine that cannot capture (CPU, a backend
        without graphs, no build config, graphs turned off) captures nothing and returns ().
        Graphs are bound to the cache's addresses: capturing again over the same cache and
        sizes is a no-op. Each capture is a row of `build_log`.
        """
        bc = self.build_config
        able = self.device.type == "cuda" and self.backend.can_execute
        if batch_sizes is None:
            if not (able and bc is not None and bc.use_cuda_graphs):
                return ()
            batch_sizes = bc.graph_batch_sizes
        elif not able:
            raise ValueError(f"capture_cuda_graphs(batch_sizes={list(batch_sizes)}): this engine cannot capture "
                             f"CUDA graphs ({self.backend.name} backend on {self.device})")
        sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"capture_cuda_graphs: batch_sizes must be integers >= 1, got {list(batch_sizes)}")
        max_len = bc.max_seq_len if bc is not None else kv_cache.num_blocks * kv_cache.block_size
        max_blocks = -(-max_len // kv_cache.block_size)
        current = getattr(self.backend, "graphs", None)
        if (current is not None and current.kv_cache is kv_cache and current.batch_sizes == sizes
                and current.max_blocks == max_blocks):
            return sizes
        t0 = time.perf_counter()
        self.backend.capture_cuda_graphs(kv_cache, sizes, max_blocks)
        self.build_log.append({"step": "capture CUDA graphs", "seconds": time.perf_counter() - t0,
                               "detail": f"decode batch sizes {list(sizes)}"})
        return sizes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes in this engine's cache (8-bit caches: values + scales)."""
        c = self.config
        qc = self.network.quant_config
        if getattr(qc, "kv_cache_quant_algo", None) is not None:
            return 2 * c.num_hidden_layers * (c.kv_size + 4 * c.num_key_value_heads)
        return c.kv_bytes_per_token(torch.empty(0, dtype=self.dtype).element_size())

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache,
                hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Logits (len(batch.logits_indices), vocab) for the batch; writes its K/V into `kv_cache`.

        `hooks` (optional, `kit.backends.base.LayerHook`) see each layer's inputs and outputs:
        the profiler times layers and opens NVTX ranges with them, evaluation captures outputs.
        """
        if batch.block_size != kv_cache.block_size:
            raise ValueError(f"batch was built for block_size {batch.block_size}, cache has {kv_cache.block_size}")
        return self.backend.forward(batch, kv_cache, hooks=hooks)

    # --------------------------------------------------------- engine directories
    def save(self, path: str | Path) -> Path:
        """Write the engine directory atomically: config.json, model.safetensors, rank0.engine, tokenizer.

        Everything goes to a temporary sibling directory first and is renamed into place at
        the end, so a reader never sees half an engine.
        """
        from safetensors.torch import save_file

        from kit import __version__

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            weights = {k: v.detach().contiguous().cpu() for k, v in self.network.weights.items()}
            save_file(weights, str(tmp / _ENGINE_WEIGHTS), metadata={"format": "kit-engine"})
            if self.backend.name == "tensorrt":
                self.backend.plan.save(tmp)  # rank0.engine + trt_build.json
            if self.tokenizer is not None:
                self.tokenizer.save(tmp / "tokenizer")
            qc = self.network.quant_config
            if self.build_key is None:  # an engine built without a model identity still gets a key
                from kit.builder import build_key

                self.build_key = build_key(self.model_info.get("identity", {}), self.config, self.build_config, qc,
                                           self.backend.name, str(self.dtype).replace("torch.", ""))
            config = {
                "format": ENGINE_FORMAT, "kit_version": __version__,
                "model": self.model_info, "model_config": self.config.to_dict(),
                "build_config": self.build_config.to_dict() if self.build_config is not None else None,
                "quant_config": qc.to_dict() if qc is not None else None,
                "backend": self.backend.name, "dtype": str(self.dtype).replace("torch.", ""),
                "build_key": self.build_key,
                "files": {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()},
            }
            (tmp / _ENGINE_CONFIG).write_text(json.dumps(config, indent=2))
            if path.exists():
                shutil.rmtree(path)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @staticmethod
    def read_config(path: str | Path) -> dict[str, Any]:
        """The engine directory's config.json, after checking that every file it lists is whole."""
        path = Path(path)
        cfg_file = path / _ENGINE_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is not an engine directory: no {_ENGINE_CONFIG}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: corrupt engine config ({e})") from e
        if cfg.get("format") != ENGINE_FORMAT:
            raise ValueError(f"{path}: engine format {cfg.get('format')!r}, this kit reads format {ENGINE_FORMAT}")
        for name, size in cfg.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise ValueError(f"{path}: engine file {name} is missing; rebuild the engine")
            if f.stat().st_size != size:
                raise ValueError(f"{path}: engine file {name} is truncated or altered "
                                 f"({f.stat().st_size} bytes, expected {size}); rebuild the engine")
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path, *, device: torch.device | str | None = None,
                 build_config: Any = None) -> "Engine":
        """Open an engine directory. `build_config`, if given, must equal the one it was built with."""
        from kit.builder import BuildConfig, build_key
        from kit.loader import LoadedModel, _read_safetensors
        from kit.quantization import QuantConfig
        from kit.tokenizer import Tokenizer

        path = Path(path)
        cfg = cls.read_config(path)
        stored_bc = BuildConfig.from_dict(cfg["build_config"]) if cfg["build_config"] else None
        if build_config is not None and stored_bc is not None and build_config != stored_bc:
            diff = {k: (v, stored_bc.to_dict()[k]) for k, v in build_config.to_dict().items()
                    if stored_bc.to_dict()[k] != v}
            raise ValueError(f"{path} was built for another configuration: "
                             + ", ".join(f"{k}={new!r} asked, engine has {old!r}" for k, (new, old) in diff.items()))
        config = ModelConfig.from_dict(cfg["model_config"])
        qc = QuantConfig.from_dict(cfg["quant_config"]) if cfg["quant_config"] else None
        expected = build_key(cfg["model"].get("identity", {}), config, stored_bc, qc, cfg["backend"], cfg["dtype"])
        if cfg.get("build_key") != expected:
            raise ValueError(f"{path}: build key mismatch (the config was altered or written by another kit); "
                             "rebuild the engine")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, cfg["dtype"])
        weights = _read_safetensors([path / _ENGINE_WEIGHTS], device, None)
        tok_dir = path / "tokenizer"
        tokenizer = Tokenizer.from_dir(tok_dir) if Tokenizer.dir_has_tokenizer(tok_dir) else None
        info = cfg["model"]
        loaded = LoadedModel(config, weights, tokenizer, name=info.get("name", path.name), source=str(path),
                             identity=info.get("identity", {}), quant_config=qc, source_format="engine")
        from kit.builder import Builder

        plan = None
        if cfg["backend"] == "tensorrt":
            from kit.backends.tensorrt_backend import TensorRTPlan

            plan = TensorRTPlan.load(path)
        engine = Builder(cfg["backend"], device=device).assemble(loaded, stored_bc, dtype=dtype, plan=plan)
        engine.build_key = cfg["build_key"]
        engine.source_dir = path
        return engine

    def __repr__(self) -> str:
        return f"Engine({self.network.name!r}, backend={self.backend.name}, {self.device}, {self.dtype})"

    def _repr_html_(self) -> str:
        c = self.config
        rows = {
            "network": f"{self.network.name} ({c.family}, {len(self.network)} layers)",
            "backend": self.backend.describe(),
            "can do": self.backend.capabilities,
            "device / dtype": f"{self.device} / {str(self.dtype).replace('torch.', '')}",
            "weights": f"{self.network.weight_bytes / 2**20:.1f} MiB",
            "KV bytes per token": f"{self.kv_bytes_per_token}",
            "build config": str(self.build_config) if self.build_config is not None else "none (eager)",
        }
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows.items())
        return f"<b>Engine</b><table>{body}</table>"
