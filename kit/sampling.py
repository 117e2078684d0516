"""Sampling: how one row of logits becomes the next token.

The engine hands back one row of logits per sequence that needs a token; the
`Sampler` turns each row into a token id, in the order vLLM uses:

    raw logits ──► min_tokens mask ──► repetition penalty ──► presence/frequency
                   (stop ids = -inf)   (prompt + output)      (output only)
                                                                     │
          greedy rows: argmax ◄──────────────────────────────────────┤
          random rows: temperature ─► top_k ─► top_p ─► min_p ─► draw

- *Penalties* (`apply_penalties`) change which token is best, so they apply to
  greedy rows too. *Warpers* (`apply_warpers`: temperature, top-k, top-p, min-p)
  only reshape the distribution a random row is drawn from.
- *Seeds*: a row whose `SamplingParams.seed` is set draws from its own
  `torch.Generator`, so "a seeded request gives the same tokens whatever else is
  in the batch".
- *Logprobs* are "raw": `log_softmax` of the model's logits before any penalty or
  warper (vLLM's default), so they measure the model, not the sampling recipe.
- *Stop strings* are matched on detokenized text by `find_stop`, which also sees
  a stop string split across two tokens.

`SamplingParams` (kit/sampling_params.py) is the per-request recipe; the
`Sampler` holds no state, so one instance serves every batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kit.kernels.greedy import greedy_pick
from kit.sampled_batch import SampledBatch, SamplerOutput, to_device
from kit.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, SamplingParams, is_int

__all__ = [
    "SamplingContext",
    "SampledBatch",
    "SamplerOutput",
    "Sampler",
    "to_device",
    "prompt_logprobs",
    "find_stop",
]


@dataclass
class SamplingContext:
    """One sequence's view for the sampler. Owned and mutated only by the caller."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far
    generator: torch.Generator | None = None  # Sampler.make_generator(params, device)


class Sampler:
    """Stateless: logits (num_rows, vocab) + one SamplingContext per row -> tokens.

    The whole batch is one pass of batched tensor ops with per-row parameter tensors;
    there is no per-row loop over the vocabulary. Top-k and top-p use `torch.topk` over
    `k_max` candidates instead of sorting the vocabulary: k_max is the largest top_k of
    the batch, and a row with top_p < 1 but no top_k looks at the `top_p_candidates`
    most likely tokens (its nucleus is cut there if it would be larger: past the first
    1024 tokens of a real model's distribution lies a negligible mass). The draw itself
    runs over the whole vocabulary (see `_draw`), so a seeded row's noise is the same
    whatever the batch holds.
    """

    top_p_candidates: int = 1024

    @staticmethod
    def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
        """A generator seeded with params.seed on `device` (that of the logits), or None."""
        if params.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(params.seed)

    def sample(self, logits: torch.Tensor, contexts: list[SamplingContext],
               eos_token_ids: tuple[int, ...] = ()) -> SamplerOutput:
        """One token per row of `logits` (num_rows, vocab), row i under contexts[i]."""
        return self.sample_async(logits, contexts, eos_token_ids).result()

    def sample_async(self, logits: torch.Tensor, contexts: list[SamplingContext],
                     eos_token_ids: tuple[int, ...] = ()) -> SampledBatch:
        """`sample` without waiting: the result stays on the device until `SampledBatch.result()`."""
        if logits.dim() != 2 or logits.shape[0] != len(contexts):
            raise ValueError(f"logits must be (num_rows={len(contexts)}, vocab), "
                             f"got {tuple(logits.shape)}")
        # NOTE: the rows' distinct params (many requests share one object): what the batch needs is read
        # per distinct params, so a batch of plain rows costs no per-row Python beyond this line
        distinct = list({id(c.params): c.params for c in contexts}.values())
        if logits.stride(-1) == 1 and all(p.is_greedy and p.logprobs is None and not _penalizes(p) for p in distinct):
            # NOTE: the common serving batch (greedy, no penalty, no top logprobs): one kernel on a GPU
            # (kit/kernels/greedy.py) instead of a float32 copy, log_softmax, argmax, a gather and the packing
            token_ids, packed = greedy_pick(logits)
            return SampledBatch(token_ids, packed, [None] * len(contexts))
        logits = logits.float()  # (R, V); a no-op (same tensor) when already float32
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # (R, V)
        if any(_penalizes(p) for p in distinct):
            logits = self.apply_penalties(logits, contexts, eos_token_ids)
        # NOTE: greedy rows need the argmax anyway, so compute it for every row at
        # once; an all-greedy batch stops here: one kernel, no per-row work.
        token_ids = logits.argmax(dim=-1)  # (R,); ties -> lowest id
        random_rows = [] if all(p.is_greedy for p in distinct) else [
            i for i, c in enumerate(contexts) if not c.params.is_greedy]
        if len(random_rows) == len(contexts):
            token_ids = self._sample_random(logits, contexts)
        elif random_rows:
            idx = to_device(random_rows, logits.device)
            token_ids[idx] = self._sample_random(logits[idx], [contexts[i] for i in random_rows])
        sampled_lp = raw_logprobs.gather(1, token_ids[:, None])  # (R, 1)
        if all(p.logprobs is None for p in distinct):
            ks: list[int | None] = [None] * len(contexts)
            max_k = 0
        else:
            ks = [c.params.logprobs for c in contexts]
            max_k = max((k for k in ks if k is not None), default=0)
        cols = [token_ids[:, None].double(), sampled_lp.double()]
        if max_k:  # one topk for the whole batch, each row keeps its own k
            vals, ids = raw_logprobs.topk(max_k, dim=-1)  # (R, max_k) each
            cols += [vals.double(), ids.double()]
        return SampledBatch(token_ids, torch.cat(cols, dim=1), ks)

    @staticmethod
    def apply_penalties(logits: torch.Tensor, contexts: list[SamplingContext],
                        eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """min_tokens, repetition, presence and frequency: what can change the argmax.

        Returns float32 (R, V); a copy when any row changes, else `logits` itself (never
        modified in place). Each penalty is one batched op over the rows that use it: the
        token ids of those rows are gathered into one (row, token) index list, scattered
        into a (rows, V) seen-mask or count tensor, and applied with per-row parameter tensors.
        """
        logits = logits.float()
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        rep: list[int] = []
        pres_freq: list[int] = []
        for i, ctx in enumerate(contexts):
            p, out = ctx.params, ctx.output_token_ids
            if len(out) < p.min_tokens:
                # NOTE: ignore_eos spares eos only; stop_token_ids still end a sequence.
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
                ban_rows += [i] * len(banned)
                ban_ids += banned
            if p.repetition_penalty != 1.0:
                rep.append(i)
            if out and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0):
                pres_freq.append(i)
        if not (ban_ids or rep or pres_freq):
            return logits
        logits = logits.clone()
        dev, vocab = logits.device, logits.shape[1]
        if ban_ids:
            ban = to_device([ban_rows, ban_ids], dev)
            logits[ban[0], ban[1]] = -math.inf
        if rep:
            # NOTE: vLLM/CTRL rule: dividing a negative logit would *raise* it, so
            # positive logits are divided and the others multiplied.
            seen = _scatter_rows([contexts[i].prompt_token_ids + contexts[i].output_token_ids for i in rep],
                                 vocab, dev, torch.bool)  # (len(rep), V)
            idx = to_device(rep, dev)
            r = to_device([contexts[i].params.repetition_penalty for i in rep], dev, torch.float32)[:, None]
            sub = logits[idx]  # (len(rep), V)
            logits[idx] = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
        if pres_freq:
            counts = _scatter_rows([contexts[i].output_token_ids for i in pres_freq], vocab, dev,
                                   torch.float32)  # (len(pres_freq), V)
            idx = to_device(pres_freq, dev)
            pf = to_device([(contexts[i].params.frequency_penalty, contexts[i].params.presence_penalty)
                            for i in pres_freq], dev, torch.float32)  # (len(pres_freq), 2)
            logits[idx] -= pf[:, :1] * counts + pf[:, 1:] * (counts > 0)
        return logits

    @classmethod
    def apply_warpers(cls, logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """temperature, top_k, top_p, min_p for random rows; masked logits become -inf.

        Returns a new float32 (R, V); softmax of it is the distribution a row is
        drawn from. A temperature below 1e-5 counts as 1 here: `sample` sends only
        random rows, and greedy rows take the argmax before any warper.
        """
        x, per_row, ks, trunc, min_p = cls._temper(logits, params)
        if trunc:
            vals, ids, _ = cls._top_k_top_p(x, trunc, ks, per_row)
            rows = to_device(trunc, x.device)
            x[rows] = torch.full_like(x[rows], -math.inf).scatter_(1, ids, vals)
        return cls._min_p(x, per_row, min_p)

    def _sample_random(self, logits: torch.Tensor, contexts: list[SamplingContext]) -> torch.Tensor:
        """Tokens (R,) for random rows: rows cut by top-k/top-p draw among their candidates, the others
        from the whole vocabulary."""
        x, per_row, ks, trunc, min_p = self._temper(logits, [c.params for c in contexts])
        if not trunc:
            return self._draw(self._min_p(x, per_row, min_p), [c.generator for c in contexts])
        dev = x.device
        every = len(trunc) == x.shape[0]
        idx = None if every else to_device(trunc, dev)
        seeded = any(contexts[i].generator is not None for i in trunc)
        vals, ids, widths = self._top_k_top_p(x, trunc, ks, per_row, canonical=seeded)
        sub = per_row if every else per_row[idx]
        pos = self._draw(self._min_p(vals, sub, min_p), [contexts[i].generator for i in trunc], widths)  # (r,)
        picked = ids.gather(1, pos[:, None]).squeeze(1)
        if every:
            return picked
        tokens = torch.empty(x.shape[0], dtype=torch.long, device=dev)
        tokens[idx] = picked
        cut = set(trunc)
        full = [i for i in range(x.shape[0]) if i not in cut]
        if full:
            idx = to_device(full, dev)
            tokens[idx] = self._draw(self._min_p(x[idx], per_row[idx], min_p), [contexts[i].generator for i in full])
        return tokens

    @staticmethod
    def _temper(logits: torch.Tensor, params: list[SamplingParams]):
        """(logits / temperature, per-row (R, 4) temperature/top_k/top_p/min_p, top_k per row, rows to cut,
        any min_p)."""
        vocab = logits.shape[1]
        # one host->device copy for every per-row parameter
        table = [(p.temperature if p.temperature >= GREEDY_TEMPERATURE else 1.0,
                  vocab if p.top_k <= 0 else min(p.top_k, vocab), p.top_p, p.min_p) for p in params]
        per_row = to_device(table, logits.device, torch.float64).float()  # (R, 4)
        ks = [int(t[1]) for t in table]
        trunc = [i for i, t in enumerate(table) if t[1] < vocab or t[2] < 1.0]
        # NOTE: whether any row uses min_p is known on the host: skipping it needs no device read
        return logits.float() / per_row[:, :1], per_row, ks, trunc, any(t[3] > 0.0 for t in table)

    @staticmethod
    def _min_p(x: torch.Tensor, per_row: torch.Tensor, used: bool) -> torch.Tensor:
        """Mask tokens less likely than min_p times the row's most likely one (any row width)."""
        if not used:
            return x
        probs = x.softmax(dim=-1)
        floor = per_row[:, 3:4] * probs.amax(dim=-1, keepdim=True)
        return x.masked_fill(probs < floor, -math.inf)

    @classmethod
    def _top_k_top_p(cls, logits: torch.Tensor, rows: list[int], ks: list[int], per_row: torch.Tensor,
                     canonical: bool = True):
        """Candidates of `rows`: (values (r, k_max), masked ones -inf; token ids; each row's own width).

        top_k first (one torch.topk over k_max, no vocabulary sort), then the nucleus within it.
        A row keeps exactly its own width (top_k, or `top_p_candidates`); with `canonical`
        (a seeded row is among them) of tied logits (common in bf16) the lowest ids, so that a
        seeded row's candidates, in order, never depend on the batch.
        """
        vocab, dev = logits.shape[1], logits.device
        cap = min(vocab, cls.top_p_candidates)
        widths = [ks[i] if ks[i] < vocab else cap for i in rows]  # what the row alone looks at
        k_max = max(widths)
        every = len(rows) == logits.shape[0]
        idx = None if every else to_device(rows, dev)
        sub = logits if every else logits[idx]  # (r, V)
        params = per_row if every else per_row[idx]  # (r, 4)
        if canonical:
            ids = _sort_key(sub).topk(k_max, dim=-1).indices  # (r, k_max): descending, ties by lowest id
            vals = sub.gather(1, ids)  # (r, k_max)
        else:  # no seeded row: which of tied logits comes first may vary, and no one can tell
            vals, ids = sub.topk(k_max, dim=-1)
        # (2, r): each row's width, and whether it has a top_k at all
        info = to_device([widths, [int(ks[i] < vocab) for i in rows]], dev)
        vals = vals.masked_fill(torch.arange(k_max, device=dev)[None, :] >= info[0][:, None], -math.inf)
        # top_p over the survivors: a row with top_k normalises over its k, one without over the vocabulary
        lse = torch.where(info[1, :, None].bool(), vals.logsumexp(-1, keepdim=True),
                          sub.logsumexp(-1, keepdim=True))  # (r, 1)
        probs = (vals - lse).exp()  # (r, k_max), descending
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        # the smallest set with mass >= top_p: keep a token while the mass before it is < top_p
        drop = (before >= params[:, 2:3]) & (params[:, 2:3] < 1.0)
        drop[:, 0] = False  # the most likely token always stays
        return vals.masked_fill(drop, -math.inf), ids, widths

    @staticmethod
    def _draw(logits: torch.Tensor, generators: list[torch.Generator | None],
              widths: list[int] | None = None) -> torch.Tensor:
        """One position per row from softmax(logits), by the exponential race.

        argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, and needs
        no cumsum or host sync. Unseeded rows share one draw from the default RNG;
        seeded rows are grouped after it, each filling its E from its own generator
        (one small launch per seeded row: a generator cannot be batched). A seeded row
        draws exactly `widths[j]` values (its own candidate count, or the vocabulary), so
        its noise, like its tokens, does not depend on what else the batch holds.
        """
        probs = logits.softmax(dim=-1)  # (R, W)
        q = torch.empty_like(probs)
        if any(g is None for g in generators):
            q.exponential_()  # unseeded rows share the default RNG
        for j, g in enumerate(generators):
            if g is not None:
                # NOTE: row j's noise depends only on its generator's state, so the
                # same seed gives the same draw whatever the batch holds.
                w = q.shape[1] if widths is None else widths[j]
                q[j, :w].exponential_(generator=g)
                q[j, w:] = 1.0  # beyond the row's own candidates: probability 0 anyway
        # NOTE: clamp so that an exact 0 draw cannot give 0/0 = NaN.
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # (R,)


def _penalizes(p: SamplingParams) -> bool:
    """True if `Sampler.apply_penalties` may change rows sampled under `p` (min_tokens masks stop ids and eos)."""
    return p.min_tokens > 0 or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _sort_key(x: torch.Tensor) -> torch.Tensor:
    """(R, V) int64 keys that order float32 `x` by value, then by lowest id: topk of them is canonical.

    The float's bits, made monotonic (negative floats flip their magnitude bits), go in the high
    32 bits, V - 1 - id in the low ones.
    """
    bits = x.float().contiguous().view(torch.int32).long()  # (R, V)
    mono = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    low = (x.shape[1] - 1 - torch.arange(x.shape[1], device=x.device))[None, :]
    return (mono << 32) | low


def _scatter_rows(rows: list[list[int]], vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(len(rows), vocab): per row, how often each token id occurs (bool: whether it occurs)."""
    row_idx = [r for r, ids in enumerate(rows) for _ in ids]
    tok_idx = [t for ids in rows for t in ids]
    out = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    if tok_idx:
        index = to_device([row_idx, tok_idx], device)
        out.index_put_((index[0], index[1]), torch.ones(len(tok_idx), device=device), accumulate=True)
    return out > 0 if dtype == torch.bool else out


def prompt_logprobs(logits: torch.Tensor, prompt_token_ids: list[int],
                    k: int) -> list[dict[int, float] | None]:
    """Per prompt position: the logprob of that prompt token and the top-k (raw).

    `logits` is (P - 1, V): row j is the model's output at prompt position j,
    predicting token j + 1. The result has P entries; entry 0 is None (nothing
    predicts the first token, vLLM's convention); entry j >= 1 maps the actual
    token prompt_token_ids[j] and the k most likely ids to their logprobs.
    """
    num_prompt = len(prompt_token_ids)
    if logits.dim() != 2 or logits.shape[0] != max(num_prompt - 1, 0):
        raise ValueError(f"logits must be (len(prompt_token_ids) - 1 = {num_prompt - 1}, vocab); "
                         f"drop the last position's row; got {tuple(logits.shape)}")
    if num_prompt == 0:
        return []
    if not (is_int(k) and 0 <= k <= MAX_LOGPROBS):
        raise ValueError(f"k must be an int in [0, {MAX_LOGPROBS}], got {k!r}")
    lp = torch.log_softmax(logits.float(), dim=-1)  # (P-1, V)
    targets = torch.tensor(prompt_token_ids[1:], device=lp.device, dtype=torch.long)
    actual = lp.gather(1, targets[:, None]).squeeze(1).tolist()  # (P-1,)
    vals, ids = lp.topk(k, dim=-1)  # (P-1, k) each; k = 0 gives empty rows
    result: list[dict[int, float] | None] = [None]
    for j, (row_ids, row_vals) in enumerate(zip(ids.tolist(), vals.tolist())):
        d = dict(zip(row_ids, row_vals))
        d[prompt_token_ids[j + 1]] = actual[j]
        result.append(d)
    return result


def find_stop(text: str, new_text_start: int, stop: tuple[str, ...], include: bool) -> int | None:
    """Where to cut `text` because a stop string appeared in it, or None.

    `text` is the whole output text so far and `text[new_text_start:]` the piece the
    newest token added. Only occurrences that *end* inside the new piece count
    (older ones were seen by earlier calls), but they may *start* before it: a stop
    string split over two tokens ("wor" + "ld") is found because each string s is
    searched from new_text_start - len(s) + 1. When several occur, the one that
    ends first wins (as if text arrived one character at a time; on a tie, the one
    starting first). The caller keeps `text[:cut]`: cut is the stop string's start,
    or its end when `include` (include_stop_str_in_output).

    NOTE: a streaming caller that excludes stop strings should also hold back a
    tail of text that could still grow into one; that is not done here.
    """
    best: tuple[int, int] | None = None  # (end, start)
    for s in stop:
        start = text.find(s, max(0, new_text_start - len(s) + 1))
        if start != -1 and (best is None or (start + len(s), start) < best):
            best = (start + len(s), start)
    if best is None:
        return None
    return best[0] if include else best[1]
