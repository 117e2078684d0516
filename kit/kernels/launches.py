"""Counting the kernels a forward pass launches, on any device (the CPU included).

On a GPU a decode step of a small model is bound by how many kernels it launches, not
by the bytes it moves: inside a CUDA graph every kernel still costs a few microseconds of
launch and ramp-up. `LaunchCounter` counts them without a GPU: a `TorchDispatchMode`
sees every ATen op a forward pass runs; ops that only make views or allocate memory
launch nothing, every other op counts as one kernel. A fused op of `kit/kernels/` is
one kernel on a GPU but runs as several torch ops in its CPU reference, so it announces
itself with `fused_launch(name)`: it counts once and the ops inside it do not count.
`_local_scalar_dense` (`.item()`, `.tolist()`) counts as a host synchronisation, not a kernel.

    with LaunchCounter() as counter:
        engine.forward(batch, kv)
    counter.total, counter.by_scope()   # kernels in all, and per scope (the profiler sets one a layer)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LaunchCounter", "fused_launch", "counted", "launches_kernel"]

# ops that allocate, alias or only change metadata: no kernel on a GPU
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
    "set_", "resize_", "split", "split_with_sizes", "unbind", "chunk", "_unsafe_view", "view", "reshape",
    "alias", "as_strided", "expand", "t", "transpose", "permute", "squeeze", "unsqueeze", "slice", "select",
    "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_has_compatible_shallow_copy_type",
}
_SYNC = {"_local_scalar_dense", "item"}
_ACTIVE: list["LaunchCounter"] = []  # counters now recording (innermost last)


def launches_kernel(func: Any) -> bool:
    """Whether an ATen op launches a kernel (views and allocations do not)."""
    name = func.__name__.split(".")[0] if hasattr(func, "__name__") else str(func)
    if name in _NO_KERNEL or name in _SYNC:
        return False
    return not getattr(func, "is_view", False)


def _decomposes(func: Any, args: Any) -> bool:
    """Whether `func` runs as other ATen ops on the device of its first tensor argument.

    NOTE: under `torch.inference_mode` (every `Engine.forward`) a composite op such as `to` or
    `rms_norm` reaches the dispatch mode whole; the device runs it as the ops it decomposes into,
    unless the device has a kernel of its own for it.
    """
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or not hasattr(func, "decompose"):
        return False
    name = func.name()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has(name, "CompositeImplicitAutograd") and not has(name, tensor.device.type.upper())


class LaunchCounter(TorchDispatchMode):
    """Counts kernel launches (and host syncs) per scope; `scope` is set by the caller (e.g. a layer name)."""

    def __init__(self) -> None:
        super().__init__()
        self.scope = ""
        self.kernels: Counter[str] = Counter()  # scope -> kernels
        self.ops: Counter[str] = Counter()  # op name -> launches
        self.syncs = 0
        self._suspended = 0

    def __enter__(self) -> "LaunchCounter":
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def record(self, name: str) -> None:
        self.kernels[self.scope] += 1
        self.ops[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._suspended:
            if _decomposes(func, args):  # e.g. `to`, `rms_norm` on the CPU: count the ops it is made of
                with self:
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            name = func.__name__.split(".")[0]
            if name in _SYNC:
                self.syncs += 1
            elif launches_kernel(func):
                self.record(name)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.kernels.values())

    def by_scope(self) -> dict[str, int]:
        return dict(self.kernels)

    def __repr__(self) -> str:
        return f"LaunchCounter({self.total} kernels, {self.syncs} host syncs)"


@contextlib.contextmanager
def fused_launch(name: str) -> Iterator[None]:
    """Mark a fused op: one kernel for every active counter, whatever runs inside."""
    if not _ACTIVE:
        yield
        return
    counters = list(_ACTIVE)
    for c in counters:
        c.record(name)
        c._suspended += 1
    try:
        yield
    finally:
        for c in counters:
            c._suspended -= 1


def counted(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` as one fused launch named `name` (free when no counter is active)."""
    if not _ACTIVE:
        return fn(*args, **kwargs)
    with fused_launch(name):
        return fn(*args, **kwargs)
