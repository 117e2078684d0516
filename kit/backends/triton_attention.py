"""The kit's Triton attention kernels, in one place: paged decode and varlen paged prefill.

Both read the paged KV cache in place through the block tables (no padded gather), in
the compute dtype or as int8 / fp8 with per-(token, kv head) scales, and both pack the
GQA group of query heads that share a kv head into one program, so every K/V element is
loaded once per group. The PyTorch backend runs them on a CUDA device:

    paged_decode_attention   one query per sequence (decode steps); split-K over the
                             context (flash-decoding) when the batch is too small to fill
                             the SMs; CUDA-graph safe  -> `attention_decode.py`
    paged_prefill_attention  packed queries of many sequences (prompt chunks with a cached
                             prefix, mixed chunk + decode batches), causal per sequence,
                             sliding window  -> `attention_prefill.py`

`reference_decode_attention` / `reference_prefill_attention` are the same computations in
plain PyTorch (float32), and `kit.ops.paged_attention` is the model's reference they are
tested against. Triton is optional and imported on the first kernel call
(`triton_support.py`), so `TRITON_INTERPRET=1` set before it runs the kernels on the CPU.
"""

from __future__ import annotations

from kit.backends.attention_decode import choose_num_splits, paged_decode_attention, reference_decode_attention
from kit.backends.attention_prefill import (default_prefill_config, paged_prefill_attention,
                                            reference_prefill_attention)
from kit.backends.triton_support import triton_available

__all__ = ["choose_num_splits", "default_prefill_config", "paged_decode_attention", "paged_prefill_attention",
           "reference_decode_attention", "reference_prefill_attention", "triton_available"]
