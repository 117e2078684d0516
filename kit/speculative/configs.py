"""Speculative-decoding configs, with TensorRT-LLM's names: `LLM(model, speculative_config=...)`.

    DraftTargetDecodingConfig(max_draft_len=4, speculative_model_dir="smollm2-135m")   a smaller model drafts
    NGramDecodingConfig(max_draft_len=4, max_matching_ngram_size=2)                     prompt lookup drafts

Both are frozen and validate themselves. `max_concurrency` (TensorRT-LLM's
`DecodingBaseConfig.max_concurrency`) turns speculation off in a step where more requests
run than that. Kit extensions (not in TensorRT-LLM) are marked as such below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["DecodingBaseConfig", "DraftTargetDecodingConfig", "NGramDecodingConfig"]


def _positive_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class DecodingBaseConfig:
    """What every speculative method shares: how many tokens a drafter proposes per step."""

    max_draft_len: int = 4
    max_concurrency: int | None = None  # speculate only while at most this many requests run (None: always)
    decoding_type: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "max_draft_len", self.max_draft_len)
        if self.max_draft_len > 32:
            raise ValueError(f"{name}.max_draft_len must be <= 32 (tokens verified in one target forward), "
                             f"got {self.max_draft_len}")
        if self.max_concurrency is not None:
            _positive_int(name, "max_concurrency", self.max_concurrency)


@dataclass(frozen=True)
class DraftTargetDecodingConfig(DecodingBaseConfig):
    """A smaller model drafts `max_draft_len` tokens, the target verifies them in one forward.

    `speculative_model_dir`: what `LLM(model)` takes (a registered name such as
    "smollm2-135m", a GGUF file, a Hugging Face or kit engine directory) or, a kit
    extension, an `Engine` / `LoadedModel` already in memory. It must share the target's
    vocabulary. `speculative_model_quantization` (kit extension): a quantization preset name
    ("int4_wo", "int8_wo", ...) or a QuantConfig applied when the draft is built (through the
    build cache, like `LLM(..., quantization=...)`).
    """

    speculative_model_dir: Any = None
    speculative_model_quantization: Any = None
    decoding_type: ClassVar[str] = "DraftTarget"

    def __post_init__(self) -> None:
        super().__post_init__()
        m = self.speculative_model_dir
        if m is None:
            raise ValueError("DraftTargetDecodingConfig.speculative_model_dir is required: the draft model (a name, "
                             "a path, an Engine or a LoadedModel)")
        if isinstance(m, (str, os.PathLike)):
            if not str(m):
                raise ValueError("DraftTargetDecodingConfig.speculative_model_dir must not be empty")
        elif not (hasattr(m, "forward") and hasattr(m, "allocate_kv_cache")) and not hasattr(m, "weights"):
            raise ValueError(f"DraftTargetDecodingConfig.speculative_model_dir must be a name, a path, an Engine or a "
                             f"LoadedModel, got {type(m).__name__}")


@dataclass(frozen=True)
class NGramDecodingConfig(DecodingBaseConfig):
    """Prompt lookup: the drafts are what followed the last n tokens where they occurred before.

    A pool maps every n-gram (n = 1 .. `max_matching_ngram_size`) of the prompt and of the
    generated text to the `max_draft_len` tokens that followed it. Each step the longest
    n-gram that ends the sequence and is in the pool gives the draft.

    - `is_keep_all`: keep every continuation seen after an n-gram (False: only the latest one);
    - `is_use_oldest`: of several continuations, draft the oldest one (False: the newest);
    - `is_public_pool`: one pool shared by all requests (False: one pool per request).

    NOTE: with a public pool a request's drafts depend on what other requests wrote. Greedy output
    never changes, and sampling keeps the target's distribution, but a *seeded* sampled request
    repeats its tokens exactly only with a private pool (`is_public_pool=False`).
    """

    max_matching_ngram_size: int = 2
    is_keep_all: bool = True
    is_use_oldest: bool = True
    is_public_pool: bool = True
    decoding_type: ClassVar[str] = "NGram"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("NGramDecodingConfig", "max_matching_ngram_size", self.max_matching_ngram_size)
        for name in ("is_keep_all", "is_use_oldest", "is_public_pool"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NGramDecodingConfig.{name} must be a bool, got {getattr(self, name)!r}")
