"""Draft-target drafting: a smaller engine proposes the next tokens, with a paged KV cache of its own.

The draft model keeps its own `KVCacheManager` and `KVCache` (same block size as the
target's, as many blocks), and, per request, the tokens whose K/V it holds (`fed`). Each
step, for every speculating request with tokens t_0..t_{N-1}:

    keep   = common prefix of fed and the request's tokens (capped at N - 1)   drafts that the
             target rejected are not in the request's tokens: their slots are rolled back
    step 0 : compute t_keep .. t_{N-1} (catch up: the whole prompt the first time, else the
             tokens the target accepted) -> logits of position N-1 -> x_1
    step i : compute x_i -> x_{i+1}      (i = 1 .. k-1, one token each)

Every step is one batched forward over all speculating requests. A greedy request drafts
argmax; a random one draws x_i from q_i = its warped draft distribution (same
temperature / top-k / top-p / min-p as the target's) with the request's own generator, and
q_i is kept for the rejection rule. A request whose blocks cannot be allocated drafts what
it has so far (possibly nothing) and decodes plainly this step.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from kit.batch import ForwardBatch, SequenceInput
from kit.engine import Engine
from kit.kv_cache import KVCacheManager
from kit.request import Request
from kit.sampling import Sampler, SamplingContext

__all__ = ["DraftModelDrafter"]


class DraftModelDrafter:
    """Proposes drafts with `engine` (the draft model) over its own paged KV cache."""

    is_deterministic = False  # random requests draw their drafts: q is kept for the rejection rule

    def __init__(self, engine: Engine, max_draft_len: int) -> None:
        self.engine = engine
        self.max_draft_len = max_draft_len
        self.kv_cache_manager: KVCacheManager | None = None
        self.kv_cache = None
        self._seqs: dict[str, Request] = {}  # request id -> the draft's view: tokens fed, num computed

    def attach(self, num_blocks: int, block_size: int) -> None:
        """Allocate the draft's KV pool (the executor calls this with its own pool's geometry)."""
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, False)
        self.kv_cache = self.engine.allocate_kv_cache(num_blocks, block_size)
        self.engine.capture_cuda_graphs(self.kv_cache)  # one-token draft steps replay graphs (a no-op on the CPU)

    # ------------------------------------------------------------------ state
    def _sync(self, rid: str, tokens: list[int]) -> Request:
        """The draft's sequence for `rid`, rolled back to the prefix it shares with `tokens`."""
        kv = self.kv_cache_manager
        seq = self._seqs.get(rid)
        if seq is None:
            seq = self._seqs[rid] = Request(rid, [], 1)
        fed = seq.prompt_token_ids
        keep = min(seq.num_computed_tokens, len(tokens) - 1)
        for i in range(keep):  # NOTE: usually all equal; the first difference is a rejected draft
            if fed[i] != tokens[i]:
                keep = i
                break
        seq.prompt_token_ids = list(tokens)
        seq.num_computed_tokens = keep
        kv.rollback(seq, keep)
        return seq

    def release(self, request_ids: Iterable[str]) -> None:
        """Free the draft blocks of finished requests."""
        for rid in request_ids:
            if self._seqs.pop(rid, None) is not None:
                self.kv_cache_manager.free(rid)

    @property
    def request_ids(self) -> list[str]:
        return list(self._seqs)

    # --------------------------------------------------------------- drafting
    def propose(self, items: Sequence[tuple[str, list[int], int, SamplingContext]]
                ) -> dict[str, tuple[list[int], torch.Tensor | None]]:
        """items: (request id, its tokens, k, sampling context) -> {id: (drafts, q (len, V) or None)}.

        q is None for greedy requests (their drafts are argmaxes); rows of q are the draft's
        warped distributions the drafts were drawn from.
        """
        if self.kv_cache_manager is None:
            raise RuntimeError("DraftModelDrafter.attach(num_blocks, block_size) must run before propose")
        kv, bs = self.kv_cache_manager, self.kv_cache_manager.block_size
        active = []  # (rid, seq, k, ctx, tokens to compute now)
        for rid, tokens, k, ctx in items:
            seq = self._sync(rid, tokens)
            active.append((rid, seq, k, ctx, tokens[seq.num_computed_tokens:]))
        drafts: dict[str, list[int]] = {rid: [] for rid, *_ in items}
        qs: dict[str, list[torch.Tensor]] = {rid: [] for rid, *_ in items}
        while active:
            inputs, live = [], []
            for rid, seq, k, ctx, todo in active:
                if kv.allocate_slots(seq, len(todo)) is None:
                    continue  # the draft pool is full: this request drafts what it has
                inputs.append(SequenceInput(todo, seq.num_computed_tokens, kv.block_table(rid), "last"))
                live.append((rid, seq, k, ctx, todo))
            if not inputs:
                break
            batch = ForwardBatch.build(inputs, bs, device=self.engine.device)
            logits = self.engine.forward(batch, self.kv_cache).float()  # (len(live), V)
            tokens = logits.argmax(dim=-1)  # (len(live),)
            rand = [i for i, (*_, ctx, _) in enumerate(live) if not ctx.params.is_greedy]
            if rand:
                idx = torch.tensor(rand, device=logits.device)
                warped = Sampler.apply_warpers(logits[idx], [live[i][3].params for i in rand])
                q = warped.softmax(dim=-1)  # (len(rand), V)
                tokens[idx] = Sampler._draw(warped, [live[i][3].generator for i in rand])
                for j, i in enumerate(rand):
                    qs[live[i][0]].append(q[j])
            next_active = []
            for (rid, seq, k, ctx, todo), t in zip(live, tokens.tolist()):
                seq.num_computed_tokens += len(todo)
                seq.prompt_token_ids.append(t)
                drafts[rid].append(t)
                if len(drafts[rid]) < k:
                    next_active.append((rid, seq, k, ctx, [t]))
            active = next_active
        out = {}
        for rid, d in drafts.items():
            if d:
                out[rid] = (d, torch.stack(qs[rid]) if qs[rid] else None)
        return out

    def __repr__(self) -> str:
        return (f"DraftModelDrafter({self.engine.network.name!r}, max_draft_len={self.max_draft_len}, "
                f"{len(self._seqs)} sequences)")
