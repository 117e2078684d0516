"""Copy-on-write forking of block tables, for beam search: many sequences, one prompt's blocks.

After a beam-search step every new beam continues one of the old beams (its *parent*):
its K/V are the parent's K/V. Nothing is recomputed; the block tables are re-mapped:

    block_size 4, 10 tokens in cache, parents [0, 0, 1]      (new beam i continues old beam parents[i])
    old beam 0: [7, 2, 5]   (blocks 7 and 2 full, block 5 holds tokens 8..9: the partial block)
    old beam 1: [7, 2, 9]
    new beam 0: [7, 2, 5]   the first child of a parent takes its table as it is
    new beam 1: [7, 2, 11]  a later child shares the full blocks (ref_count + 1) and gets a fresh
                            block 11 holding a device copy of block 5 (its next tokens go there)
    new beam 2: [7, 2, 9]

Full blocks are never written again, so sharing them is safe; a partial block will be
written by its owner's next token, so every other child needs its own copy
(`copy_blocks`). A parent with no child gives its blocks back. The prompt's blocks stay
shared by every beam for the whole search.

Like `KVCacheInspector`, this is a companion of `KVCacheManager` that reads and writes its
bookkeeping (tables, reference counts); `check_invariants` holds after every re-mapping.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kit.batch import KVCache
from kit.kv_cache import KVCacheManager

__all__ = ["copy_blocks", "fork_tables"]


def copy_blocks(kv_cache: KVCache, src: Sequence[int], dst: Sequence[int]) -> None:
    """Copy the K/V (and their scales, for a quantized cache) of blocks `src[i]` into `dst[i]`, on the device."""
    if len(src) != len(dst):
        raise ValueError(f"copy_blocks: {len(src)} source blocks but {len(dst)} destination blocks")
    if not src:
        return
    bad = [b for b in (*src, *dst) if not 0 <= b < kv_cache.num_blocks]
    if bad:
        raise ValueError(f"copy_blocks: block ids {bad} are outside the pool [0, {kv_cache.num_blocks})")
    if set(src) & set(dst):
        raise ValueError(f"copy_blocks: a block is both a source and a destination: {sorted(set(src) & set(dst))}")
    s = torch.tensor(list(src), device=kv_cache.k.device)
    d = torch.tensor(list(dst), device=kv_cache.k.device)
    tensors = [kv_cache.k, kv_cache.v] + ([kv_cache.k_scale, kv_cache.v_scale] if kv_cache.is_quantized else [])
    for t in tensors:  # (num_layers, num_blocks + 1, block_size, ...): blocks are dim 1
        t.index_copy_(1, d, t.index_select(1, s))


def fork_tables(manager: KVCacheManager, kv_cache: KVCache | None, src_ids: Sequence[str], dst_ids: Sequence[str],
                parents: Sequence[int], num_tokens: int) -> int:
    """Give `dst_ids[i]` the K/V of `src_ids[parents[i]]`; every source's `num_tokens` tokens are in cache.

    Sources and destinations may be the same ids (a beam slot keeps its name while its
    content moves). Sources that are not destinations are released. Returns the number of
    blocks copied. Raises RuntimeError, changing nothing, if the pool lacks blocks for the copies.
    """
    bs = manager.block_size
    tables = {}
    for sid in src_ids:
        if sid not in manager._tables:
            raise ValueError(f"fork_tables: source {sid!r} holds no blocks")
        tables[sid] = list(manager._tables[sid])
        if len(tables[sid]) < manager.num_blocks_for(num_tokens):
            raise ValueError(f"fork_tables: source {sid!r} has {len(tables[sid])} blocks, too few for {num_tokens} tokens")
    if len(dst_ids) != len(parents) or len(set(dst_ids)) != len(dst_ids):
        raise ValueError(f"fork_tables: need one parent per distinct destination, got {list(dst_ids)} / {list(parents)}")
    stale = [d for d in dst_ids if d not in tables and d in manager._tables]
    if stale:
        raise ValueError(f"fork_tables: destinations {stale} already hold blocks and are not sources")
    if any(not 0 <= p < len(src_ids) for p in parents):
        raise ValueError(f"fork_tables: parents {list(parents)} must index the {len(src_ids)} sources")
    num_full, partial = divmod(num_tokens, bs)
    claimed: set[int] = set()
    plans = []  # (dst id, source table, copy the partial block?)
    for dst, p in zip(dst_ids, parents):
        table = tables[src_ids[p]][:manager.num_blocks_for(num_tokens)]
        plans.append((dst, table, bool(partial) and p in claimed))
        claimed.add(p)
    num_copies = sum(c for _, _, c in plans)
    if num_copies > manager.num_free_blocks:
        raise RuntimeError(f"fork_tables: {num_copies} partial blocks to copy but {manager.num_free_blocks} free blocks")
    hashes = {sid: list(manager._hashes.get(sid, [])) for sid in src_ids}
    new_tables, copy_src, copy_dst = {}, [], []
    for (dst, table, copy), p in zip(plans, parents):
        new = list(table)
        if copy:
            block = manager._pop_free_block()
            manager._ref_count[block] = 0  # counted with the others below
            copy_src.append(table[num_full])
            copy_dst.append(block)
            new[num_full] = block
        new_tables[dst] = (new, hashes[src_ids[p]][:num_full])
    for new, _ in new_tables.values():  # take the new references before releasing the old ones
        for b in new:
            manager._ref_count[b] += 1
    if kv_cache is not None:
        copy_blocks(kv_cache, copy_src, copy_dst)
    for sid in src_ids:
        manager.free(sid)
    for dst, (new, h) in new_tables.items():
        manager._tables[dst] = new
        manager._num_slots[dst] = num_tokens
        if manager.enable_prefix_caching:
            manager._hashes[dst] = h  # the shared leading full blocks keep their chained hashes
    return num_copies
