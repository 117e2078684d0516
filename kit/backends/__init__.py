"""Backends that execute or lower a `Network`: PyTorch (runs everywhere) and TensorRT (builds plans)."""

from kit.backends.torch_backend import TorchBackend

__all__ = ["TorchBackend"]
