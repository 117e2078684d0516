"""N-gram (prompt lookup) drafting: propose what followed the sequence's last n tokens before.

The pool maps a key, an n-gram (n = 1 .. max_matching_ngram_size), to the continuations
that followed it, each up to `max_draft_len` tokens long:

    tokens  a b c d a b            key (a, b) -> [(c, d, a, b)]   (max_draft_len 4)
    ends with (a, b): draft c d a b

Each request's tokens (prompt, then generated) are indexed as they arrive; a continuation
that was cut short by the end of the sequence is extended as later tokens come. The
longest matching key wins; of several continuations, the oldest or the newest
(`is_use_oldest`); with `is_keep_all=False` a key keeps only its latest one. A public pool
is shared by all requests (what one request wrote, another can draft from), a private one
belongs to its request and is dropped with it. No model runs: drafting is a dict lookup.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from kit.speculative.configs import NGramDecodingConfig

__all__ = ["NGramDrafter"]

_PUBLIC = ""  # the pool id of the shared pool


class NGramDrafter:
    """Proposes drafts by n-gram lookup; one pool, or one per request (`is_public_pool=False`)."""

    is_deterministic = True  # drafts are not drawn from a distribution: q is one-hot

    def __init__(self, config: NGramDecodingConfig) -> None:
        self.config = config
        # pool id -> key -> {(request id, position where the continuation starts): continuation}
        self._pools: dict[str, dict[tuple[int, ...], dict[tuple[str, int], tuple[int, ...]]]] = {}
        self._indexed: dict[str, int] = {}  # request id -> tokens indexed so far

    def _pool(self, request_id: str) -> dict[tuple[int, ...], dict[tuple[str, int], tuple[int, ...]]]:
        return self._pools.setdefault(_PUBLIC if self.config.is_public_pool else request_id, {})

    def index(self, request_id: str, tokens: Sequence[int]) -> None:
        """Add the n-grams of `tokens` (the request's whole sequence so far) not indexed yet."""
        cfg, pool = self.config, self._pool(request_id)
        L, k = len(tokens), cfg.max_draft_len
        done = self._indexed.get(request_id, 0)
        # continuations starting at p >= done - k were cut by the old end: extend them too
        for p in range(max(1, done - k), L):
            value = tuple(tokens[p:p + k])
            for n in range(1, min(cfg.max_matching_ngram_size, p) + 1):
                entries = pool.setdefault(tuple(tokens[p - n:p]), {})
                where = (request_id, p)
                if not cfg.is_keep_all and where not in entries:
                    entries.clear()  # a key keeps only its latest continuation
                entries[where] = value
        self._indexed[request_id] = L

    def draft(self, request_id: str, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens for the sequence `tokens` (indexed first); [] when no n-gram matches."""
        self.index(request_id, tokens)
        pool, cfg = self._pool(request_id), self.config
        for n in range(min(cfg.max_matching_ngram_size, len(tokens) - 1), 0, -1):
            entries = pool.get(tuple(tokens[-n:]))
            if not entries:
                continue
            # NOTE: dicts keep insertion order, so the first entry is the oldest continuation
            ordered = iter(entries.values()) if cfg.is_use_oldest else reversed(entries.values())
            for value in ordered:
                if value:
                    return list(value[:k])
        return []

    def propose(self, items: Sequence[tuple[str, list[int], int, object]]) -> dict[str, tuple[list[int], None]]:
        """items: (request id, its tokens, draft length, sampling context) -> {id: (draft, None)}."""
        out = {}
        for rid, tokens, k, _ in items:
            d = self.draft(rid, tokens, k)
            if d:
                out[rid] = (d, None)
        return out

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget finished requests (their private pools; a public pool keeps what they wrote)."""
        for rid in request_ids:
            self._indexed.pop(rid, None)
            if not self.config.is_public_pool:
                self._pools.pop(rid, None)

    @property
    def request_ids(self) -> list[str]:
        return list(self._indexed)

    def __repr__(self) -> str:
        c = self.config
        return (f"NGramDrafter(max_draft_len={c.max_draft_len}, n<={c.max_matching_ngram_size}, "
                f"{'public' if c.is_public_pool else 'private'} pool, {sum(map(len, self._pools.values()))} keys)")
