"""Build-cache size limit (KIT_CACHE_MAX_GB, LRU eviction by last use) and engine entries that
share identical weight files as hard-linked blobs."""

import os
import subprocess
import warnings
from pathlib import Path

import pytest

from kit.build_cache import BuildCache
from kit.build_config import BuildConfig
from kit.cache_entry import BLOBS_DIR, file_digest
from kit.cli import main
from kit.engine_dir import save_engine
from kit.llm import LLM, SamplingParams

SMALL = dict(max_seq_len=64, max_input_len=32, max_num_tokens=64)
SP = SamplingParams(max_tokens=6, temperature=0)
PROMPT = [5, 6, 7, 8]


def _du(path: Path) -> int:
    """Bytes on disk under `path` as `du` measures them (hard links counted once)."""
    return int(subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True)
               .stdout.split()[0])


def _tokens(path, bc: BuildConfig) -> tuple[list[int], bool]:
    with LLM(str(path), device="cpu", build_config=bc) as llm:
        return list(llm.generate(PROMPT, SP).outputs[0].token_ids), llm.build_cache_hit


def _weights(entry: Path) -> Path:
    return entry / "model.safetensors"


def test_identical_weights_share_one_blob_and_saved_engines_stay_self_contained(cache_dir, tiny_checkpoints,
                                                                                 tmp_path):
    path = tiny_checkpoints["llama"][0]
    a, _ = _tokens(path, BuildConfig(max_batch_size=2, **SMALL))
    b, _ = _tokens(path, BuildConfig(max_batch_size=4, **SMALL))
    assert a == b
    entries = sorted(p for p in (cache_dir / "engines").iterdir() if not p.name.startswith("."))
    assert len(entries) == 2
    w0, w1 = _weights(entries[0]), _weights(entries[1])
    assert os.stat(w0).st_ino == os.stat(w1).st_ino and os.stat(w0).st_nlink == 3  # two entries + the blob
    blobs = list((cache_dir / "engines" / BLOBS_DIR).iterdir())
    assert [p.name for p in blobs] == [f"{file_digest(w0)}-{w0.stat().st_size}"]
    weight_bytes = w0.stat().st_size
    assert weight_bytes > 256 * 1024
    # two configs of one model cost one weight file plus their small files
    assert _du(cache_dir) < weight_bytes + 128 * 1024
    assert BuildCache().disk_bytes() == _du(cache_dir / "engines")  # the limit measures what `du` does
    df = BuildCache().list()
    assert list(df["size_mb"].round(3)) == [round(_du_apparent(e) / 1e6, 3) for e in entries]
    # an engine saved outside the cache is plain files
    with LLM(str(path), device="cpu", build_config=BuildConfig(max_batch_size=2, **SMALL)) as llm:
        out = save_engine(llm.engine, tmp_path / "saved")
    assert os.stat(_weights(out)).st_nlink == 1 and os.stat(_weights(out)).st_ino != os.stat(w0).st_ino


def _du_apparent(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def test_ten_build_configs_stay_under_the_limit_and_evicted_entries_are_rebuilt(cache_dir, tiny_checkpoints,
                                                                               monkeypatch):
    path = tiny_checkpoints["qwen3"][0]
    # NOTE: three dtypes give three distinct weight blobs; ten configs (dtype x batch size) share them
    configs = [BuildConfig(max_batch_size=1 + i, dtype=("float32", "float16", "bfloat16")[i % 3], **SMALL)
               for i in range(10)]
    # the limit: the float32 weights and one half-size blob, not all three blobs
    first, hit = _tokens(path, configs[0])
    assert not hit
    fp32 = _weights(next(p for p in (cache_dir / "engines").iterdir() if not p.name.startswith("."))).stat().st_size
    limit = int(fp32 * 1.5 + 96 * 1024)
    monkeypatch.setenv("KIT_CACHE_MAX_GB", str(limit / 1e9))
    assert BuildCache().max_bytes == limit
    expected = {0: first}
    for i, bc in enumerate(configs[1:], 1):
        expected[i], _ = _tokens(path, bc)
        assert _du(cache_dir / "engines") <= limit, i
    df = BuildCache().list()
    assert 0 < len(df) < 10  # entries were evicted
    assert all(df["size_mb"] > 0) and all(df["last_used"] != "")
    # config 0 (float32) was the least recently used: evicted, and rebuilt transparently
    assert not ((df["dtype"] == "float32") & (df["max_batch_size"] == 1)).any()
    again, hit = _tokens(path, configs[0])
    assert not hit and again == first
    assert _du(cache_dir / "engines") <= limit
    # the entry just built is used (hit) and its stamp is the newest
    again2, hit = _tokens(path, configs[0])
    assert hit and again2 == first
    df = BuildCache().list()
    newest = df[(df["dtype"] == "float32") & (df["max_batch_size"] == 1)]["last_used"].iloc[0]
    assert (df["last_used"] <= newest).all()  # (stamps are to the second: ties are possible)


def test_a_damaged_shared_blob_is_detected_and_healed(cache_dir, tiny_checkpoints):
    path = tiny_checkpoints["mistral"][0]
    bcs = [BuildConfig(max_batch_size=n, **SMALL) for n in (2, 3)]
    good = [_tokens(path, bc)[0] for bc in bcs]
    blob = next((cache_dir / "engines" / BLOBS_DIR).iterdir())
    raw = bytearray(blob.read_bytes())
    raw[-100:] = bytes(b ^ 0xFF for b in raw[-100:])  # same size, other bytes: every linked entry sees it
    with open(blob, "r+b") as f:  # in place: the inode every entry links
        f.write(raw)
    for bc, want in zip(bcs, good):
        with pytest.warns(UserWarning, match="damaged"):
            got, hit = _tokens(path, bc)
        assert not hit and got == want
    assert blob.exists() and file_digest(blob) == blob.name.split("-")[0]
    assert list(BuildCache().verify()["status"]) == ["ok", "ok"]
    for bc, want in zip(bcs, good):
        assert _tokens(path, bc) == (want, True)


def test_an_entry_in_use_is_never_evicted_and_bad_limits_are_refused(cache_dir, tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["llama"][0]
    monkeypatch.setenv("KIT_CACHE_MAX_GB", "0.000001")  # 1000 bytes: smaller than any engine
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a, _ = _tokens(path, BuildConfig(max_batch_size=2, **SMALL))
    assert any("over its limit" in str(w.message) for w in caught)
    assert len(BuildCache().list()) == 1  # the entry just stored stays
    b, _ = _tokens(path, BuildConfig(max_batch_size=3, **SMALL))
    df = BuildCache().list()
    assert list(df["max_batch_size"]) == [3] and a == b  # the older one went
    for bad in ("0", "-1", "lots", "inf"):
        monkeypatch.setenv("KIT_CACHE_MAX_GB", bad)
        with pytest.raises(ValueError, match="KIT_CACHE_MAX_GB"):
            BuildCache()
    with pytest.raises(ValueError, match="max_bytes"):
        BuildCache(max_bytes=0)
    monkeypatch.delenv("KIT_CACHE_MAX_GB")
    assert BuildCache(max_bytes=10**9).max_bytes == 10**9 and BuildCache().max_bytes is None


def test_kit_cache_list_shows_size_last_use_and_limit(cache_dir, tiny_checkpoints, monkeypatch, capsys):
    _tokens(tiny_checkpoints["llama"][0], BuildConfig(max_batch_size=2, **SMALL))
    monkeypatch.setenv("KIT_CACHE_MAX_GB", "0.5")
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert "size_mb" in header and "last_used" in header
    stamp = BuildCache().list()["last_used"][0]
    assert stamp in row
    assert out.rstrip().splitlines()[-1] == (
        f"on disk: engines {_du(cache_dir / 'engines') / 1e6:.1f} MB (shared weight files counted once), "
        f"limit 500.0 MB; with converted and quantized models {_du(cache_dir) / 1e6:.1f} MB")


def test_eviction_follows_last_use_not_creation(cache_dir, tiny_checkpoints, monkeypatch):
    path = tiny_checkpoints["qwen2"][0]
    a, b, c = (BuildConfig(max_batch_size=2, dtype=d, **SMALL) for d in ("float32", "float16", "bfloat16"))
    ta, _ = _tokens(path, a)
    fp32 = _weights(next(p for p in (cache_dir / "engines").iterdir() if not p.name.startswith("."))).stat().st_size
    monkeypatch.setenv("KIT_CACHE_MAX_GB", str(int(fp32 * 1.5 + 96 * 1024) / 1e9))  # a and b fit, not c too
    _tokens(path, b)
    assert len(BuildCache().list()) == 2
    assert _tokens(path, a) == (ta, True)  # a used after b was made
    _tokens(path, c)
    assert sorted(BuildCache().list()["dtype"]) == ["bfloat16", "float32"]  # b, least recently used, went
    assert _tokens(path, a) == (ta, True)
