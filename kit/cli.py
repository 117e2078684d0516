"""The `kit` command: generate, demo, bench, build and cache.

User errors (a bad flag value, a missing file, a model that cannot do what was asked) print one
line, `kit: error: <message>`, on stderr and exit with status 2; `--debug` or `KIT_DEBUG=1` also
prints the traceback. Ctrl-C exits with status 130 without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from kit.bench import add_arguments as add_bench_arguments
from kit.bench import main as bench_main
from kit.build_cache import BuildCache
from kit.builder import BuildConfig, Builder
from kit.engine_dir import is_engine_dir, save_engine
from kit.llm import LLM
from kit.sampling_params import SamplingParams
from kit.server.load_gen import add_arguments as add_bench_serve_arguments
from kit.server.load_gen import main as bench_serve_main
from kit.server.serve import add_arguments as add_serve_arguments
from kit.server.serve import main as serve_main

__all__ = ["main", "build_parser", "KitUsageError", "USER_ERRORS", "int_at_least", "float_above",
           "float_in_range"]

DEMO_PROMPTS = [
    "The three primary colours are",
    "Write a Python function that reverses a string:",
    "Q: What is the capital of Japan?\nA:",
    "Once upon a time, a small robot",
]


class KitUsageError(Exception):
    """Something the user asked for that cannot be done as asked; the CLI prints it as one line."""


# NOTE: these are the errors a user's input causes (bad values, missing or clashing paths);
# anything else is a defect in kit and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    KitUsageError, ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
    NotADirectoryError, PermissionError)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def int_at_least(flag: str, low: int) -> Callable[[str], int]:
    """An argparse `type` accepting integers >= `low`; its message names `flag`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _parse_float(flag: str, text: str, allowed: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} must be a number {allowed}, got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{flag} must be a number {allowed}, got {text!r}")
    return value


def float_above(flag: str, low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse `type` accepting numbers > `low` (>= with `inclusive`), `inf` included."""
    allowed = f"{'>=' if inclusive else '>'} {low:g}"

    def parse(text: str) -> float:
        value = _parse_float(flag, text, allowed)
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"{flag} must be a number {allowed}, got {text!r}")
        return value

    parse.__name__ = f"number {allowed}"
    return parse


def float_in_range(flag: str, low: float, high: float) -> Callable[[str], float]:
    """An argparse `type` accepting numbers in the half-open range (low, high]."""
    allowed = f"in ({low:g}, {high:g}]"

    def parse(text: str) -> float:
        value = _parse_float(flag, text, allowed)
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{flag} must be a number {allowed}, got {text!r}")
        return value

    parse.__name__ = f"number {allowed}"
    return parse


# `kit bench`'s flags come from kit.bench.add_arguments; these types bound them at the parser.
BENCH_TYPES: dict[str, Callable[[str], object]] = {
    "input_len": int_at_least("--input-len", 1),
    "output_len": int_at_least("--output-len", 1),
    "num_requests": int_at_least("--num-requests", 1),
    "concurrency": int_at_least("--concurrency", 1),
    "request_rate": float_above("--request-rate", 0.0),
    "seed": int_at_least("--seed", 0),
    "tp": int_at_least("--tp", 1),
}


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KitUsageError(f"--device {name!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KitUsageError(f"--device {name!r}: no CUDA GPU is available here; use --device cpu")
    return name


def cmd_generate(args: argparse.Namespace) -> int:
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    with LLM(args.model, device=_device(args.device), quantization=args.quantization,
             build_config=BuildConfig(max_batch_size=8, max_seq_len=2048), tensor_parallel_size=args.tp) as llm:
        if llm.tokenizer is None:
            what = "--chat needs the model's chat template" if args.chat else "kit generate takes a text prompt"
            raise KitUsageError(f"{what}, but model {args.model!r} has no tokenizer "
                                "(add its tokenizer.json, or call LLM.generate with token ids)")
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                      tokenize=False)
        if args.stream:
            for snap in llm.generate(prompt, sp, streaming=True):
                print(snap.outputs[0].text_diff, end="", flush=True)
            print()
        else:
            print(llm.generate(prompt, sp).text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    device = _device(args.device)
    print(f"kit demo: loading {args.model} on {device} ...")
    t0 = time.perf_counter()
    with LLM(args.model, device=device,
             build_config=BuildConfig(max_batch_size=8, max_seq_len=1024, max_input_len=512)) as llm:
        print(f"ready in {time.perf_counter() - t0:.1f} s: {llm.engine!r}\n")
        if llm.tokenizer is None:
            raise KitUsageError(f"kit demo needs a model with a tokenizer; {args.model!r} has none")
        print("Network summary (per layer kind):")
        print(llm.network.summary().to_string(index=False))
        for note in getattr(llm.loaded, "notes", []):
            print(f"note: {note}")
        sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in DEMO_PROMPTS]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=True)
        dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print()
    for p, o in zip(DEMO_PROMPTS, outs):
        print(f"### {p}\n{o.text.strip()}\n   [{len(o.outputs[0].token_ids)} tokens, {o.outputs[0].finish_reason}]\n")
    print(f"{len(outs)} prompts, {n_out} generated tokens in {dt:.2f} s: {n_out / dt:.1f} tokens/s "
          f"(batched, greedy, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _device(args.device)
    return bench_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    return serve_main(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    return bench_serve_main(args)


def cmd_build(args: argparse.Namespace) -> int:
    if args.output:
        _check_output(args.output, args.force)  # before the build: refuse early, touch nothing
    bc = BuildConfig(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                     max_input_len=min(args.max_input_len, args.max_seq_len))
    engine = Builder(args.backend, device=_device(args.device)).get_engine(args.model, bc).engine
    if args.output:
        save_engine(engine, args.output, overwrite=args.force)
        print(f"engine saved to {args.output}")
    for row in engine.build_log:
        print(f"{row['step']:<32} {row['seconds']:8.3f} s  {row.get('detail', '')}")
    return 0


def _check_output(output: str, force: bool) -> None:
    """Refuse `--output` early if saving there would be refused (a file, a foreign or kept directory)."""
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--output {output}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not is_engine_dir(path):
            raise FileExistsError(f"--output {output}: the directory is not empty and is not a kit engine "
                                  "directory; nothing was changed (choose a new or empty directory)")
        if not force:
            raise FileExistsError(f"--output {output}: already holds a kit engine; pass --force to replace it")


def cmd_cache(args: argparse.Namespace) -> int:
    cache = BuildCache()
    if args.action == "list":
        df = cache.list()
        print(df.to_string(index=False, float_format="%.1f") if len(df) else f"(empty) {cache.root}")
        limit = f"limit {cache.max_bytes / 1e6:.1f} MB" if cache.max_bytes else "no limit (set KIT_CACHE_MAX_GB)"
        print(f"on disk: engines {cache.disk_bytes() / 1e6:.1f} MB (shared weight files counted once), {limit}; "
              f"with converted and quantized models {cache.disk_bytes(all_roots=True) / 1e6:.1f} MB")
    elif args.action == "verify":
        df = cache.verify()
        print(df.to_string(index=False) if len(df) else f"(empty) {cache.root}")
        bad = int((df["status"] != "ok").sum()) if len(df) else 0
        print(f"{len(df) - bad} entries ok, {bad} damaged entries quarantined (they are rebuilt when next used)")
    else:
        kinds = cache.list()["kind"].value_counts()
        cache.clear()
        print(f"removed {int(kinds.get('engine', 0))} entries from {cache.root} and "
              f"{int(kinds.get('model', 0))} converted models from {cache.models_root}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (and printed by `main` as one line) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --concurrency: --concurrency must be ..." -> "--concurrency must be ..."
        m = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message)
        if m and m.group(2).startswith(m.group(1)):
            message = m.group(2)
        message = message.replace("argument command: invalid choice", "unknown command")
        raise KitUsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # NOTE: SUPPRESS, so that `kit --debug generate ...` is not reset by the sub-command's default
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error (also: KIT_DEBUG=1)")
    p = _Parser(prog="kit", description="A notebook-first research kit for LLM inference.", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt", parents=[common])
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--max-tokens", type=int_at_least("--max-tokens", 1), default=64)
    g.add_argument("--temperature", type=float_above("--temperature", 0.0, inclusive=True), default=0.0)
    g.add_argument("--top-p", type=float_in_range("--top-p", 0.0, 1.0), default=1.0)
    g.add_argument("--seed", type=int_at_least("--seed", 0), default=None)
    g.add_argument("--quantization", default=None, help="fp8 | int8_wo | int4_wo | int4_awq | int4_gptq | int8_sq")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--device", default=None)
    g.add_argument("--tp", type=int_at_least("--tp", 1), default=1,
                   help="tensor parallel size: ranks in their own processes (GPUs, or gloo on the CPU)")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="load the default model, show its network, generate, report tokens/s",
                       parents=[common])
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=int_at_least("--max-tokens", 1), default=48)
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="offline throughput / latency benchmark, JSON out", parents=[common])
    add_bench_arguments(b)
    for action in b._actions:  # NOTE: argparse has no public way to retype an added argument
        if action.dest in BENCH_TYPES:
            action.type = BENCH_TYPES[action.dest]
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)", parents=[common])
    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="drive a running `kit serve` with the `kit bench` workload, JSON out",
                        parents=[common])
    add_bench_serve_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)

    bl = sub.add_parser("build", help="build an engine (optionally save it to a directory)",
                        parents=[common])
    bl.add_argument("--model", default="smollm2-135m")
    bl.add_argument("--backend", default="torch", choices=["torch", "tensorrt"])
    bl.add_argument("--max-batch-size", type=int, default=8)
    bl.add_argument("--max-seq-len", type=int, default=1024)
    bl.add_argument("--max-input-len", type=int, default=512)
    bl.add_argument("--output", default=None, help="engine directory to write (new, empty, or an engine with --force)")
    bl.add_argument("--force", action="store_true", help="replace the kit engine directory at --output")
    bl.add_argument("--device", default=None)
    bl.set_defaults(func=cmd_build)

    c = sub.add_parser("cache", help="list, verify or clear the caches (built engines, converted models)",
                       parents=[common])
    c.add_argument("action", choices=["list", "verify", "clear"])
    c.set_defaults(func=cmd_cache)
    return p


def _one_line(err: BaseException) -> str:
    """The error as one line: OSErrors without their errno prefix, whitespace runs collapsed."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    if isinstance(err, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `kit` command; return its exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KIT_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"kit: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as err:  # --help, --version: argparse prints and exits 0
        return err.code if isinstance(err.code, int) else (0 if err.code is None else EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
