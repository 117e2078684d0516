"""Quantized linear layers: what the engine calls in place of `x @ W^T`.

`build_linear(weights, prefixes, quant_config, ...)` (in `schemes.py`, which picks the
class by the scheme registry) reads the stored tensors of one or
several linears (q/k/v, or gate/up, fused: their outputs are concatenated along the
output dim in the order given) and returns a callable `lin(x) -> y`, x (T, in) in the
compute dtype, y (T, sum of out_features). Every layer object has:

* a **reference path** that computes exactly what the format means, in float32 on any
  device: dequantize-and-multiply for weight-only schemes, and for W8A8 / FP8 the
  quantized activations times the quantized weights with the scales applied after the
  accumulation (what an int32 / fp32 tensor-core accumulator holds);
* **fast paths** chosen by device on a CUDA GPU (Hopper):

| scheme                         | M <= `stream_max_m` (decode)                  | larger M (prefill)                      |
| ------------------------------ | --------------------------------------------- | --------------------------------------- |
| W8A16 / W4A16 (RTN, AWQ, GPTQ) | `stream_gemm`: weights streamed once, dequantized in registers | Triton dequantize to bf16 + cuBLAS |
| FP8 (per tensor / per channel) | timed once per shape: `stream_gemm` or `_scaled_mm` (*) | `torch._scaled_mm` on FP8 tensor cores |
| W8A8 / SmoothQuant             | `torch._int_mm` (int8 tensor cores, int32 out), then a fused epilogue (every M) |  |

(*) the faster (`path_choice.py`) of `stream_gemm` (activations quantized as it loads them) and
`torch._scaled_mm`.

`stream_max_m` is an attribute of each layer (defaults `TRITON_MAX_M`, `FP8_STREAM_MAX_M`,
`FP8_PT_STREAM_MAX_M`; `bench/quant_gemm.py` measures both sides); setting it to 0 takes the
large-M path at every M, which is how the benchmark compares the two. FP8's two decode paths
compute the same product, so which one runs up to `stream_max_m` is measured, not fixed: the
first eager call of a (M, N, K) times both and every later call (and CUDA graph) uses the
winner. `FP8Linear.weight_only_decode = True` instead streams fp8 weights against bf16
activations as they are (no activation quantization at all) up to `stream_max_m`: faster where
the quantization costs, but the decode numerics then differ from the reference's (and from
the same tokens in a batch above `stream_max_m`), so it is opt-in.

Weight-only layers rearrange their tensors once, here, into the run-time layout of the
kernels (`weight_layout.py`: int4 codes read as int32 words, group scales transposed);
the stored checkpoint format does not change. AWQ's `pre_quant_scale` is applied inside
the kernel (int4: a vector of ones when there is none, so every int4 layer runs one
compiled kernel).

For `_scaled_mm`, activations are quantized by one fused Triton kernel
(`triton_quant.quantize_rows`), and W8A8's int32 -> scaled bf16 epilogue is another
(`triton_quant.int8_epilogue`). `torch._int_mm` needs more than 16 rows: decode batches
are padded with zero rows.

Fusing per-tensor FP8 weights: q, k and v each have their own weight scale, but one
GEMM takes one tensor-wise scale. Rather than re-quantizing all three to the largest
scale (TensorRT-LLM's choice, which costs precision), the three scales are expanded
to one scale per output row and the GEMM runs with row-wise scales: same math, one GEMM.

`force_reference=True` takes the reference path on any device (tests compare the fast
paths against it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from kit.quantization import fp8 as fp8_mod
from kit.quantization import int4 as int4_mod
from kit.quantization.int8_weight_only import dequantize_weight as int8_dequantize
from kit.quantization.path_choice import CHOOSER
from kit.quantization.smoothquant import int8_linear_reference

from kit.quantization.weight_layout import int4_bytes, int4_words, transpose_groups

try:  # NOTE: triton is optional (a CPU install has none); only the CUDA fast paths need its kernels
    from kit.quantization.stream_gemm import new_counters, stream_gemm
    from kit.quantization.triton_gemm import dequantize as triton_dequantize
    from kit.quantization.triton_quant import int8_epilogue, quantize_rows
except ImportError:  # pragma: no cover - exercised where triton is not installed
    triton_dequantize = stream_gemm = new_counters = int8_epilogue = quantize_rows = None

__all__ = ["QuantLinear", "FloatLinear", "WeightOnlyLinear", "FP8Linear", "Int8Linear",
           "ConcatLinear", "TRITON_MAX_M", "FP8_STREAM_MAX_M", "FP8_PT_STREAM_MAX_M", "FP8_ROWWISE_MIN_M"]

# Crossovers (H100; bench/quant_gemm.py measures both sides of each at M = 1, 4, 16, 64, 256):
TRITON_MAX_M = 64  # weight-only: above this many tokens, dequantize once and use cuBLAS
FP8_STREAM_MAX_M = 64  # FP8 per tensor: up to this many tokens the faster (timed) of stream and _scaled_mm
FP8_PT_STREAM_MAX_M = 64  # FP8 per token: the same (the stream's prologue reads each token's row for the amax)
FP8_ROWWISE_MIN_M = 17  # FP8 _scaled_mm with row-wise scales: below this, tensor-wise GEMM + scaling epilogue


def _cap(device: torch.device) -> tuple[int, int]:
    """The CUDA compute capability, or (0, 0) off CUDA or without triton (no fast path then)."""
    if device.type != "cuda" or quantize_rows is None:
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantLinear:
    """Base: holds sizes, bias and the choice between the reference and the fast path."""

    scheme = "?"

    def __init__(self, prefixes: list[str], out_features: list[int], in_features: int,
                 bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype, force_reference: bool) -> None:
        self.prefixes, self.out_sizes, self.in_features = prefixes, out_features, in_features
        self.out_features = sum(out_features)
        self.bias = bias.to(device=device, dtype=dtype) if bias is not None else None
        self.device, self.dtype = device, dtype
        self.path = "reference" if force_reference or not self._fast_ok() else self.fast_path_name()

    def _fast_ok(self) -> bool:
        return False

    def fast_path_name(self) -> str:
        return "reference"

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return ()

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stored weight tensors (codes, scales, zeros, smoothing) and bias."""
        return _nbytes(*self._tensors(), self.bias)

    def describe(self) -> str:
        names = ",".join(p.rsplit(".", 1)[-1] for p in self.prefixes)
        return (f"{self.scheme} [{names}] ({self.out_features}, {self.in_features}) "
                f"{self.weight_bytes / 2**20:.2f} MiB, path: {self.path}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "reference":
            y = self.forward_reference(x)
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(self.dtype)
        y = self.forward_fast(x)
        return y + self.bias if self.bias is not None else y

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:  # float32 (T, out), no bias
        raise NotImplementedError

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:  # dtype (T, out), no bias
        raise NotImplementedError


class FloatLinear(QuantLinear):
    """An excluded (unquantized) linear: y = x @ W^T in the compute dtype."""

    scheme = "float"

    def __init__(self, weights: list[torch.Tensor], bias, device, dtype, prefixes: list[str] = ()) -> None:
        self.weight = torch.cat([w.to(device=device, dtype=dtype) for w in weights], 0)  # (out, in)
        super().__init__(list(prefixes), [w.shape[0] for w in weights], self.weight.shape[1], bias, device, dtype,
                         True)

    def _tensors(self):
        return (self.weight,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class WeightOnlyLinear(QuantLinear):
    """W8A16 (int8 per row) and W4A16 (int4 groups; RTN, AWQ, GPTQ): bf16 activations.

    On the fast path the stored tensors are replaced by their run-time layout (`_w`, `_s`,
    `_z`: same bytes); `qweight` / `scale` / `zero` then read None, and
    `dequantized_weight()` reads the run-time layout back.
    """

    def __init__(self, qweight, scale, zero, pre_quant_scale, *, bits: int, group_size: int, **kw) -> None:
        self.qweight, self.scale, self.zero, self.pqs = qweight, scale, zero, pre_quant_scale
        self.bits, self.group_size = bits, group_size
        self.scheme = "W8A16" if bits == 8 else f"W4A16 g{group_size}{'+zero' if zero is not None else ''}"
        self._w = self._s = self._z = self._pqs = None
        # int4 streams whole groups of >= 32 channels (int32 words of 8 codes, one tl.dot a group)
        self.stream_max_m = TRITON_MAX_M if bits == 8 or group_size >= 32 else 0
        super().__init__(in_features=qweight.shape[1] * (2 if bits == 4 else 1), **kw)
        self._deq: torch.Tensor | None = None
        if self.path != "reference":
            self._prepare()

    def _prepare(self) -> None:
        """The run-time layout, once (`weight_layout.py`); the stored tensors are let go."""
        if self.bits == 4:
            self._w = int4_words(self.qweight)
            self._s, self._z = transpose_groups(self.scale), transpose_groups(self.zero)
            # NOTE: ones when there is no pre_quant_scale: one compiled int4 kernel for every layer
            pqs = self.pqs if self.pqs is not None else torch.ones(self.in_features, device=self.device)
            self._pqs = pqs.to(self.dtype).contiguous()
        else:
            self._w, self._s = self.qweight.contiguous(), self.scale.float().contiguous()
            self._pqs = self.pqs.to(self.dtype).contiguous() if self.pqs is not None else None
        self.qweight = self.scale = self.zero = None
        self._counters = new_counters(self.out_features, self.device)

    def _tensors(self):
        if self._w is not None:
            return (self._w, self._s, self._z, self.pqs)
        return (self.qweight, self.scale, self.zero, self.pqs)

    def _fast_ok(self) -> bool:
        return self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16) and _cap(self.device) >= (8, 0)

    def fast_path_name(self) -> str:
        return f"triton stream (M<={self.stream_max_m}) / dequant+cuBLAS"

    def dequantized_weight(self) -> torch.Tensor:
        """float32 (out, in): what the codes and scales mean."""
        if self._w is not None:  # the run-time layout, read back
            if self.bits == 8:
                return int8_dequantize(self._w, self._s)
            z = self._z.t() if self._z is not None else None
            return int4_mod.dequantize_weight(int4_bytes(self._w), self._s.t(), z, self.group_size)
        if self.bits == 8:
            return int8_dequantize(self.qweight, self.scale)
        return int4_mod.dequantize_weight(self.qweight, self.scale, self.zero, self.group_size)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        if self._deq is None:  # NOTE: the reference path keeps a float32 copy, to be quick on the CPU
            self._deq = self.dequantized_weight()
        xf = x.float() if self.pqs is None else x.float() * self.pqs.float()
        return xf @ self._deq.T

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.stream_max_m:
            return stream_gemm(x, self._w, self._s, kind="int4" if self.bits == 4 else "int8",
                               out_features=self.out_features, counters=self._counters, group_size=self.group_size,
                               zero=self._z, pre_quant_scale=self._pqs)
        if self._pqs is not None:
            x = x * self._pqs
        # prefill: one pass dequantizes the weight to bf16, then cuBLAS (the GEMM outweighs the pass)
        return F.linear(x, triton_dequantize(self._w, self._s, self._z, bits=self.bits, group_size=self.group_size,
                                             out_features=self.out_features, in_features=self.in_features,
                                             dtype=x.dtype))


class FP8Linear(QuantLinear):
    """FP8 weights and activations: per-tensor (static input scale) or per-channel per-token."""

    # opt-in (on the class: every layer; or per instance): bf16 activations x fp8 weights up to stream_max_m
    weight_only_decode = False

    def __init__(self, qweight, weight_scales: list[torch.Tensor], input_scale, *, per_channel: bool, **kw) -> None:
        self.qweight, self.per_channel = qweight, per_channel
        self.scheme = "FP8 per-channel per-token" if per_channel else "FP8 per-tensor"
        self.weight_scales = weight_scales  # as stored: (1,) each per tensor, (out_i,) per channel
        sizes = kw["out_features"]
        # one scale per output row either way (per-tensor scales of fused prefixes expanded)
        self.row_scale = torch.cat([s.float().expand(n) for s, n in zip(weight_scales, sizes)])
        self.input_scale = input_scale
        # tokens up to this many: the faster of the streaming kernel and _scaled_mm (timed once per shape)
        self.stream_max_m = FP8_PT_STREAM_MAX_M if per_channel else FP8_STREAM_MAX_M
        super().__init__(in_features=qweight.shape[1], **kw)
        self._qw_t = self.qweight.t()  # (in, out) column-major: the layout _scaled_mm wants
        self.row_scale = self.row_scale.to(self.device).contiguous()  # (out,)
        self._row_scale_2d = self.row_scale[None, :].contiguous()  # (1, out)
        self._one = torch.ones(1, device=self.device)
        if self.path != "reference":
            self._counters = new_counters(self.out_features, self.device)

    def _tensors(self):
        return (self.qweight, *self.weight_scales, self.input_scale)

    def _fast_ok(self) -> bool:
        return (self.device.type == "cuda" and _cap(self.device) >= (8, 9) and self.in_features % 16 == 0
                and self.out_features % 16 == 0)

    def fast_path_name(self) -> str:
        tensorwise = not self.per_channel and len(self.weight_scales) == 1
        return (f"triton stream or _scaled_mm, timed (M<={self.stream_max_m}) / "
                f"torch._scaled_mm ({'tensor-wise' if tensorwise else 'row-wise'} scales)")

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x fp8 (T, in), scale float32 (1,) static or (T, 1) per token)."""
        if self.per_channel:
            return fp8_mod.quantize_per_token(x)
        return fp8_mod.quantize_static(x, self.input_scale), self.input_scale

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.row_scale[:, None]

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = self.quantize_input(x)
        return (xq.float() @ self.qweight.float().T) * xs.float() * self.row_scale[None, :]

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if m <= self.stream_max_m and x.dtype in (torch.bfloat16, torch.float16):
            if self.weight_only_decode:
                return self.forward_stream(x, weight_only=True)
            key = ("FP8", self.per_channel, len(self.weight_scales), m, self.out_features, self.in_features,
                   str(x.dtype))
            paths = {"stream": lambda: self.forward_stream(x), "scaled_mm": lambda: self.forward_scaled_mm(x)}
            path = CHOOSER.choose(key, paths, default="stream", device=x.device)
            if path == "stream":
                return self.forward_stream(x)
        return self.forward_scaled_mm(x)

    def forward_stream(self, x: torch.Tensor, weight_only: bool = False) -> torch.Tensor:
        # no separate quantization pass: the kernel quantizes x as it loads it (or keeps it, weight-only)
        return stream_gemm(x, self.qweight, self.row_scale, kind="fp8", out_features=self.out_features,
                           counters=self._counters,
                           x_scale=None if self.per_channel or weight_only else self.input_scale,
                           per_token=self.per_channel and not weight_only, weight_only=weight_only)

    def forward_scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        # one fused kernel: codes + a (T, 1) scale (the static scale repeated, or each token's own)
        xq, xs = quantize_rows(x, to_fp8=True, static_scale=None if self.per_channel else self.input_scale)
        if not self.per_channel and len(self.weight_scales) == 1:
            return torch._scaled_mm(xq, self._qw_t, scale_a=self.input_scale, scale_b=self.weight_scales[0],
                                    out_dtype=self.dtype)
        if xq.shape[0] <= FP8_ROWWISE_MIN_M - 1:
            # a few rows: the row-wise kernel is slow (up to 1.7x bf16 on H100 at K=14336);
            # a tensor-wise GEMM with unit scales into float32, then the scaling epilogue, is not
            acc = torch._scaled_mm(xq, self._qw_t, scale_a=self._one, scale_b=self._one, out_dtype=torch.float32)
            return int8_epilogue(acc, xs, self.row_scale, None, self.dtype)
        # NOTE: row-wise scaling (cuBLASLt / CUTLASS) needs (T, 1) and (1, N) float32 scales and bf16 output
        y = torch._scaled_mm(xq, self._qw_t, scale_a=xs, scale_b=self._row_scale_2d, out_dtype=torch.bfloat16)
        return y if self.dtype is torch.bfloat16 else y.to(self.dtype)


class Int8Linear(QuantLinear):
    """W8A8: int8 weights per row, int8 activations per token (SmoothQuant or plain)."""

    def __init__(self, qweight, scale, pre_quant_scale, *, smoothed: bool, **kw) -> None:
        self.qweight, self.scale = qweight, scale.float()
        self.pqs = pre_quant_scale.float() if pre_quant_scale is not None else None
        self.scheme = "W8A8 SmoothQuant" if smoothed else "W8A8"
        super().__init__(in_features=qweight.shape[1], **kw)
        self._qw_t = self.qweight.t()  # (in, out) column-major for _int_mm

    def _tensors(self):
        return (self.qweight, self.scale, self.pqs)

    def _fast_ok(self) -> bool:
        return self.device.type == "cuda" and _cap(self.device) >= (8, 0) and self.in_features % 8 == 0 \
            and self.out_features % 8 == 0

    def fast_path_name(self) -> str:
        return "torch._int_mm (int8 tensor cores)"

    def dequantized_weight(self) -> torch.Tensor:
        return int8_dequantize(self.qweight, self.scale)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if self.pqs is None else x.float() * self.pqs.float()
        return int8_linear_reference(xf, self.qweight, self.scale)

    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_rows(x, to_fp8=False, pre_quant_scale=self.pqs)  # int8 (T, in), (T, 1)
        m = xq.shape[0]
        if m <= 16:  # NOTE: _int_mm needs more than 16 rows: pad with zero tokens
            xq = F.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, self._qw_t)  # (rows, out) int32
        return int8_epilogue(acc, xs, self.scale, None, self.dtype, rows=m)  # acc * token * channel scale


class ConcatLinear:
    """Several linears of different formats (e.g. k_proj excluded, q/v quantized), outputs concatenated."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.out_features = sum(p.out_features for p in parts)

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.parts)

    def describe(self) -> str:
        return " + ".join(p.describe() for p in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)
