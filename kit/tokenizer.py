"""Text <-> token ids, the chat template, and incremental detokenization for streaming.

`Tokenizer` wraps a Hugging Face fast tokenizer (read from a model directory, or built
once from a GGUF file's vocabulary and saved beside the converted weights).

`IncrementalDetokenizer` turns a stream of token ids into a stream of text pieces whose
concatenation is exactly `decode(all_ids)`. A token may end in the middle of a UTF-8
character (byte-level BPE splits emoji and CJK across tokens): such a piece decodes to
U+FFFD, so the detokenizer holds it back until the next token completes the character.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Tokenizer", "IncrementalDetokenizer"]


class Tokenizer:
    """encode / decode / chat template over a Hugging Face tokenizer, called the way one calls it:
    `tok("text")` -> {"input_ids": [...], "attention_mask": [...]}, `encode`, `decode`, `batch_decode`,
    `pad_token_id`, `eos_token_id`, `apply_chat_template` (HF defaults: no generation prompt, token ids)."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer

    # ------------------------------------------------------------- construction
    @staticmethod
    def dir_has_tokenizer(path: str | Path) -> bool:
        return (Path(path) / "tokenizer.json").exists() or (Path(path) / "tokenizer.model").exists()

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        if not cls.dir_has_tokenizer(path):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        return cls(AutoTokenizer.from_pretrained(str(path)))

    @classmethod
    def from_gguf(cls, path: str | Path) -> "Tokenizer":
        """Build the tokenizer from a GGUF file's vocabulary, merges and chat template."""
        from transformers import AutoTokenizer

        path = Path(path)
        return cls(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))

    def save(self, path: str | Path) -> None:
        self.hf.save_pretrained(str(path))

    # ------------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int | None:
        """The pad token (the eos token where the model defines none, as TensorRT-LLM's SamplingParams does)."""
        return self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """The Hugging Face call: a BatchEncoding with `input_ids` and `attention_mask`."""
        return self.hf(text, add_special_tokens=add_special_tokens, **kwargs)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; TypeError for a non-str, ValueError for text that is not valid Unicode."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str to encode, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ('\ud800'): no tokenizer can take it
            raise ValueError(f"prompt {text[:40]!r} holds a lone surrogate {text[e.start]!r} at index {e.start}: "
                             "text must be valid Unicode (encodable as UTF-8)") from None
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(token_ids))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> str | list[int]:
        """Format a conversation with the model's chat template (token ids, or the text with tokenize=False).

        As in Hugging Face, the assistant's turn is opened only with add_generation_prompt=True."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        # NOTE: the template already holds the special tokens; encode it without adding more
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def detokenizer(self, prompt_token_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_token_ids, skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.hf).__name__}, vocab={self.vocab_size}, eos={self.eos_token_id})"

    def _repr_html_(self) -> str:
        example = "Hello, world! Héllo 日本"
        ids = self.encode(example, add_special_tokens=False)
        pieces = " ".join(f"<code>{html.escape(t)}</code>" for t in self.convert_ids_to_tokens(ids))
        return (f"<b>Tokenizer</b> {html.escape(type(self.hf).__name__)} &middot; vocab {self.vocab_size} &middot; "
                f"bos {self.bos_token_id} &middot; eos {self.eos_token_id}<br>"
                f"<i>{html.escape(example)}</i> &rarr; {len(ids)} tokens: {pieces}")


class IncrementalDetokenizer:
    """Text pieces for a growing list of token ids; their join equals the full decode.

    It keeps two offsets into the generated ids (as vLLM does): `prefix_offset` marks the
    tokens of left context that are decoded again with each new token (some tokenizers
    render a token differently at the start of a string), `read_offset` the first token
    whose text has not been emitted yet. Each step decodes a short window, not the whole
    sequence, so streaming stays linear in the output length.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly "")."""
        self.token_ids.append(int(token_id))
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text) or not new_text.startswith(prefix_text):
            # an unfinished UTF-8 sequence, or nothing visible yet: wait for more tokens
            return ""
        delta = new_text[len(prefix_text):]
        # the tokens just emitted become the left context of the next decode
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of a sequence: whatever the full decode has beyond what was emitted."""
        full = self._decode(self.token_ids)
        if full.startswith(self.text):
            delta = full[len(self.text):]
        else:  # NOTE: cannot happen for byte-level BPE; kept so the join stays exact regardless
            delta = ""
        self.text += delta
        self._read_offset = len(self.token_ids)
        return delta
