"""How big the paged KV pool is: `KvCacheConfig` and the arithmetic that turns it into blocks.

Exactly one budget wins, in this order (TensorRT-LLM's `KvCacheConfig` fields):

    num_blocks                        -> that many blocks
    max_tokens                        -> ceil(max_tokens / block_size) blocks
    free_gpu_memory_fraction (CUDA)   -> fraction x free GPU memory, capped at
                                         2 x max_batch_size x max_seq_len tokens
    (CPU default)                     -> min(max_batch_size x max_seq_len, 8192) tokens

`free_gpu_memory_fraction=None` means the default (0.9). `tokens_per_block` (None: the
build's `block_size`) sets the block size. `host_cache_size` (bytes of host memory for
blocks offloaded from the GPU) is accepted as None or 0: the kit keeps no secondary pool.

`num_kv_blocks` does this once; the executor builds its `KVCacheManager` from the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KvCacheConfig", "gpu_memory_budget", "num_kv_blocks"]


@dataclass(frozen=True)
class KvCacheConfig:
    """How big the paged KV pool is (exactly one way wins, see the module) and whether blocks are reused."""

    free_gpu_memory_fraction: float | None = 0.9  # None: 0.9
    max_tokens: int | None = None
    num_blocks: int | None = None
    enable_block_reuse: bool = False  # prefix caching
    tokens_per_block: int | None = None  # None: BuildConfig.block_size
    host_cache_size: int | None = None  # bytes; only None or 0 (no host offload)
    event_buffer_max_size: int = 0  # KV-cache events kept for LLM.get_kv_cache_events (0: none recorded)

    def __post_init__(self) -> None:
        if self.free_gpu_memory_fraction is None:
            object.__setattr__(self, "free_gpu_memory_fraction", 0.9)
        f = self.free_gpu_memory_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"KvCacheConfig.free_gpu_memory_fraction must be a number in (0, 1], got {f!r}")
        for name in ("max_tokens", "num_blocks", "tokens_per_block"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"KvCacheConfig.{name} must be an integer >= 1 or None, got {v!r}")
        if not isinstance(self.enable_block_reuse, bool):
            raise ValueError(f"KvCacheConfig.enable_block_reuse must be a bool, got {self.enable_block_reuse!r}")
        e = self.event_buffer_max_size
        if not isinstance(e, int) or isinstance(e, bool) or e < 0:
            raise ValueError(f"KvCacheConfig.event_buffer_max_size must be an integer >= 0, got {e!r}")
        h = self.host_cache_size
        if h is not None and (not isinstance(h, int) or isinstance(h, bool) or h < 0):
            raise ValueError(f"KvCacheConfig.host_cache_size must be None or an integer >= 0 (bytes), got {h!r}")
        if h:
            raise ValueError(f"KvCacheConfig.host_cache_size={h}: this kit keeps no host-memory block pool (KV "
                             "offload); use None or 0, and size the GPU pool with max_tokens or num_blocks")


def gpu_memory_budget(fraction: float, device: Any = None) -> int:
    """Bytes for the KV cache: `fraction` of the GPU memory that is free *now*.

    This is TensorRT-LLM's `kv_cache_free_gpu_memory_fraction`: call it after the
    weights are loaded, then `KVCacheManager.from_budget(..., memory_bytes=...)`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"kv_cache_free_gpu_memory_fraction must be in (0, 1], got {fraction!r}")
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"gpu_memory_budget needs a CUDA device, got {dev} (cuda available: "
                           f"{torch.cuda.is_available()}); on the CPU size the cache with "
                           "from_budget(..., max_tokens=...) or num_blocks=...")
    free_bytes, _total = torch.cuda.mem_get_info(dev)
    return int(free_bytes * fraction)


def num_kv_blocks(config: KvCacheConfig, *, bytes_per_token: int, block_size: int, max_batch_size: int,
                  max_seq_len: int, device: torch.device) -> int:
    """The number of KV blocks `config` buys for an engine on `device` (see the module docstring)."""
    if config.num_blocks is not None:
        return config.num_blocks
    if config.max_tokens is not None:
        return math.ceil(config.max_tokens / block_size)
    if device.type == "cuda":
        # NOTE: capped at twice what max_batch_size full-length sequences need: more only feeds the
        # prefix cache, and a notebook often holds other models on the same GPU
        cap = 2 * max_batch_size * max_seq_len * bytes_per_token
        memory = min(cap, gpu_memory_budget(config.free_gpu_memory_fraction, device))
        n = memory // (bytes_per_token * block_size)
        if n < 1:
            raise ValueError(f"KvCacheConfig.free_gpu_memory_fraction={config.free_gpu_memory_fraction} leaves "
                             f"{memory} bytes: not one block of {block_size} tokens x {bytes_per_token} bytes")
        return n
    return math.ceil(min(max_batch_size * max_seq_len, 8192) / block_size)
