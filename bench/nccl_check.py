"""NCCL on this host, before the tensor-parallel runs: the collectives the kit uses, small to large, eager and graphed.

One process per GPU (spawned), the default group as the kit makes it (NCCL, `device_id`, the machine's
NCCL settings untouched). For each op the kit issues (all_reduce: the row-parallel layers; broadcast:
the step message; scatter: the shards at start-up; all_gather_into_tensor: the logits) and each size
from 8 KiB (a batch-1 all-reduce of an 8B model) to 256 MiB (a rank's part of its embedding), rank 0
prints a line before the op starts and the time and bus bandwidth after; then an all-reduce of 8 KiB
and 512 KiB captured in a CUDA graph and replayed. A stalled op shows as the last line printed; every
rank dumps its stacks and exits after `--op-timeout` seconds without progress.

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


def rank_main(rank: int, world: int, port: int, op_timeout: float, queue: Any, sizes: list[int],
              cpu: bool = False) -> None:
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
    faulthandler.cancel_dump_traceback_later()
    queue.put((rank, rows))
    os._exit(0)  # NOTE: the results are out; NCCL's teardown at exit is not what this checks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: every GPU)")
    p.add_argument("--op-timeout", type=float, default=30.0, help="seconds one op may take before stacks and exit")
    p.add_argument("--smoke", action="store_true", help="the same code on the CPU (gloo, 2 ranks, no graphs)")
    args = p.parse_args()
    sizes = SIZES[:2] if args.smoke else SIZES
    if not args.smoke and (not torch.cuda.is_available() or torch.cuda.device_count() < 2):
        json.dump({"skipped": "needs 2 CUDA GPUs"}, open(args.out, "w"))
        print("nccl_check: skipped (needs 2 CUDA GPUs)")
        return
    world = args.gpus or (2 if args.smoke else torch.cuda.device_count())
    peer = {} if args.smoke else {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b)
                                  for a in range(world) for b in range(world) if a != b}
    env = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_SYMM", "NVSHMEM_"))}
    name = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    nccl = "none" if args.smoke else ".".join(map(str, torch.cuda.nccl.version()))
    print(f"nccl_check: {world} x {name}, NCCL {nccl}, peer access {peer}, env {env}", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args.op_timeout, queue, sizes, args.smoke),
                         daemon=True) for r in range(world)]
    for pr in procs:
        pr.start()
    deadline = time.monotonic() + 4 * args.op_timeout * (len(OPS) * len(sizes) + 3)
    for pr in procs:
        pr.join(max(1.0, deadline - time.monotonic()))
    got = {}
    while not queue.empty():
        rank, rows = queue.get()
        got[rank] = rows
    for pr in procs:
        if pr.is_alive():
            pr.kill()
    result = {"device": name, "torch": torch.__version__, "nccl": nccl, "world": world, "peer_access": peer,
              "nccl_env": env, "exit_codes": [pr.exitcode for pr in procs], "rows": got.get(0, []),
              "complete": sorted(got) == list(range(world))}
    json.dump(result, open(args.out, "w"), indent=2)
    print(f"{'op':<20} {'KiB':>8} {'ms':>9} {'bus GB/s':>9} ok")
    for r in result["rows"]:
        print(f"{r['op']:<20} {r['bytes'] >> 10:>8} {r['ms']:>9.3f} {r.get('bus_gbps', 0.0):>9.1f} {r['sum_ok']}")
    print(f"complete: {result['complete']}, exit codes {result['exit_codes']} -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
