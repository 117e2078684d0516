"""Every command line and Python snippet that README.md shows works as shown.

The README is parsed here, not copied: each `kit ...` command in its code blocks and inline
code is expanded (`list|clear` gives one command per alternative; `[--flag X]` groups give one
run without any of them and one with all of them), made small where a flag allows
(`--max-tokens 2`, a two-request bench), and run in-process through `kit.cli.main`, which must
return 0. The README's Python blocks (the tour) run in order in one namespace, and the comments
that show a result (`print(out.text)  # " Paris. ..."`, `logits = ...  # (1, 49152)`) are checked.
`test_a_broken_readme_command_fails` shows that a broken command in a copy of the README fails
the same check.
"""

from __future__ import annotations

import ast
import contextlib
import io
import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch

from kit.cli import build_parser, main
from kit.loader import registered_model_path

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = README.parent

# Flag values that keep each sub-command small; a flag is set only where the sub-command has it.
SMALL = {
    "generate": {"--max-tokens": "2"},
    "demo": {"--max-tokens": "2"},
    "bench": {"--input-len": "8", "--output-len": "2", "--concurrency": "2", "--num-requests": "2"},
    "build": {"--max-seq-len": "64", "--max-input-len": "32", "--max-batch-size": "2"},
}
# Placeholders the README writes in capitals, and what stands in for them.
PLACEHOLDERS = {
    "NAME": lambda tmp: "smollm2-135m",
    "PATH": lambda tmp: str(registered_model_path("smollm2-135m")),
    "DIR": lambda tmp: str(tmp / "out-dir"),
    "FILE": lambda tmp: str(tmp / "out-file"),
    "KEY": lambda tmp: "sk-readme-test",
}
OUTPUT_FLAGS = ("--output", "--out")
COMMAND_START = re.compile(r"^(kit|make|python|python3|pip)\s")


# ------------------------------------------------------------------------------- extraction
def code_spans(markdown: str) -> list[str]:
    """The text of every fenced code line and every inline code span, whitespace-normalised."""
    spans: list[str] = []
    prose: list[str] = []
    fence = None
    for line in markdown.splitlines():
        m = re.match(r"^\s*(```+|~~~+)\s*(\S*)", line)
        if m and fence is None:
            fence = m.group(1)
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                spans.append(line.split("  #")[0].strip())  # "make demo   # sets up ..." -> "make demo"
            continue
        prose.append(line)
    # NOTE: an inline code span may wrap onto the next line of the paragraph
    for m in re.finditer(r"`([^`]+)`", "\n".join(prose)):
        spans.append(" ".join(m.group(1).split()))
    return spans


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def expand(command: str) -> list[str]:
    """`a [--x X] [--y] b|c` -> ["a b", "a c", "a --x X --y b", "a --x X --y c"] (order kept, no duplicates)."""
    parts = re.split(r"(\[[^\[\]]*\])", command)
    required = [p for p in parts if not p.startswith("[")]
    everything = [p[1:-1] if p.startswith("[") else p for p in parts]
    out: list[str] = []
    for text in (" ".join(required), " ".join(everything)):
        words = shlex.split(text)
        choices = [w.split("|") if "|" in w else [w] for w in words]
        for combo in itertools.product(*choices):
            cmd = shlex.join(combo)
            if cmd not in out:
                out.append(cmd)
    return out


def readme_commands(markdown: str) -> list[str]:
    """Every command line the markdown shows, expanded into the runs to make."""
    out: list[str] = []
    for span in code_spans(markdown):
        if COMMAND_START.match(span):
            # NOTE: only kit's own commands use the [optional] and a|b notation (pip's ".[tensorrt]" is literal)
            for cmd in (expand(span) if span.startswith("kit ") else [span]):
                if cmd not in out:
                    out.append(cmd)
    return out


# ------------------------------------------------------------------------------- running
def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.choices and "generate" in a.choices)
    return action.choices


def skip_reason(command: str) -> str | None:
    """Why a README command is not run here, or None when it is."""
    words = shlex.split(command)
    if words[0] == "make":
        return f"`{command}` sets up .venv from nothing and runs the suite or JupyterLab; its kit commands run here"
    if words[0] == "pip":
        return f"`{command}` installs packages"
    if words[0].startswith("python") and "-m" in words and "gpu" in words:
        return "the GPU tests need a CUDA GPU"
    if words[0].startswith("python") and words[1].startswith("bench/"):
        assert (ROOT / words[1]).exists(), f"the README names {words[1]}, which does not exist"
        return f"{words[1]} measures a CUDA GPU"
    return None


def prepare(command: str, tmp: Path) -> list[str]:
    """argv for `kit.cli.main`: placeholders filled in, small sizes set where the flag exists."""
    words = shlex.split(command)
    assert words[0] == "kit", command
    argv = []
    for w in words[1:]:
        if re.fullmatch(r"[A-Z][A-Z_]+", w):
            assert w in PLACEHOLDERS, f"README placeholder {w} has no stand-in here: add it to PLACEHOLDERS"
            w = PLACEHOLDERS[w](tmp)
        argv.append(w)
    sub = argv[0]
    parser = _subparsers().get(sub)
    known = {o for a in parser._actions for o in a.option_strings} if parser is not None else set()
    for flag, value in SMALL.get(sub, {}).items():
        if flag not in known:
            continue
        if flag in argv:
            i = argv.index(flag)
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                j += 1
            argv[i + 1:j] = [value]
        else:
            argv += [flag, value]
    return argv


def run_kit(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def check_command(command: str, tmp: Path) -> None:
    """Run one README command; fail with its output unless it exits 0 and writes what it names."""
    argv = prepare(command, tmp)
    rc, out, err = run_kit(argv)
    assert rc == 0, f"`{command}` (run as kit {shlex.join(argv)}) exited {rc}:\n{err[-2000:]}\n{out[-2000:]}"
    for flag in OUTPUT_FLAGS:
        if flag in argv:
            written = Path(argv[argv.index(flag) + 1])
            assert written.exists(), f"`{command}` exited 0 but wrote nothing at {written}"


def _params() -> list:
    params = []
    for cmd in readme_commands(README.read_text()):
        # NOTE: building a TensorRT plan of SmolLM2 takes ~40 s on 2 cores: `make test-slow` runs that
        # command, and tests/test_tensorrt_backend.py builds tiny plans through the same code in `make test`
        marks = [pytest.mark.slow] if "--backend tensorrt" in cmd else []
        params.append(pytest.param(cmd, id=cmd, marks=marks))
    return params


@pytest.fixture
def kit_dirs(tmp_path, monkeypatch):
    """Commands run in a fresh directory, so relative outputs (`--out b.json`) land there."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command, kit_dirs, tmp_path, monkeypatch):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    if shlex.split(command)[1] in ("serve", "bench-serve"):
        # a server runs until it is stopped (and bench-serve needs one): the flags the README shows
        # must parse here; tests/test_server.py starts a real server and drives it with bench-serve
        build_parser().parse_args(prepare(command, kit_dirs))
        pytest.skip(f"`{command}` is long-running; its flags parse, and tests/test_server.py runs it")
    if "--backend tensorrt" in command:
        pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install .[tensorrt])")
    if shlex.split(command)[1] == "cache":
        # NOTE: `kit cache clear` must not empty the cache that the other tests load SmolLM2 from
        monkeypatch.setenv("KIT_CACHE_DIR", str(tmp_path / "scratch-cache"))
    check_command(command, kit_dirs)


def test_readme_shows_every_subcommand():
    """The extraction finds the README's commands: each sub-command of `kit` is shown at least once."""
    commands = readme_commands(README.read_text())
    shown = {shlex.split(c)[1] for c in commands if c.startswith("kit ")}
    assert {"generate", "demo", "bench", "build", "cache"} <= shown
    assert shown <= set(_subparsers()), f"the README shows unknown sub-commands: {shown - set(_subparsers())}"
    assert "kit cache list" in commands and "kit cache clear" in commands
    assert "make demo" in commands and "make test" in commands


def test_expansion_of_alternatives_and_optional_groups():
    assert expand("kit cache list|clear") == ["kit cache list", "kit cache clear"]
    assert expand('kit generate "a b" --max-tokens 32 [--model PATH|NAME] [--chat]') == [
        "kit generate 'a b' --max-tokens 32",
        "kit generate 'a b' --max-tokens 32 --model PATH --chat",
        "kit generate 'a b' --max-tokens 32 --model NAME --chat",
    ]
    assert prepare("kit generate x --max-tokens 32 --model NAME", Path("/t")) == [
        "generate", "x", "--max-tokens", "2", "--model", "smollm2-135m"]
    assert prepare("kit bench --concurrency 1 8 64", Path("/t")) == [
        "bench", "--concurrency", "2", "--input-len", "8", "--output-len", "2", "--num-requests", "2"]
    md = "text `kit demo` and\n```bash\nkit cache list   # note\n```\n`kit build\n[--output DIR]`"
    assert readme_commands(md) == ["kit cache list", "kit demo", "kit build", "kit build --output DIR"]


def test_a_broken_readme_command_fails(kit_dirs):
    """A copy of the README with an unknown flag on a command: the same check fails on it."""
    text = README.read_text()
    assert "`kit demo`" in text
    broken = text.replace("`kit demo`", "`kit demo --no-such-flag`")
    bad = [c for c in readme_commands(broken) if "--no-such-flag" in c]
    assert bad == ["kit demo --no-such-flag"]
    with pytest.raises(AssertionError, match=r"exited 2:\s+kit: error: unrecognized arguments: --no-such-flag"):
        check_command(bad[0], kit_dirs)
    # a renamed placeholder is caught before anything runs
    with pytest.raises(AssertionError, match="placeholder MODEL_DIR"):
        check_command("kit generate x --model MODEL_DIR", kit_dirs)


# ------------------------------------------------------------------------------- the tour
def _shown_results(block: str) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """From result comments: printed texts (`print(x)  # " Paris. ..."`) and shapes (`y = f()  # (1, 49152)`)."""
    printed, shapes = [], []
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        comment = comment.strip()
        if code.strip().startswith("print(") and comment.startswith('"'):
            printed.append(ast.literal_eval(comment).removesuffix("...").strip())
        m = re.match(r"\s*(\w+)\s*=", code)
        if m and re.fullmatch(r"\(\d+(, \d+)*\)", comment):
            shapes.append((m.group(1), ast.literal_eval(comment)))
    return printed, shapes


def test_readme_python_tour_runs_as_shown():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's tour has Python blocks"
    namespace: dict = {"__name__": "readme_tour"}
    checked = 0
    try:
        for block in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
            printed, shapes = _shown_results(block)
            for text in printed:
                assert text in out.getvalue(), f"the README shows {text!r}; the code printed {out.getvalue()!r}"
            for name, shape in shapes:
                assert tuple(namespace[name].shape) == shape, f"{name}: README says {shape}"
            checked += len(printed) + len(shapes)
    finally:
        for value in list(namespace.values()):
            if type(value).__name__ == "LLM":
                value.shutdown()
    assert checked >= 2  # " Paris." and the logits' shape
    assert isinstance(namespace["logits"], torch.Tensor)
