"""What every backend offers an `Engine`: the `Backend` protocol and per-layer hooks.

A backend turns a `Network` into something that computes logits for a `ForwardBatch`
over a paged `KVCache`, or says plainly that it cannot:

    name, device, dtype         what it is
    can_execute                 whether `forward` runs here at all
    capabilities                one sentence: what it can do (and, if it cannot execute, what to use)
    describe()                  one line for build logs and reprs
    forward(batch, kv, hooks)   logits (num_logits, vocab); writes the batch's K/V into kv
    capture_cuda_graphs(kv, batch_sizes, max_blocks)   an explicit build step (CUDA only)

Hooks see every layer of a forward pass: `before(layer, inputs)` right before it runs
and `after(layer, outputs)` right after, with the named tensors it reads / writes. The
profiler times layers and opens NVTX ranges with them; evaluation captures each layer's
output with them. A forward with hooks always runs layer by layer (never a CUDA graph).
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch

from kit.batch import ForwardBatch, KVCache
from kit.network import Layer

__all__ = ["Backend", "LayerHook"]


class LayerHook:
    """Called around every layer of a forward pass; override either method (both do nothing here)."""

    def before(self, layer: Layer, inputs: Mapping[str, torch.Tensor]) -> None:
        """`inputs`: the tensors the layer reads, by name (`layer.inputs` that exist at this point)."""

    def after(self, layer: Layer, outputs: Mapping[str, torch.Tensor]) -> None:
        """`outputs`: the tensors the layer wrote, by name (`layer.outputs`)."""


@runtime_checkable
class Backend(Protocol):
    """The interface `Engine` uses; see the module docstring."""

    name: str

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def can_execute(self) -> bool: ...

    @property
    def capabilities(self) -> str: ...

    def describe(self) -> str: ...

    def forward(self, batch: ForwardBatch, kv_cache: KVCache,
                hooks: Sequence[LayerHook] | None = None) -> torch.Tensor: ...

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int], max_blocks: int) -> None: ...
