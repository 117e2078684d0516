"""Guided decoding: constrain generated text to a JSON schema, a regex or an EBNF grammar.

`GuidedDecodingParams` is what a request asks for (TensorRT-LLM's class: exactly one of
`json`, `regex`, `grammar`, `json_object`, `structural_tag`). `GuidedDecoder` does it with
xgrammar (LLM(guided_decoding_backend='xgrammar')): the guide is compiled once per distinct
guide against the tokenizer's vocabulary, each completion gets a `GrammarMatcher`, and in
every batch pass

    matchers ──fill──► bitmask (rows, ceil(vocab / 32)) int32, on the host
                         │ one copy to the logits' device
    logits (rows, vocab) ◄── apply_token_bitmask_inplace: disallowed tokens -> -inf

so the sampler only ever sees tokens that keep the text inside the guide; the sampled
token is then fed to the matcher (`accept`). The end token is allowed only where the
guide is complete, so a guided completion that stops on eos is a complete match.

xgrammar is an optional extra (`pip install kit[guided]`, installed by `make setup`);
it is imported when the first guided request arrives, never at import time.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["GuidedDecodingParams", "GuidedDecoder", "GUIDED_DECODING_BACKENDS"]

GUIDED_DECODING_BACKENDS = ("xgrammar",)


@dataclass(frozen=True, kw_only=True)
class GuidedDecodingParams:
    """One guide for a request: exactly one field set (TensorRT-LLM's names).

    - `json`: a JSON schema (a dict, its JSON text, or a pydantic model class);
    - `regex`: a regular expression the whole output matches;
    - `grammar`: an EBNF grammar (GBNF dialect, start symbol `root`);
    - `json_object`: any JSON object/value;
    - `structural_tag`: an xgrammar structural tag (JSON text).
    """

    json: Any = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        num_guides = sum(bool(getattr(self, f.name)) for f in fields(self))
        if num_guides != 1:
            set_ = [f.name for f in fields(self) if getattr(self, f.name)]
            raise ValueError(f"GuidedDecodingParams: exactly one of json, regex, grammar, json_object, structural_tag "
                             f"must be set, got {num_guides} ({', '.join(set_) or 'none'})")
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"GuidedDecodingParams.{name} must be a str, got {type(value).__name__}")
        if not isinstance(self.json_object, bool):
            raise TypeError(f"GuidedDecodingParams.json_object must be a bool, got {self.json_object!r}")

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self) if getattr(self, f.name))

    def key(self) -> tuple[str, str]:
        """A hashable identity of the guide (the compile cache's key)."""
        kind = self.kind
        value = self.json
        if kind == "json":
            if hasattr(value, "model_json_schema"):  # a pydantic model class
                value = value.model_json_schema()
            value = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            return kind, value
        return kind, str(getattr(self, kind))

    def _repr_html_(self) -> str:
        kind, text = self.key()
        return f"<b>GuidedDecodingParams</b> {kind}: <code>{html.escape(text[:200])}</code>"


class GuidedDecoder:
    """xgrammar over one tokenizer: compiled guides (cached), matchers, the device bitmask."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 backend: str = "xgrammar") -> None:
        if backend not in GUIDED_DECODING_BACKENDS:
            raise ValueError(f"guided_decoding_backend must be one of {GUIDED_DECODING_BACKENDS}, got {backend!r}")
        try:
            import xgrammar as xgr
        except ImportError:
            raise ImportError("guided decoding needs xgrammar: pip install 'kit[guided]' (make setup installs it)") \
                from None
        self.xgr = xgr
        self.vocab_size = vocab_size
        # NOTE: the model's vocabulary (the logits' width) may exceed the tokenizer's: pass it
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids) or None)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._compiled: dict[tuple[str, str], Any] = {}

    def compile(self, guide: GuidedDecodingParams) -> Any:
        """The compiled grammar of `guide` (ValueError naming the guide if xgrammar refuses it)."""
        key = guide.key()
        if key not in self._compiled:
            kind, text = key
            try:
                if kind == "json":
                    # NOTE: no free whitespace between tokens: a sampled model could otherwise fill
                    # its whole budget with spaces and never close the object
                    compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
                elif kind == "json_object":
                    compiled = self.compiler.compile_builtin_json_grammar()
                elif kind == "regex":
                    compiled = self.compiler.compile_regex(text)
                elif kind == "grammar":
                    compiled = self.compiler.compile_grammar(text)
                else:
                    compiled = self.compiler.compile_structural_tag(text)
            except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError for bad guides
                raise ValueError(f"GuidedDecodingParams.{kind} could not be compiled: {e}") from None
            self._compiled[key] = compiled
        return self._compiled[key]

    def matcher(self, guide: GuidedDecodingParams) -> Any:
        """A fresh matcher for one completion (at the start of its output)."""
        return self.xgr.GrammarMatcher(self.compile(guide))

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Mask, in place, the rows `rows` of `logits` (R, V) to the tokens their matchers allow."""
        if not rows:
            return
        bitmask = self.xgr.allocate_token_bitmask(len(rows), self.vocab_size)  # (len(rows), ceil(V/32)) int32
        for j, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, j)
        sub = logits[rows] if rows != list(range(logits.shape[0])) else logits  # (len(rows), V)
        sub = sub.contiguous()
        self.xgr.apply_token_bitmask_inplace(sub, bitmask.to(logits.device), vocab_size=self.vocab_size)
        if sub.data_ptr() != logits.data_ptr():
            logits[rows] = sub

    @staticmethod
    def accept(matcher: Any, token: int) -> bool:
        """Advance the matcher by the sampled token; False if the guide did not allow it."""
        if matcher.is_terminated():
            return True
        return bool(matcher.accept_token(int(token)))

    def __repr__(self) -> str:
        return f"GuidedDecoder(xgrammar, vocab={self.vocab_size}, {len(self._compiled)} compiled guides)"
