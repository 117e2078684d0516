"""The engine: a built network that computes logits for a `ForwardBatch`.

`ForwardBatch` is the only thing an engine sees of the serving side. It holds the
flattened tokens of every scheduled sequence, whatever their phase: a sequence simply
has `num_computed_tokens` already in the KV cache and some tokens to compute now (a
whole prompt, a chunk of one, or a single decode token).

    input_ids       (num_tokens,)          the tokens to compute, sequence after sequence
    positions       (num_tokens,)          their positions in their sequence
    query_start_loc (num_seqs + 1,)        where each sequence's tokens start in input_ids
    seq_lens        (num_seqs,)            tokens in the cache after this step (context length)
    block_tables    (num_seqs, max_blocks) the cache blocks of each sequence, in order
    slot_mapping    (num_tokens,)          where each token's K/V is written: block * block_size + offset
    logits_indices  (num_logits,)          rows of the flattened tokens whose logits are wanted

`KVCache` is the paged pool itself: K and V tensors of shape
(num_layers, num_blocks, block_size, num_kv_heads, head_dim).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from kit.config import ModelConfig
from kit.network import Network

__all__ = ["ForwardBatch", "KVCache", "Engine", "SequenceInput"]


@dataclass
class SequenceInput:
    """One sequence's share of a step, as the caller knows it (plain Python)."""

    token_ids: Sequence[int]  # the tokens to compute this step
    num_computed_tokens: int  # tokens of this sequence already in the cache
    block_table: Sequence[int]  # its cache blocks, in order
    logits: str = "last"  # "last" | "all" | "none": which of its rows need logits


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    logits_indices: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @classmethod
    def build(cls, seqs: Sequence[SequenceInput], block_size: int,
              device: torch.device | str = "cpu") -> "ForwardBatch":
        """Flatten a list of sequences into one batch (validating the block tables)."""
        if not seqs:
            raise ValueError("ForwardBatch.build needs at least one sequence")
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_idx: list[int] = []
        max_blocks = max(len(s.block_table) for s in seqs)
        for i, s in enumerate(seqs):
            n = len(s.token_ids)
            if n == 0:
                raise ValueError(f"sequence {i} has no tokens to compute")
            total = s.num_computed_tokens + n
            if len(s.block_table) * block_size < total:
                raise ValueError(f"sequence {i}: {len(s.block_table)} blocks of {block_size} cannot hold "
                                 f"{total} tokens")
            first = len(input_ids)
            input_ids.extend(int(t) for t in s.token_ids)
            for p in range(s.num_computed_tokens, total):
                positions.append(p)
                slots.append(s.block_table[p // block_size] * block_size + p % block_size)
            if s.logits == "last":
                logits_idx.append(first + n - 1)
            elif s.logits == "all":
                logits_idx.extend(range(first, first + n))
            elif s.logits != "none":
                raise ValueError(f"SequenceInput.logits must be 'last', 'all' or 'none', got {s.logits!r}")
            starts.append(len(input_ids))
            seq_lens.append(total)
        tables = [list(s.block_table) + [0] * (max_blocks - len(s.block_table)) for s in seqs]
        i64 = dict(dtype=torch.long, device=device)
        return cls(
            input_ids=torch.tensor(input_ids, **i64),
            positions=torch.tensor(positions, **i64),
            query_start_loc=torch.tensor(starts, **i64),
            seq_lens=torch.tensor(seq_lens, **i64),
            block_tables=torch.tensor(tables, **i64),
            slot_mapping=torch.tensor(slots, **i64),
            logits_indices=torch.tensor(logits_idx, **i64),
            max_query_len=max(len(s.token_ids) for s in seqs),
            max_seq_len=max(seq_lens),
            block_size=block_size,
        )


class KVCache:
    """The paged K/V pool: (num_layers, num_blocks, block_size, num_kv_heads, head_dim) each."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_blocks <= 0:
            raise ValueError(f"KVCache.num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"KVCache.block_size must be > 0, got {block_size}")
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __repr__(self) -> str:
        return (f"KVCache({self.num_blocks} blocks x {self.block_size} tokens, {self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


class Engine:
    """A network prepared by a backend: `forward(batch, kv_cache) -> logits`."""

    def __init__(self, network: Network, backend: Any, *, build_config: Any = None,
                 build_log: list[dict[str, Any]] | None = None) -> None:
        self.network = network
        self.backend = backend
        self.build_config = build_config
        self.build_log = build_log or []

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

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config, num_blocks, block_size, dtype=dtype or self.dtype, device=self.device)

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
            "KV bytes per token": f"{c.kv_bytes_per_token(torch.empty(0, dtype=self.dtype).element_size())}",
            "build config": str(self.build_config) if self.build_config is not None else "none (eager)",
        }
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows.items())
        return f"<b>Engine</b><table>{body}</table>"
