"""Tensor-parallel engine directories: one config, one weight file per rank (as TensorRT-LLM writes
`rank0.engine`, `rank1.engine`, ... beside one `config.json`).

    save_tp_engine(network, tp_size, path, build_config=..., build_key=...)   every rank's shard, once
    is_tp_engine_dir(path) / read_tp_config(path)                             the config, checked
    rank_file(path, rank)                                                     rank r's `rank{r}.safetensors`

The directory's key is the single-device build key with the `Mapping` folded in
(`tp_build_key`), so the same model split 2 and 4 ways are two entries; `tp_cache_path(key,
mapping)` is where `LLM(model, tensor_parallel_size=N)` keeps them (`$KIT_CACHE_DIR/tp-engines/`).
A rank loads its own file (no scatter from rank 0); a manifest with every file's size and hash
is written last and checked on load, the directory is written to a temp directory and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kit.build_config import BuildConfig
from kit.cache_entry import CacheEntryError, cache_dir, make_temp_dir, verify_manifest, write_manifest
from kit.config import ModelConfig
from kit.network import Layer, Network
from kit.parallel.mapping import Mapping
from kit.parallel.sharding import shard_network
from kit.quantization import QuantConfig

__all__ = ["TP_ENGINE_FORMAT", "tp_build_key", "tp_cache_path", "save_tp_engine", "is_tp_engine_dir",
           "read_tp_config", "rank_file", "load_rank_weights"]

TP_ENGINE_FORMAT = 1
_CONFIG = "config.json"


def tp_build_key(build_key: str, mapping: Mapping) -> str:
    """The single-device build key with the mapping folded in."""
    payload = json.dumps({"build_key": build_key, "mapping": mapping.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def tp_cache_path(key: str) -> Path:
    return cache_dir() / "tp-engines" / key[:32]


def rank_file(path: str | os.PathLike, rank: int) -> Path:
    return Path(path) / f"rank{rank}.safetensors"


def save_tp_engine(network: Network, tp_size: int, path: str | os.PathLike, *, build_config: BuildConfig,
                   build_key: str, dtype: torch.dtype, model_info: dict[str, Any] | None = None,
                   tokenizer: Any = None) -> Path:
    """Write every rank's shard of `network` and one config into `path` (atomically); return `path`."""
    from safetensors.torch import save_file  # NOTE: a writer looked up per call, as kit/engine_dir.py does

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: refusing to write a tensor-parallel engine there")
    mapping = Mapping.tensor_parallel(tp_size)
    tmp = make_temp_dir(path.parent, path.name)
    try:
        shard = None
        for rank in range(tp_size):
            shard = shard_network(network, mapping.for_rank(rank))
            save_file({k: v.detach().contiguous().cpu() for k, v in shard.weights.items()}, str(rank_file(tmp, rank)),
                      metadata={"format": "kit-tp-engine", "rank": str(rank)})
        qc = network.quant_config
        config = {"format": TP_ENGINE_FORMAT, "mapping": mapping.to_dict(), "name": network.name,
                  "model_info": model_info or {"name": network.name}, "model_config": network.config.to_dict(),
                  "shard_config": shard.config.to_dict(), "build_config": build_config.to_dict(),
                  "quant_config": qc.to_dict() if qc is not None else None,
                  "layers": [[l.name, l.kind, list(l.inputs), list(l.outputs), list(l.weights), l.attrs]
                             for l in shard.layers],
                  "dtype": str(dtype).replace("torch.", ""), "build_key": build_key,
                  "tp_build_key": tp_build_key(build_key, mapping)}
        (tmp / _CONFIG).write_text(json.dumps(config, indent=1, default=str))
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        write_manifest(tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.rmdir()
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_tp_engine_dir(path: Any) -> bool:
    try:
        cfg = json.loads((Path(path) / _CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False
    return isinstance(cfg, dict) and "tp_build_key" in cfg


def read_tp_config(path: str | os.PathLike, tp_size: int | None = None) -> dict[str, Any]:
    """The checked config: key consistent with its mapping, every file whole; the parsed objects added."""
    path = Path(path)
    try:
        cfg = json.loads((path / _CONFIG).read_text())
        mapping = Mapping(**cfg["mapping"])
        if cfg["format"] != TP_ENGINE_FORMAT or cfg["tp_build_key"] != tp_build_key(cfg["build_key"], mapping):
            raise CacheEntryError(f"{path}: tensor-parallel engine config altered or of another format")
        parsed = {"mapping": mapping, "model_config": ModelConfig.from_dict(cfg["model_config"]),
                  "shard_config": ModelConfig.from_dict(cfg["shard_config"]),
                  "build_config": BuildConfig.from_dict(cfg["build_config"]),
                  "quant_config": QuantConfig.from_dict(cfg["quant_config"]) if cfg["quant_config"] else None,
                  "layers": [Layer(n, k, tuple(i), tuple(o), tuple(w), a) for n, k, i, o, w, a in cfg["layers"]],
                  "dtype": getattr(torch, cfg["dtype"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheEntryError(f"{path}: not a readable tensor-parallel engine directory ({e})") from e
    if tp_size is not None and mapping.tp_size != tp_size:
        raise ValueError(f"{path} is split for tensor_parallel_size={mapping.tp_size}, asked for {tp_size}")
    verify_manifest(path, hashes=(_CONFIG,))  # sizes of every rank file, the config's hash
    cfg["_parsed"] = parsed
    return cfg


def load_rank_weights(path: str | os.PathLike, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(rank_file(path, rank)), device=str(device))
