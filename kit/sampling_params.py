"""`SamplingParams`: the per-request recipe for picking tokens (field names, defaults, validation).

Kept apart from the `Sampler` (kit/sampling.py), which applies it to a batch of
logits rows: this module is the public surface a caller fills in, that one is the
engine's batch pass.
"""

from __future__ import annotations

import html
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

__all__ = ["SamplingParams", "MAX_LOGPROBS", "MAX_SEED", "GREEDY_TEMPERATURE", "is_int"]

MAX_LOGPROBS = 20
# NOTE: vLLM's _SAMPLING_EPS: below this a temperature is treated as 0 (greedy),
# since dividing logits by it would overflow float32 to inf and give NaN probs.
GREEDY_TEMPERATURE = 1e-5


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit int


def _bad(name: str, allowed: str, value: Any, error: Any = None) -> ValueError:
    # NOTE: a ValueError for a wrong type too (the field's value is wrong either way), one format for all
    return ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _int(name: str, value: Any, allowed: str, lo: int, hi: int | None = None) -> int:
    """`value` as an int in [lo, hi]: numpy ints accepted; bool, float, str refused."""
    if not is_int(value):
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
    if not all(is_int(t) and 0 <= t <= MAX_SEED for t in value):
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
    # ---- beam search (TensorRT-LLM names; kit/beam_search.py runs it) ----
    use_beam_search: bool = False
    best_of: int | None = None  # beams (use_beam_search) of which the best n are returned; None: n
    length_penalty: float | None = None  # score = sum logprobs / generated_len ** length_penalty; None: 0.0
    early_stopping: bool | int | str | None = None  # True/1: stop once best_of hypotheses end; False/0:
    # stop when no running beam can still beat them (HF heuristic); "never": canonical; None: 1 (TensorRT-LLM)
    beam_search_diversity_rate: float | None = None  # None or 0 only (diverse beam search is not supported)

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
        self._check_beam_fields(put)

    def _check_beam_fields(self, put) -> None:
        """The beam-search fields (types and ranges; what beam search can combine with is checked at submit)."""
        if not isinstance(self.use_beam_search, (bool, np.bool_)):
            raise _bad("use_beam_search", "a bool", self.use_beam_search)
        put("use_beam_search", bool(self.use_beam_search))
        if self.best_of is not None:
            put("best_of", _int("best_of", self.best_of, f"None or an int >= n={self.n}", self.n))
            if self.best_of > self.n and not self.use_beam_search:
                raise _bad("best_of", f"None or n={self.n} without use_beam_search=True (the kit returns every "
                           "sample it draws; best_of > n is the beam width of a beam search)", self.best_of)
        if self.length_penalty is not None:
            put("length_penalty", _real("length_penalty", self.length_penalty, "None or a finite float",
                                        lambda v: True))
        es = self.early_stopping
        if not (es is None or isinstance(es, (bool, np.bool_)) or es == "never" or (is_int(es) and es in (0, 1))):
            raise _bad("early_stopping", "None, True/1, False/0 or 'never'", es)
        if es is not None and es != "never":
            put("early_stopping", bool(es))
        rate = self.beam_search_diversity_rate
        if rate is not None and (isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real)
                                 or float(rate) != 0.0):
            raise _bad("beam_search_diversity_rate", "None or 0.0 (diverse beam search is not supported)", rate)

    @property
    def beam_width(self) -> int:
        """Beams searched together: best_of (or n) with use_beam_search, else 1."""
        return (self.best_of or self.n) if self.use_beam_search else 1

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids outside the vocabulary (checked at submit, when the vocabulary is known)."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise _bad("stop_token_ids", f"token ids in [0, {vocab_size}) (the vocabulary)", self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0 (below 1e-5) or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

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
