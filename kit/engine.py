"""The engine: a built network that computes logits for a `ForwardBatch` (see `kit/batch.py`).

A runtime object: a `Network` prepared by a `Backend` (kit/backends/base.py), plus the
build config it was built for. What it does at run time:

    kv = engine.allocate_kv_cache(num_blocks, block_size)    the paged pool
    engine.capture_cuda_graphs(kv)                           decode CUDA graphs over it (CUDA)
    logits = engine.forward(batch, kv, hooks=None)           (num_logits, vocab)
"""

from __future__ import annotations

import html
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
                          capture_graphs: bool = False) -> KVCache:
        """The paged pool of `num_blocks` blocks of `block_size` tokens, in the engine's dtype by default.

        CUDA graphs are a separate, explicit step (`capture_cuda_graphs(kv)`): the executor takes
        it for the serving cache; scratch caches (profiler, evaluation) never capture, so the
        serving cache keeps its graphs. `capture_graphs=True` is shorthand for both steps.
        """
        qc = self.network.quant_config
        kv = KVCache(self.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device,
                     quant_algo=getattr(qc, "kv_cache_quant_algo", None))
        if capture_graphs:
            self.capture_cuda_graphs(kv)
        return kv

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int] | None = None) -> tuple[int, ...]:
        """Capture the CUDA graphs over `kv_cache` (decode, and mixed steps); returns the decode batch sizes.

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
        mixed: dict[str, Any] = {}
        if bc is not None and bc.use_cuda_graphs and getattr(self.backend, "supports_mixed_graphs", False):
            mixed = dict(num_tokens=bc.graph_num_tokens, max_seqs=bc.max_batch_size * bc.max_beam_width)
        current = getattr(self.backend, "graphs", None)
        current_mixed = getattr(self.backend, "mixed_graphs", None)
        mixed_sizes = self.backend.mixed_graph_sizes(kv_cache, mixed["num_tokens"]) if mixed else ()
        if (current is not None and current.kv_cache is kv_cache and current.batch_sizes == sizes
                and current.max_blocks == max_blocks
                and (current_mixed.num_tokens if current_mixed is not None else ()) == mixed_sizes):
            return sizes
        t0 = time.perf_counter()
        self.backend.capture_cuda_graphs(kv_cache, sizes, max_blocks, **mixed)
        detail = f"decode batch sizes {list(sizes)}"
        runner = getattr(self.backend, "mixed_graphs", None)
        if runner is not None:
            detail += f"; mixed steps of {list(runner.num_tokens)} tokens"
        self.build_log.append({"step": "capture CUDA graphs", "seconds": time.perf_counter() - t0, "detail": detail})
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
