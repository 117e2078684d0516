"""The `kit` command: generate, demo, bench, build and cache."""

from __future__ import annotations

import argparse
import sys
import time

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
    from kit.builder import BuildConfig, Builder
    from kit.loader import ModelLoader
    from kit.network import NetworkBuilder

    device = _device(args.device)
    loaded = ModelLoader(args.model, device=device).load()
    network = NetworkBuilder(loaded).build()
    bc = BuildConfig(max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                     max_input_len=min(args.max_input_len, args.max_seq_len))
    engine = Builder(args.backend, device=device).build(network, bc, loaded=loaded)
    if args.output:
        engine.save(args.output)
        print(f"engine saved to {args.output}")
    for row in engine.build_log:
        print(f"{row['step']:<32} {row['seconds']:8.3f} s  {row.get('detail', '')}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from kit.builder import BuildCache

    cache = BuildCache()
    if args.action == "list":
        df = cache.list()
        print(df.to_string(index=False) if len(df) else f"(empty) {cache.root}")
    else:
        n = cache.clear()
        print(f"removed {n} entries from {cache.root}")
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
    bl.add_argument("--output", default=None)
    bl.add_argument("--device", default=None)
    bl.set_defaults(func=cmd_build)

    c = sub.add_parser("cache", help="list or clear the build cache")
    c.add_argument("action", choices=["list", "clear"])
    c.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
