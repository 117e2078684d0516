"""The model as an explicit, ordered list of layers.

A `Network` is what TensorRT calls a network definition: every step of the forward
pass named, typed and wired by tensor names, with the weights each step reads. The
backends (PyTorch, TensorRT) execute or lower it layer by layer, the profiler times
it layer by layer, and a notebook can print it, count it and look inside any layer.

One decoder block of a Llama-family model becomes these layers (`layers.{i}.` prefix):

    input_norm (rmsnorm) -> qkv_proj -> [qk_norm] -> rope -> attention
        -> o_proj (+ residual) -> post_attention_norm (rmsnorm) -> mlp (+ residual)

framed by `embedding` at the start and `final_norm` + `lm_head` at the end. Tensors
flow between layers by name through an environment: `hidden` is the residual stream,
`x` the normalised input of the next projection.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from kit.config import ModelConfig
from kit.layer_kinds import LAYER_KINDS
from kit.loader import LoadedModel

__all__ = ["Layer", "Network", "NetworkBuilder", "LAYER_KINDS"]

@dataclass(frozen=True)
class Layer:
    """One step of the forward pass; `kind` is a key of `LAYER_KINDS` (kit/layer_kinds.py).

    `attrs` holds what the kind's computation needs beyond the weights: `layer_idx` (blocks),
    `eps` (norms), `bias` (projections), `scale` / `sliding_window` (attention),
    `intermediate_size` (mlp), `tied` (lm_head).
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"Layer.kind {self.kind!r} is not one of {', '.join(LAYER_KINDS)}")

    @property
    def block(self) -> int | None:
        """Index of the decoder block this layer belongs to (None for embedding / head)."""
        return self.attrs.get("layer_idx")


class Network:
    """An ordered list of `Layer`s plus the weights they name."""

    def __init__(
        self,
        config: ModelConfig,
        layers: list[Layer],
        weights: dict[str, torch.Tensor],
        *,
        name: str = "model",
        quant_config: Any = None,
    ) -> None:
        missing = [w for layer in layers for w in layer.weights if w not in weights]
        if missing:
            raise ValueError(f"network {name!r}: weights named by layers but absent: {missing[:5]}")
        self.config = config
        self.layers = layers
        self.weights = weights
        self.name = name
        self.quant_config = quant_config

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, key: int | str) -> Layer:
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no layer named {key!r}")
        return self.layers[key]

    @property
    def num_parameters(self) -> int:
        # tied embeddings are one tensor named by two layers: count each tensor once
        return sum(t.numel() for t in self.weights.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def to_frame(self) -> pd.DataFrame:
        """One row a layer: `name, kind, block, params, weight_bytes, dtype, inputs, outputs`.

        A tied lm_head reports the embedding's parameters again (it reads them again
        every step), so the column sums to more than `num_parameters`.
        """
        rows = []
        for layer in self.layers:
            tensors = [self.weights[w] for w in layer.weights]
            dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
            rows.append(
                {
                    "name": layer.name,
                    "kind": layer.kind,
                    "block": layer.block,
                    "params": sum(t.numel() for t in tensors),
                    "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
                    "dtype": ",".join(dtypes) if dtypes else "",
                    "inputs": ",".join(layer.inputs),
                    "outputs": ",".join(layer.outputs),
                }
            )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Per-kind totals: `kind, count, params, weight_bytes, share_pct`."""
        df = self.to_frame()
        g = df.groupby("kind", sort=False).agg(count=("name", "size"), params=("params", "sum"), weight_bytes=("weight_bytes", "sum"))
        g["share_pct"] = 100.0 * g["weight_bytes"] / max(1, int(g["weight_bytes"].sum()))
        return g.reset_index()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Network({self.name!r}, {c.family}, {len(self.layers)} layers, "
            f"{self.num_parameters / 1e6:.1f}M params, {self.weight_bytes / 2**20:.1f} MiB)"
        )

    def _repr_html_(self) -> str:
        c = self.config
        head = (
            f"<b>Network</b> <code>{html.escape(self.name)}</code> &middot; {c.family} &middot; "
            f"{c.num_hidden_layers} blocks &middot; {len(self.layers)} layers &middot; "
            f"{self.num_parameters / 1e6:.1f}M parameters &middot; {self.weight_bytes / 2**20:.1f} MiB"
            + (f" &middot; quantized: {html.escape(str(self.quant_config))}" if self.quant_config else "")
        )
        df = self.to_frame()
        # show the embedding, the first block in full, and the head; summarise the rest
        first_block = df[(df["block"].isna()) | (df["block"] == 0)]
        shown = first_block.drop(columns=["block"]).to_html(index=False, border=0)
        rest = len(df) - len(first_block)
        note = f"<p><i>... and {rest} more layers in blocks 1..{c.num_hidden_layers - 1}, same structure.</i></p>" if rest else ""
        return f"<div>{head}{shown}{note}<p><b>By kind</b></p>{self.summary().to_html(index=False, border=0)}</div>"


class NetworkBuilder:
    """Turns a `LoadedModel` into a `Network` (Llama, Mistral, Qwen2, Qwen3)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def build(self) -> Network:
        cfg = self.loaded.config
        w = self.loaded.weights
        layers: list[Layer] = [
            Layer("embedding", "embedding", ("input_ids",), ("hidden",), ("model.embed_tokens.weight",)),
        ]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            n = f"layers.{i}."
            attn = p + "self_attn."

            def proj(*names: str, bias: bool) -> tuple[str, ...]:
                out = tuple(f"{attn}{m}.weight" for m in names)
                if bias:
                    out += tuple(f"{attn}{m}.bias" for m in names)
                return out

            block = [
                Layer(n + "input_norm", "rmsnorm", ("hidden",), ("x",), (p + "input_layernorm.weight",),
                      {"layer_idx": i, "eps": cfg.rms_norm_eps}),
                Layer(n + "qkv_proj", "qkv_proj", ("x",), ("q", "k", "v"),
                      self._linear_weights(proj("q_proj", "k_proj", "v_proj", bias=cfg.qkv_bias)),
                      {"layer_idx": i, "bias": cfg.qkv_bias}),
            ]
            if cfg.qk_norm:
                block.append(Layer(n + "qk_norm", "qk_norm", ("q", "k"), ("q", "k"),
                                   (attn + "q_norm.weight", attn + "k_norm.weight"),
                                   {"layer_idx": i, "eps": cfg.rms_norm_eps}))
            block += [
                Layer(n + "rope", "rope", ("q", "k", "positions"), ("q", "k"), (),
                      {"layer_idx": i}),
                Layer(n + "attention", "attention", ("q", "k", "v"), ("attn",), (),
                      {"layer_idx": i, "scale": cfg.head_dim**-0.5, "sliding_window": cfg.sliding_window}),
                Layer(n + "o_proj", "o_proj", ("attn", "hidden"), ("hidden",),
                      self._linear_weights(proj("o_proj", bias=cfg.o_bias)),
                      {"layer_idx": i, "bias": cfg.o_bias}),
                Layer(n + "post_attention_norm", "rmsnorm", ("hidden",), ("x",),
                      (p + "post_attention_layernorm.weight",), {"layer_idx": i, "eps": cfg.rms_norm_eps}),
                Layer(n + "mlp", "mlp", ("x", "hidden"), ("hidden",),
                      self._linear_weights(tuple(f"{p}mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj"))
                                           + (tuple(f"{p}mlp.{m}.bias" for m in ("gate_proj", "up_proj", "down_proj"))
                                              if cfg.mlp_bias else ())),
                      {"layer_idx": i, "bias": cfg.mlp_bias, "intermediate_size": cfg.intermediate_size}),
            ]
            layers += block
        head_weight = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        layers += [
            Layer("final_norm", "rmsnorm", ("hidden",), ("x",), ("model.norm.weight",), {"eps": cfg.rms_norm_eps}),
            Layer("lm_head", "lm_head", ("x", "logits_indices"), ("logits",), self._linear_weights((head_weight,)),
                  {"tied": cfg.tie_word_embeddings}),
        ]
        return Network(cfg, layers, w, name=self.loaded.name, quant_config=self.loaded.quant_config)

    def _linear_weights(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The tensors that hold each linear weight: the weight itself, or its quantized parts.

        A quantized model stores `<prefix>.qweight` and its scales in place of
        `<prefix>.weight`; every tensor starting with the prefix belongs to the layer.
        """
        out: list[str] = []
        weights = self.loaded.weights
        for name in names:
            if name in weights:
                out.append(name)
                continue
            prefix = name.rsplit(".", 1)[0] + "."
            parts = sorted(k for k in weights if k.startswith(prefix) and k.count(".") == name.count("."))
            if not parts:
                raise ValueError(f"{self.loaded.name}: weight {name!r} is missing from the checkpoint")
            out += parts
        return tuple(dict.fromkeys(out))
