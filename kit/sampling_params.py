"""`SamplingParams`: the per-request recipe for picking tokens (field names, defaults, validation).

Kept apart from the `Sampler` (kit/sampling.py), which applies it to a batch of
logits rows: this module is the public surface a caller fills in, that one is the
engine's batch pass.
"""

from __future__ import annotations

import html
import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from kit.guided_decoding import GuidedDecodingParams

__all__ = ["SamplingParams", "GuidedDecodingParams", "LogitsProcessor", "BatchedLogitsProcessor", "MAX_LOGPROBS",
           "MAX_SEED", "GREEDY_TEMPERATURE", "is_int"]

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


class LogitsProcessor(ABC):
    """Subclass and implement `__call__` (or pass any callable with this signature) in
    `SamplingParams(logits_processor=...)`; modify `logits` in place (kit/logits_processors.py runs it)."""

    @abstractmethod
    def __call__(self, req_id: Any, logits: torch.Tensor, token_ids: list[list[int]], stream_ptr: int | None,
                 client_id: int | None) -> None:
        """logits: (1, beam_width, vocab); token_ids: per beam, prompt + generated so far."""


class BatchedLogitsProcessor(ABC):
    """Subclass and implement `__call__`; pass the instance as `LLM(batched_logits_processor=...)` and set
    `SamplingParams(apply_batched_logits_processor=True)` on the requests it applies to."""

    @abstractmethod
    def __call__(self, req_ids: list[Any], logits: list[torch.Tensor], token_ids: list[list[list[int]]],
                 stream_ptr: int | None, client_ids: list[int | None]) -> None:
        """One entry per request of the batch that opted in; modify each logits tensor in place."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request: TensorRT-LLM's names and defaults.

    With none of `temperature`, `top_k`, `top_p` set the request decodes greedily (as
    TensorRT-LLM does); setting any of them samples, the unset ones then mean "off"
    (temperature 1, top-k all, top-p 1). The stored values are the effective ones:
    `SamplingParams().temperature == 0.0`, `SamplingParams(top_p=0.9).temperature == 1.0`.
    """

    max_tokens: int = 32
    min_tokens: int = 0
    temperature: float | None = None  # None: greedy when top_k and top_p are unset too, else 1.0
    top_k: int | None = None  # None, 0 or -1 = off; 1 = greedy
    top_p: float | None = None  # None or 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # top logprobs per generated token (+ the sampled one); True = 1; 0 = sampled only
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    # ---- TensorRT-LLM's end/pad ids, output and tokenizer options
    end_id: int | None = None  # None: the model's eos; a request-level eos otherwise
    pad_id: int | None = None  # None: end_id (accepted for compatibility; nothing is padded)
    return_context_logits: bool = False  # RequestOutput.context_logits: (prompt_len, vocab)
    return_generation_logits: bool = False  # CompletionOutput.generation_logits: (num_tokens, vocab)
    exclude_input_from_output: bool = True  # False: token_ids (and text) start with the prompt
    detokenize: bool = True
    add_special_tokens: bool = True  # when a str prompt is encoded
    skip_special_tokens: bool = True
    # ---- logits hooks (kit/logits_processors.py) and guided decoding (kit/guided_decoding.py)
    logits_processor: Any = field(default=None, hash=False, compare=False)  # one callable or a list
    apply_batched_logits_processor: bool = False  # run LLM(batched_logits_processor=...) on this request
    guided_decoding: GuidedDecodingParams | None = field(default=None, hash=False, compare=False)
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
        min_tokens = 0 if self.min_tokens is None else self.min_tokens
        put("min_tokens", _int("min_tokens", min_tokens, f"an int in [0, max_tokens={self.max_tokens}]",
                               0, self.max_tokens))
        # TensorRT-LLM: temperature/top_k/top_p all unset -> greedy; any set -> the others are "off"
        all_unset = self.temperature is None and self.top_k is None and self.top_p is None
        put("temperature", 0.0 if all_unset else 1.0 if self.temperature is None else
            _real("temperature", self.temperature, "a finite float >= 0 (0 = greedy) or None", lambda v: v >= 0))
        put("top_k", 0 if self.top_k is None else _int("top_k", self.top_k, "None, 0 or -1 (off) or an int >= 1", -1))
        put("top_p", 1.0 if self.top_p is None else
            _real("top_p", self.top_p, "None or a float in (0, 1]", lambda v: 0.0 < v <= 1.0))
        put("min_p", _real("min_p", self.min_p, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0))
        put("repetition_penalty", _real("repetition_penalty", self.repetition_penalty,
                                        "a finite float > 0 (1 = off)", lambda v: v > 0))
        for name in ("presence_penalty", "frequency_penalty"):
            put(name, _real(name, getattr(self, name), "a float in [-2, 2]", lambda v: -2.0 <= v <= 2.0))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _bad(name, "a bool", getattr(self, name), TypeError)
            put(name, bool(getattr(self, name)))
        if self.seed is not None:
            put("seed", _int("seed", self.seed, f"None or an int in [0, {MAX_SEED}]", 0, MAX_SEED))
        put("n", _int("n", self.n, "an int >= 1", 1))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)):  # TensorRT-LLM: logprobs=True asks for the top-1
                value = 1 if value else None
            put(name, None if value is None else
                _int(name, value, f"None, a bool or an int in [0, {MAX_LOGPROBS}]", 0, MAX_LOGPROBS))
        for name in ("end_id", "pad_id"):
            if getattr(self, name) is not None:
                put(name, _int(name, getattr(self, name), "None or a token id >= 0", 0, MAX_SEED))
        if self.pad_id is None:
            put("pad_id", self.end_id)
        put("logits_processor", _processors(self.logits_processor))
        if self.guided_decoding is not None and not isinstance(self.guided_decoding, GuidedDecodingParams):
            raise _bad("guided_decoding", "None or a GuidedDecodingParams", self.guided_decoding, TypeError)
        if self.stop and not self.detokenize:
            raise _bad("stop", "empty when detokenize=False (stop strings are matched on the output text)",
                       self.stop)
        if self.n > 1 and self.is_greedy and not self.use_beam_search:
            # NOTE: TensorRT-LLM's LLM API refuses n > 1 under greedy decoding: n identical copies are useless
            raise _bad("n", "1 under greedy decoding (n identical copies); set temperature > 0 (or top_p / "
                       "top_k > 1) to sample n different completions", self.n)
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
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and value >= vocab_size:
                raise _bad(name, f"None or a token id in [0, {vocab_size}) (the vocabulary)", value)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: temperature 0 (below 1e-5) or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _repr_html_(self) -> str:
        defaults = SamplingParams()
        changed = [(f.name, getattr(self, f.name)) for f in fields(self)
                   if getattr(self, f.name) != getattr(defaults, f.name)]
        rows = "".join(f"<tr><td>{k}</td><td>{html.escape(repr(v))}</td></tr>" for k, v in changed)
        rows = rows or "<tr><td colspan='2'><i>all defaults</i></td></tr>"
        mode = "greedy" if self.is_greedy else "random"
        return (f"<table><caption>SamplingParams ({mode})</caption>"
                f"<tr><th>field</th><th>value</th></tr>{rows}</table>")


_BOOLS = ("ignore_eos", "include_stop_str_in_output", "return_context_logits", "return_generation_logits",
          "exclude_input_from_output", "detokenize", "add_special_tokens", "skip_special_tokens",
          "apply_batched_logits_processor")


def _processors(value: Any) -> tuple[Any, ...] | None:
    """None, one callable or a list of callables -> None or a tuple (applied in order)."""
    if value is None:
        return None
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items or not all(callable(p) for p in items):
        raise _bad("logits_processor", "None, a callable (req_id, logits, token_ids, stream_ptr, client_id) "
                   "or a list of them", value, TypeError)
    return items
