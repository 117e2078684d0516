"""Caches of quantization work under the kit's cache directory.

Quantizing SmolLM2 with eight schemes takes minutes on a CPU (AWQ's search, GPTQ's
Hessians); comparing them takes minutes more. Both are pure functions of their inputs,
so they are stored once and read back:

* `QuantCache` — `$KIT_CACHE_DIR/quantized/<key>/`: the tensors a `Quantizer` wrote
  (`tensors.safetensors`: the quantized linears' codes and scales and the float tensors
  it rescaled), `meta.json` (which weights they replace, the report, the notes) and
  `manifest.json` (each file's size). The key is the sha256 of the model's content, the
  `QuantConfig`, the calibration token ids, the kit version and the quantization code.
* `ResultCache` — `$KIT_CACHE_DIR/results/<key>.json`: small JSON results (the rows of
  `evaluation.compare`), keyed by whoever computes them.

Entries appear only by an atomic rename of a complete temporary directory (as the
build cache's do); an entry whose files do not match its manifest, or do not parse,
is removed and rebuilt by the caller.

With `KIT_CACHE_LOG=<file>` set, every lookup appends one line `<cache> hit|miss <key>` to that
file (the test suite sets it, and its kernels inherit it, to report whether the notebooks and the
tests share their entries).

`tensor_digest` / `weights_digest` hash tensor contents (sha256 of the bytes, with name,
dtype and shape); a tensor's digest is remembered until it is modified in place
(torch's version counter) or freed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kit.loader import cache_dir

__all__ = ["QuantCache", "ResultCache", "tensor_digest", "weights_digest", "code_version", "digest_json", "QUANT_CODE"]

_KIT_DIR = Path(__file__).resolve().parent.parent
# the code a quantization's result depends on (paths under kit/); a change is a new key
QUANT_CODE = ("quantization", "ops.py", "config.py")
# tensor id -> (weak reference, version counter, digest)
_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (remembered until it changes)."""
    memo = _DIGESTS.get(id(t))
    if memo is not None and memo[0]() is t and memo[1] == t._version:
        return memo[2]
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    digest = h.hexdigest()
    key = id(t)
    _DIGESTS[key] = (weakref.ref(t, lambda _r, k=key: _DIGESTS.pop(k, None)), t._version, digest)
    return digest


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """sha256 over every (name, tensor digest) of a weight dict, in name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(f"{name}:{tensor_digest(weights[name])};".encode())
    return h.hexdigest()


def digest_json(obj: Any) -> str:
    """sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version(paths: Iterable[str] = QUANT_CODE) -> str:
    """The kit's version plus a digest of the code under `paths` (files or folders of kit/)."""
    try:
        version = metadata.version("kit")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        version = "source"
    h = hashlib.sha256()
    for rel in paths:
        p = _KIT_DIR / rel
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.exists() else []:
            h.update(str(f.relative_to(_KIT_DIR)).encode() + f.read_bytes())
    return f"{version}+{h.hexdigest()[:16]}"


def _write_atomic(entry: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> Path:
    """Write `files` (bytes, or tensors for safetensors) plus a manifest into `entry`, atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name, content in files.items():
            if isinstance(content, dict):
                save_file(content, str(tmp / name))
            else:
                (tmp / name).write_bytes(content)
        manifest = {name: (tmp / name).stat().st_size for name in files}
        (tmp / "manifest.json").write_text(json.dumps({"files": manifest}, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # NOTE: another process wrote the same entry first; its copy is as good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _log_lookup(cache: str, key: str, hit: bool) -> None:
    """One line per lookup in the file named by KIT_CACHE_LOG, if set."""
    path = os.environ.get("KIT_CACHE_LOG")
    if path:
        try:
            with open(path, "a") as f:  # NOTE: one short append per line: concurrent writers do not interleave
                f.write(f"{cache} {'hit' if hit else 'miss'} {key}\n")
        except OSError:
            pass


def _manifest_ok(entry: Path) -> bool:
    try:
        files = json.loads((entry / "manifest.json").read_text())["files"]
        return all((entry / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


class QuantCache:
    """Quantized tensors by key under `<root>/` (default `$KIT_CACHE_DIR/quantized`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "quantized"

    def path(self, key: str) -> Path:
        return self.root / key

    def keys(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.root.is_dir() else []

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, meta) of a complete entry, or None (a damaged entry is removed)."""
        entry = self.path(key)
        if entry.is_dir():
            if _manifest_ok(entry):
                try:
                    found = load_file(str(entry / "tensors.safetensors")), json.loads((entry / "meta.json").read_text())
                    _log_lookup("quantized", key, True)
                    return found
                except (OSError, ValueError, RuntimeError, SafetensorError):
                    pass
            shutil.rmtree(entry, ignore_errors=True)  # damaged: rebuild
        _log_lookup("quantized", key, False)
        return None

    def discard(self, key: str) -> None:
        """Remove an entry (one whose content its reader found inconsistent)."""
        shutil.rmtree(self.path(key), ignore_errors=True)

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
        # NOTE: safetensors refuses tensors sharing storage (GPTQ's row slices): copy each one
        own = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
        return _write_atomic(self.path(key), {"tensors.safetensors": own,
                                              "meta.json": json.dumps(meta, indent=1).encode()})

    def _repr_html_(self) -> str:
        return f"<b>QuantCache</b> {self.root}: {len(self.keys())} entries"


class ResultCache:
    """Small JSON results by key under `<root>/` (default `$KIT_CACHE_DIR/results`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "results"

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Any:
        entry = self.path(key)
        if entry.is_dir():
            if _manifest_ok(entry):
                try:
                    found = json.loads((entry / "result.json").read_text())
                    _log_lookup("results", key, True)
                    return found
                except (OSError, ValueError):
                    pass
            shutil.rmtree(entry, ignore_errors=True)
        _log_lookup("results", key, False)
        return None

    def put(self, key: str, result: Any) -> Path:
        return _write_atomic(self.path(key), {"result.json": json.dumps(result, indent=1).encode()})

    def keys(self) -> Iterable[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if self.root.is_dir() else []
