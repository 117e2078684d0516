"""Online benchmark: drive a running `kit serve` over HTTP with `kit bench`'s workload.

Same prompts (`kit.bench.make_prompts`: random token ids, same seed), same sampling
(greedy, exactly `output_len` tokens with `ignore_eos`), same arrival process (at most
`concurrency` in flight; closed loop, or Poisson arrivals at `request_rate`), same result
fields (`output_tokens_per_s`, `requests_per_s`, `ttft_ms`, `tpot_ms`, ...) in the same JSON
layout (`runs[i]["kit"]`), so `kit bench --out A.json` and `kit bench-serve --out B.json`
compare field by field. Times are taken at the client: TTFT from sending the request to
the first streamed token, TPOT from the first to the last token over `tokens - 1`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from typing import Any

import httpx
from kit.progress import tqdm

# NOTE: the offline benchmark's own prompt maker and percentiles, so both report the same statistics
from kit.bench import _percentiles, make_prompts, write_results
from kit.server.metrics import parse_metrics

__all__ = ["add_arguments", "run_online_benchmark", "main"]


async def _one(client: httpx.AsyncClient, model: str, prompt: list[int], output_len: int) -> dict[str, Any]:
    """One streamed completion: submit time, token times, usage."""
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t_submit = time.perf_counter()
    first = last = None
    use = None
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                use = chunk["usage"]
    n = use["completion_tokens"] if use else 0
    return {"submit": t_submit, "first": first, "last": last, "tokens": n}


async def _kv_poller(client: httpx.AsyncClient, peak: dict[str, float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            m = parse_metrics((await client.get("/metrics")).text)
            peak["used"] = max(peak.get("used", 0.0), m.get("kit_kv_cache_blocks_used", 0.0))
            peak["total"] = m.get("kit_kv_cache_blocks_total", 0.0)
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def _run(endpoint: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
               request_rate: float, seed: int, progress: bool, headers: dict[str, str]) -> dict[str, Any]:
    if concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = closed loop), got {request_rate}")
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=endpoint, timeout=None, limits=limits, headers=headers) as client:
        slots = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(prompts), desc=f"bench-serve c={concurrency}", disable=not progress, leave=False)
        peak: dict[str, float] = {}
        stop = asyncio.Event()
        poller = asyncio.ensure_future(_kv_poller(client, peak, stop))

        async def go(p: list[int]) -> dict[str, Any]:
            try:
                return await _one(client, model, p, output_len)
            finally:
                slots.release()
                bar.update(1)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            await slots.acquire()
            tasks.append(asyncio.ensure_future(go(p)))
            if request_rate != float("inf"):  # Poisson arrivals: an exponential gap after each submission
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        stop.set()
        await poller
        bar.close()
    ttft = [1e3 * (r["first"] - r["submit"]) for r in results if r["first"] is not None]
    tpot = [1e3 * (r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    n_out = sum(r["tokens"] for r in results)
    total = int(peak.get("total", 0)) or None
    used = int(peak.get("used", 0))
    return {
        "num_requests": len(prompts), "input_len": len(prompts[0]), "output_len": output_len,
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "wall_s": wall, "output_tokens": n_out, "output_tokens_per_s": n_out / wall,
        "requests_per_s": len(prompts) / wall, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
        "peak_kv_blocks": used, "kv_blocks_total": total,
        "peak_kv_pct": 100.0 * used / total if total else None,
    }


def run_online_benchmark(endpoint: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                         request_rate: float = float("inf"), seed: int = 0, progress: bool = True,
                         api_key: str | None = None) -> dict[str, Any]:
    """Serve `prompts` through the server at `endpoint`; the same metrics dict as `kit.bench.run_benchmark`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_run(endpoint.rstrip("/"), model, prompts, output_len, concurrency, request_rate, seed,
                            progress, headers))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per concurrency level (default: max(8, 2 x concurrency))")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here")


def main(args: argparse.Namespace) -> int:
    if any(c < 1 for c in args.concurrency):
        raise ValueError(f"--concurrency must be ints >= 1, got {args.concurrency}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf = closed loop), got {args.request_rate}")
    endpoint = args.endpoint.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = httpx.get(f"{endpoint}/v1/models", headers=headers, timeout=30.0).raise_for_status().json()["data"][0]

    def count(c: int) -> int:
        return args.num_requests or max(8, 2 * c)

    prompts = make_prompts(card["vocab_size"], args.input_len, max(count(c) for c in args.concurrency), args.seed)
    results: dict[str, Any] = {"model": card["id"], "endpoint": endpoint,
                               "environment": {"client": "kit bench-serve", "python": platform.python_version()},
                               "runs": []}
    bench = dict(endpoint=endpoint, model=card["id"], api_key=args.api_key)
    run_online_benchmark(prompts=prompts[:max(2, min(4, len(prompts)))], output_len=min(8, args.output_len),
                         concurrency=2, progress=False, **bench)  # warm-up, as `kit bench` does
    for c in args.concurrency:
        results["runs"].append({"kit": run_online_benchmark(prompts=prompts[:count(c)], output_len=args.output_len,
                                                            concurrency=c, request_rate=args.request_rate,
                                                            seed=args.seed, **bench)})
    print(f"{'concurrency':>11} {'tok/s':>10} {'req/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for run in results["runs"]:
        k = run["kit"]
        print(f"{k['concurrency']:>11} {k['output_tokens_per_s']:>10.1f} {k['requests_per_s']:>8.2f} "
              f"{k['ttft_ms']['p50']:>12.1f} {k['tpot_ms']['p50']:>12.2f}")
    write_results(results, args.out)
    return 0
