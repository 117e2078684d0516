"""NCCL on this host, before the tensor-parallel runs: the collectives the kit uses, small to large, eager and graphed.

One process per GPU (spawned), the default group as the kit makes it (NCCL, `device_id`, the machine's
NCCL settings untouched). For each op the kit issues (all_reduce: the row-parallel layers; broadcast:
the step message; scatter: the shards at start-up; all_gather_into_tensor: the logits) and each size
from 8 KiB (a batch-1 all-reduce of an 8B model) to 256 MiB (a rank's part of its embedding), rank 0
prints a line before the op starts and the time and bus bandwidth after; then an all-reduce of 8 KiB
and 512 KiB captured in a CUDA graph and replayed. A stalled op shows as the last line printed; every
rank dumps its stacks and exits after `--op-timeout` seconds without progress.

Then (GPUs only, unless `--no-symm`) the latency of a batch-1-sized all-reduce (8..512 KiB of bf16,
what a TP decode step issues 2 x layers + 2 times) three ways, eager and replayed from a CUDA graph:
NCCL's `all_reduce`, and torch's symmetric-memory one-shot and two-shot all-reduce
(`torch.ops.symm_mem.one_shot_all_reduce_out` / `two_shot_all_reduce_`: peer-to-peer loads over
NVLink, no NVLink multicast: `TORCH_SYMM_MEM_DISABLE_MULTICAST=1` is set when absent, the section is
refused when it is set otherwise, and no multimem op is called). An API this torch lacks, or a
failure, is reported in the JSON (`symm_mem.error` or a row's `error`), never fatal; the NCCL rows
above are sent to the parent before this section starts, so a stall here loses nothing else.

    python bench/nccl_check.py --out nccl.json             # all GPUs
    python bench/nccl_check.py --gpus 2 --out nccl.json
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [8 << 10, 512 << 10, 16 << 20, 256 << 20]
SYMM_SIZES = [8 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10]
SYMM_WAYS = ("nccl", "one_shot", "two_shot")
MULTICAST_ENV = "TORCH_SYMM_MEM_DISABLE_MULTICAST"
OPS = ("all_reduce", "broadcast", "scatter", "all_gather")


def say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"[nccl {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_op(op: str, x: torch.Tensor, world: int, rank: int) -> None:
    if op == "all_reduce":
        dist.all_reduce(x)
    elif op == "broadcast":
        dist.broadcast(x, src=0)
    elif op == "scatter":
        parts = list(x.chunk(world)) if rank == 0 else None
        dist.scatter(torch.empty_like(x.chunk(world)[0]), parts, src=0)
    else:
        out = torch.empty(world * x.numel(), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x)


def _symm_call(way: str, x: torch.Tensor, out: torch.Tensor, group: str) -> None:
    if way == "nccl":
        dist.all_reduce(x)
    elif way == "one_shot":  # every rank reads every peer's buffer and sums: one step, world x the reads
        torch.ops.symm_mem.one_shot_all_reduce_out(x, "sum", group, out)
    else:  # reduce-scatter then all-gather through the peers' buffers, in place
        torch.ops.symm_mem.two_shot_all_reduce_(x, "sum", group)


def symm_mem_rows(rank: int, world: int, dev: torch.device, op_timeout: float, iters: int = 50) -> dict[str, Any]:
    """NCCL vs symmetric-memory one-shot / two-shot all-reduce, 8..512 KiB bf16, eager and graphed (latency)."""
    info: dict[str, Any] = {"multicast_env": os.environ.get(MULTICAST_ENV)}
    if os.environ.get(MULTICAST_ENV) != "1":
        info["error"] = f"{MULTICAST_ENV} is {os.environ.get(MULTICAST_ENV)!r}, not '1': not run (no NVLink multicast)"
        return info
    try:
        import torch.distributed._symmetric_memory as symm_mem  # NOTE: private API of torch; absent = reported
        group = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.8, a no-op after
            symm_mem.enable_symm_mem_for_group(group)
        if hasattr(symm_mem, "get_backend"):
            info["backend"] = str(symm_mem.get_backend(dev))
        bufs, outs = {}, {}
        for nbytes in SYMM_SIZES:  # one symmetric allocation per size (each rendezvous is collective)
            bufs[nbytes] = symm_mem.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
            symm_mem.rendezvous(bufs[nbytes], group)
            outs[nbytes] = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    except Exception as e:  # noqa: BLE001 - an API this torch lacks: reported, not fatal
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    want = world * (world + 1) / 2
    rows = []
    for nbytes in SYMM_SIZES:
        for way in SYMM_WAYS:
            x, out = bufs[nbytes], outs[nbytes]
            result = out if way == "one_shot" else x
            row: dict[str, Any] = {"way": way, "bytes": nbytes}
            faulthandler.dump_traceback_later(op_timeout, exit=True)
            say(rank, f"{way} all_reduce {nbytes >> 10} KiB (symmetric-memory comparison) ...")
            try:
                x.fill_(float(rank + 1))
                _symm_call(way, x, out, group)
                torch.cuda.synchronize(dev)
                row["sum_ok"] = bool((result.float() == want).all())
                for _ in range(3):
                    x.fill_(1.0)  # NOTE: in place, the sums double each call: from 1, bf16 holds 2^iters exactly
                    _symm_call(way, x, out, group)
                x.fill_(1.0)
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    _symm_call(way, x, out, group)
                torch.cuda.synchronize(dev)
                row["eager_us"] = 1e6 * (time.perf_counter() - t0) / iters
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    _symm_call(way, x, out, group)
                x.fill_(float(rank + 1))
                graph.replay()
                torch.cuda.synchronize(dev)
                row["graph_sum_ok"] = bool((result.float() == want).all())
                x.fill_(1.0)
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    graph.replay()
                torch.cuda.synchronize(dev)
                row["graph_us"] = 1e6 * (time.perf_counter() - t0) / iters
                graph.reset()
            except Exception as e:  # noqa: BLE001 - unsupported here (size, alignment, backend): a row says so
                row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            say(rank, f"{way} {nbytes >> 10} KiB: " + (row["error"] if "error" in row else
                      f"eager {row['eager_us']:.1f} us, graph {row['graph_us']:.1f} us, sums "
                      f"{'right' if row['sum_ok'] and row['graph_sum_ok'] else 'WRONG'}"))
    info["rows"] = rows
    return info


def rank_main(rank: int, world: int, port: int, op_timeout: float, queue: Any, sizes: list[int],
              cpu: bool = False, symm: bool = True) -> None:
    faulthandler.enable(all_threads=True)
    dev = torch.device("cpu") if cpu else torch.device("cuda", rank)
    kw: dict[str, Any] = {}
    if not cpu:
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    faulthandler.dump_traceback_later(4 * op_timeout, exit=True)
    say(rank, f"init the group: {world} ranks")
    dist.init_process_group("gloo" if cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=2 * op_timeout), **kw)
    sync = (lambda: None) if cpu else (lambda: torch.cuda.synchronize(dev))
    rows = []
    for op in OPS:
        for nbytes in sizes:
            faulthandler.dump_traceback_later(op_timeout, exit=True)
            say(rank, f"{op} {nbytes >> 10} KiB ...")
            x = torch.full((nbytes // 2,), float(rank + 1), dtype=torch.bfloat16, device=dev)
            if cpu and op == "all_gather":
                continue  # NOTE: gloo has no all_gather_into_tensor
            run_op(op, x, world, rank)  # warm-up (connections are made here)
            sync()
            if op == "all_reduce":
                want = world * (world + 1) / 2
                ok = bool((x.float() == want).all()) if nbytes <= (16 << 20) else None
                x.fill_(float(rank + 1))
            else:
                ok = None
            t0 = time.perf_counter()
            for _ in range(3):
                run_op(op, x, world, rank)
            sync()
            ms = 1e3 * (time.perf_counter() - t0) / 3
            factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
            rows.append({"op": op, "bytes": nbytes, "ms": ms, "bus_gbps": factor * nbytes / ms / 1e6, "sum_ok": ok})
            say(rank, f"{op} {nbytes >> 10} KiB: {ms:.3f} ms, bus {rows[-1]['bus_gbps']:.1f} GB/s"
                      + ("" if ok is None else f", sum {'right' if ok else 'WRONG'}"))
    for nbytes in () if cpu else (8 << 10, 512 << 10):
        faulthandler.dump_traceback_later(op_timeout, exit=True)
        say(rank, f"all_reduce {nbytes >> 10} KiB in a CUDA graph: capture ...")
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
        dist.all_reduce(x)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dist.all_reduce(x)
        say(rank, "replay x10 ...")
        x.fill_(1.0)
        t0 = time.perf_counter()
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize(dev)
        ms = 1e3 * (time.perf_counter() - t0) / 10
        ok = bool((x.float() == float(world) ** 10).all())
        rows.append({"op": "all_reduce (graph)", "bytes": nbytes, "ms": ms, "sum_ok": ok})
        say(rank, f"graphed all_reduce {nbytes >> 10} KiB: {ms:.3f} ms per replay, sums {'right' if ok else 'WRONG'}")
    queue.put((rank, "nccl", rows))
    if symm:  # NOTE: on the CPU (--smoke) it stops at the symmetric allocation and reports why
        queue.put((rank, "symm_mem", symm_mem_rows(rank, world, dev, op_timeout)))
    faulthandler.cancel_dump_traceback_later()
    os._exit(0)  # NOTE: the results are out; NCCL's teardown at exit is not what this checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: every GPU)")
    p.add_argument("--op-timeout", type=float, default=30.0, help="seconds one op may take before stacks and exit")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU (gloo, 2 ranks, no graphs)")
    p.add_argument("--no-symm", action="store_true", help="skip the symmetric-memory all-reduce comparison")
    args = p.parse_args()
    sizes = SIZES[:2] if args.smoke else SIZES
    if not args.smoke and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        json.dump({"skipped": "needs 2 CUDA GPUs"}, open(args.out, "w"))
        print("nccl_check: skipped (needs 2 CUDA GPUs)")
        return
    world = args.gpus or (2 if args.smoke else torch.cuda.device_count())
    peer = {} if args.smoke else {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
                                  for a in range(world) for b in range(world) if a != b}
    if not args.no_symm:
        os.environ.setdefault(MULTICAST_ENV, "1")  # NOTE: the ranks inherit it: no NVLink multicast
    env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_SYMM", "NVSHMEM_"))}
    name = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    nccl = "none" if args.smoke else ".".join(map(str, torch.cuda.nccl.version()))
    print(f"nccl_check: {world} x {name}, NCCL {nccl}, peer access {peer}, env {env}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args.op_timeout, queue, sizes, args.smoke,
                                                             not args.no_symm),
                         daemon=True) for r in range(world)]
    for pr in procs:
        pr.start()
    deadline = time.monotonic() + 4 * args.op_timeout * (len(OPS) * len(sizes) + 3) + 60
    for pr in procs:
        pr.join(max(1.0, deadline - time.monotonic()))
    got, symm = {}, {}
    while not queue.empty():
        rank, kind, rows = queue.get()
        (got if kind == "nccl" else symm)[rank] = rows
    for pr in procs:
        if pr.is_alive():
            pr.kill()
    result = {"device": name, "torch": torch.__version__, "nccl": nccl, "world": world, "peer_access": peer,
              "nccl_env": env, "exit_codes": [pr.exitcode for pr in procs], "rows": got.get(0, []),
              "complete": sorted(got) == list(range(world)),
              "symm_mem": symm.get(0, "skipped (--no-symm)" if args.no_symm
                                   else "missing: the section did not finish (see the stacks on stderr)")}
    json.dump(result, open(args.out, "w"), indent=2)
    print(f"{'op':<20} {'KiB':>8} {'ms':>9} {'bus GB/s':>9} ok")
    for r in result["rows"]:
        print(f"{r['op']:<20} {r['bytes'] >> 10:>8} {r['ms']:>9.3f} {r.get('bus_gbps', 0.0):>9.1f} {r['sum_ok']}")
    if isinstance(result["symm_mem"], dict):
        sm = result["symm_mem"]
        print(f"symmetric memory ({sm.get('backend', '?')}, {MULTICAST_ENV}={sm.get('multicast_env')}): "
              + (sm["error"] if "error" in sm else "latency per all-reduce, us"))
        if sm.get("rows"):
            print(f"{'KiB':>5} " + " ".join(f"{w + ' ' + m:>16}" for w in SYMM_WAYS for m in ("eager", "graph")))
        by = {(r["bytes"], r["way"]): r for r in sm.get("rows", [])}
        for nbytes in sorted({r["bytes"] for r in sm.get("rows", [])}):
            cells = []
            for w in SYMM_WAYS:
                r = by.get((nbytes, w), {})
                for m in ("eager_us", "graph_us"):
                    cells.append(f"{r[m]:>16.1f}" if m in r else f"{'error' if 'error' in r else '-':>16}")
            print(f"{nbytes >> 10:>5} " + " ".join(cells))
    else:
        print(f"symmetric memory: {result['symm_mem']}")
    print(f"complete: {result['complete']}, exit codes {result['exit_codes']} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
