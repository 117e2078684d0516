"""Engine directories: put an `Engine` together from its parts, save it, load it back.

An engine directory holds `config.json` (model, build and quantization configs, backend,
dtype, build key), `model.safetensors`, `rank0.engine` + `trt_build.json` for a TensorRT
engine, `tokenizer/`, and `manifest.json` (size and xxh3-64 of every other file). It is
written to a temp directory and renamed into place, so a reader never sees half of one;
loading checks the build key and the manifest, so an altered or damaged one is refused.

`save_engine` never deletes what it does not own: it refuses a non-empty directory that is
not a kit engine directory, and replaces an engine directory only with `overwrite=True`
and only when that directory holds nothing but the files its manifest lists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kit.backends.tensorrt_backend import TensorRTBackend, TensorRTPlan
from kit.backends.torch_backend import TorchBackend
from kit.build_config import BuildConfig, build_key
from kit.cache_entry import MANIFEST, CacheEntryError, make_temp_dir, read_manifest, verify_manifest, write_manifest
from kit.config import ModelConfig
from kit.engine import Engine
from kit.loader import LoadedModel, read_safetensors
from kit.network import Network, NetworkBuilder
from kit.quantization import QuantConfig
from kit.tokenizer import Tokenizer
from kit.version import __version__

__all__ = ["ENGINE_FORMAT", "assemble_engine", "engine_key", "save_engine", "write_engine_files",
           "read_engine_config", "load_engine", "is_engine_dir"]

# NOTE: 2 = a manifest.json with per-file hashes; format-1 directories are refused (rebuild them)
ENGINE_FORMAT = 2
_ENGINE_CONFIG = "config.json"
_ENGINE_WEIGHTS = "model.safetensors"
_REQUIRED = ("model", "model_config", "build_config", "quant_config", "backend", "dtype", "build_key")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def assemble_engine(loaded: LoadedModel | None, build_config: BuildConfig | None, *, backend: str,
                    device: torch.device, dtype: torch.dtype, plan: TensorRTPlan | None = None,
                    network: Network | None = None) -> Engine:
    """An Engine from its parts: the network prepared by the backend, plus what it was built from."""
    network = network or NetworkBuilder(loaded).build()
    if backend == "torch":
        prepared: Any = TorchBackend(network, device=device, dtype=dtype)
    else:
        if plan is None:
            raise ValueError("a tensorrt engine needs its plan (rank0.engine)")
        prepared = TensorRTBackend(plan)
    info: dict[str, Any] = {"name": network.name}
    if loaded is not None:
        info.update({"identity": dict(loaded.identity), "source_format": loaded.source_format,
                     "notes": list(loaded.notes)})
    return Engine(network, prepared, build_config=build_config, tokenizer=getattr(loaded, "tokenizer", None),
                  model_info=info)


def engine_key(engine: Engine) -> str:
    """The engine's build key; an engine built without a model identity still gets one."""
    if engine.build_key is None:
        engine.build_key = build_key(engine.model_info.get("identity", {}), engine.config, engine.build_config,
                                     engine.network.quant_config, engine.backend.name, _dtype_name(engine.dtype))
    return engine.build_key


def write_engine_files(engine: Engine, directory: Path) -> None:
    """Write the engine's files into the (empty) `directory`; the manifest last."""
    from safetensors.torch import save_file  # NOTE: looked up per call, so a test can swap the writer

    weights = {k: v.detach().contiguous().cpu() for k, v in engine.network.weights.items()}
    save_file(weights, str(directory / _ENGINE_WEIGHTS), metadata={"format": "kit-engine"})
    if engine.backend.name == "tensorrt":
        engine.backend.plan.save(directory)  # rank0.engine + trt_build.json
    if engine.tokenizer is not None:
        engine.tokenizer.save(directory / "tokenizer")
    qc = engine.network.quant_config
    config = {
        "format": ENGINE_FORMAT, "kit_version": __version__,
        "model": engine.model_info, "model_config": engine.config.to_dict(),
        "build_config": engine.build_config.to_dict() if engine.build_config is not None else None,
        "quant_config": qc.to_dict() if qc is not None else None,
        "backend": engine.backend.name, "dtype": _dtype_name(engine.dtype), "build_key": engine_key(engine),
    }
    (directory / _ENGINE_CONFIG).write_text(json.dumps(config, indent=2))
    write_manifest(directory)


def is_engine_dir(path: Path) -> bool:
    """Does `path` hold a kit engine's config.json (whole or not)?"""
    try:
        cfg = json.loads((Path(path) / _ENGINE_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "build_key" in cfg


def _owned_files_only(path: Path) -> bool:
    """True if every file under `path` is one its manifest lists (so replacing it deletes nothing else)."""
    try:
        listed = set(read_manifest(path)) | {MANIFEST}
    except CacheEntryError:
        return False
    return all(str(f.relative_to(path)) in listed for f in path.rglob("*") if not f.is_dir())


def save_engine(engine: Engine, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the engine directory `path` atomically and return it.

    Refuses (FileExistsError, nothing touched) a file, a non-empty directory that is not a kit
    engine directory, and an engine directory unless `overwrite` (then only one that holds
    nothing but its own files).
    """
    path = Path(path)
    replace = False
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise FileExistsError(f"{path} exists and is not a directory: refusing to write an engine there")
        if any(path.iterdir()):
            if not is_engine_dir(path):
                raise FileExistsError(f"{path} is not empty and is not a kit engine directory: refusing to write "
                                      "an engine there (nothing was changed); choose a new or empty directory")
            if not overwrite:
                raise FileExistsError(f"{path} already holds a kit engine: pass overwrite=True "
                                      "(kit build --force) to replace it")
            if not _owned_files_only(path):
                raise FileExistsError(f"{path} holds files its engine manifest does not list: refusing to "
                                      "replace it (nothing was changed)")
            replace = True
    tmp = make_temp_dir(path.parent, path.name)
    old: Path | None = None
    try:
        write_engine_files(engine, tmp)
        if replace:
            old = make_temp_dir(path.parent, path.name + ".old")
            os.rename(path, old / "engine")
        os.rename(tmp, path)  # onto a missing or empty directory: atomic
    except BaseException:
        if old is not None and (old / "engine").exists() and not path.exists():
            os.rename(old / "engine", path)  # put the replaced engine back
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def read_engine_config(path: str | os.PathLike, *, hashes: bool = True) -> dict[str, Any]:
    """The engine directory's config.json, after checking its build key and that every file is whole.

    FileNotFoundError if `path` is no engine directory; CacheEntryError (a ValueError) if it is damaged.
    """
    path = Path(path)
    cfg_file = path / _ENGINE_CONFIG
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not an engine directory: no {_ENGINE_CONFIG}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheEntryError(f"{cfg_file}: corrupt engine config ({e})") from e
    if not isinstance(cfg, dict):
        raise CacheEntryError(f"{cfg_file}: corrupt engine config (a JSON {type(cfg).__name__}, not an object)")
    if cfg.get("format") != ENGINE_FORMAT:
        raise CacheEntryError(f"{path}: engine format {cfg.get('format')!r}, this kit reads format {ENGINE_FORMAT}; "
                              "rebuild the engine")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing or not isinstance(cfg["model"], dict):
        raise CacheEntryError(f"{cfg_file}: corrupt engine config (missing {', '.join(missing) or 'model'})")
    try:
        stored_bc = BuildConfig.from_dict(cfg["build_config"]) if cfg["build_config"] else None
        config = ModelConfig.from_dict(cfg["model_config"])
        qc = QuantConfig.from_dict(cfg["quant_config"]) if cfg["quant_config"] else None
        expected = build_key(cfg["model"].get("identity", {}), config, stored_bc, qc, cfg["backend"], cfg["dtype"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CacheEntryError(f"{cfg_file}: corrupt engine config ({type(e).__name__}: {e})") from e
    if cfg["build_key"] != expected:
        raise CacheEntryError(f"{path}: build key mismatch (the config was altered or written by another kit); "
                              "rebuild the engine")
    try:
        verify_manifest(path, hashes=hashes)
    except CacheEntryError as e:
        raise CacheEntryError(f"{e}; rebuild the engine") from None
    cfg["_parsed"] = (config, stored_bc, qc)
    return cfg


def load_engine(path: str | os.PathLike, *, device: torch.device | str | None = None,
                build_config: BuildConfig | None = None) -> Engine:
    """Open an engine directory. `build_config`, if given, must equal the one it was built with."""
    path = Path(path)
    cfg = read_engine_config(path)
    config, stored_bc, qc = cfg.pop("_parsed")
    if build_config is not None and stored_bc is not None and build_config != stored_bc:
        diff = {k: (v, stored_bc.to_dict()[k]) for k, v in build_config.to_dict().items()
                if stored_bc.to_dict()[k] != v}
        raise ValueError(f"{path} was built for another configuration: "
                         + ", ".join(f"{k}={new!r} asked, engine has {old!r}" for k, (new, old) in diff.items()))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights = read_safetensors([path / _ENGINE_WEIGHTS], device, None)
    tok_dir = path / "tokenizer"
    tokenizer = Tokenizer.from_dir(tok_dir) if Tokenizer.dir_has_tokenizer(tok_dir) else None
    info = cfg["model"]
    loaded = LoadedModel(config, weights, tokenizer, name=info.get("name", path.name), source=str(path),
                         identity=info.get("identity", {}), quant_config=qc, source_format="engine")
    plan = TensorRTPlan.load(path) if cfg["backend"] == "tensorrt" else None
    engine = assemble_engine(loaded, stored_bc, backend=cfg["backend"], device=device,
                             dtype=getattr(torch, cfg["dtype"]), plan=plan)
    engine.build_key = cfg["build_key"]
    engine.source_dir = path
    return engine
