"""Fused kernels of the decode step (Triton on CUDA, the exact torch reference elsewhere).

Each op does in one kernel what the unfused PyTorch backend does in several, and has a
reference written with `kit/ops.py`'s math that it is tested against:

    fused_add_rms_norm   residual += x; x = rms_norm(residual)     (kit/kernels/fused_norm.py)
    rope_kv_write        RoPE on q and k, k and v into the paged cache (kit/kernels/rope_cache.py)
    silu_mul             silu(gate) * up over the gate_up output    (kit/kernels/activation.py)
    greedy_pick          argmax and its log-softmax, one read of the logits (kit/kernels/greedy.py)
    LaunchCounter        kernels one forward pass launches, counted on any device (kit/kernels/launches.py)

`impl` is "auto" (Triton on a CUDA tensor when triton is installed, else torch), "triton" or "torch".
"""

from kit.kernels.activation import silu_mul, silu_mul_reference
from kit.kernels.fused_norm import fused_add_rms_norm, fused_add_rms_norm_reference, rms_norm_kernel
from kit.kernels.greedy import greedy_pick, greedy_pick_reference
from kit.kernels.launches import LaunchCounter, counted, fused_launch
from kit.kernels.rope_cache import rope_kv_write, rope_kv_write_reference

__all__ = ["fused_add_rms_norm", "fused_add_rms_norm_reference", "rms_norm_kernel", "rope_kv_write",
           "rope_kv_write_reference", "silu_mul", "silu_mul_reference", "greedy_pick", "greedy_pick_reference",
           "LaunchCounter", "counted", "fused_launch"]
