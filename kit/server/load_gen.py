"""Online benchmark: drive a running `kit serve` over HTTP with `kit bench`'s workload.

Same prompts (`kit.bench.make_prompts`: random token ids, same seed), same sampling
(greedy, exactly `output_len` tokens with `ignore_eos`), same arrival process (at most
`concurrency` in flight; closed loop, or Poisson arrivals at `request_rate`), same result
fields (`output_tokens_per_s`, `requests_per_s`, `ttft_ms`, `tpot_ms`, ...) in the same JSON
layout (`runs[i]["kit"]`), so `kit bench --out A.json` and `kit bench-serve --out B.json`
compare field by field. Times are taken at the client: TTFT from sending the request to
the first streamed token, TPOT from the first to the last token over `tokens - 1`.

The streams are read by `client_procs` processes (kit/server/load_client.py; default one
per 16 streams in flight): request i and 1/N of the concurrency go to process i % N, each
its own event loop over raw keep-alive HTTP/1.1 streams, parsing JSON only for the usage
chunk (tokens are counted from `usage`). TTFT and TPOT are `perf_counter` intervals
inside one process; the run's wall time spans the processes on the `time.time()` clock
(each process anchors its `perf_counter` to it at a common start), since `perf_counter`'s
origin is not shared between processes. Poisson arrivals are drawn once (seeded) as
offsets from the start; a request is sent at its offset or when a slot frees, whichever
is later.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
from kit.progress import tqdm

# NOTE: the offline benchmark's own prompt maker and percentiles, so both report the same statistics
from kit.bench import _percentiles, make_prompts, write_results
from kit.server.metrics import parse_metrics

__all__ = ["add_arguments", "default_client_procs", "run_online_benchmark", "main"]

_STREAMS_PER_PROC = 16
# NOTE: run as a file, not `-m`: a client process then imports only the standard library, not the kit
_CLIENT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_client.py")


def _kv_poller(endpoint: str, headers: dict[str, str], peak: dict[str, float], stop: threading.Event) -> None:
    """Poll /metrics for the peak KV-cache use until `stop`."""
    with httpx.Client(base_url=endpoint, timeout=30.0, headers=headers) as http:
        while not stop.is_set():
            try:
                m = parse_metrics(http.get("/metrics").text)
                peak["used"] = max(peak.get("used", 0.0), m.get("kit_kv_cache_blocks_used", 0.0))
                peak["total"] = m.get("kit_kv_cache_blocks_total", 0.0)
            except httpx.HTTPError:
                pass
            stop.wait(0.25)


def default_client_procs(concurrency: int) -> int:
    """One client process per 16 streams in flight, at most one per CPU core."""
    return max(1, min(math.ceil(concurrency / _STREAMS_PER_PROC), os.cpu_count() or 1))


def _arrivals(n: int, request_rate: float, seed: int) -> list[float] | None:
    """Poisson arrivals: each request's offset from the start (exponential gaps); None for a closed loop."""
    if request_rate == float("inf"):
        return None
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


class _ClientProc:
    """One `load_client.py` process and the thread that reads its answers."""

    def __init__(self, job: dict[str, Any], bar: Any, failed: threading.Event) -> None:
        self.proc = subprocess.Popen([sys.executable, _CLIENT_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self._bar, self._failed = bar, failed
        self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        self.proc.stdin.flush()
        self._thread = threading.Thread(target=self._read, name="kit-bench-serve-client", daemon=True)

    def ready(self) -> None:
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"a bench-serve client process did not start (status {self.proc.wait()}): {line[:300]!r}")

    def go(self, start_at: float) -> None:
        self.proc.stdin.write(f"go {start_at!r}\n".encode())
        self.proc.stdin.close()
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, _, rest = line.decode().rstrip("\n").partition(" ")
            if kind == "done":
                self._bar.update(1)
            elif kind == "result":
                self.result = json.loads(rest)
            elif kind == "error":
                self.error = json.loads(rest)
        if self.result is None:
            self.error = self.error or f"the process exited with status {self.proc.wait()} before its result"
            self._failed.set()

    def join(self) -> None:
        self._thread.join()
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if not pipe.closed:
                pipe.close()


def _run(endpoint: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
         request_rate: float, seed: int, progress: bool, headers: dict[str, str],
         client_procs: int | None) -> dict[str, Any]:
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf = closed loop), got {request_rate}")
    if client_procs is None:
        client_procs = default_client_procs(concurrency)
    if not isinstance(client_procs, int) or client_procs < 1:
        raise ValueError(f"client_procs must be an int >= 1 (or None: one per 16 streams), got {client_procs!r}")
    n_procs = min(client_procs, concurrency, len(prompts))
    arrivals = _arrivals(len(prompts), request_rate, seed)
    # NOTE: request i goes to process i % n, and so does one n-th of the concurrency (the first ones get the rest)
    jobs = [{"endpoint": endpoint, "headers": headers, "model": model, "output_len": output_len,
             "concurrency": concurrency // n_procs + (p < concurrency % n_procs),
             "prompts": prompts[p::n_procs], "arrivals": arrivals[p::n_procs] if arrivals else None}
            for p in range(n_procs)]
    bar = tqdm(total=len(prompts), desc=f"bench-serve c={concurrency}", disable=not progress, leave=False)
    failed, stop, peak = threading.Event(), threading.Event(), {}
    clients: list[_ClientProc] = []
    poller = threading.Thread(target=_kv_poller, args=(endpoint, headers, peak, stop), name="kit-bench-serve-kv",
                              daemon=True)
    try:
        clients = [_ClientProc(j, bar, failed) for j in jobs]
        for c in clients:
            c.ready()
        start_at = time.time() + 0.05  # every process begins at this moment
        for c in clients:
            c.go(start_at)
        poller.start()
        while not failed.is_set() and any(c.result is None for c in clients):
            failed.wait(0.05)
        errors = [c.error for c in clients if c.error]
        if errors:
            raise RuntimeError(f"bench-serve client: {errors[0]}")
        for c in clients:
            c.join()
    finally:
        stop.set()
        for c in clients:
            c.kill()
        if poller.is_alive():
            poller.join()
        bar.close()
    outs = [c.result for c in clients]
    results = [r for o in outs for r in o["requests"]]
    wall = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    ttft = [1e3 * (r["first"] - r["submit"]) for r in results if r["first"] is not None]
    tpot = [1e3 * (r["last"] - r["first"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    n_out = sum(r["tokens"] for r in results)
    total = int(peak.get("total", 0)) or None
    used = int(peak.get("used", 0))
    return {
        "num_requests": len(prompts), "input_len": len(prompts[0]), "output_len": output_len,
        "concurrency": concurrency, "request_rate": None if request_rate == float("inf") else request_rate,
        "client_procs": n_procs,
        "wall_s": wall, "output_tokens": n_out, "output_tokens_per_s": n_out / wall,
        "stream_chunks": sum(r["chunks"] for r in results),  # < output_tokens where the server joined tokens
        "requests_per_s": len(prompts) / wall, "ttft_ms": _percentiles(ttft), "tpot_ms": _percentiles(tpot),
        "peak_kv_blocks": used, "kv_blocks_total": total,
        "peak_kv_pct": 100.0 * used / total if total else None,
    }


def run_online_benchmark(endpoint: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                         request_rate: float = float("inf"), seed: int = 0, progress: bool = True,
                         api_key: str | None = None, client_procs: int | None = None) -> dict[str, Any]:
    """Serve `prompts` through the server at `endpoint` from `client_procs` client processes (None: one per 16
    streams, at most one per core); the same metrics dict as `kit.bench.run_benchmark`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return _run(endpoint.rstrip("/"), model, prompts, output_len, concurrency, request_rate, seed, progress, headers,
                client_procs)


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
    p.add_argument("--client-procs", type=int, default=None,
                   help="client processes that share the streams (default: one per 16 in flight, at most one per core)")
    p.add_argument("--out", default=None, help="write the JSON here")


def main(args: argparse.Namespace) -> int:
    if any(c < 1 for c in args.concurrency):
        raise ValueError(f"--concurrency must be ints >= 1, got {args.concurrency}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf = closed loop), got {args.request_rate}")
    if args.client_procs is not None and args.client_procs < 1:
        raise ValueError(f"--client-procs must be an int >= 1, got {args.client_procs}")
    endpoint = args.endpoint.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    card = httpx.get(f"{endpoint}/v1/models", headers=headers, timeout=30.0).raise_for_status().json()["data"][0]

    def count(c: int) -> int:
        return args.num_requests or max(8, 2 * c)

    # NOTE: fresh prompts for the warm-up and for every level, as `kit bench` does: no run is served from
    # the prefix cache that an earlier one filled
    vocab = card["vocab_size"]
    results: dict[str, Any] = {"model": card["id"], "endpoint": endpoint,
                               "environment": {"client": "kit bench-serve", "python": platform.python_version()},
                               "runs": []}
    bench = dict(endpoint=endpoint, model=card["id"], api_key=args.api_key)
    run_online_benchmark(prompts=make_prompts(vocab, args.input_len, 4, args.seed), output_len=min(8, args.output_len),
                         concurrency=2, progress=False, **bench)  # warm-up, as `kit bench` does
    for i, c in enumerate(args.concurrency):
        prompts = make_prompts(vocab, args.input_len, count(c), args.seed + 1 + i)
        results["runs"].append({"kit": run_online_benchmark(prompts=prompts, output_len=args.output_len,
                                                            concurrency=c, request_rate=args.request_rate,
                                                            seed=args.seed, client_procs=args.client_procs,
                                                            **bench)})
    print(f"{'concurrency':>11} {'tok/s':>10} {'req/s':>8} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}")
    for run in results["runs"]:
        k = run["kit"]
        print(f"{k['concurrency']:>11} {k['output_tokens_per_s']:>10.1f} {k['requests_per_s']:>8.2f} "
              f"{k['ttft_ms']['p50']:>12.1f} {k['tpot_ms']['p50']:>12.2f}")
    write_results(results, args.out)
    return 0
