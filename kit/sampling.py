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
from typing import Any

import torch

from kit.sampling_params import GREEDY_TEMPERATURE, MAX_LOGPROBS, SamplingParams, is_int

__all__ = [
    "SamplingContext",
    "SamplerOutput",
    "Sampler",
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


@dataclass
class SamplerOutput:
    """One entry per logits row, in row order."""

    token_ids: list[int]
    logprobs: list[float]  # raw log_softmax of the model's logits at the sampled token
    top_logprobs: list[dict[int, float] | None]  # top params.logprobs + the sampled token


class Sampler:
    """Stateless: logits (num_rows, vocab) + one SamplingContext per row -> tokens."""

    @staticmethod
    def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
        """A generator seeded with params.seed on `device` (that of the logits), or None."""
        if params.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(params.seed)

    def sample(self, logits: torch.Tensor, contexts: list[SamplingContext],
               eos_token_ids: tuple[int, ...] = ()) -> SamplerOutput:
        """One token per row of `logits` (num_rows, vocab), row i under contexts[i]."""
        if logits.dim() != 2 or logits.shape[0] != len(contexts):
            raise ValueError(f"logits must be (num_rows={len(contexts)}, vocab), "
                             f"got {tuple(logits.shape)}")
        logits = logits.float()  # (R, V); a no-op (same tensor) when already float32
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # (R, V)
        logits = self.apply_penalties(logits, contexts, eos_token_ids)
        # NOTE: greedy rows need the argmax anyway, so compute it for every row at
        # once; an all-greedy batch stops here: one kernel, no per-row work.
        token_ids = logits.argmax(dim=-1)  # (R,); ties -> lowest id
        random_rows = [i for i, c in enumerate(contexts) if not c.params.is_greedy]
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            warped = self.apply_warpers(logits[idx], [contexts[i].params for i in random_rows])
            token_ids[idx] = self._draw(warped, [contexts[i].generator for i in random_rows])

        sampled_lp = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # (R,)
        # one device->host copy for both (token ids < 2**53 are exact in float64)
        tokens_f, lps = torch.stack((token_ids.double(), sampled_lp.double())).tolist()
        tokens = [int(t) for t in tokens_f]
        ks = [c.params.logprobs for c in contexts]
        max_k = max((k for k in ks if k is not None), default=0)
        top_lp, top_ids = [[]] * len(ks), [[]] * len(ks)
        if max_k:  # one topk for the whole batch, each row keeps its own k
            vals, ids = raw_logprobs.topk(max_k, dim=-1)  # (R, max_k) each
            top_lp, top_ids = vals.tolist(), ids.tolist()
        top: list[dict[int, float] | None] = [None] * len(ks)
        for i, k in enumerate(ks):
            if k is not None:
                top[i] = dict(zip(top_ids[i][:k], top_lp[i][:k]))
                top[i][tokens[i]] = lps[i]
        return SamplerOutput(token_ids=tokens, logprobs=lps, top_logprobs=top)

    @staticmethod
    def apply_penalties(logits: torch.Tensor, contexts: list[SamplingContext],
                        eos_token_ids: tuple[int, ...] = ()) -> torch.Tensor:
        """min_tokens, repetition, presence and frequency: what can change the argmax.

        Returns float32 (R, V); a copy when any row changes, else `logits` itself
        (never modified in place).
        """
        logits = logits.float()
        copied = False
        vocab = logits.shape[1]
        for i, ctx in enumerate(contexts):
            p, out = ctx.params, ctx.output_token_ids
            banned: list[int] = []
            if len(out) < p.min_tokens:
                # NOTE: ignore_eos spares eos only; stop_token_ids still end a sequence.
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            rep = p.repetition_penalty != 1.0
            pres_freq = bool(out) and (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0)
            if not (banned or rep or pres_freq):
                continue
            if not copied:
                logits, copied = logits.clone(), True
            row = logits[i]  # (V,) view into the copy
            dev = row.device
            if banned:
                row[torch.tensor(banned, device=dev)] = -math.inf
            if rep:
                # NOTE: vLLM/CTRL rule: dividing a negative logit would *raise* it, so
                # positive logits are divided and the others multiplied.
                seen = torch.tensor(ctx.prompt_token_ids + out, device=dev, dtype=torch.long).unique()
                vals = row[seen]
                r = p.repetition_penalty
                row[seen] = torch.where(vals > 0, vals / r, vals * r)
            if pres_freq:
                counts = torch.bincount(torch.tensor(out, device=dev), minlength=vocab)[:vocab]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    @staticmethod
    def apply_warpers(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """temperature, top_k, top_p, min_p for random rows; masked logits become -inf.

        Returns a new float32 (R, V); softmax of it is the distribution a row is
        drawn from. A temperature below 1e-5 counts as 1 here: `sample` sends only
        random rows, and greedy rows take the argmax before any warper.
        """
        vocab = logits.shape[1]
        dev = logits.device
        temp = torch.tensor([p.temperature if p.temperature >= GREEDY_TEMPERATURE else 1.0
                             for p in params], device=dev)
        logits = logits.float() / temp[:, None]  # (R, V)
        # top_k off (0/-1) or larger than the vocab -> keep all V.
        ks = [vocab if p.top_k <= 0 else min(p.top_k, vocab) for p in params]
        top_ps = [p.top_p for p in params]
        if any(k < vocab for k in ks) or any(tp < 1.0 for tp in top_ps):
            # Sort ascending once and mask in sorted order, as vLLM does.
            sorted_logits, order = logits.sort(dim=-1)  # (R, V) each
            k = torch.tensor(ks, device=dev)
            kth = sorted_logits.gather(1, (vocab - k)[:, None])  # (R, 1): k-th largest
            # NOTE: by value: ties with the k-th largest logit are all kept.
            sorted_logits.masked_fill_(sorted_logits < kth, -math.inf)
            # top_p: drop the smallest tokens while their total mass <= 1 - top_p;
            # what remains is the smallest set with mass >= top_p (the nucleus).
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (R, V)
            drop = cum <= 1.0 - torch.tensor(top_ps, device=dev)[:, None]
            drop[:, -1] = False  # the most likely token always stays
            sorted_logits.masked_fill_(drop, -math.inf)
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        min_ps = [p.min_p for p in params]
        if any(m > 0.0 for m in min_ps):
            probs = logits.softmax(dim=-1)  # (R, V)
            floor = torch.tensor(min_ps, device=dev)[:, None] * probs.amax(dim=-1, keepdim=True)
            logits = logits.masked_fill(probs < floor, -math.inf)
        return logits

    @staticmethod
    def _draw(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One token per row from softmax(logits), by the exponential race.

        argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, and needs
        no cumsum or host sync. Seeded rows fill their E from their own generator.
        """
        probs = logits.softmax(dim=-1)  # (R, V)
        q = torch.empty_like(probs)
        if any(g is None for g in generators):
            q.exponential_()  # unseeded rows share the default RNG
        for j, g in enumerate(generators):
            if g is not None:
                # NOTE: row j's noise depends only on its generator's state, so the
                # same seed gives the same draw whatever the batch holds.
                q[j].exponential_(generator=g)
        # NOTE: clamp so that an exact 0 draw cannot give 0/0 = NaN.
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)  # (R,)


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
