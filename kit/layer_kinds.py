"""The kinds of layer a `Network` is made of: what each computes and what it costs, written once.

`LAYER_KINDS` maps each kind to a `LayerKind`: the formula it computes (in terms of
`kit/ops.py`), the ops it uses, and its cost model (the least FLOPs and bytes a kernel
must do / move for a batch). Every consumer of a `Network` dispatches on this table:
the PyTorch backend (one function per kind), the TensorRT lowering (one lowering per
kind), the TensorRT reference and the profiler's cost model (`LayerKind.cost`). Each
dispatch table is checked against it with `check_covers`, so adding a kind without
teaching every consumer fails at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from kit.config import ModelConfig

__all__ = ["LayerKind", "CostShape", "LAYER_KINDS", "check_covers"]


@dataclass(frozen=True)
class CostShape:
    """A batch as the cost model sees it: `num_seqs` sequences of `q_len` new tokens over `ctx_len` context."""

    num_tokens: int
    num_seqs: int
    q_len: int
    ctx_len: int
    elem: int  # bytes per activation element


Cost = Callable[[ModelConfig, int, int, CostShape], tuple[float, float]]  # (config, params, weight bytes, shape)


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer: `computes` is its formula, `ops` the `kit.ops` functions it uses."""

    name: str
    computes: str
    ops: tuple[str, ...]
    cost: Cost


def _linear(acts: Callable[[ModelConfig], int], rows_are_seqs: bool = False) -> Cost:
    """A GEMM over the layer's weights: 2 FLOPs a parameter a row; weights read once, activations once."""
    def cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
        rows = s.num_seqs if rows_are_seqs else s.num_tokens
        return 2.0 * rows * params, float(wbytes + rows * acts(c) * s.elem)
    return cost


def _embedding_cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
    return 0.0, float(2 * s.num_tokens * c.hidden_size * s.elem)


def _rmsnorm_cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
    return 4.0 * s.num_tokens * c.hidden_size, float(2 * s.num_tokens * c.hidden_size * s.elem + wbytes)


def _qk_norm_cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
    width = c.q_size + c.kv_size
    return 4.0 * s.num_tokens * width, float(2 * s.num_tokens * width * s.elem)


def _rope_cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
    width = c.q_size + c.kv_size
    return 6.0 * s.num_tokens * width, float(2 * s.num_tokens * width * s.elem)


def _attention_cost(c: ModelConfig, params: int, wbytes: int, s: CostShape) -> tuple[float, float]:
    # each new token attends to its causal prefix: on average ctx - q_len/2 keys
    keys = max(1.0, s.ctx_len - (s.q_len - 1) / 2)
    flops = 4.0 * s.num_seqs * s.q_len * keys * c.num_attention_heads * c.head_dim
    kv_read = s.num_seqs * s.ctx_len * 2 * c.kv_size * s.elem
    return flops, float(kv_read + s.num_tokens * (2 * c.q_size + 2 * c.kv_size) * s.elem)


_KINDS = (
    LayerKind("embedding", "hidden = table[input_ids]", (), _embedding_cost),
    LayerKind("rmsnorm", "out = rms_norm(in, weight, eps)", ("rms_norm",), _rmsnorm_cost),
    LayerKind("qkv_proj", "q, k, v = split(x @ [Wq; Wk; Wv]^T (+ b))", (),
              _linear(lambda c: c.hidden_size + c.q_size + 2 * c.kv_size)),
    LayerKind("qk_norm", "q, k = rms_norm(q, wq, eps), rms_norm(k, wk, eps) per head", ("rms_norm",), _qk_norm_cost),
    LayerKind("rope", "q, k = apply_rope(q|k, rope_cos_sin(positions, rope_inv_freq(config)))",
              ("rope_inv_freq", "rope_cos_sin", "apply_rope"), _rope_cost),
    LayerKind("attention", "attn = softmax(q k^T * scale + causal_mask) v over the cached K/V (GQA)",
              ("causal_mask", "paged_attention"), _attention_cost),
    LayerKind("o_proj", "hidden = hidden + attn @ Wo^T (+ b)", (), _linear(lambda c: c.q_size + 2 * c.hidden_size)),
    LayerKind("mlp", "hidden = hidden + swiglu(x @ Wg^T, x @ Wu^T) @ Wd^T", ("swiglu",),
              _linear(lambda c: 2 * c.hidden_size + 3 * c.intermediate_size)),
    # logits are kept in float32: two elements' worth a vocabulary entry
    LayerKind("lm_head", "logits = x[logits_indices] @ W^T (float32)", (),
              _linear(lambda c: c.hidden_size + 2 * c.vocab_size, rows_are_seqs=True)),
)
LAYER_KINDS: dict[str, LayerKind] = {k.name: k for k in _KINDS}


def check_covers(owner: str, handled: Iterable[str]) -> None:
    """Raise if `owner`'s dispatch table does not handle exactly the kinds of `LAYER_KINDS`."""
    handled = set(handled)
    missing, extra = sorted(set(LAYER_KINDS) - handled), sorted(handled - set(LAYER_KINDS))
    if missing or extra:
        raise TypeError(f"{owner} must handle every layer kind exactly: missing {missing}, unknown {extra}")
