"""A TensorRT plan: build it from a `Network`, inspect it, save and load it.

`build_plan(network, profiles)` lowers the network (`TensorRTLowering`), runs the
TensorRT builder and returns a `TensorRTPlan`: the serialized engine (`rank0.engine`)
plus its inputs, outputs, optimization profile, layers and build metadata
(`trt_build.json`). `profiles` is `BuildConfig.optimization_profiles()`.

Precision: TensorRT-RTX cannot compile float32 GEMMs ("FP32 GEMM is not supported").
A float32 network (the CPU's default dtype) is therefore built in float16 when no
dtype was asked for, and the plan says so (`dtype`, `requested_dtype`,
`precision_reason`); asking for float32 explicitly is refused before building.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from kit.backends.tensorrt_common import TORCH_NAMES, import_tensorrt, io_of, kit_layer_of, progress_monitor
from kit.backends.tensorrt_lowering import TensorRTLowering
from kit.network import Network

__all__ = ["TensorRTPlan", "build_plan", "resolve_precision"]

_RTX_FP32 = "TensorRT-RTX cannot compile float32 GEMMs (\"FP32 GEMM is not supported\")"


@dataclass
class TensorRTPlan:
    """A serialized TensorRT engine plus what is needed to feed it and to read it back."""

    plan: bytes
    flavour: str  # "tensorrt" | "tensorrt_rtx"
    version: str
    inputs: list[dict[str, Any]]  # name, dtype, shape (-1 = dynamic)
    outputs: list[dict[str, Any]]
    profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]  # name -> (min, opt, max)
    num_layers: int  # TensorRT layers in the network definition
    build_seconds: float  # the builder alone (optimisation + serialization)
    layer_info: dict[str, Any] | None = None  # engine inspector JSON (DETAILED); needs a GPU that runs the plan
    network_name: str = "model"
    dtype: str = "float16"
    compute_capabilities: list[str] = field(default_factory=list)  # AOT targets (TensorRT-RTX)
    layers: list[dict[str, str]] = field(default_factory=list)  # network definition: name, type, kit_layer
    lower_seconds: float = 0.0  # kit Network -> INetworkDefinition
    requested_dtype: str | None = None  # the dtype asked for or the network's, where it differs from `dtype`
    precision_reason: str | None = None  # why the plan's dtype is not the requested one

    @property
    def precision(self) -> str:
        """`float16`, or `float16 (float32 requested: why)` when the build changed the precision."""
        if self.requested_dtype is None or self.requested_dtype == self.dtype:
            return self.dtype
        return f"{self.dtype} ({self.requested_dtype} requested: {self.precision_reason})"

    @property
    def nbytes(self) -> int:
        return len(self.plan)

    def kit_layers(self) -> list[str]:
        """The kit layers the TensorRT layers came from, in order of first appearance."""
        return list(dict.fromkeys(layer["kit_layer"] for layer in self.layers))

    def to_frame(self) -> pd.DataFrame:
        """One row a TensorRT layer of the network definition: `name, type, kit_layer`."""
        return pd.DataFrame(self.layers, columns=["name", "type", "kit_layer"])

    def save(self, path: str | Path) -> Path:
        """Write `rank0.engine` (the plan) and `trt_build.json` (everything else) into directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "rank0.engine").write_bytes(self.plan)
        meta = {k: v for k, v in asdict(self).items() if k != "plan"}
        meta["plan_bytes"] = self.nbytes
        (path / "trt_build.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TensorRTPlan":
        path = Path(path)
        meta = json.loads((path / "trt_build.json").read_text())
        meta.pop("plan_bytes", None)
        for io in meta["inputs"] + meta["outputs"]:
            io["shape"] = tuple(io["shape"])
        meta["profiles"] = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in meta["profiles"]]
        return cls(plan=(path / "rank0.engine").read_bytes(), **meta)

    def __repr__(self) -> str:
        return (f"TensorRTPlan({self.network_name!r}, {self.flavour} {self.version}, {self.dtype}, "
                f"{self.nbytes / 2**20:.1f} MiB, {self.num_layers} layers, built in {self.build_seconds:.1f} s)")

    def _repr_html_(self) -> str:
        head = (f"<b>TensorRTPlan</b> <code>{html.escape(self.network_name)}</code> &middot; "
                f"{self.flavour} {html.escape(self.version)} &middot; {html.escape(self.precision)} &middot; "
                f"{self.nbytes / 2**20:.1f} MiB &middot; {self.num_layers} TensorRT layers from "
                f"{len(self.kit_layers())} kit layers &middot; lowered in {self.lower_seconds:.1f} s, "
                f"built in {self.build_seconds:.1f} s"
                + (f" &middot; targets {', '.join(self.compute_capabilities)}" if self.compute_capabilities else ""))
        profile = self.profiles[0] if self.profiles else {}
        rows = []
        for kind, ios in (("input", self.inputs), ("output", self.outputs)):
            for io in ios:
                rng = profile.get(io["name"])
                rows.append({"io": kind, "name": io["name"], "dtype": io["dtype"], "shape": str(io["shape"]),
                             "min": str(rng[0]) if rng else "", "opt": str(rng[1]) if rng else "",
                             "max": str(rng[2]) if rng else ""})
        df = pd.DataFrame(rows)
        if len(df) > 12:  # many layers: show the first layer's KV tensors and the rest in a line
            keep = ~df["name"].str.match(r"(past|present)_(key|value)_[1-9]")
            note = f"<p><i>... and {int((~keep).sum())} more KV tensors, one pair per layer, same shapes.</i></p>"
            df = df[keep]
        else:
            note = ""
        return f"<div>{head}{df.to_html(index=False, border=0)}{note}</div>"


def resolve_precision(network: Network, dtype: torch.dtype | None, flavour: str
                      ) -> tuple[torch.dtype, str | None, str | None]:
    """(build dtype, requested dtype name or None, reason or None) for `network` on `flavour`.

    `dtype=None` means "the network's own dtype" (its embedding's); an explicit float32 on
    TensorRT-RTX is a ValueError, an implicit one becomes float16 with the reason recorded.
    """
    own = network.weights["model.embed_tokens.weight"].dtype  # never quantized
    if dtype is not None and dtype not in TORCH_NAMES:
        raise ValueError(f"build_plan dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if flavour != "tensorrt_rtx" or (dtype or own) != torch.float32:
        return dtype or own, None, None
    if dtype is not None:
        raise ValueError("build_plan dtype=torch.float32: TensorRT-RTX cannot compile float32 GEMMs; "
                         "use dtype=torch.float16 or torch.bfloat16 (BuildConfig(dtype='float16'))")
    return torch.float16, "float32", _RTX_FP32


def build_plan(network: Network, profiles: Mapping[str, Sequence[int]], *, dtype: torch.dtype | None = None,
               compute_capabilities: Sequence[str] | None = None, profiling_verbosity: str = "detailed",
               progress: bool = True) -> TensorRTPlan:
    """Lower `network` and build a TensorRT plan for one optimization profile.

    `profiles`: `BuildConfig.optimization_profiles()` ((min, opt, max) of `batch_size`,
    `input_len`, `past_len`). `dtype`: the plan's precision; None builds in the network's
    dtype, except float32 on TensorRT-RTX, which builds in float16 (see the module docstring).
    `profiling_verbosity`: `BuildConfig.profiling_verbosity` (how much the engine inspector shows).
    """
    t0 = time.perf_counter()
    build_dtype, requested, reason = resolve_precision(network, dtype, import_tensorrt()[1])
    lowering = TensorRTLowering(network, profiles, dtype=build_dtype, compute_capabilities=compute_capabilities,
                                profiling_verbosity=profiling_verbosity, progress=progress)
    trt = lowering.trt
    builder, net, config = lowering.lower()
    lower_seconds = time.perf_counter() - t0
    monitor = None
    if progress and hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = progress_monitor(trt)
        config.progress_monitor = monitor
    t1 = time.perf_counter()
    serialized = builder.build_serialized_network(net, config)
    build_seconds = time.perf_counter() - t1
    if serialized is None:
        errors = "; ".join(m for s, m in lowering.logger.messages if s != "WARNING" and "cudaError" not in m)[:3000]
        raise RuntimeError(f"TensorRT ({lowering.flavour}) could not build {network.name!r}: {errors or 'no message'}")
    plan = bytes(memoryview(serialized))
    layers = []
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        layers.append({"name": layer.name, "type": layer.type.name, "kit_layer": kit_layer_of(layer.name)})
    return TensorRTPlan(
        plan=plan, flavour=lowering.flavour, version=trt.__version__,
        inputs=[io_of(net.get_input(i)) for i in range(net.num_inputs)],
        outputs=[io_of(net.get_output(i)) for i in range(net.num_outputs)],
        profiles=[lowering.profile_shapes()], num_layers=net.num_layers, build_seconds=build_seconds,
        layer_info=_inspect(trt, lowering.flavour, plan, lowering.logger), network_name=network.name,
        dtype=TORCH_NAMES[build_dtype], compute_capabilities=list(lowering.compute_capabilities), layers=layers,
        lower_seconds=lower_seconds, requested_dtype=requested, precision_reason=reason,
    )


def _inspect(trt: Any, flavour: str, plan: bytes, logger: Any) -> dict[str, Any] | None:
    """The engine inspector's per-layer JSON, where a local GPU can deserialize the plan; else None."""
    if not torch.cuda.is_available() or (flavour == "tensorrt_rtx" and torch.cuda.get_device_capability() == (9, 0)):
        return None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        return None
    inspector = engine.create_engine_inspector()
    return json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
