"""The build cache: engine directories under `$KIT_CACHE_DIR/engines/<key>`, and its repair tools.

An entry appears only by an atomic rename of a complete engine directory, so a build that
dies half-way leaves no entry (its temp dir is swept by the next build), and two processes
building the same key at once both succeed: the first rename wins. An entry is checked
against its build key and manifest before it is served; a damaged one is quarantined and
rebuilt. A cache that cannot be written (read-only, full, cleared meanwhile) leaves the
engine built but not cached, with a warning.

`list()`, `verify()` and `clear()` cover both caches of the kit: built engines and
converted GGUF models (`$KIT_CACHE_DIR/models`), and survive malformed entries.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError

from kit.cache_entry import (QUARANTINE_DIR, CacheEntryError, cache_dir, entry_dirs, make_temp_dir, quarantine,
                             sweep_temp_dirs, verify_manifest)
from kit.engine import Engine
from kit.engine_dir import load_engine, read_engine_config, write_engine_files

__all__ = ["BuildCache"]

_COLUMNS = ["kind", "key", "model", "backend", "dtype", "max_batch_size", "max_seq_len", "quantization",
            "size_mib", "created", "status"]


def _size_mib(p: Path) -> float:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


def _read_json(f: Path) -> dict[str, Any]:
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


class BuildCache:
    """Engine directories under `root` (default `$KIT_CACHE_DIR/engines`); `models_root` is the
    GGUF conversion cache covered by `list/verify/clear` (default `$KIT_CACHE_DIR/models` when
    `root` is the default, else none)."""

    def __init__(self, root: str | Path | None = None, *, models_root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "engines"
        self.models_root = Path(models_root) if models_root is not None else (
            cache_dir() / "models" if root is None else None)

    def path(self, key: str) -> Path:
        return self.root / key[:32]

    # ------------------------------------------------------------------ lookups
    def _check(self, key: str, p: Path) -> None:
        cfg = read_engine_config(p)
        if cfg["build_key"] != key:
            raise CacheEntryError(f"{p}: holds build key {cfg['build_key'][:12]}…, expected {key[:12]}…")

    def get(self, key: str) -> Path | None:
        """The verified entry of `key`, or None (a damaged entry is quarantined)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            self._check(key, p)
        except (CacheEntryError, FileNotFoundError, OSError) as e:
            quarantine(p, str(e))
            return None
        return p

    def load(self, key: str, *, device: torch.device | str | None = None) -> Engine | None:
        """The cached engine of `key`, checked and loaded in one pass; None on a miss or a damaged entry."""
        sweep_temp_dirs(self.root)
        p = self.path(key)
        if not p.exists():
            return None
        try:
            engine = load_engine(p, device=device)
            if engine.build_key != key:
                raise CacheEntryError(f"{p}: holds another build key")
        except (CacheEntryError, FileNotFoundError, OSError) as e:
            quarantine(p, str(e))
            return None
        return engine

    def put(self, key: str, engine: Engine) -> Path | None:
        """Store `engine` under `key`; None (with a warning) if the cache cannot be written."""
        staging: Path | None = None
        try:
            sweep_temp_dirs(self.root)
            staging = make_temp_dir(self.root, key[:32])
            write_engine_files(engine, staging)
            target = self.path(key)
            if target.exists() and self.get(key) is not None:
                return target  # another process stored the same key first
            try:
                os.rename(staging, target)
            except OSError:
                if self.get(key) is None:  # not a lost race: a real failure
                    raise
            return target
        except (OSError, SafetensorError) as e:  # NOTE: safetensors reports I/O errors as SafetensorError
            warnings.warn(f"could not store the engine in the build cache {self.root} ({e}); "
                          "it was built and is used, but not cached", stacklevel=2)
            return None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    # -------------------------------------------------------------- repair tools
    def _roots(self) -> list[tuple[str, Path]]:
        return [("engine", self.root)] + ([("model", self.models_root)] if self.models_root is not None else [])

    def _engine_row(self, p: Path) -> dict[str, Any]:
        cfg = _read_json(p / "config.json")
        model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
        bc = cfg.get("build_config") if isinstance(cfg.get("build_config"), dict) else {}
        qc = cfg.get("quant_config") if isinstance(cfg.get("quant_config"), dict) else {}
        return {"model": model.get("name"), "backend": cfg.get("backend"), "dtype": cfg.get("dtype"),
                "max_batch_size": bc.get("max_batch_size"), "max_seq_len": bc.get("max_seq_len"),
                "quantization": qc.get("quant_algo")}

    def _model_row(self, p: Path) -> dict[str, Any]:
        info = _read_json(p / "entry.json")
        return {"model": info.get("name"), "backend": None, "dtype": "float32", "max_batch_size": None,
                "max_seq_len": None, "quantization": None}

    def _status(self, kind: str, p: Path, hashes: bool) -> str:
        try:
            if kind == "engine":
                read_engine_config(p, hashes=hashes)
            else:
                verify_manifest(p, hashes=hashes)
        except (CacheEntryError, FileNotFoundError, OSError) as e:
            return f"damaged: {e}"
        return "ok"

    def _rows(self, hashes: bool) -> list[dict[str, Any]]:
        rows = []
        for kind, root in self._roots():
            for p in entry_dirs(root):
                try:
                    row = self._engine_row(p) if kind == "engine" else self._model_row(p)
                    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(p.stat().st_mtime))
                    size = _size_mib(p)
                except OSError:  # removed while listing
                    continue
                rows.append({"kind": kind, "key": p.name, **row, "size_mib": size, "created": created,
                             "status": self._status(kind, p, hashes)})
        return rows

    def list(self) -> pd.DataFrame:
        """One row per entry of both caches (sizes checked, not hashes): `kind` is engine or model."""
        return pd.DataFrame(self._rows(hashes=False), columns=_COLUMNS)

    def verify(self) -> pd.DataFrame:
        """Check every entry of both caches in full (hashes); quarantine the damaged ones.

        Columns `kind, key, model, status` (status `ok`, or `quarantined: <why>`).
        """
        rows = []
        for row in self._rows(hashes=True):
            if row["status"] != "ok":
                root = self.root if row["kind"] == "engine" else self.models_root
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quarantine(root / row["key"], row["status"])
                row["status"] = "quarantined: " + row["status"].removeprefix("damaged: ")
            rows.append({k: row[k] for k in ("kind", "key", "model", "status")})
        return pd.DataFrame(rows, columns=["kind", "key", "model", "status"])

    def clear(self) -> int:
        """Remove every entry of both caches (and quarantined entries and dead temp dirs); return how many."""
        n = 0
        for _, root in self._roots():
            n += len(entry_dirs(root))
            for p in entry_dirs(root) + [root / QUARANTINE_DIR]:
                shutil.rmtree(p, ignore_errors=True)
            sweep_temp_dirs(root)
        return n

    def _repr_html_(self) -> str:
        df = self.list()
        table = df.to_html(index=False, border=0, float_format="%.1f") if len(df) else "<p><i>empty</i></p>"
        return f"<b>BuildCache</b> <code>{self.root}</code>{table}"
