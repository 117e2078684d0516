"""Cache entries on disk: content manifests, atomic writes, quarantine and the sweep of dead temp dirs.

Both caches of the kit (converted GGUF models under `$KIT_CACHE_DIR/models`, built engines
under `$KIT_CACHE_DIR/engines`) are directories of files that appear by one atomic rename
of a complete temp directory. Each carries `manifest.json`: the size and xxh3-64 hash of
every other file. A reader checks it before using anything; an entry that fails is moved
aside (quarantined) and rebuilt, never served.

Large files of an entry can be shared between entries (`share_blobs`): a content-addressed
blob `<root>/.blobs/<xxh3_64>-<size>` hard-linked into every entry that holds those bytes, so
two engines of one model with the same weights cost one weight file on disk. A link is the
same file as its blob, so the entry's manifest check verifies the blob's content too.

Temp directories are named `.tmp-<pid>-<host>-<stem>-<random>`: one whose process is gone
(same host) or that is older than a day (another host) belongs to a build that died and is
swept; one of a live process is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import xxhash

__all__ = ["MANIFEST", "CacheEntryError", "cache_dir", "file_digest", "write_manifest", "read_manifest",
           "verify_manifest", "write_json_atomic", "make_temp_dir", "sweep_temp_dirs", "quarantine",
           "QUARANTINE_DIR", "entry_dirs", "BLOBS_DIR", "share_blobs", "sweep_blobs", "disk_usage",
           "touch_last_used", "last_used_ns", "LAST_USED"]

MANIFEST = "manifest.json"
QUARANTINE_DIR = ".quarantine"
BLOBS_DIR = ".blobs"
LAST_USED = ".last_used"  # NOTE: its mtime is the stamp; a dot file, so no manifest lists it
_SHARE_MIN_BYTES = 64 * 2**10  # smaller files are not worth a blob
_MANIFEST_FORMAT = 1
_KEEP_QUARANTINED = 2  # NOTE: quarantined entries can be large: keep only the newest few, for inspection
_FOREIGN_TEMP_AGE_S = 24 * 3600


class CacheEntryError(ValueError):
    """A cache entry or engine directory whose files do not match its manifest (or have none)."""


def cache_dir() -> Path:
    """The kit's cache directory: `$KIT_CACHE_DIR`, default `~/.cache/kit`."""
    return Path(os.environ.get("KIT_CACHE_DIR", Path.home() / ".cache" / "kit")).expanduser()


def file_digest(path: Path) -> str:
    """xxh3-64 of a file's bytes, hex (~10 GB/s: cheap enough to check on every load)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync it, then rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _files(directory: Path) -> list[str]:
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)


def write_manifest(directory: Path) -> dict[str, Any]:
    """Record size and hash of every file under `directory` in its manifest.json (written last)."""
    directory = Path(directory)
    files = {name: {"size": (directory / name).stat().st_size, "xxh3_64": file_digest(directory / name)}
             for name in _files(directory)}
    manifest = {"format": _MANIFEST_FORMAT, "files": files}
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{file: {size, xxh3_64}} of the manifest; CacheEntryError if it is missing or malformed."""
    directory = Path(directory)
    f = directory / MANIFEST
    if not f.is_file():
        raise CacheEntryError(f"{directory}: no {MANIFEST} (written by another kit, or the write was cut)")
    try:
        m = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CacheEntryError(f"{f}: unreadable manifest ({e})") from e
    files = m.get("files") if isinstance(m, dict) else None
    if (not isinstance(m, dict) or m.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not files
            or not all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("xxh3_64"), str)
                       for v in files.values())):
        raise CacheEntryError(f"{f}: malformed manifest (expected format {_MANIFEST_FORMAT} with a 'files' table)")
    return files


def verify_manifest(directory: Path, *, hashes: bool | tuple[str, ...] = True) -> dict[str, dict[str, Any]]:
    """Every file of the manifest is present with its size, and its content hash: all files with
    `hashes=True`, none with False, the named ones with a tuple of names."""
    directory = Path(directory)
    files = read_manifest(directory)
    for name, meta in files.items():
        f = directory / name
        if not f.is_file():
            raise CacheEntryError(f"{directory}: file {name} is missing")
        size = f.stat().st_size
        if size != meta["size"]:
            raise CacheEntryError(f"{directory}: file {name} is truncated or altered ({size} bytes, "
                                  f"expected {meta['size']})")
    if hashes:
        for name, meta in files.items():
            if hashes is not True and name not in hashes:
                continue
            if file_digest(directory / name) != meta["xxh3_64"]:
                raise CacheEntryError(f"{directory}: file {name} is corrupt (its content hash differs from "
                                      f"the manifest)")
    return files


# ------------------------------------------------------------------------- temp dirs
def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def make_temp_dir(parent: Path, stem: str) -> Path:
    """A fresh temp dir in `parent` whose name says which process owns it."""
    parent.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "._" else "_" for c in stem)[:40]
    return Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{_host_tag()}-{safe}-", dir=parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_dirs(parent: Path) -> list[Path]:
    """Remove the temp dirs in `parent` left by builds that died; return what was removed."""
    removed: list[Path] = []
    try:
        children = list(parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in children:
        if not p.name.startswith(".tmp-") or not p.is_dir():
            continue
        parts = p.name.split("-", 3)
        try:
            pid, host = int(parts[1]), parts[2]
            age = now - p.stat().st_mtime
        except (IndexError, ValueError, OSError):
            continue
        dead = (not _pid_alive(pid)) if host == _host_tag() else age > _FOREIGN_TEMP_AGE_S
        if dead:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------ quarantine
def quarantine(entry: Path, reason: str) -> Path | None:
    """Move a bad entry to `<cache>/.quarantine/` (kept for inspection), with a warning.

    Returns where it went, or None when it could not be moved (then it is removed if possible).
    """
    qdir = entry.parent / QUARANTINE_DIR
    dest = qdir / f"{entry.name}.{time.time_ns()}"
    try:
        qdir.mkdir(exist_ok=True)
        os.rename(entry, dest)
    except FileNotFoundError:
        return None  # another process moved or removed it first
    except OSError:
        shutil.rmtree(entry, ignore_errors=True)
        dest = None
    warnings.warn(f"damaged cache entry {entry} ({reason}): "
                  + (f"moved to {dest}; it is rebuilt" if dest else "removed; it is rebuilt"), stacklevel=3)
    if dest is not None:
        def moved_at(p: Path) -> int:
            stamp = p.name.rsplit(".", 1)[-1]
            return int(stamp) if stamp.isdigit() else 0

        old = sorted(qdir.iterdir(), key=moved_at)[:-_KEEP_QUARANTINED]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return dest


def entry_dirs(root: Path) -> list[Path]:
    """The entries of a cache root (its visible sub-directories), sorted; [] when it does not exist."""
    try:
        return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


# ----------------------------------------------------------------- shared blobs
def _link_over(src: Path, dst: Path) -> None:
    """Make `dst` a hard link of `src`, atomically replacing what `dst` was."""
    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}-{time.time_ns()}")
    os.link(src, tmp)
    try:
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def share_blobs(directory: Path, blobs: Path) -> list[str]:
    """Hard-link every large file of the (manifested) `directory` to its blob in `blobs`.

    An existing blob is used only after its content hash is checked: a damaged one is replaced
    by this directory's file (healed, with a warning) and the entries still linked to the
    damaged bytes fail their own manifest check on their next load. Where links cannot be made
    (another file system, no link support) the files stay plain copies. Returns the names shared.
    """
    directory = Path(directory)
    shared: list[str] = []
    try:
        blobs.mkdir(parents=True, exist_ok=True)
    except OSError:
        return shared
    for name, meta in read_manifest(directory).items():
        if meta["size"] < _SHARE_MIN_BYTES:
            continue
        f = directory / name
        blob = blobs / f"{meta['xxh3_64']}-{meta['size']}"
        try:
            if blob.is_file():
                if blob.stat().st_size == meta["size"] and file_digest(blob) == meta["xxh3_64"]:
                    _link_over(blob, f)
                    shared.append(name)
                    continue
                warnings.warn(f"damaged shared blob {blob} (its content hash differs from its name): "
                              "replaced by freshly built bytes", stacklevel=3)
                blob.unlink()
            os.link(f, blob)
            shared.append(name)
        except FileExistsError:  # another process stored the same blob meanwhile: keep our copy
            continue
        except OSError:
            continue
    return shared


def sweep_blobs(blobs: Path) -> int:
    """Remove blobs no entry links any more (link count 1); return the bytes freed."""
    freed = 0
    try:
        children = list(blobs.iterdir())
    except OSError:
        return 0
    for b in children:
        try:
            st = b.stat()
            if b.is_file() and st.st_nlink == 1:
                b.unlink()
                freed += st.st_size
        except OSError:
            continue
    return freed


def disk_usage(*paths: Path) -> int:
    """Bytes allocated on disk under `paths` (directories and files), each hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in paths:
        if root is None:
            continue
        for dirpath, _, filenames in os.walk(root):
            for fn in [None, *filenames]:  # the directory itself, then its files (as `du` counts)
                try:
                    st = os.lstat(dirpath if fn is None else os.path.join(dirpath, fn))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def touch_last_used(entry: Path) -> None:
    """Stamp `entry` as used now (best effort: a read-only cache keeps its old stamp)."""
    try:
        (Path(entry) / LAST_USED).touch()
    except OSError:
        pass


def last_used_ns(entry: Path) -> int:
    """When `entry` was last used (its stamp; the directory's mtime when it has none)."""
    try:
        return (Path(entry) / LAST_USED).stat().st_mtime_ns
    except OSError:
        try:
            return Path(entry).stat().st_mtime_ns
        except OSError:
            return 0
