"""What one pass of the `Sampler` hands back, and the host<->device copies the serving loop makes.

`SampledBatch` keeps the sampled token ids on the device (the next step's input ids are gathered
from them) and brings one packed tensor to the host per step; `SamplerOutput` is its host view.
`to_device` copies small index lists through pinned memory, so the host never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SampledBatch", "SamplerOutput", "to_device"]


@dataclass
class SamplerOutput:
    """One entry per logits row, in row order."""

    token_ids: list[int]
    logprobs: list[float]  # raw log_softmax of the model's logits at the sampled token
    top_logprobs: list[dict[int, float] | None]  # top params.logprobs + the sampled token


class SampledBatch:
    """One pass of the `Sampler`, still on the device: what the next step and the host need.

    `token_ids` (R,) stays on the device, where the next step's input ids are gathered from
    it; `packed` (R, 2 + 2 * max_k) float64 holds token, logprob, top-k logprobs and top-k
    ids, and is the only thing that crosses to the host: `start_copy()` queues one
    non-blocking copy into pinned memory and records a CUDA event; `result()` waits for that
    event only (on the CPU it is already there). Token ids < 2**53 are exact in float64.
    """

    def __init__(self, token_ids: torch.Tensor, packed: torch.Tensor, ks: list[int | None]) -> None:
        self.token_ids = token_ids  # (R,) int64, device
        self.packed = packed  # (R, 2 + 2 * max_k) float64, device
        self.ks = ks
        self._host: torch.Tensor | None = None
        self._event: Any = None

    def start_copy(self) -> "SampledBatch":
        """Queue the device->host copy (pinned, non-blocking) and record its event; a no-op on the CPU."""
        if self.packed.device.type == "cuda" and self._host is None:
            self._host = torch.empty(self.packed.shape, dtype=self.packed.dtype, pin_memory=True)
            self._host.copy_(self.packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        return self

    @property
    def ready(self) -> bool:
        """True when `result()` would not wait."""
        return self._event is None or self._event.query()

    def result(self) -> SamplerOutput:
        """The host view (waits for this batch's copy only, never for the whole device)."""
        if self.packed.device.type == "cuda":
            self.start_copy()
            self._event.synchronize()
            host = self._host
        else:
            host = self.packed
        # NOTE: column-wise: two conversions for the batch instead of a Python int() per row
        tokens = host[:, 0].long().tolist()
        lps = host[:, 1].tolist()
        max_k = (host.shape[1] - 2) // 2
        top: list[dict[int, float] | None] = [None] * len(tokens)
        if not max_k:
            return SamplerOutput(token_ids=tokens, logprobs=lps, top_logprobs=top)
        rows = host.tolist()
        for i, k in enumerate(self.ks):
            if k is not None:
                r = rows[i]
                top[i] = {int(t): v for t, v in zip(r[2 + max_k:2 + max_k + k], r[2:2 + k])}
                top[i][tokens[i]] = lps[i]
        return SamplerOutput(token_ids=tokens, logprobs=lps, top_logprobs=top)


def to_device(data: Any, device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A tensor of `data` on `device`; on CUDA through pinned memory, so the copy never blocks the host.

    NOTE: a copy from pageable memory makes CUDA wait for the stream first: in the serving
    loop that would stall the host until the forward pass ends, which is what overlap avoids.
    """
    t = torch.tensor(data, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
