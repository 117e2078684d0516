"""What every TensorRT module of the kit shares: finding TensorRT, dtypes, the logger, progress bars.

`import_tensorrt()` returns TensorRT proper if installed, else TensorRT-RTX; the rest
are small adapters between TensorRT's Python API and the kit (torch dtypes, a logger
that keeps messages so a failed build can say why, tqdm bars for the builder's phases).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from kit.progress import tqdm

__all__ = ["import_tensorrt", "kit_layer_of", "trt_dtype", "make_logger", "progress_monitor", "io_of",
           "DEFAULT_RTX_COMPUTE_CAPABILITIES", "NEG", "TORCH_NAMES"]

# every GPU TensorRT-RTX 1.7 builds for ahead of time (Turing to Blackwell, no Hopper); kernels are
# compiled on the target at load time, so more targets cost no plan size
DEFAULT_RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
NEG = float(np.finfo(np.float32).min)  # "minus infinity" for masked scores, finite to keep softmax NaN-free
TORCH_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def import_tensorrt() -> tuple[Any, str]:
    """(module, flavour): `tensorrt` if installed, else `tensorrt_rtx`."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]

        return trt, "tensorrt"
    except ImportError:
        pass
    try:
        import tensorrt_rtx as trt  # type: ignore[import-not-found]

        return trt, "tensorrt_rtx"
    except ImportError as e:
        raise ImportError("neither `tensorrt` nor `tensorrt_rtx` is installed: pip install .[tensorrt] "
                          "(installs TensorRT-RTX, tensorrt-rtx-cu13)") from e


def kit_layer_of(trt_layer_name: str) -> str:
    """The kit layer a TensorRT layer came from: `layers.3.mlp/gate_up` -> `layers.3.mlp`."""
    return trt_layer_name.split("/", 1)[0]


def trt_dtype(trt: Any, dtype: torch.dtype) -> Any:
    table = {torch.float16: trt.float16, torch.bfloat16: trt.bfloat16, torch.float32: trt.float32}
    if dtype not in table:
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    return table[dtype]


def _logger_class(trt: Any) -> type:
    class Logger(trt.ILogger):
        """Keeps TensorRT's errors and warnings so a failed build can say why."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR, trt.ILogger.WARNING):
                self.messages.append((str(severity).rsplit(".", 1)[-1], msg))

    return Logger


def make_logger(trt: Any) -> Any:
    return _logger_class(trt)()


def progress_monitor(trt: Any) -> Any:
    class TqdmProgressMonitor(trt.IProgressMonitor):
        """One tqdm bar per builder phase, nested by depth. TensorRT calls it from its own threads."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name] = depth
                self._bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT: {phase_name}", position=depth,
                                              leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                if phase_name in self._bars:
                    self._bars[phase_name].update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                self._depth.pop(phase_name, None)
                if bar is not None:
                    # NOTE: TensorRT announces an upper bound of steps (e.g. tactics it may time) and
                    # often finishes a phase early; a finished phase is complete, not failed, so its
                    # total shrinks to the steps done (a bar closed short of its total reads as an error)
                    if bar.total and bar.n < bar.total:
                        bar.total = bar.n
                        bar.refresh()
                    bar.close()

    return TqdmProgressMonitor()


DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "FP8": "float8"}


def io_of(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": DTYPE_NAMES.get(tensor.dtype.name, tensor.dtype.name),
            "shape": tuple(int(d) for d in tensor.shape)}
