"""Paged KV-cache bookkeeping: which block of the cache holds which tokens.

The K/V tensors of a paged cache are cut into `num_blocks` blocks of `block_size`
token slots (the tensors live in `KVCache`; `KVCacheManager` never touches them). A
request owns a *block table*, the ids of the blocks that hold its tokens in order, so
token `i` sits in slot `block_table[i // block_size] * block_size + i % block_size`:

    block_size 4, tokens 0..9, block_table [7, 2, 5]  ->  token 9 is in slot 5*4 + 1 = 21

Blocks are handed out on demand (`allocate_slots`) and given back when a request ends
(`free`). With prefix caching, each *full* block of computed tokens gets a hash that
chains its tokens with the hash of the block before it, so two prompts that share
their first k blocks share their first k hashes; a later request looks its tokens up
(`get_computed_blocks`) and reuses those blocks instead of recomputing them. A block
whose last owner has gone keeps its hash and its K/V ("cached") until a free block is
needed; then the least recently freed cached block is evicted.

Every block is in exactly one state (`check_invariants` verifies it):

| state  | ref_count | hash  | kept in                                                  |
| ------ | --------- | ----- | -------------------------------------------------------- |
| free   | 0         | None  | the free list (FIFO)                                     |
| used   | >= 1      | any   | the block tables of `ref_count` requests                 |
| cached | 0         | set   | the LRU list: reusable by a hit, evicted oldest-first    |

Allocation takes free blocks first and evicts cached ones only when none is left, so
`num_free_blocks` (what can be allocated) counts both. A request's blocks are released
tail first, so a prompt's last blocks are evicted before its first ones (a chained
hash makes the later blocks useless once an earlier one is gone).

The scheduler and the manager meet through `KVCacheBlocks` (vLLM v1's name; kit/kv_cache_blocks.py): the
prefix-cache lookup returns one, `allocate_slots` returns the newly allocated one (or
None), and `get_num_blocks_to_allocate` answers "how many blocks would leave the pool",
so the scheduler never reads reference counts. `KVCacheInspector`
(kit/kv_cache_inspector.py) turns the state into a stats dict and a per-block DataFrame;
pool sizing (`KvCacheConfig`) is in kit/kv_cache_config.py.
Modelled on vLLM v1 (`KVCacheManager`, `BlockPool`) and nano-vllm (`BlockManager`).
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from typing import Any, Sequence

from kit.kv_cache_blocks import KVCacheBlocks, hash_block_tokens
from kit.kv_cache_config import gpu_memory_budget
from kit.kv_cache_inspector import KVCacheInspector
from kit.request import Request

__all__ = ["KVCacheBlocks", "KVCacheManager", "KVCacheInspector", "gpu_memory_budget", "hash_block_tokens"]


def _check_positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")


_NO_BLOCKS = KVCacheBlocks()  # frozen: one instance serves every "nothing new was allocated"


class KVCacheManager:
    """Owns the block pool and every request's block table. No tensors, no threads.

    Protocol (the scheduler drives it; the executor only reads block tables):

    1. admission: `blocks, n = get_computed_blocks(req)` (prefix-cache lookup, a
       `KVCacheBlocks`), optionally `get_num_blocks_to_allocate(req, num_tokens, blocks)`
       to check a budget, then `allocate_slots(req, num_new_tokens, blocks)`; on success the caller sets
       `req.num_computed_tokens = n`.
    2. every step: `allocate_slots(req, num_new_tokens)` before the forward pass, and
       `cache_full_blocks(req)` after it (once `req.num_computed_tokens` has advanced):
       a block is hashed, and so becomes shareable, only once its K/V have been written.
    3. the end (finish, abort, preemption): `free(req)`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 *, bytes_per_token: int | None = None) -> None:
        _check_positive("KVCacheManager", num_blocks=num_blocks, block_size=block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.bytes_per_token = bytes_per_token  # for stats only
        self._ref_count = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no hash; allocate from the left
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; least recently freed first
        self._tables: dict[str, list[int]] = {}  # request id -> block ids in token order
        self._num_slots: dict[str, int] = {}  # request id -> token slots its table was allocated for
        self._hashes: dict[str, list[bytes]] = {}  # request id -> chained hashes of its full computed blocks
        self.num_queried_tokens = 0  # tokens of admitted requests looked up in the prefix cache
        self.num_hit_tokens = 0  # of those, tokens served from cached blocks
        self.num_evictions = 0  # cached blocks whose hash was dropped to reuse the block
        self.events: Any = None  # a KVCacheEventRing (kit/kv_cache_events.py) when events are recorded

    @classmethod
    def from_budget(cls, bytes_per_token: int, block_size: int, *, max_tokens: int | None = None,
                    num_blocks: int | None = None, memory_bytes: int | None = None,
                    enable_prefix_caching: bool = False) -> KVCacheManager:
        """Size the pool from exactly one of: tokens (rounded up to whole blocks), blocks, or bytes.

        `bytes_per_token` is K+V over all layers (`ModelConfig.kv_bytes_per_token`);
        `memory_bytes` buys `memory_bytes // (bytes_per_token * block_size)` blocks.
        """
        given = {k: v for k, v in (("max_tokens", max_tokens), ("num_blocks", num_blocks),
                                   ("memory_bytes", memory_bytes)) if v is not None}
        if len(given) != 1:
            raise ValueError("from_budget takes exactly one of max_tokens, num_blocks, memory_bytes; "
                             f"got {', '.join(given) or 'none'}")
        _check_positive("from_budget", bytes_per_token=bytes_per_token, block_size=block_size, **given)
        (name, value), = given.items()
        if name == "num_blocks":
            n = value
        elif name == "max_tokens":
            n = math.ceil(value / block_size)
        else:
            n = value // (bytes_per_token * block_size)
            if n < 1:
                raise ValueError(f"from_budget: memory_bytes={value} holds no block of {block_size} tokens x "
                                 f"{bytes_per_token} bytes ({block_size * bytes_per_token} bytes)")
        return cls(n, block_size, enable_prefix_caching, bytes_per_token=bytes_per_token)

    # ---- counts ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now: free plus cached (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by at least one request (cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block_id: int) -> int:
        return self._ref_count[block_id]

    def has_request(self, request_id: str) -> bool:
        return request_id in self._tables

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] for an unknown request)."""
        return list(self._tables.get(request_id, ()))

    # ---- the protocol ---------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[KVCacheBlocks, int]:
        """Longest run of the request's leading *full* blocks whose hashes are cached.

        Returns (block ids, number of tokens they hold). At most `(num_tokens - 1) //
        block_size` blocks are returned, so at least one token is left to compute and the
        model produces logits to sample from. Changes nothing (stats are counted by
        `allocate_slots` when the lookup is used, so a head-of-line request looked up on
        every step is counted once).
        """
        if not self.enable_prefix_caching or not request.use_prefix_cache:
            return KVCacheBlocks(), 0
        tokens, bs = request.all_token_ids, self.block_size
        blocks: list[int] = []
        parent = None
        for i in range((len(tokens) - 1) // bs):
            parent = hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs])
            block = self._hash_to_block.get(parent)
            if block is None:
                break
            blocks.append(block)
        return KVCacheBlocks(tuple(blocks)), len(blocks) * bs

    def get_num_blocks_to_allocate(self, request: Request, num_tokens: int,
                                   computed_blocks: KVCacheBlocks | None = None) -> int:
        """Blocks that would leave the free pool for the request to hold `num_tokens` slots.

        Counts new blocks beyond its table and `computed_blocks`, plus cached (unowned)
        hits that a hit would revive. Changes nothing.
        """
        computed = tuple(computed_blocks or ())
        have = len(self._tables.get(request.request_id, ())) + len(computed)
        revived = sum(1 for b in computed if self._ref_count[b] == 0)
        return max(0, self.num_blocks_for(num_tokens) - have) + revived

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: KVCacheBlocks | Sequence[int] | None = None) -> KVCacheBlocks | None:
        """Grow the request's table to cover `num_computed_tokens + num_new_tokens` slots.

        `computed_blocks` (from `get_computed_blocks`, only for a request without blocks)
        are prepended and their tokens count as computed. Returns the newly allocated
        blocks (maybe empty), or None, changing nothing, when the pool cannot supply them.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        rid = request.request_id
        table = self._tables.get(rid)
        num_slots = request.num_computed_tokens + num_new_tokens
        if table and not computed_blocks and num_slots <= len(table) * self.block_size:
            # NOTE: the decode fast path: a step inside the blocks it holds takes nothing from the pool
            self._num_slots[rid] = max(self._num_slots[rid], num_slots)
            return _NO_BLOCKS
        computed = list(computed_blocks or ())
        if computed:
            if table:
                raise ValueError(f"request {rid!r} already holds blocks; computed_blocks are for a new request")
            if len(set(computed)) != len(computed) or any(self._block_hash[b] is None for b in computed):
                raise ValueError(f"stale computed_blocks {computed}: look them up again with get_computed_blocks")
            num_computed = len(computed) * self.block_size
        else:
            num_computed = request.num_computed_tokens
        num_slots = num_computed + num_new_tokens
        have = len(computed) + (len(table) if table else 0)
        num_new_blocks = max(0, self.num_blocks_for(num_slots) - have)
        if self.get_num_blocks_to_allocate(request, num_slots, KVCacheBlocks(tuple(computed))) > self.num_free_blocks:
            return None
        if computed_blocks is not None and table is None and self.enable_prefix_caching:
            self.num_queried_tokens += request.num_tokens
            self.num_hit_tokens += num_computed
            self._hashes[rid] = [self._block_hash[b] for b in computed]
        if table is None:
            table = self._tables[rid] = []
        for b in computed:  # NOTE: take hits before allocating, so allocation cannot evict them
            if self._ref_count[b] == 0:
                del self._cached[b]
            self._ref_count[b] += 1
            table.append(b)
        new_blocks = [self._pop_free_block() for _ in range(num_new_blocks)]
        for b in new_blocks:
            self._ref_count[b] = 1
        table.extend(new_blocks)
        self._num_slots[rid] = max(self._num_slots.get(rid, 0), num_slots)
        return KVCacheBlocks(tuple(new_blocks))

    def cache_full_blocks(self, request: Request) -> int:
        """Hash the request's blocks that are now full of computed tokens; returns how many got registered.

        Call after the forward pass, once `request.num_computed_tokens` has advanced. A block
        whose hash is already registered to another block (two requests computed the same
        prefix in the same step) stays unregistered and goes back to the free list when freed.
        """
        table = self._tables.get(request.request_id)
        if not self.enable_prefix_caching or not table:
            return 0
        bs, tokens = self.block_size, request.all_token_ids
        hashes = self._hashes.setdefault(request.request_id, [])
        num_registered = 0
        for i in range(len(hashes), min(request.num_computed_tokens // bs, len(table))):
            h = hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if self._block_hash[block] is None:
                if h not in self._hash_to_block:
                    self._block_hash[block] = h
                    self._hash_to_block[h] = block
                    num_registered += 1
                    if self.events is not None:
                        self.events.stored(hashes[-2] if i else None, h, tokens[i * bs:(i + 1) * bs])
            elif self._block_hash[block] != h:
                raise RuntimeError(f"block {block} of request {request.request_id!r} holds other tokens than "
                                   "its hash says: the block table was corrupted")
        return num_registered

    def free(self, request: Request | str) -> None:
        """Release the request's blocks (tail first). Unknown ids are a no-op."""
        rid = request if isinstance(request, str) else request.request_id
        table = self._tables.pop(rid, None)
        self._num_slots.pop(rid, None)
        self._hashes.pop(rid, None)
        self._release(table or ())

    def rollback(self, request: Request | str, num_tokens: int) -> int:
        """Shrink the request's slots to `num_tokens` (speculative drafts the target rejected).

        Blocks wholly past `num_tokens` go back to the pool (tail first); returns how many. They
        hold only uncomputed slots, so none of them is hashed or shared. Unknown ids: 0.
        """
        rid = request if isinstance(request, str) else request.request_id
        table = self._tables.get(rid)
        if num_tokens < 0:
            raise ValueError(f"rollback: num_tokens must be >= 0, got {num_tokens}")
        if table is None or num_tokens >= self._num_slots[rid]:
            return 0
        keep = self.num_blocks_for(num_tokens)
        released = table[keep:]
        del table[keep:]
        self._num_slots[rid] = num_tokens
        self._release(released)
        return len(released)

    def _release(self, blocks: Sequence[int]) -> None:
        for b in reversed(blocks):
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                if self._block_hash[b] is not None:
                    self._cached[b] = None  # most recently freed: evicted last
                else:
                    self._free.append(b)

    def fork(self, parent: Request, child: Request) -> list[int]:
        """Let `child` share the parent's leading *full computed* blocks (for n > 1 completions).

        The child's tokens must start with the parent's tokens over those blocks. The
        child gets a table of k shared blocks (ref counts +1) and `num_computed_tokens =
        k * block_size`; the parent's partial tail block is not shared (its next slots
        will be written by the parent), so the child recomputes its tail into blocks of
        its own. k also leaves the child at least one token to compute. Returns the shared ids.
        """
        ptable = self._tables.get(parent.request_id)
        if ptable is None:
            raise ValueError(f"fork: parent {parent.request_id!r} holds no blocks")
        if self._tables.get(child.request_id) or child.num_computed_tokens:
            raise ValueError(f"fork: child {child.request_id!r} must be new (no blocks, nothing computed)")
        if child.num_tokens < 1:
            raise ValueError(f"fork: child {child.request_id!r} has no tokens")
        k = min(parent.num_computed_tokens // self.block_size, len(ptable), (child.num_tokens - 1) // self.block_size)
        n = k * self.block_size
        if child.all_token_ids[:n] != parent.all_token_ids[:n]:
            raise ValueError(f"fork: child {child.request_id!r} must start with the parent's first {n} tokens")
        shared = ptable[:k]
        for b in shared:
            self._ref_count[b] += 1
        self._tables[child.request_id] = list(shared)
        self._num_slots[child.request_id] = n
        if self.enable_prefix_caching:
            self._hashes[child.request_id] = list(self._hashes.get(parent.request_id, [])[:k])
        child.num_computed_tokens = n
        return list(shared)

    def reset_prefix_cache(self) -> int:
        """Forget every cached (unowned) block: they become plain free blocks. Returns how many."""
        n = len(self._cached)
        while self._cached:
            b, _ = self._cached.popitem(last=False)
            if self.events is not None:
                self.events.removed(self._block_hash[b])
            del self._hash_to_block[self._block_hash[b]]
            self._block_hash[b] = None
            self._free.append(b)
        return n

    def _pop_free_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._cached.popitem(last=False)  # evict the least recently freed cached block
        if self.events is not None:
            self.events.removed(self._block_hash[block])
        del self._hash_to_block[self._block_hash[block]]
        self._block_hash[block] = None
        self.num_evictions += 1
        return block

    def check_invariants(self) -> None:
        """Raise RuntimeError if the bookkeeping is inconsistent (used by the tests)."""
        def bad(msg: str) -> None:
            raise RuntimeError(f"KV cache invariant broken: {msg}")

        owners = Counter(b for t in self._tables.values() for b in t)
        free, cached = set(self._free), set(self._cached)
        if len(free) != len(self._free) or free & cached:
            bad(f"a block is twice in the free list, or free and cached: {sorted(free & cached)}")
        for rid, table in self._tables.items():
            if len(set(table)) != len(table):
                bad(f"request {rid!r} holds a block twice: {table}")
            if len(table) != self.num_blocks_for(self._num_slots.get(rid, 0)):
                bad(f"request {rid!r} has {len(table)} blocks for {self._num_slots.get(rid)} slots")
        for b in range(self.num_blocks):
            rc, h = self._ref_count[b], self._block_hash[b]
            if rc != owners.get(b, 0):
                bad(f"block {b} has ref_count {rc} but {owners.get(b, 0)} owners")
            if (rc > 0) == (b in free or b in cached):
                bad(f"block {b} (ref_count {rc}) is owned and free/cached, or neither (leaked)")
            if (b in free and h is not None) or (b in cached and h is None):
                bad(f"block {b}: hash {h!r} does not match its list")
            if h is not None and self._hash_to_block.get(h) != b:
                bad(f"block {b}'s hash is not registered to it")
        if len(self._hash_to_block) != sum(h is not None for h in self._block_hash):
            bad("the hash index names blocks that do not carry the hash")

    def __repr__(self) -> str:
        return (f"KVCacheManager({self.num_blocks} blocks x {self.block_size} tokens, used={self.num_used_blocks}, "
                f"cached={self.num_cached_blocks}, prefix_caching={self.enable_prefix_caching})")

    def _repr_html_(self) -> str:
        return KVCacheInspector(self)._repr_html_()


