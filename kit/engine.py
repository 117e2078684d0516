"""The engine: a built network that computes logits for a `ForwardBatch` (see `kit/batch.py`).

A runtime object: `Engine.forward(batch, kv_cache) -> logits`.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kit.batch import ForwardBatch, KVCache, SequenceInput
from kit.config import ModelConfig
from kit.network import Network

__all__ = ["ForwardBatch", "KVCache", "Engine", "SequenceInput"]


class Engine:
    """A network prepared by a backend: `forward(batch, kv_cache) -> logits`."""

    def __init__(self, network: Network, backend: Any, *, build_config: Any = None,
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
        from kit.backends.torch_backend import TorchBackend

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
        """The paged pool; on CUDA with `use_cuda_graphs`, also captures the decode graphs over it.

        Tools that need a scratch cache of their own (profiler, evaluation) pass
        `capture_graphs=False`, so the serving cache keeps its graphs.
        """
        qc = self.network.quant_config
        kv = KVCache(self.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device,
                     quant_algo=getattr(qc, "kv_cache_quant_algo", None))
        bc = self.build_config
        if (capture_graphs and bc is not None and bc.use_cuda_graphs and self.device.type == "cuda"
                and hasattr(self.backend, "capture_graphs")):
            t0 = time.perf_counter()
            self.backend.capture_graphs(kv, bc.graph_batch_sizes, -(-bc.max_seq_len // block_size))
            self.build_log.append({"step": "capture CUDA graphs", "seconds": time.perf_counter() - t0,
                                   "detail": f"decode batch sizes {list(bc.graph_batch_sizes)}"})
        return kv

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
                on_layer: Callable[[Any], Any] | None = None) -> torch.Tensor:
        """Logits (len(batch.logits_indices), vocab) for the batch; writes its K/V into `kv_cache`.

        `on_layer(layer)` (optional) returns a context manager entered around each layer:
        the profiler uses it for timing and NVTX ranges.
        """
        if batch.block_size != kv_cache.block_size:
            raise ValueError(f"batch was built for block_size {batch.block_size}, cache has {kv_cache.block_size}")
        return self.backend.forward(batch, kv_cache, on_layer=on_layer)

    def __repr__(self) -> str:
        return f"Engine({self.network.name!r}, backend={self.backend.name}, {self.device}, {self.dtype})"

    def _repr_html_(self) -> str:
        c = self.config
        rows = {
            "network": f"{self.network.name} ({c.family}, {len(self.network)} layers)",
            "backend": self.backend.describe(),
            "device / dtype": f"{self.device} / {str(self.dtype).replace('torch.', '')}",
            "weights": f"{self.network.weight_bytes / 2**20:.1f} MiB",
            "KV bytes per token": f"{self.kv_bytes_per_token}",
            "build config": str(self.build_config) if self.build_config is not None else "none (eager)",
        }
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows.items())
        return f"<b>Engine</b><table>{body}</table>"
