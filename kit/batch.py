"""The values an engine and the serving side share: `ForwardBatch`, `SequenceInput`, `KVCache`.

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

from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import torch

from kit.config import ModelConfig
from kit.quantization.kv_cache import kv_cache_dtype

__all__ = ["ForwardBatch", "KVCache", "SequenceInput", "split_aligned"]


def split_aligned(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Views of `flat` (int64) holding parts of `sizes` one after another, each part starting at an even slot
    (16-byte aligned: an odd-length part is followed by one unused slot), as `ForwardBatch` lays them out."""
    padded = [n + (n & 1) for n in sizes]
    return [v[:n] for v, n in zip(flat[:sum(padded)].split(padded), sizes)]


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
        if all(len(s.token_ids) == 1 and s.logits == "last" for s in seqs):
            return cls.build_decode(seqs, block_size, device)
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logits_idx: list[int] = []
        tables: list[int] = []  # (num_seqs * max_blocks,) each table padded with block 0
        max_blocks = max(len(s.block_table) for s in seqs)
        for i, s in enumerate(seqs):
            n, start, table = len(s.token_ids), s.num_computed_tokens, s.block_table
            if n == 0:
                raise ValueError(f"sequence {i} has no tokens to compute")
            total = start + n
            if len(table) * block_size < total:
                raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold "
                                 f"{total} tokens")
            first = len(input_ids)
            if n == 1:  # NOTE: a decode token, the common case: plain appends, no per-position loop
                input_ids.append(int(s.token_ids[0]))
                positions.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(map(int, s.token_ids))
                positions.extend(range(start, total))
                slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, total))
            if s.logits == "last":
                logits_idx.append(first + n - 1)
            elif s.logits == "all":
                logits_idx.extend(range(first, first + n))
            elif s.logits != "none":
                raise ValueError(f"SequenceInput.logits must be 'last', 'all' or 'none', got {s.logits!r}")
            starts.append(first + n)
            seq_lens.append(total)
            tables.extend(table)
            if len(table) < max_blocks:
                tables.extend([0] * (max_blocks - len(table)))
        return cls._from_parts((input_ids, positions, starts, seq_lens, tables, slots, logits_idx), len(seqs),
                               max_blocks, max(len(s.token_ids) for s in seqs), max(seq_lens), block_size, device)

    @classmethod
    def build_decode(cls, seqs: Sequence[Any], block_size: int, device: torch.device | str = "cpu") -> "ForwardBatch":
        """`build` for a decode step (one token per sequence, each its logits row): the same batch, made
        with one comprehension per field instead of a loop of appends (it runs every step of a server).

        `seqs` need only `token_ids` (one id), `num_computed_tokens` and `block_table`: SequenceInputs or
        the scheduler's ScheduledSequences."""
        if not seqs:
            raise ValueError("ForwardBatch.build_decode needs at least one sequence")
        num_seqs = len(seqs)
        positions = [s.num_computed_tokens for s in seqs]
        tables = [s.block_table for s in seqs]
        sizes = [len(t) for t in tables]
        for i, (p, n) in enumerate(zip(positions, sizes)):
            if n * block_size <= p:
                raise ValueError(f"sequence {i}: {n} blocks of {block_size} cannot hold {p + 1} tokens")
        max_blocks = max(sizes)
        if min(sizes) == max_blocks:
            flat_tables: Any = chain.from_iterable(tables)
        else:  # each table padded with block 0
            pad = (0,) * max_blocks
            flat_tables = chain.from_iterable(chain(t, pad[n:]) for t, n in zip(tables, sizes))
        parts = ([int(s.token_ids[0]) for s in seqs], positions, range(num_seqs + 1), [p + 1 for p in positions],
                 flat_tables, [t[p // block_size] * block_size + p % block_size for p, t in zip(positions, tables)],
                 range(num_seqs))
        return cls._from_parts(parts, num_seqs, max_blocks, 1, max(positions) + 1, block_size, device,
                               (num_seqs, num_seqs, num_seqs + 1, num_seqs, num_seqs * max_blocks, num_seqs, num_seqs))

    @classmethod
    def _from_parts(cls, parts: tuple, num_seqs: int, max_blocks: int, max_query_len: int, max_seq_len: int,
                    block_size: int, device: torch.device | str,
                    sizes: tuple[int, ...] | None = None) -> "ForwardBatch":
        """The batch from its seven index lists (input ids, positions, starts, seq lens, padded tables, slots,
        logits rows), in that order. NOTE: one host->device copy for all seven, then views into it."""
        sizes = sizes if sizes is not None else tuple(len(part) for part in parts)
        # NOTE: every view starts 16-byte aligned (an odd-length part is followed by one unused slot): Triton
        # specializes a kernel on each pointer's 16-byte alignment, so views at odd offsets, changing with the
        # step's token and sequence counts, compiled new variants of the attention and RoPE kernels in the
        # middle of serving (stalls of 1-1.5 s on an H200, bench/results/serving_full_h200.json's slowest iterations)
        odd = [(0,) if n & 1 else () for n in sizes]
        # NOTE: an int64 array (from a list: it is sized once), shared by the tensor without a copy; ~4x faster
        # than torch.tensor(list)
        flat = torch.frombuffer(array("q", list(chain.from_iterable(chain.from_iterable(zip(parts, odd))))),
                                dtype=torch.long)
        if torch.device(device).type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        views = split_aligned(flat, sizes)
        return cls(
            input_ids=views[0],
            positions=views[1],
            query_start_loc=views[2],
            seq_lens=views[3],
            block_tables=views[4].view(num_seqs, max_blocks),
            slot_mapping=views[5],
            logits_indices=views[6],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            block_size=block_size,
        )


class KVCache:
    """The paged K/V pool: (num_layers, num_blocks, block_size, num_kv_heads, head_dim) each."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 quant_algo: Any = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"KVCache.num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"KVCache.block_size must be > 0, got {block_size}")
        # NOTE: one block more than asked for: the scratch block, owned by no sequence, takes the
        # K/V writes of padding rows (CUDA-graph buckets) so they never touch a real block
        shape = (config.num_hidden_layers, num_blocks + 1, block_size, config.num_key_value_heads, config.head_dim)
        # a quantized cache (int8 / fp8) keeps one float32 scale per (token, kv head) beside K and V
        self.quant_algo = quant_algo
        if quant_algo is not None:
            dtype = kv_cache_dtype(quant_algo)
            self.k_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
            self.v_scale = torch.ones(shape[:-1], dtype=torch.float32, device=device)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def is_quantized(self) -> bool:
        return self.quant_algo is not None

    @property
    def nbytes(self) -> int:
        scales = 2 * self.k_scale.numel() * 4 if self.is_quantized else 0
        return 2 * self.k.numel() * self.k.element_size() + scales

    def __repr__(self) -> str:
        return (f"KVCache({self.num_blocks} blocks x {self.block_size} tokens, {self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB)")
