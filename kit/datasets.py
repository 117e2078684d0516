"""Small public-domain texts for calibration and perplexity, and perplexity windows.

The texts are committed under `data/` at the repository root (next to `kit/`); see
`data/README.md` for their provenance and `data/make_data.py` to regenerate them.

| file              | size    | content                                                        |
| ----------------- | ------- | -------------------------------------------------------------- |
| `calibration.txt` | ~200 KB | State of the Union 1801-1964 and Pride and Prejudice ch. 1-11, interleaved |
| `eval.txt`        | ~100 KB | State of the Union 1973 and 2003, Persuasion ch. 1-3, KJV Ruth and Jonah |

Both are plain UTF-8, one paragraph per block, blocks separated by one blank line;
no paragraph of `eval.txt` occurs in `calibration.txt`.

- `calibration_texts(n, min_chars)`: calibration paragraphs (e.g. for quantization).
- `eval_text()`: the held-out text as one string, to tokenize once for perplexity.
- `chunk_tokens(ids, length, stride)`: fixed-length windows over a token sequence.

The files are not part of an installed wheel: the functions read them from the
source tree, and raise `FileNotFoundError` naming the path when they are missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["DATA_DIR", "CALIBRATION_FILE", "EVAL_FILE", "calibration_texts", "eval_text", "chunk_tokens"]

DATA_DIR: Path = Path(__file__).resolve().parent.parent / "data"
CALIBRATION_FILE = "calibration.txt"
EVAL_FILE = "eval.txt"


def _read(name: str) -> str:
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: kit.datasets reads data/{name} from the repository "
            f"(the 'data' folder next to the 'kit' package); regenerate it with data/make_data.py"
        )
    return path.read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def calibration_texts(n: int | None = None, min_chars: int = 200) -> list[str]:
    """The first `n` paragraphs of `data/calibration.txt` with at least `min_chars`
    characters (all of them when `n` is None), in file order.

    The file interleaves State of the Union and Jane Austen paragraphs evenly, so any
    prefix is a mix of both. Raises ValueError if fewer than `n` paragraphs qualify.
    """
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    texts = [p for p in _paragraphs(_read(CALIBRATION_FILE)) if len(p) >= min_chars]
    if n is None:
        return texts
    if n > len(texts):
        raise ValueError(
            f"only {len(texts)} calibration paragraphs have >= {min_chars} characters, asked for {n} "
            f"(lower min_chars, or join texts into longer samples)"
        )
    return texts[:n]


def eval_text() -> str:
    """The whole of `data/eval.txt` (paragraphs separated by blank lines, ending in
    one newline), to be tokenized once and cut with `chunk_tokens`."""
    return _read(EVAL_FILE)


def chunk_tokens(token_ids: Sequence[int], length: int, stride: int | None = None) -> list[list[int]]:
    """Windows of exactly `length` tokens, starting at 0, stride, 2*stride, ...

    `stride` defaults to `length` (non-overlapping windows) and must lie in
    1..length. Only full windows are returned: the tail that does not fill one is
    dropped (fewer than `stride` tokens), and a sequence shorter than `length` gives
    no window.

    For sliding-window perplexity with `stride < length`, score every token of the
    first window and only the last `stride` tokens of each later one: then each
    token covered is scored exactly once, with at least `length - stride` tokens of
    context (except in the first window).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if stride is None:
        stride = length
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= length:
        raise ValueError(f"stride must be an int in 1..length ({length}), got {stride!r}")
    ids = [int(t) for t in token_ids]
    return [ids[start : start + length] for start in range(0, len(ids) - length + 1, stride)]
