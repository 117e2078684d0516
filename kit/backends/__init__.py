"""Backends that execute or lower a `Network`: PyTorch (runs everywhere) and TensorRT (builds plans).

Every backend follows the `Backend` protocol of `kit/backends/base.py`.
"""

from kit.backends.base import Backend, LayerHook
from kit.backends.torch_backend import TorchBackend

__all__ = ["Backend", "LayerHook", "TorchBackend"]
