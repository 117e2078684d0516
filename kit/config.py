"""Architecture facts of a decoder-only transformer, read from a checkpoint.

`ModelConfig` is the one description of a model that every later step uses: the
loader fills it from a Hugging Face `config.json` or from GGUF metadata, the network
builder turns it into layers, the engine sizes its KV cache from it, and the build
cache hashes it. It covers the Llama family and its close relatives:

| family  | what differs from Llama                                   |
| ------- | --------------------------------------------------------- |
| llama   | (reference) RMSNorm, RoPE (incl. llama3 scaling), GQA, SwiGLU |
| mistral | sliding-window attention                                  |
| qwen2   | bias on the q/k/v projections                             |
| qwen3   | RMSNorm on each head of q and k before RoPE               |
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]

# model_type (config.json) / general.architecture (GGUF) -> HF class name
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_ARCH_TO_FAMILY = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")
_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _unsupported(name: str) -> ValueError:
    return ValueError(
        f"unsupported architecture {name!r}: the kit supports "
        f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} "
        f"({', '.join(SUPPORTED_ARCHITECTURES.values())})"
    )


@dataclass(frozen=True)
class ModelConfig:
    """What the engine must know about a model's architecture."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in HF configs
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.family not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(self.family)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "ModelConfig.num_attention_heads must be a multiple of num_key_value_heads, got "
                f"{self.num_attention_heads} and {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"ModelConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"ModelConfig.rope_scaling type {rope_type!r} is not supported; "
                    f"allowed: {', '.join(_ROPE_TYPES)}"
                )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be > 0 or None, got {self.sliding_window}")

    # ------------------------------------------------------------------ derived
    @property
    def architecture(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.family]

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_bytes

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        total = v * h + self.num_hidden_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        if model_type is None:
            archs = hf.get("architectures") or []
            model_type = next((_ARCH_TO_FAMILY[a] for a in archs if a in _ARCH_TO_FAMILY), None)
            if model_type is None:
                raise _unsupported(archs[0] if archs else "<none given>")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(model_type)
        missing = [k for k in _REQUIRED_HF_FIELDS if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {', '.join(missing)}")
        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        # transformers >= 5 keeps theta and scaling together in `rope_parameters`
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
            if scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=True is not supported for {model_type}")
        return cls(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=attention_bias if model_type in ("llama", "mistral", "qwen3") else False,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_config(data, source=str(path))

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dictionary that transformers reads back into the same model."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(self.rope_scaling)
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        hf["rope_parameters"] = rope_parameters
        if self.family in ("llama", "mistral", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.family == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.family == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    # -------------------------------------------------------------------- GGUF
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, source: str = "GGUF") -> "ModelConfig":
        """Read the `general.*` / `<arch>.*` key-value metadata of a GGUF file."""
        arch = meta.get("general.architecture")
        if arch is None:
            raise ValueError(f"{source}: no general.architecture in its metadata")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported(arch)

        def get(key: str, default: Any = None, required: bool = False) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                if required:
                    raise ValueError(f"{source}: missing required metadata {full}")
                return default
            return meta[full]

        hidden = int(get("embedding_length", required=True))
        heads = int(get("attention.head_count", required=True))
        kv_heads = int(get("attention.head_count_kv", heads))
        head_dim = int(get("attention.key_length", 0) or get("rope.dimension_count", 0) or hidden // heads)
        vocab = get("vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ValueError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is present")
            vocab = len(tokens)
        scaling = None
        if get("rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            family=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length", required=True)),
            num_hidden_layers=int(get("block_count", required=True)),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=bool(meta.get("_tied_embeddings", True)),
            qkv_bias=arch == "qwen2",
            qk_norm=arch == "qwen3",
            sliding_window=get("attention.sliding_window") if arch == "mistral" else None,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

