"""Fault injection on the kit's caches (built engines, converted GGUF models) and build outputs.

Every damage kind, a SIGKILL during a write, a cache that cannot be written: the next start
gives the right tokens (or one clear error) and the damaged entry is healed, never served.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kit.build_cache import BuildCache
from kit.builder import BuildConfig
from kit.cache_entry import BLOBS_DIR, QUARANTINE_DIR, entry_dirs, make_temp_dir
from kit.cli import build_parser, main
from kit.engine_dir import load_engine, save_engine
from kit.gguf import converted_entry
from kit.llm import LLM, SamplingParams
from kit.loader import ModelLoader, registered_model_path

REPO = Path(__file__).resolve().parent.parent
SMALL = dict(max_batch_size=4, max_input_len=32, max_seq_len=64, max_num_tokens=64, block_size=4)
SP = SamplingParams(max_tokens=6, temperature=0)
PROMPT = [5, 6, 7, 8]


def run_cli(argv):
    """The sub-command itself (its exceptions reach the test; `main` reports them as one line)."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def start(model, **kwargs):
    """(build cache hit?, greedy tokens for PROMPT) of a fresh LLM."""
    with LLM(model, device="cpu", build_config=BuildConfig(**SMALL), **kwargs) as llm:
        return llm.build_cache_hit, llm.generate(PROMPT, SP).outputs[0].token_ids


def _flip(f: Path, offset: int) -> None:
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))


def _edit_json(f: Path, change) -> None:
    cfg = json.loads(f.read_text())
    change(cfg)
    f.write_text(json.dumps(cfg))


def _set_max_seq_len(cfg):
    cfg["build_config"]["max_seq_len"] = 32


def _set_build_key(cfg):
    cfg["build_key"] = "0" * 64


DAMAGE = {
    "truncated weights": lambda e: (e / "model.safetensors").write_bytes((e / "model.safetensors").read_bytes()[:-100]),
    "same-size flip": lambda e: _flip(e / "model.safetensors", -5),
    "header flip": lambda e: _flip(e / "model.safetensors", 20),
    "edited config": lambda e: _edit_json(e / "config.json", _set_max_seq_len),
    "edited build key": lambda e: _edit_json(e / "config.json", _set_build_key),
    "deleted config.json": lambda e: (e / "config.json").unlink(),
    "deleted weights": lambda e: (e / "model.safetensors").unlink(),
    "config {}": lambda e: (e / "config.json").write_text("{}"),
    "config []": lambda e: (e / "config.json").write_text("[]"),
    "manifest []": lambda e: (e / "manifest.json").write_text("[]"),
    "manifest deleted": lambda e: (e / "manifest.json").unlink(),
}


@pytest.fixture
def tiny(tiny_checkpoints):
    return str(tiny_checkpoints["llama"][0])


@pytest.fixture
def reference(tiny, cache_dir):
    """Tokens of an uncached start, and the cache with one good entry."""
    hit, ref = start(tiny, enable_build_cache=False)
    assert not hit and not (cache_dir / "engines").exists()
    assert start(tiny) == (False, ref)
    return ref


def _entry(cache_dir) -> Path:
    (entry,) = entry_dirs(cache_dir / "engines")
    return entry


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_engine_entry_is_quarantined_and_rebuilt(damage, tiny, cache_dir, reference):
    DAMAGE[damage](_entry(cache_dir))
    with pytest.warns(UserWarning, match="damaged cache entry"):
        assert start(tiny) == (False, reference)  # never served: rebuilt, same tokens
    assert len(list((cache_dir / "engines" / QUARANTINE_DIR).iterdir())) == 1
    assert start(tiny) == (True, reference)  # healed
    assert list(BuildCache().verify()["status"]) == ["ok"]


@pytest.mark.parametrize("damage", ["deleted config.json", "same-size flip", "config []"])
def test_skip_build_cache_never_fails_on_a_bad_entry_and_heals_it(damage, tiny, cache_dir, reference):
    DAMAGE[damage](_entry(cache_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert start(tiny, skip_build_cache=True) == (False, reference)
    assert start(tiny) == (True, reference)


@pytest.mark.parametrize("damage", ["config {}", "config []", "manifest []", "deleted config.json"])
def test_repair_tools_survive_malformed_entries(damage, tiny, cache_dir, reference, capsys):
    DAMAGE[damage](_entry(cache_dir))
    df = BuildCache().list()
    assert len(df) == 1 and df["status"][0].startswith("damaged")
    assert main(["cache", "list"]) == 0
    assert main(["cache", "verify"]) == 0
    out = capsys.readouterr().out
    assert "quarantined" in out and "0 entries ok, 1 damaged" in out
    assert len(BuildCache().list()) == 0
    assert start(tiny) == (False, reference)
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not entry_dirs(cache_dir / "engines") and not (cache_dir / "engines" / QUARANTINE_DIR).exists()


_DYING_WRITER = """
import os, signal, sys
import safetensors.torch as st
real = st.save_file
def dying(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    os.kill(os.getpid(), signal.SIGKILL)  # killed half-way through the write
st.save_file = dying
"""


def _run_killed(code: str, cache_dir: Path) -> None:
    env = {**os.environ, "KIT_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _DYING_WRITER + code], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_sigkill_during_store_leaves_no_entry_and_the_temp_dir_is_swept(tiny, cache_dir):
    hit, ref = start(tiny, enable_build_cache=False)
    _run_killed(f"from kit.llm import LLM, BuildConfig\nLLM({tiny!r}, device='cpu', "
                f"build_config=BuildConfig(**{SMALL!r}))", cache_dir)
    root = cache_dir / "engines"
    assert not entry_dirs(root) and [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert start(tiny) == (False, ref)
    # swept: its process is gone; the weight-blob store holds only blobs an entry links
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name != BLOBS_DIR]
    assert all(b.stat().st_nlink == 2 for b in (root / BLOBS_DIR).iterdir())
    assert start(tiny) == (True, ref)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_a_cache_that_cannot_be_written_degrades_to_built_not_cached(err, tiny, cache_dir, monkeypatch):
    import safetensors.torch

    hit, ref = start(tiny, enable_build_cache=False)

    def failing(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.warns(UserWarning, match="built and is used, but not cached"):
        with LLM(tiny, device="cpu", build_config=BuildConfig(**SMALL)) as llm:
            assert llm.generate(PROMPT, SP).outputs[0].token_ids == ref
            assert "not cached" in llm.engine.build_log[-1]["detail"]
    assert not entry_dirs(cache_dir / "engines")
    assert not [p for p in (cache_dir / "engines").iterdir() if p.name.startswith(".tmp-")]


def test_cache_removed_by_another_process_during_the_build(tiny, cache_dir, monkeypatch):
    import shutil

    import kit.build_cache

    hit, ref = start(tiny, enable_build_cache=False)
    real = kit.build_cache.write_engine_files

    def removed_meanwhile(engine, directory):
        shutil.rmtree(cache_dir)  # what `rm -rf` or an older `kit cache clear` does mid-build
        real(engine, directory)

    monkeypatch.setattr(kit.build_cache, "write_engine_files", removed_meanwhile)
    with pytest.warns(UserWarning, match="not cached"):
        assert start(tiny) == (False, ref)
    monkeypatch.setattr(kit.build_cache, "write_engine_files", real)
    assert start(tiny) == (False, ref) and start(tiny) == (True, ref)


# ------------------------------------------------------------------ build outputs
def _snapshot(d: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.rglob("*")) if p.is_file()}


def test_build_output_refuses_a_non_empty_directory_and_touches_nothing(tiny, tiny_checkpoints, cache_dir, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "sub" / "data.bin").write_bytes(os.urandom(64))
    (mine / "config.json").write_text('{"model_type": "llama"}')  # looks like a checkpoint, not an engine
    model_dir = tiny_checkpoints["llama"][0]
    for target in (mine, model_dir):
        before = _snapshot(target)
        with pytest.raises(FileExistsError, match="not empty and is not a kit engine directory"):
            run_cli(["build", "--model", tiny, "--max-seq-len", "64", "--max-input-len", "32", "--output",
                     str(target), "--device", "cpu"])
        assert _snapshot(target) == before


def test_build_output_replaces_an_engine_only_with_force(tiny, cache_dir, tmp_path, capsys):
    out = tmp_path / "engine"
    args = ["build", "--model", tiny, "--max-seq-len", "64", "--max-input-len", "32", "--output", str(out),
            "--device", "cpu"]
    assert run_cli(args) == 0
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match="--force"):
        run_cli(args)
    assert _snapshot(out) == before
    assert run_cli(args + ["--force"]) == 0 and load_engine(out, device="cpu").build_key
    # an engine directory holding a file of its owner's is never replaced
    (out / "my-notes.txt").write_text("mine")
    engine = load_engine(out, device="cpu")
    with pytest.raises(FileExistsError, match="does not list"):
        save_engine(engine, out, overwrite=True)
    assert (out / "my-notes.txt").read_text() == "mine"


def test_an_engine_directory_opened_directly_is_checked(tiny, cache_dir, tmp_path):
    out = tmp_path / "engine"
    with LLM(tiny, device="cpu", build_config=BuildConfig(**SMALL)) as llm:
        save_engine(llm.engine, out)
        ref = llm.generate(PROMPT, SP).outputs[0].token_ids
    assert start(out)[1] == ref  # a Path is accepted like a str
    _flip(out / "model.safetensors", -5)
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        LLM(out, device="cpu")


def test_tensorrt_backend_is_refused_by_llm_with_what_it_can_do(tiny):
    with pytest.raises(ValueError, match="builds and inspects plans.*backend='torch'"):
        LLM(tiny, device="cpu", backend="tensorrt")


# ---------------------------------------------------------------------- GGUF files
@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-gguf")
    good = registered_model_path("smollm2-135m").read_bytes()
    files = {"empty.gguf": b"", "magic.gguf": b"GGML" + good[4:4096], "truncated.gguf": good[: len(good) * 9 // 10]}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


@pytest.mark.parametrize("name", ["empty.gguf", "magic.gguf", "truncated.gguf"])
def test_a_bad_gguf_file_is_one_clear_error_everywhere(name, bad_ggufs, cache_dir):
    path = str(bad_ggufs / name)
    pattern = f"{name}: not a readable GGUF file"
    with pytest.raises(ValueError, match=pattern):
        ModelLoader(path).load()
    with pytest.raises(ValueError, match=pattern):
        LLM(path, device="cpu")
    with pytest.raises(ValueError, match=pattern):
        run_cli(["build", "--model", path, "--device", "cpu"])


@pytest.mark.slow
def test_gguf_conversion_cache_heals_after_sigkill_full_disk_and_damage(smollm2, cache_dir, monkeypatch):
    """The one SmolLM2 test (four conversions, minutes on a CPU): a conversion killed half-way, a full
    disk, a same-size flip. `test_conversion_cache_*` below are its short always-run versions."""
    import safetensors.torch

    def same_weights(loaded):
        return all(torch.equal(loaded.weights[k], v) for k, v in smollm2.weights.items())

    _run_killed("from kit.loader import ModelLoader\nModelLoader('smollm2-135m').load()", cache_dir)
    models = cache_dir / "models"
    assert not entry_dirs(models) and [p for p in models.iterdir() if p.name.startswith(".tmp-")]
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.warns(UserWarning, match="converted in memory and is not cached"):
        assert same_weights(ModelLoader("smollm2-135m").load())
    assert not list(models.iterdir())  # the dead conversion's temp dir was swept, nothing half-written
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert same_weights(ModelLoader("smollm2-135m").load())
    entry = converted_entry(smollm2.identity["sha256"])
    assert list(BuildCache().verify()["status"]) == ["ok"]
    _flip(entry / "model.safetensors", -5)  # same size, different bytes: once served silently
    with pytest.warns(UserWarning, match="damaged cache entry"):
        assert same_weights(ModelLoader("smollm2-135m").load())
    assert list(BuildCache().verify()["status"]) == ["ok"] and (models / QUARANTINE_DIR).exists()


# ----------------------------------------------- conversion cache, short versions
@pytest.fixture
def fake_gguf(tiny_checkpoints, tmp_path, monkeypatch):
    """A `.gguf` path whose reading is replaced by the tiny llama checkpoint (the cache logic is real)."""
    import kit.gguf
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    from kit.config import ModelConfig
    from kit.tokenizer import Tokenizer

    src = tiny_checkpoints["llama"][0]
    ref = ModelLoader(src).load()
    raw = RawTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    calls = []

    def read(path):
        calls.append(path)
        return ModelConfig.from_json(src / "config.json"), {k: v.clone() for k, v in ref.weights.items()}, {}

    monkeypatch.setattr(kit.gguf, "read_gguf", read)
    monkeypatch.setattr(kit.gguf.Tokenizer, "from_gguf", classmethod(lambda cls, path: tok))
    f = tmp_path / "tiny.gguf"
    f.write_bytes(os.urandom(256))
    return f, ref, calls


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["truncated weights", "same-size flip", "header flip", "deleted weights",
                                    "manifest []", "manifest deleted"])
def test_conversion_cache_damage_is_quarantined_and_converted_again(damage, fake_gguf, cache_dir):
    f, ref, calls = fake_gguf
    assert _same(ModelLoader(f).load().weights, ref.weights) and len(calls) == 1
    assert _same(ModelLoader(f).load().weights, ref.weights) and len(calls) == 1  # served from the cache
    (entry,) = entry_dirs(cache_dir / "models")
    DAMAGE[damage](entry)
    with pytest.warns(UserWarning, match="damaged cache entry"):
        assert _same(ModelLoader(f).load().weights, ref.weights)
    assert len(calls) == 2 and list(BuildCache().verify()["status"]) == ["ok"]


def test_conversion_cache_sweeps_dead_temp_dirs_and_survives_a_full_disk(fake_gguf, cache_dir, monkeypatch):
    import safetensors.torch

    f, ref, calls = fake_gguf
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    models = cache_dir / "models"
    models.mkdir(parents=True)
    live = make_temp_dir(models, "building-now")  # this process's: never swept
    stale = Path(str(live).replace(f".tmp-{os.getpid()}-", f".tmp-{int(dead.stdout)}-"))
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.warns(UserWarning, match="converted in memory and is not cached"):
        assert _same(ModelLoader(f).load().weights, ref.weights)
    assert sorted(models.iterdir()) == [live]  # the dead one swept, nothing half-written left
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert _same(ModelLoader(f).load().weights, ref.weights) and len(entry_dirs(models)) == 1
