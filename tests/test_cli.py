from kit.cli import main


def test_generate_and_cache_commands(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["generate", "The capital of France is", "--max-tokens", "4", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out
    assert main(["cache", "list"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out


def test_build_command_saves_an_engine(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "engine"
    assert main(["build", "--max-seq-len", "128", "--max-input-len", "64", "--output", str(out), "--device", "cpu"]) == 0
    assert (out / "config.json").exists() and "prepare network" in capsys.readouterr().out
