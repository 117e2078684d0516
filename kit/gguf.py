"""GGUF files: read them (config, dequantized weights with Hugging Face names) and cache the conversion.

A GGUF file is dequantized once and stored as safetensors + config + tokenizer under
`$KIT_CACHE_DIR/models/<sha256[:24]>-v<format>`, with a content manifest (see
`kit/cache_entry.py`): a damaged entry is quarantined and converted again, and a cache
that cannot be written degrades to "converted, not cached" with a warning.

Any failure to read the file (empty, truncated, wrong magic, a tensor that does not fit its
shape, missing metadata) is one `ValueError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from kit.progress import tqdm

from kit.cache_entry import (CacheEntryError, cache_dir, make_temp_dir, quarantine, sweep_temp_dirs,
                             verify_manifest, write_json_atomic, write_manifest)
from kit.config import ModelConfig
from kit.tokenizer import Tokenizer

__all__ = ["read_gguf", "gguf_metadata", "gguf_config", "open_gguf", "converted_entry", "load_converted",
           "convert_gguf", "CONVERTED_FORMAT"]

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# NOTE: 2 = entries carry a content manifest; format-1 entries (no manifest) are not read
CONVERTED_FORMAT = 2
_ENTRY_INFO = "entry.json"


def _unreadable(path: Path, e: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})")


def open_gguf(path: Path) -> Any:
    """A GGUFReader over `path`; ValueError naming the file if it is not a readable GGUF file."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises many types on a bad file
        raise _unreadable(path, e) from e


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """Plain Python values of a GGUFReader's key-value fields."""
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # noqa: BLE001 - exotic field types are not needed by the kit
            continue
    return meta


def _config(reader: Any, path: Path) -> tuple[ModelConfig, dict[str, Any]]:
    meta = gguf_metadata(reader)
    meta["_tied_embeddings"] = "output.weight" not in {t.name for t in reader.tensors}
    try:
        config = ModelConfig.from_gguf_metadata(meta, source=str(path))
    except (KeyError, TypeError, IndexError) as e:
        raise _unreadable(path, e) from e
    return config, meta


def gguf_config(path: Path, digest: str) -> ModelConfig:
    """The ModelConfig of a GGUF file (as the converted entry stores it) without reading its tensors.

    From the converted entry's config.json when its manifest vouches for it (parsing the GGUF
    vocabulary takes seconds), else from the file.
    """
    entry = converted_entry(digest)
    try:
        verify_manifest(entry, hashes=("config.json",))
        return ModelConfig.from_json(entry / "config.json")
    except (CacheEntryError, OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: the load that follows quarantines and converts it again
    config, _ = _config(open_gguf(path), path)
    return ModelConfig.from_hf_config(config.to_hf_config())


def _reverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of the rotary halves in q/k projection rows."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Dequantize every tensor of a GGUF file to float32 with Hugging Face names."""
    from gguf.quants import dequantize

    reader = open_gguf(path)
    config, meta = _config(reader, path)
    weights: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", leave=False):
        base, _, suffix = t.name.rpartition(".")
        if base.startswith("blk."):
            _, idx, part = base.split(".", 2)
            if part not in _GGUF_BLOCK_NAMES:
                continue
            hf = f"model.layers.{idx}.{_GGUF_BLOCK_NAMES[part]}.{suffix}"
        elif base in _GGUF_TOP_NAMES:
            hf = f"{_GGUF_TOP_NAMES[base]}.{suffix}"
        else:
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the innermost dim first
        try:
            data = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except Exception as e:  # noqa: BLE001 - a truncated file surfaces as a reshape / buffer error
            raise ValueError(f"{path}: not a readable GGUF file (tensor {t.name}: {type(e).__name__}: {e})") from e
        tensor = torch.from_numpy(data.copy())
        if config.family in ("llama", "mistral") and hf.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf else config.num_key_value_heads
            tensor = _reverse_permute(tensor, heads)
        weights[hf] = tensor
    return config, weights, meta


# ------------------------------------------------------------------ conversion cache
def converted_entry(digest: str) -> Path:
    """Where the conversion of the GGUF file with this sha256 is cached."""
    return cache_dir() / "models" / f"{digest[:24]}-v{CONVERTED_FORMAT}"


def _drop_stale_formats(entry: Path) -> None:
    """Remove conversions of the same file in older formats (the kit no longer reads them)."""
    stem = entry.name.rsplit("-v", 1)[0]
    for p in entry.parent.glob(f"{stem}-v*"):
        if p != entry and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def load_converted(entry: Path) -> tuple[ModelConfig, Path, Tokenizer] | None:
    """(config, safetensors file, tokenizer) of a verified entry; None when absent or damaged (quarantined)."""
    if not entry.exists():
        return None
    try:
        verify_manifest(entry)
        result = ModelConfig.from_json(entry / "config.json"), entry / "model.safetensors", Tokenizer.from_dir(entry)
        _drop_stale_formats(entry)
        return result
    except (CacheEntryError, OSError, ValueError, KeyError, TypeError) as e:
        quarantine(entry, str(e))
        return None


def convert_gguf(path: Path, entry: Path, digest: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Dequantize `path` and store the result as `entry` (atomic: temp dir, manifest, rename).

    The converted weights are returned from memory; if the cache cannot be written (read-only,
    full, removed meanwhile) a warning says so and nothing else fails.
    """
    from safetensors.torch import save_file

    config, weights, _ = read_gguf(path)
    tokenizer = Tokenizer.from_gguf(path)
    tmp: Path | None = None
    try:
        sweep_temp_dirs(entry.parent) if entry.parent.exists() else None
        tmp = make_temp_dir(entry.parent, entry.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"source": str(path)})
        (tmp / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2))
        tokenizer.save(tmp)
        write_json_atomic(tmp / _ENTRY_INFO, {"source": str(path), "name": path.stem, "sha256": digest})
        write_manifest(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            # another process converted the same file first: theirs is as good as ours, if whole
            if load_converted(entry) is None:
                os.rename(tmp, entry)
    except (OSError, SafetensorError) as e:  # NOTE: safetensors reports I/O errors as SafetensorError
        warnings.warn(f"could not store the conversion of {path.name} in {entry.parent} ({e}); "
                      "it was converted in memory and is not cached", stacklevel=2)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelConfig.from_hf_config(config.to_hf_config()), weights, tokenizer
