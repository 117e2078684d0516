"""The `kit` command: generate, demo, bench, build and cache."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kit.build_cache import BuildCache
from kit.builder import BuildConfig, Builder
from kit.engine_dir import is_engine_dir, save_engine

__all__ = ["main"]

DEMO_PROMPTS = [
    "The three primary colours are",
    "Write a Python function that reverses a string:",
    "Q: What is the capital of Japan?\nA:",
    "Once upon a time, a small robot",
]


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_generate(args: argparse.Namespace) -> int:
    from kit.builder import BuildConfig
    from kit.llm import LLM, SamplingParams

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed)
    with LLM(args.model, device=_device(args.device), quantization=args.quantization,
             build_config=BuildConfig(max_batch_size=8, max_seq_len=2048)) as llm:
        prompt = args.prompt
        if args.chat:
            prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        if args.stream:
            for snap in llm.generate(prompt, sp, streaming=True):
                print(snap.outputs[0].text_diff, end="", flush=True)
            print()
        else:
            print(llm.generate(prompt, sp).text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from kit.builder import BuildConfig
    from kit.llm import LLM, SamplingParams

    device = _device(args.device)
    print(f"kit demo: loading {args.model} on {device} ...")
    t0 = time.perf_counter()
    llm = LLM(args.model, device=device, build_config=BuildConfig(max_batch_size=8, max_seq_len=1024, max_input_len=512))
    print(f"ready in {time.perf_counter() - t0:.1f} s: {llm.engine!r}\n")
    print("Network summary (per layer kind):")
    print(llm.network.summary().to_string(index=False))
    for note in getattr(llm.loaded, "notes", []):
        print(f"note: {note}")
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in DEMO_PROMPTS]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=True)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    print()
    for p, o in zip(DEMO_PROMPTS, outs):
        print(f"### {p}\n{o.text.strip()}\n   [{len(o.outputs[0].token_ids)} tokens, {o.outputs[0].finish_reason}]\n")
    print(f"{len(outs)} prompts, {n_out} generated tokens in {dt:.2f} s: {n_out / dt:.1f} tokens/s "
          f"(batched, greedy, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
    llm.shutdown()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from kit.bench import main as bench_main

    return bench_main(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from kit.server.serve import main as serve_main

    return serve_main(args)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from kit.server.load_gen import main as bench_serve_main

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
        print(df.to_string(index=False) if len(df) else f"(empty) {cache.root}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kit", description="A notebook-first research kit for LLM inference.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--quantization", default=None, help="fp8 | int8_wo | int4_wo | int4_awq | int4_gptq | int8_sq")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="load the default model, show its network, generate, report tokens/s")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--device", default=None)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="offline throughput / latency benchmark, JSON out")
    from kit.bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (FastAPI + uvicorn)")
    from kit.server.serve import add_arguments as add_serve_arguments

    add_serve_arguments(sv)
    sv.set_defaults(func=cmd_serve)

    bs = sub.add_parser("bench-serve", help="drive a running `kit serve` with the `kit bench` workload, JSON out")
    from kit.server.load_gen import add_arguments as add_bench_serve_arguments

    add_bench_serve_arguments(bs)
    bs.set_defaults(func=cmd_bench_serve)

    bl = sub.add_parser("build", help="build an engine (optionally save it to a directory)")
    bl.add_argument("--model", default="smollm2-135m")
    bl.add_argument("--backend", default="torch", choices=["torch", "tensorrt"])
    bl.add_argument("--max-batch-size", type=int, default=8)
    bl.add_argument("--max-seq-len", type=int, default=1024)
    bl.add_argument("--max-input-len", type=int, default=512)
    bl.add_argument("--output", default=None, help="engine directory to write (new, empty, or an engine with --force)")
    bl.add_argument("--force", action="store_true", help="replace the kit engine directory at --output")
    bl.add_argument("--device", default=None)
    bl.set_defaults(func=cmd_build)

    c = sub.add_parser("cache", help="list, verify or clear the caches (built engines, converted models)")
    c.add_argument("action", choices=["list", "verify", "clear"])
    c.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
