"""The TensorRT backend: lower a `Network`, build a plan, inspect it (and run it, unpaged, on a GPU).

What TensorRT does with a network
---------------------------------
TensorRT does not execute Python. It takes a *network definition* (`INetworkDefinition`):
a graph of standard layers (gather, matrix multiply, elementwise, reduce, softmax,
shuffle, concatenation, ...) wired by named tensors, with the weights baked in as
constants. The *builder* then optimises that graph for a GPU and a range of input
shapes: it folds constants, fuses chains of layers into single kernels (a norm into
the GEMM that follows it, the softmax of attention with its two matmuls), picks or
generates a kernel for every fused node ("tactics"), and plans the memory of every
intermediate tensor. The result is a *plan* (a serialized engine, `rank0.engine` in
TensorRT-LLM's layout): bytes that a runtime deserializes into an `ICudaEngine` and
runs through an `IExecutionContext`, with one pointer per named input and output.

Shapes are dynamic within one *optimization profile*: for every input, TensorRT is
told the (min, opt, max) shape; kernels are chosen for `opt` and must stay correct
anywhere in [min, max]. Here batch, new tokens and cached tokens are the dynamic dims.
(TensorRT-RTX goes furthest: for SmolLM2 it fuses all ~2,800 layers of the definition
into one compiled node, and finishes compiling its kernels on the target GPU.)

How the kit's layers are lowered (standard layers only, no plugins)
------------------------------------------------------------------
    input_ids (B, S) int32 ──gather from the (1, V, H) embedding──► hidden (B, S, H)
    rmsnorm:   cast f32 → x*x → reduce AVG → + eps → sqrt → 1/· → × → cast dtype → × weight
    qkv_proj:  one matmul against the fused [Wq; Wk; Wv] constant, then three slices
    rope:      cos/sin of position_ids × inv_freq, computed once (layers.0.rope) and
               reused: x·cos + rotate_half(x)·sin
    attention: present_k = concat(past_key_i, k_new) over the sequence axis;
               GQA by broadcasting: q (B, KVH, G, S, D) @ k^T (B, KVH, 1, D, L), so every
               group of G query heads reads its kv head without copying it;
               scores in float32 × scale, a causal mask built from shapes (key j is
               visible to new token i iff j <= past_len + i), softmax, @ v
    o_proj / mlp: matmuls against constants, SwiGLU = silu(gate) * up, residual adds
    lm_head:   matmul against the embedding constant itself when tied (one copy of it in
               the plan), logits for EVERY new position, cast to float32: (B, S, V)

The KV cache is explicit and contiguous (not paged): each layer `i` reads
`past_key_{i}` / `past_value_{i}` of shape (B, num_kv_heads, past_len, head_dim) and
writes `present_key_{i}` / `present_value_{i}` = concat(past, new), (B, KVH,
past_len + S, D). All rows of a batch share one past_len, and the new tokens follow the
cached ones (position_ids feed RoPE only; the mask comes from the shapes). The profile
gives past_len [0, max_seq_len - 1] and S [1, max_input_len] separately: that
past_len + S <= max_seq_len is the caller's to keep. Every TensorRT layer is
named `<kit layer>/<op>` (`layers.3.mlp/gate_up`), so the engine's layer information
maps back to the kit's `Network`.

Modules: `tensorrt_lowering.py` (Network -> INetworkDefinition), `tensorrt_plan.py`
(build, inspect, save / load a `TensorRTPlan`), `tensorrt_reference.py`
(`reference_forward`: the same graph written op for op with `kit/ops.py`, how the
lowering's math is tested where the plan cannot run), and this one: the backend.

The backend cannot execute paged batches (`can_execute` is False): an engine built with
it holds a plan to inspect and save; serving uses the PyTorch backend. On a GPU the
plan runs unpaged through `TensorRTBackend.run(input_ids, position_ids, past_kv)`.

Flavours: `tensorrt` (TensorRT proper) or `tensorrt_rtx` (TensorRT-RTX, `pip install
.[tensorrt]`). TensorRT-RTX builds ahead of time without a GPU for the compute
capabilities it is told (`compute_capabilities`), but its runtime refuses Hopper
(compute capability 9.0): there, use the PyTorch backend.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kit.backends.base import LayerHook
from kit.backends.tensorrt_common import DEFAULT_RTX_COMPUTE_CAPABILITIES, import_tensorrt, kit_layer_of, make_logger
from kit.backends.tensorrt_lowering import TensorRTLowering
from kit.backends.tensorrt_plan import TensorRTPlan, build_plan
from kit.backends.tensorrt_reference import KV, reference_forward
from kit.batch import ForwardBatch, KVCache

__all__ = ["import_tensorrt", "TensorRTLowering", "TensorRTPlan", "TensorRTBackend", "build_plan",
           "reference_forward", "kit_layer_of", "DEFAULT_RTX_COMPUTE_CAPABILITIES"]


class TensorRTBackend:
    """Holds a `TensorRTPlan`; on a CUDA GPU runs it unpaged: `run(input_ids, position_ids, past_kv)`."""

    name = "tensorrt"
    can_execute = False  # paged batches: see `capabilities`
    capabilities = ("the TensorRT backend builds and inspects plans (inputs, outputs, optimization profile, "
                    "layers; engine.backend.plan) and saves them with the engine; it does not execute paged "
                    "batches: use the PyTorch backend (backend='torch') to execute")

    def __init__(self, plan: TensorRTPlan) -> None:
        self.plan = plan
        self._context: Any = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.plan.dtype)

    def forward(self, batch: ForwardBatch, kv_cache: KVCache,
                hooks: Sequence[LayerHook] | None = None) -> torch.Tensor:
        """Always raises: a plan takes a contiguous KV cache (see `run`), not a paged batch."""
        raise RuntimeError(self.capabilities)

    def capture_cuda_graphs(self, kv_cache: KVCache, batch_sizes: Sequence[int], max_blocks: int) -> None:
        raise RuntimeError(self.capabilities)

    def describe(self) -> str:
        return (f"{self.plan.flavour} {self.plan.version} plan ({self.plan.nbytes / 2**20:.1f} MiB, "
                f"{self.plan.precision})")

    def check_runtime(self) -> None:
        """Raise a clear RuntimeError unless this machine can run the plan; deserialize it once."""
        if self._context is not None:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU and none is visible; the plan can be built "
                               "here but not run: use the PyTorch backend (backend='torch')")
        cc = torch.cuda.get_device_capability()
        if self.plan.flavour == "tensorrt_rtx" and cc == (9, 0):
            raise RuntimeError("TensorRT-RTX does not run on compute capability 9.0 (Hopper); "
                               "use the PyTorch backend (backend='torch')")
        sm = f"SM{cc[0]}{cc[1]}"
        if self.plan.compute_capabilities and sm not in self.plan.compute_capabilities:
            raise RuntimeError(f"this plan was built for {', '.join(self.plan.compute_capabilities)}, the GPU is {sm}: "
                               f"rebuild with compute_capabilities=[{sm!r}]")
        trt, flavour = import_tensorrt()
        if flavour != self.plan.flavour:
            raise RuntimeError(f"the plan was built with {self.plan.flavour}, but {flavour} is installed")
        self._logger = make_logger(trt)
        self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.plan.plan)
        if self._engine is None:
            raise RuntimeError(f"{flavour} could not deserialize the plan: {self._logger.messages[-3:]}")
        self._context = self._engine.create_execution_context()

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
            past_kv: Sequence[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """input_ids / position_ids (B, S); past_kv[i] = (k, v) of (B, KVH, P, D), None for an empty cache.

        Returns logits (B, S, V) in float32 and present_kv[i] = (k, v) of (B, KVH, P + S, D).
        """
        self.check_runtime()
        dev, dtype = torch.device("cuda"), getattr(torch, self.plan.dtype)
        num_layers = sum(io["name"].startswith("past_key_") for io in self.plan.inputs)
        if past_kv is None:
            _, kvh, _, d = self.plan.inputs[2]["shape"]
            empty = torch.empty(input_ids.shape[0], kvh, 0, d, dtype=dtype, device=dev)
            past_kv = [(empty, empty)] * num_layers
        feeds = {"input_ids": input_ids.to(dev, torch.int32).contiguous(),
                 "position_ids": position_ids.to(dev, torch.int32).contiguous()}
        for i, (k, v) in enumerate(past_kv):
            feeds[f"past_key_{i}"] = k.to(dev, dtype).contiguous()
            feeds[f"past_value_{i}"] = v.to(dev, dtype).contiguous()
        scratch = torch.empty(1, dtype=torch.float32, device=dev)  # an address for zero-size tensors (past_len 0)
        ctx = self._context
        for name, t in feeds.items():
            if not ctx.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self.plan.profiles[0][name]
                raise ValueError(f"{name} has shape {tuple(t.shape)}, outside the plan's profile [{lo}, {hi}]")
            ctx.set_tensor_address(name, t.data_ptr() if t.numel() else scratch.data_ptr())
        outs = {}
        for io in self.plan.outputs:
            t = torch.empty(tuple(ctx.get_tensor_shape(io["name"])), dtype=getattr(torch, io["dtype"]), device=dev)
            ctx.set_tensor_address(io["name"], t.data_ptr() if t.numel() else scratch.data_ptr())
            outs[io["name"]] = t
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution failed: {self._logger.messages[-3:]}")
        torch.cuda.current_stream().synchronize()
        present = [(outs[f"present_key_{i}"], outs[f"present_value_{i}"]) for i in range(num_layers)]
        return outs["logits"], present
