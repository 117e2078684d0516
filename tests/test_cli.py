import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kit import cli
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


# ---------------------------------------------------------------- user errors: one line, exit 2
def _one_error_line(err: str) -> str:
    """The error is one line, the last on stderr (progress bars of the work before it may precede it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("kit: error: "), err
    assert sum("kit: error" in line for line in lines) == 1 and "Traceback" not in err, err
    return lines[-1]


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--concurrency", "0", "1"], "--concurrency must be an integer >= 1, got 0"),
    (["bench", "--concurrency", "two"], "--concurrency must be an integer >= 1, got 'two'"),
    (["bench", "--request-rate", "0"], "--request-rate must be a number > 0, got '0'"),
    (["bench", "--request-rate", "nan"], "--request-rate must be a number > 0, got 'nan'"),
    (["bench", "--output-len", "-1"], "--output-len must be an integer >= 1, got -1"),
    (["generate", "hi", "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["generate", "hi", "--temperature", "-0.5"], "--temperature must be a number >= 0, got '-0.5'"),
    (["generate", "hi", "--top-p", "1.5"], "--top-p must be a number in (0, 1], got '1.5'"),
    (["demo", "--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["generate"], "the following arguments are required: prompt"),
    (["frobnicate"], "unknown command: 'frobnicate'"),
    (["cache", "list", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert _one_error_line(captured.err).startswith(f"kit: error: {expected}")
    assert captured.out == ""


@pytest.mark.parametrize("argv, expected", [
    (["generate", "hi", "--model", "/no/such/model"], "model '/no/such/model' is neither a registered name"),
    (["build", "--model", "/no/such/model"], "model '/no/such/model' is neither a registered name"),
    (["bench", "--model", "/no/such/model"], "model '/no/such/model' is neither a registered name"),
    (["generate", "hi", "--device", "cuda"] if not torch.cuda.is_available() else ["generate", "hi", "--device", "tpu"],
     "--device"),
    (["generate", "hi", "--device", "abacus"], "--device 'abacus' is not a device"),
])
def test_errors_inside_a_command_are_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_unknown_quantization_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["generate", "hi", "--max-tokens", "1", "--quantization", "int3", "--device", "cpu"]) == 2
    assert "unknown quantization 'int3'" in _one_error_line(capsys.readouterr().err)


def test_chat_on_a_model_without_a_tokenizer_is_one_clear_line(tiny_checkpoints, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    path = str(tiny_checkpoints["llama"][0])  # a transformers checkpoint saved without tokenizer files
    assert main(["generate", "hi", "--chat", "--model", path, "--max-tokens", "1", "--device", "cpu"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == (f"kit: error: --chat needs the model's chat template, but model {path!r} has no tokenizer "
                    "(add its tokenizer.json, or call LLM.generate with token ids)")
    assert main(["generate", "hi", "--model", path, "--max-tokens", "1", "--device", "cpu"]) == 2
    assert "kit generate takes a text prompt, but model" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("how", ["flag-before", "flag-after", "env"])
def test_debug_shows_the_traceback(how, capsys, monkeypatch):
    argv = ["generate", "hi", "--model", "/no/such/model"]
    if how == "flag-before":
        argv = ["--debug", *argv]
    elif how == "flag-after":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("KIT_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("kit: error: model '/no/such/model'")


def test_keyboard_interrupt_exits_130_quietly(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_demo", interrupted)
    assert main(["demo"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_defect_keeps_its_traceback(monkeypatch):
    """Only user errors become one line: an internal error propagates with its traceback."""
    def broken(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "cmd_demo", broken)
    with pytest.raises(KeyError, match="internal"):
        main(["demo"])


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0
    assert "--concurrency" in capsys.readouterr().out


def test_the_kit_process_prints_one_line_and_exits_2():
    """The installed entry point, as a shell sees it: stderr holds one line, the status is 2."""
    proc = subprocess.run([sys.executable, "-m", "kit.cli", "bench", "--concurrency", "0", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert proc.returncode == 2
    assert proc.stderr == "kit: error: --concurrency must be an integer >= 1, got 0 (see 'kit bench --help')\n"
    assert proc.stdout == ""


def test_tensorrt_build_of_a_float32_model_writes_a_plan_the_inspector_opens(tmp_path, monkeypatch, capsys):
    """`kit build --backend tensorrt --output DIR` with the CPU's default dtype (float32): TensorRT-RTX
    cannot compile float32 GEMMs, so the plan is built in float16, says why, and opens again."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install .[tensorrt])")
    from helpers import make_hf_checkpoint

    from kit.backends.tensorrt_backend import TensorRTPlan
    from kit.engine_dir import load_engine

    monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "cache"))
    ckpt, out = tmp_path / "ckpt", tmp_path / "trt"
    make_hf_checkpoint("llama", ckpt)
    argv = ["build", "--model", str(ckpt), "--backend", "tensorrt", "--max-seq-len", "64", "--max-input-len", "32",
            "--max-batch-size", "2", "--output", str(out), "--device", "cpu"]
    assert main(argv) == 0
    plan = TensorRTPlan.load(out)
    assert plan.dtype == "float16" and plan.requested_dtype == "float32" and "float32" in plan.precision_reason
    assert {io["name"] for io in plan.inputs} >= {"input_ids"} and plan.outputs and plan.profiles
    assert set(plan.profiles[0]) and all(len(shapes) == 3 for shapes in plan.profiles[0].values())
    layers = plan.to_frame()  # the inspector's view: one row a TensorRT layer, mapped back to kit layers
    assert len(layers) == plan.num_layers and layers["kit_layer"].str.startswith("layers.0.").any()
    engine = load_engine(out, device="cpu")  # the engine directory reopens (its key names the float16 plan)
    assert engine.backend.name == "tensorrt" and not engine.backend.can_execute
    capsys.readouterr()
