"""Run-time layouts of quantized weights: what the weight-streaming kernels read.

The stored (checkpoint) format stays as `int4.py` / `int8_weight_only.py` / `fp8.py`
define it; a quantized linear built for a CUDA fast path rearranges its tensors once,
in its constructor, into the layout its kernel streams best:

* **int4 codes, half-split nibbles.** Stored: byte j of a row holds columns 2j (low
  nibble) and 2j + 1 (high nibble). Run time: inside every group of `group_size`
  columns, byte j holds column j (low) and column j + group_size / 2 (high):

      stored    [c0|c1] [c2|c3] ... [c126|c127]          (one group of 128)
      run time  [c0|c64] [c1|c65] ... [c63|c127]

  so `packed & 0xF` is the first half of the group and `packed >> 4` the second half,
  each a contiguous block of columns that multiplies a contiguous slice of x; no
  interleaving shuffle in registers. Same bytes, same size.
* **Group scales and zero points transposed**: (out, in / group) -> (in / group, out),
  so that one group's scales of a tile of output rows are one contiguous load.

`unshuffle_int4` inverts the code layout (the reference path and tests read the
stored layout back).
"""

from __future__ import annotations

import torch

__all__ = ["shuffle_int4", "unshuffle_int4", "transpose_groups"]


def _check(packed: torch.Tensor, group_size: int) -> tuple[int, int]:
    n, half_k = packed.shape
    if group_size < 2 or group_size % 2 or (2 * half_k) % group_size:
        raise ValueError(f"int4 layout: in_features {2 * half_k} is not a multiple of group_size {group_size}")
    return n, half_k


def shuffle_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Stored uint8 (out, in/2) (even column low, odd column high) -> the half-split layout."""
    n, half_k = _check(packed, group_size)
    lo, hi = packed & 0xF, packed >> 4
    codes = torch.stack((lo, hi), dim=-1).reshape(n, 2 * half_k)  # (out, in): columns 0, 1, 2, ...
    g = codes.reshape(n, -1, 2, group_size // 2)  # (out, groups, half, group / 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, half_k).contiguous()


def unshuffle_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """The half-split layout -> the stored layout (inverse of `shuffle_int4`)."""
    n, half_k = _check(packed, group_size)
    g = packed.reshape(n, -1, group_size // 2)  # (out, groups, group / 2)
    codes = torch.cat((g & 0xF, g >> 4), dim=-1).reshape(n, 2 * half_k)  # (out, in)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def transpose_groups(t: torch.Tensor | None) -> torch.Tensor | None:
    """(out, groups) scales or zero points -> (groups, out), contiguous."""
    return None if t is None else t.t().contiguous()
