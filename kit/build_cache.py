"""The build cache: engine directories under `$KIT_CACHE_DIR/engines/<key>`, and its repair tools.

An entry appears only by an atomic rename of a complete engine directory, so a build that
dies half-way leaves no entry (its temp dir is swept by the next build), and two processes
building the same key at once both succeed: the first rename wins. An entry is checked
against its build key and manifest before it is served; a damaged one is quarantined and
rebuilt. A cache that cannot be written (read-only, full, cleared meanwhile) leaves the
engine built but not cached, with a warning.

`list()`, `verify()` and `clear()` cover both caches of the kit: built engines and
converted GGUF models (`$KIT_CACHE_DIR/models`), and survive malformed entries.

Size limit: `BuildCache(max_bytes=...)` or `KIT_CACHE_MAX_GB` (decimal GB, 10**9 bytes) bounds the
build cache: the real disk usage (hard links once) of `engines/` with its shared weight blobs,
quarantined entries and temp dirs. Every hit stamps the entry's last use; after every store the
least recently used engine entries are evicted until it is under the limit (an evicted engine
is rebuilt on its next request). An entry in use by a build or load of this process is never
evicted; when that alone exceeds the limit, a warning says so. NOTE: converted GGUF models
(`models/`) and quantized models (`quantized/`) do not count and are never evicted: they grow
with the number of models, not of build configs, are the input of every build of their model,
and counting them could make a limit unreachable (SmolLM2: a 0.54 GB converted model beside a
0.54 GB float32 engine under a 1 GB limit). `disk_bytes(all_roots=True)` reports them too.

Engines with identical weight files share them: each large file is a hard link to a
content-addressed blob under `engines/.blobs` (see `cache_entry.share_blobs`), so ten configs
of one model cost about one weight file. An engine saved with `save_engine(engine, path)`
outside the cache is written as plain files and stays self-contained.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from safetensors import SafetensorError

from kit.cache_entry import (BLOBS_DIR, QUARANTINE_DIR, CacheEntryError, cache_dir, disk_usage, entry_dirs,
                             last_used_ns, make_temp_dir, quarantine, share_blobs, sweep_blobs, sweep_temp_dirs,
                             touch_last_used, verify_manifest)
from kit.engine import Engine
from kit.engine_dir import load_engine, read_engine_config, write_engine_files

__all__ = ["BuildCache", "MAX_GB_ENV"]

MAX_GB_ENV = "KIT_CACHE_MAX_GB"
_COLUMNS = ["kind", "key", "model", "backend", "dtype", "max_batch_size", "max_seq_len", "quantization",
            "size_mb", "last_used", "created", "status"]

# entries this process is building or loading right now ({path: count}): never evicted
_IN_USE: Counter[Path] = Counter()
_IN_USE_LOCK = threading.Lock()


@contextmanager
def _in_use(p: Path) -> Iterator[None]:
    with _IN_USE_LOCK:
        _IN_USE[p] += 1
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            _IN_USE[p] -= 1
            if _IN_USE[p] <= 0:
                del _IN_USE[p]


def _size_mb(p: Path) -> float:
    """The entry's bytes in decimal MB (a shared blob counts in full in every entry that links it)."""
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6


def _stamp(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else ""


def _max_bytes_from_env() -> int | None:
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0 or gb == float("inf"):
        raise ValueError(f"{MAX_GB_ENV}={raw!r}: expected a positive number of GB (10**9 bytes), e.g. 20 or 0.5; "
                         "unset it for no limit")
    return int(gb * 1e9)


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

    def __init__(self, root: str | Path | None = None, *, models_root: str | Path | None = None,
                 max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "engines"
        self.models_root = Path(models_root) if models_root is not None else (
            cache_dir() / "models" if root is None else None)
        self.quantized_root = cache_dir() / "quantized" if root is None else None
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes <= 0):
            raise ValueError(f"BuildCache: max_bytes={max_bytes!r}, expected a positive int (bytes) or None "
                             "(no limit)")
        self.max_bytes = max_bytes if max_bytes is not None else _max_bytes_from_env()

    def path(self, key: str) -> Path:
        return self.root / key[:32]

    def _sweep(self) -> None:
        """Remove the temp dirs of dead builds, and the blobs only they linked."""
        if sweep_temp_dirs(self.root):
            sweep_blobs(self.root / BLOBS_DIR)

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
        touch_last_used(p)
        return p

    def load(self, key: str, *, device: torch.device | str | None = None) -> Engine | None:
        """The cached engine of `key`, checked and loaded in one pass; None on a miss or a damaged entry."""
        self._sweep()
        p = self.path(key)
        if not p.exists():
            return None
        try:
            with _in_use(p):
                engine = load_engine(p, device=device)
                if engine.build_key != key:
                    raise CacheEntryError(f"{p}: holds another build key")
                touch_last_used(p)
        except (CacheEntryError, FileNotFoundError, OSError) as e:
            quarantine(p, str(e))
            return None
        return engine

    def put(self, key: str, engine: Engine) -> Path | None:
        """Store `engine` under `key`; None (with a warning) if the cache cannot be written."""
        staging: Path | None = None
        target = self.path(key)
        try:
            with _in_use(target):
                self._sweep()
                staging = make_temp_dir(self.root, key[:32])
                write_engine_files(engine, staging)
                share_blobs(staging, self.root / BLOBS_DIR)
                if not (target.exists() and self.get(key) is not None):  # else another process stored it first
                    try:
                        os.rename(staging, target)
                    except OSError:
                        if self.get(key) is None:  # not a lost race: a real failure
                            raise
                    touch_last_used(target)
                shutil.rmtree(staging, ignore_errors=True)  # NOTE: before evict, which measures the disk
                self.evict()
            return target
        except (OSError, SafetensorError) as e:  # NOTE: safetensors reports I/O errors as SafetensorError
            warnings.warn(f"could not store the engine in the build cache {self.root} ({e}); "
                          "it was built and is used, but not cached", stacklevel=2)
            return None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    # ---------------------------------------------------------------- size limit
    def disk_bytes(self, *, all_roots: bool = False) -> int:
        """Real disk usage of the build cache (hard-linked blobs counted once): what `max_bytes`
        bounds; with `all_roots`, converted and quantized models added."""
        if not all_roots:
            return disk_usage(self.root)
        return disk_usage(*(r for _, r in self._roots()), *([self.quantized_root] if self.quantized_root else []))

    def evict(self) -> list[str]:
        """Evict least recently used engine entries until the cache is under `max_bytes`; return their keys.

        Quarantined entries go first; entries in use by this process are kept.
        """
        if self.max_bytes is None:
            return []
        evicted: list[str] = []
        if self.disk_bytes() <= self.max_bytes:
            return evicted
        shutil.rmtree(self.root / QUARANTINE_DIR, ignore_errors=True)
        sweep_blobs(self.root / BLOBS_DIR)
        with _IN_USE_LOCK:
            busy = set(_IN_USE)
        candidates = sorted((p for p in entry_dirs(self.root) if p not in busy), key=last_used_ns)
        used = self.disk_bytes()
        while used > self.max_bytes and candidates:
            p = candidates.pop(0)
            try:  # NOTE: renamed away first, so a reader never sees half an entry
                doomed = make_temp_dir(self.root, p.name + ".evicted")
                os.rename(p, doomed / "entry")
            except OSError:
                doomed = p
            shutil.rmtree(doomed, ignore_errors=True)
            sweep_blobs(self.root / BLOBS_DIR)
            evicted.append(p.name)
            used = self.disk_bytes()
        if used > self.max_bytes:
            warnings.warn(f"the build cache uses {used / 1e6:.1f} MB, over its limit of {self.max_bytes / 1e6:.1f} MB "
                          f"({MAX_GB_ENV}), with nothing left to evict: the entries left are in use", stacklevel=3)
        return evicted

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
                    size = _size_mb(p)
                except OSError:  # removed while listing
                    continue
                rows.append({"kind": kind, "key": p.name, **row, "size_mb": size,
                             "last_used": _stamp(last_used_ns(p)), "created": created,
                             "status": self._status(kind, p, hashes)})
        return rows

    def list(self) -> pd.DataFrame:
        """One row per entry of both caches (sizes checked, not hashes): `kind` is engine or model;
        `size_mb` the entry's bytes (decimal MB; a weight blob shared by several engines counts in
        each), `last_used` its last hit (local time)."""
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
            for p in entry_dirs(root) + [root / QUARANTINE_DIR, root / BLOBS_DIR]:
                shutil.rmtree(p, ignore_errors=True)
            sweep_temp_dirs(root)
        return n

    def _repr_html_(self) -> str:
        df = self.list()
        table = df.to_html(index=False, border=0, float_format="%.1f") if len(df) else "<p><i>empty</i></p>"
        return f"<b>BuildCache</b> <code>{self.root}</code>{table}"
