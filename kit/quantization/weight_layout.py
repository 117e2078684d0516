"""Run-time layouts of quantized weights: what the weight-streaming kernels read.

The stored (checkpoint) format stays as `int4.py` / `int8_weight_only.py` / `fp8.py`
define it; a quantized linear built for a CUDA fast path rearranges its tensors once,
in its constructor, into the layout its kernels stream best:

* **int4 codes as int32 words.** Stored: uint8 (out, in/2), byte j of a row holding
  columns 2j (low nibble) and 2j + 1 (high nibble). Viewed four bytes at a time (little
  endian), word i of a row holds columns 8i .. 8i + 7, column 8i + b in bits 4b .. 4b + 3:

      bytes  [c1|c0] [c3|c2] [c5|c4] [c7|c6]   ->   word i = c7 c6 c5 c4 c3 c2 c1 c0 (nibbles, high to low)

  The same bytes, no copy: a kernel loads a group's G / 8 words of a row as 16-byte
  vectors, repeats each word 8 times in registers and takes nibble c % 8 for column c,
  so the codes come out in column order against a contiguous slice of x (one shift and
  one mask a weight, one `tl.dot` a group).
* **Group scales and zero points transposed**: (out, in / group) -> (in / group, out),
  so that one group's scales of a tile of output rows are one contiguous load.

`int4_bytes` inverts the code layout (the reference path and tests read the stored
layout back).
"""

from __future__ import annotations

import torch

__all__ = ["int4_words", "int4_bytes", "transpose_groups"]


def int4_words(packed: torch.Tensor) -> torch.Tensor:
    """Stored uint8 (out, in/2) -> int32 (out, in/8): the same bytes, four at a time."""
    if packed.dtype is not torch.uint8 or packed.dim() != 2:
        raise ValueError(f"int4 layout: packed codes must be uint8 (out, in/2), got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    if packed.shape[1] % 4:
        raise ValueError(f"int4 layout: in_features {2 * packed.shape[1]} is not a multiple of 8")
    return packed.contiguous().view(torch.int32)


def int4_bytes(words: torch.Tensor) -> torch.Tensor:
    """The int32 words -> the stored uint8 layout (inverse of `int4_words`)."""
    if words.dtype is not torch.int32:
        raise ValueError(f"int4 layout: words must be int32, got {words.dtype}")
    return words.contiguous().view(torch.uint8)


def transpose_groups(t: torch.Tensor | None) -> torch.Tensor | None:
    """(out, groups) scales or zero points -> (groups, out), contiguous."""
    return None if t is None else t.t().contiguous()
