"""Greedy picks in one kernel: each row's argmax and its log-probability, in one read of the logits.

A greedy step of the sampler needs, per row, the token with the largest logit (the lowest id
among equal ones, as `torch.argmax`) and that token's log-softmax value, which the outputs
report. Unfused that is a float32 copy of the logits, `log_softmax` over the whole
vocabulary (a second (rows, vocab) tensor), `argmax` and a gather: four passes over
64 x 128k floats at batch 64, ~0.12 ms of an H200 step. Here one program per row walks its
logits once in `BLOCK`-wide tiles, keeping the running maximum, the lowest id that reaches
it and the sum of exp(logit - maximum) rescaled as the maximum grows (the online softmax of
flash attention); the log-probability is then `max - (max + log(sum))`, in float32 as
`torch.log_softmax` computes it on float32 logits.

    greedy_pick(logits, impl="auto")   # (R, V) -> token ids (R,) int64, packed (R, 2) float64: [id, logprob]

The packed columns are those `kit.sampled_batch.SampledBatch` brings to the host (ids < 2**53
are exact in float64), written by the same kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from kit.kernels._triton import jit, next_pow2, resolve_impl, triton_module
from kit.kernels.launches import counted

__all__ = ["greedy_pick", "greedy_pick_reference"]

tl: Any = None  # triton.language, set on the first Triton call (see kit/kernels/_triton.py)
BLOCK = 4096


def _greedy_kernel(x_ptr, ids_ptr, packed_ptr, vocab, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # per lane: the running maximum, the lowest id reaching it, the sum of exp(x - lane max)
    # NOTE: the lowest float32, not -inf: exp(m - new_m) is then never exp(-inf + inf) = NaN
    m = tl.full((BLOCK,), -3.4028234663852886e38, tl.float32)
    idx = tl.zeros((BLOCK,), tl.int32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab, BLOCK):
        c = start + cols
        x = tl.load(x_ptr + row * stride_x + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        s = s * tl.exp(m - new_m) + tl.exp(x - new_m)  # a -inf logit adds exp(-inf) = 0
        idx = tl.where(x > m, c, idx)  # strictly greater: a lane keeps the first (lowest) id of its maximum
        m = new_m
    row_max = tl.max(m, axis=0)
    # the lowest id among the lanes that hold the row's maximum
    best = tl.min(tl.where(m == row_max, idx, vocab), axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    tl.store(ids_ptr + row, best.to(tl.int64))
    tl.store(packed_ptr + 2 * row, best.to(tl.float64))
    tl.store(packed_ptr + 2 * row + 1, (-tl.log(total)).to(tl.float64))  # x[best] - logsumexp(x)


def _launch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    global tl
    tl = triton_module()[1]
    rows, vocab = logits.shape
    ids = torch.empty(rows, dtype=torch.long, device=logits.device)
    packed = torch.empty(rows, 2, dtype=torch.float64, device=logits.device)
    if rows:
        jit(_greedy_kernel)[(rows,)](logits, ids, packed, vocab, logits.stride(0),
                                     BLOCK=min(BLOCK, next_pow2(vocab)), num_warps=8)
    return ids, packed


def greedy_pick_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused ops: argmax of the float32 logits, and log_softmax gathered at it."""
    x = logits.float()
    ids = x.argmax(dim=-1)
    lp = torch.log_softmax(x, dim=-1).gather(1, ids[:, None])
    return ids, torch.cat([ids[:, None].double(), lp.double()], dim=1)


def greedy_pick(logits: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy picks of `logits` (R, V): token ids (R,) int64 and (R, 2) float64 rows [id, log-probability]."""
    if logits.dim() != 2 or logits.shape[1] == 0 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be (rows, vocab > 0) with contiguous rows, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if resolve_impl(impl, logits) == "triton":
        return counted("greedy_pick", _launch, logits)
    return counted("greedy_pick", greedy_pick_reference, logits)
