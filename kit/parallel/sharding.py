"""How each weight is split between tensor-parallel ranks (the Megatron-LM layout).

    column-parallel   q/k/v, gate/up      rows (output features) split: each rank computes
                                          its own heads / its slice of the MLP, no communication
    row-parallel      o_proj, down        columns (input features) split: each rank holds a
                                          partial sum; one all-reduce per layer adds them
    vocab-parallel    embedding, lm_head  vocabulary rows split (padded to a multiple of
                                          tp_size); the embedding all-reduces its rows, the
                                          lm_head's logits are gathered on rank 0
    replicated        norms, q/k norms    every rank keeps the whole tensor

Quantized weights are split by the same rule, tensor by tensor, reading what each stored
tensor is from its name and shape: codes and per-row scales follow the rows; int4 codes
(two a byte) and group scales / zero points follow the input columns in units of a byte
or a group, so a row-parallel split must fall on a group boundary (refused otherwise);
per-tensor scales, FP8 input scales and a column-parallel layer's `pre_quant_scale` are
replicated; a row-parallel bias is kept by rank 0 only (the all-reduce adds it once).

`shard_network(network, mapping)` returns the rank's `Network`: the same layers with the
rank's shapes (its `ModelConfig` counts local heads, KV heads, MLP width and vocab rows).
`sharding_frame(network, tp_size)` lists the split of every tensor for every rank.
"""

from __future__ import annotations

import dataclasses
import re

import pandas as pd
import torch

from kit.network import Network
from kit.parallel.mapping import Mapping

__all__ = ["shard_network", "shard_tensor", "split_of", "sharding_frame", "SHARD_COLUMNS"]

SHARD_COLUMNS = ("tensor", "layer_kind", "split", "full_shape", "rank", "shard_shape", "shard_bytes")

_COLUMN = re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj)|mlp\.(gate_proj|up_proj))\.([a-z_]+)$")
_ROW = re.compile(r"\.(self_attn\.o_proj|mlp\.down_proj)\.([a-z_]+)$")
_VOCAB = ("model.embed_tokens.", "lm_head.")


def split_of(name: str) -> str:
    """'column' | 'row' | 'vocab' | 'replicated' for a weight named `name`."""
    if name.startswith(_VOCAB):
        return "vocab"
    if _COLUMN.search(name):
        return "column"
    if _ROW.search(name):
        return "row"
    return "replicated"


def _out_range(name: str, config, mapping: Mapping) -> tuple[int, int, int]:
    """(first row, end row, full rows) of a column-parallel linear's output for this rank."""
    d = config.head_dim
    proj = _COLUMN.search(name).group(1).rsplit(".", 1)[-1]
    if proj == "q_proj":
        heads = mapping.heads(config)
        return heads.start * d, heads.stop * d, config.q_size
    if proj in ("k_proj", "v_proj"):
        heads = mapping.kv_heads(config)
        return heads.start * d, heads.stop * d, config.kv_size
    n = config.intermediate_size // mapping.tp_size
    return mapping.tp_rank * n, (mapping.tp_rank + 1) * n, config.intermediate_size


def _in_range(name: str, config, mapping: Mapping) -> tuple[int, int, int]:
    """(first column, end column, full columns) of a row-parallel linear's input for this rank."""
    if "o_proj" in name:
        heads = mapping.heads(config)
        return heads.start * config.head_dim, heads.stop * config.head_dim, config.q_size
    n = config.intermediate_size // mapping.tp_size
    return mapping.tp_rank * n, (mapping.tp_rank + 1) * n, config.intermediate_size


def shard_tensor(name: str, t: torch.Tensor, config, mapping: Mapping) -> torch.Tensor:
    """This rank's part of tensor `name` (a view where it can be; padded rows are new zeros)."""
    split = split_of(name)
    suffix = name.rsplit(".", 1)[-1]
    if mapping.tp_size == 1 or split == "replicated":
        return t
    if split == "vocab":
        if t.ndim == 0 or t.shape[0] != config.vocab_size:
            return t  # per-tensor scales of a quantized lm_head
        rows = mapping.vocab_range(config.vocab_size)
        part = t[rows.start:min(rows.stop, config.vocab_size)]
        pad = len(rows) - part.shape[0]
        if pad > 0:  # the padding rows of the last rank: zero embeddings, zero logits (cut off later)
            part = torch.cat([part, part.new_zeros((pad, *part.shape[1:]))])
        return part
    if split == "column":
        a, b, full = _out_range(name, config, mapping)
        if suffix == "pre_quant_scale" or t.ndim == 0 or t.shape[0] != full:
            return t  # reads the whole input: smoothing vector, per-tensor scales
        return t[a:b]
    a, b, full = _in_range(name, config, mapping)  # row-parallel
    if suffix == "bias":
        return t if mapping.tp_rank == 0 else torch.zeros_like(t)
    if suffix == "pre_quant_scale":
        return t[a:b]
    if t.ndim < 2:
        return t  # per-row or per-tensor scales: every rank needs all of them
    k = full // t.shape[-1]  # input columns per stored column: 1, 2 (int4 codes), group_size (group scales)
    if k * t.shape[-1] != full or a % k or b % k:
        raise ValueError(f"{name}: its {t.shape[-1]} stored columns cover {full} inputs in units of {k}; rank "
                         f"{mapping.tp_rank} of tensor_parallel_size={mapping.tp_size} would take inputs "
                         f"[{a}, {b}), which does not fall on a unit (group) boundary: choose a group_size "
                         f"that divides {b - a}")
    return t[..., a // k:b // k]


def _shard_config(config, mapping: Mapping):
    return dataclasses.replace(
        config, num_attention_heads=config.num_attention_heads // mapping.tp_size,
        num_key_value_heads=len(mapping.kv_heads(config)),
        intermediate_size=config.intermediate_size // mapping.tp_size,
        vocab_size=len(mapping.vocab_range(config.vocab_size)))


def shard_network(network: Network, mapping: Mapping) -> Network:
    """The `Network` rank `mapping.rank` runs: its weights, its shapes, the same layers."""
    config = network.config
    mapping.check_model(config)
    if mapping.tp_size == 1:
        return network
    weights = {n: shard_tensor(n, t, config, mapping).contiguous() for n, t in network.weights.items()}
    layers = [dataclasses.replace(l, attrs={**l.attrs, "intermediate_size": config.intermediate_size
                                            // mapping.tp_size}) if l.kind == "mlp" else l for l in network.layers]
    return Network(_shard_config(config, mapping), layers, weights, name=network.name,
                   quant_config=network.quant_config)


def sharding_frame(network: Network, tp_size: int) -> pd.DataFrame:
    """One row per (tensor, rank): columns `SHARD_COLUMNS` (shapes as tuples, bytes of the shard)."""
    kinds = {w: l.kind for l in network.layers for w in l.weights}
    rows = []
    for rank in range(tp_size):
        m = Mapping.tensor_parallel(tp_size, rank)
        m.check_model(network.config)
        for name, t in network.weights.items():
            s = shard_tensor(name, t, network.config, m)
            rows.append({"tensor": name, "layer_kind": kinds.get(name, ""), "split": split_of(name),
                         "full_shape": tuple(t.shape), "rank": rank, "shard_shape": tuple(s.shape),
                         "shard_bytes": s.numel() * s.element_size()})
    return pd.DataFrame(rows, columns=list(SHARD_COLUMNS))

