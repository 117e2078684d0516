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

`SamplingParams` is the per-request recipe (vLLM field names and semantics); the
`Sampler` holds no state, so one instance serves every batch.
"""

from __future__ import annotations

import html
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

__all__ = [
    "SamplingParams",
    "SamplingContext",
    "SamplerOutput",
    "Sampler",
    "prompt_logprobs",
    "find_stop",
]

MAX_LOGPROBS = 20
# NOTE: vLLM's _SAMPLING_EPS: below this a temperature is treated as 0 (greedy),
# since dividing logits by it would overflow float32 to inf and give NaN probs.
_GREEDY_TEMPERATURE = 1e-5


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit int


def _bad(name: str, allowed: str, value: Any, error: Any = None) -> ValueError:
    # NOTE: a ValueError for a wrong type too (the field's value is wrong either way), one format for all
    return ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _int(name: str, value: Any, allowed: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]: numpy ints accepted; bool, float, str refused."""
    if not _is_int(value):
        raise _bad(name, allowed, value, TypeError)
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, allowed, value)
    return value


def _real(name: str, value: Any, allowed: str, ok) -> float:
    """`value` as a finite float with ok(value): ints and numpy numbers accepted; bool, str refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise _bad(name, allowed, value, TypeError)
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise _bad(name, allowed, value)
    return value


def _int_list(name: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray, range)):
        raise _bad(name, "a list of int token ids >= 0", value, TypeError)
    if not all(_is_int(t) and 0 <= t <= MAX_SEED for t in value):
        raise _bad(name, "a list of int token ids >= 0", value)
    return tuple(int(t) for t in value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request (vLLM names and defaults)."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # top logprobs per generated token; 0 = sampled token only
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # NOTE: frozen, so normalisation goes through object.__setattr__. Every field is checked for
        # its type first (TypeError) and then its range (ValueError), both naming the field.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise _bad("stop", "None, a str or a list of non-empty str", self.stop,
                       ValueError if isinstance(stop, (list, tuple)) else TypeError)
        put("stop", tuple(stop))
        put("stop_token_ids", _int_list("stop_token_ids", () if self.stop_token_ids is None else self.stop_token_ids))
        put("max_tokens", _int("max_tokens", self.max_tokens, "an int >= 1", 1))
        put("min_tokens", _int("min_tokens", self.min_tokens, f"an int in [0, max_tokens={self.max_tokens}]",
                               0, self.max_tokens))
        put("temperature", _real("temperature", self.temperature, "a finite float >= 0 (0 = greedy)",
                                 lambda v: v >= 0))
        put("top_k", _int("top_k", self.top_k, "0 or -1 (off) or an int >= 1", -1))
        put("top_p", _real("top_p", self.top_p, "a float in (0, 1]", lambda v: 0.0 < v <= 1.0))
        put("min_p", _real("min_p", self.min_p, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0))
        put("repetition_penalty", _real("repetition_penalty", self.repetition_penalty,
                                        "a finite float > 0 (1 = off)", lambda v: v > 0))
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _real(name, getattr(self, name), "a float in [-2, 2]", lambda v: -2.0 <= v <= 2.0))
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _bad(name, "a bool", getattr(self, name), TypeError)
            put(name, bool(getattr(self, name)))
        if self.seed is not None:
            put("seed", _int("seed", self.seed, f"None or an int in [0, {MAX_SEED}]", 0, MAX_SEED))
        put("n", _int("n", self.n, "an int >= 1", 1))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                put(name, _int(name, getattr(self, name), f"None or an int in [0, {MAX_LOGPROBS}]", 0, MAX_LOGPROBS))

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids outside the vocabulary (checked at submit, when the vocabulary is known)."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise _bad("stop_token_ids", f"token ids in [0, {vocab_size}) (the vocabulary)", self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0 (below 1e-5) or top_k 1."""
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _repr_html_(self) -> str:
        changed = [(f.name, getattr(self, f.name)) for f in fields(self)
                   if getattr(self, f.name) != f.default]
        rows = "".join(f"<tr><td>{k}</td><td>{html.escape(repr(v))}</td></tr>" for k, v in changed)
        rows = rows or "<tr><td colspan='2'><i>all defaults</i></td></tr>"
        mode = "greedy" if self.is_greedy else "random"
        return (f"<table><caption>SamplingParams ({mode})</caption>"
                f"<tr><th>field</th><th>value</th></tr>{rows}</table>")


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
        temp = torch.tensor([p.temperature if p.temperature >= _GREEDY_TEMPERATURE else 1.0
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
    if not (_is_int(k) and 0 <= k <= MAX_LOGPROBS):
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
