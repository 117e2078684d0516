"""What the KV-cache manager and the scheduler hand each other: `KVCacheBlocks` and the block hash.

`KVCacheBlocks` (vLLM v1's name) carries block ids: the prefix-cache hits of `get_computed_blocks`, the
blocks `allocate_slots` added. `hash_block_tokens` names a full block by its tokens chained with the
hash of the block before it, so two prompts that share their first k blocks share their first k hashes
(kit/kv_cache.py's prefix cache).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence

__all__ = ["KVCacheBlocks", "hash_block_tokens"]

_ROOT_HASH = hashlib.sha256(b"kit.kv_cache:root").digest()


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int]) -> bytes:
    """sha256(parent block's hash || token ids as little-endian int64): names the whole prefix.

    Stable across processes (unlike `hash()` of a str), so block hashes can be compared
    between runs. The first block of a sequence chains from a fixed root hash.
    """
    h = hashlib.sha256(_ROOT_HASH if parent_hash is None else parent_hash)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(frozen=True)
class KVCacheBlocks:
    """Block ids handed between the KV-cache manager and the scheduler (vLLM v1's `KVCacheBlocks`).

    `get_computed_blocks` returns the prefix-cache hits as one; `allocate_slots` returns the
    newly allocated blocks as one (maybe empty), or None when the pool cannot supply them.
    """

    blocks: tuple[int, ...] = ()

    @property
    def block_ids(self) -> list[int]:
        return list(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def __bool__(self) -> bool:
        return bool(self.blocks)
