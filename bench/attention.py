"""The Triton attention kernels on a GPU: paged decode against the memory bandwidth, varlen prefill
against the bf16 matrix peak and torch SDPA, with an in-script sweep of their tile configs.

Shapes of Llama-3.1-8B's attention (32 query heads, 8 kv heads, head_dim 128, block size 16):
* decode, one query per sequence: contexts 256 / 2k / 8k, batch 1 and 64, KV cache bf16 / int8 /
  fp8. Each figure is the time per call of the kernel(s) replayed from a CUDA graph (as the
  engine's decode step runs), the KV bytes the call must read (K, V and the 8-bit caches'
  scales), the achieved bandwidth and its share of the device-to-device copy bandwidth
  measured here. Calls cycle over several copies of the cache where one fits in L2, so the
  bytes come from HBM.
* prefill, 1024-token prompts, batch 1 and 16 (causal): TFLOP/s and share of 790 TFLOP/s,
  against `F.scaled_dot_product_attention` on the same (dense) data; plus a ragged batch
  (16 prompts of 64..1024 tokens) against the reference's padded gather (`ops.paged_attention`).
* mixed, a prompt chunk (128 or 1024 tokens) beside 62-63 decode rows at context 256 / 2k: the
  varlen kernel's default tiles against its former 128-row tiles and a sweep, beside the decode
  kernel over the decode rows alone (the floor for those rows).

Every case is measured with the kernel's default config first, then the sweep tries other
tile sizes / warps / stages / split counts while `--budget-s` lasts; the best is reported
beside the default. Results are written after every case.

    python bench/attention.py --out bench/results/attention_h100.json
    python bench/attention.py --smoke --out /tmp/attention_smoke.json    # CPU, interpreter, tiny
    python bench/attention.py --cases mixed --out /tmp/mixed.json        # only the mixed steps
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first JIT-decorated

import triton  # noqa: E402
from kit.backends.triton_attention import (choose_num_splits, default_prefill_config,  # noqa: E402
                                           paged_decode_attention, paged_prefill_attention)
from kit.batch import ForwardBatch, SequenceInput  # noqa: E402
from kit.ops import paged_attention  # noqa: E402
from kit.quantization.kv_cache import quantize_kv  # noqa: E402

PEAK_BF16_TFLOPS = 790.0
KV_DTYPES = ("bf16", "int8", "fp8")
DECODE_TILES = [dict(block_n=64, num_warps=4, num_stages=2), dict(block_n=128, num_warps=4, num_stages=2),
                dict(block_n=32, num_warps=4, num_stages=2), dict(block_n=64, num_warps=4, num_stages=3),
                dict(block_n=128, num_warps=8, num_stages=3)]
PREFILL_TILES = [dict(block_m=128, block_n=32, num_warps=4, num_stages=2),
                 dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
                 dict(block_m=128, block_n=64, num_warps=4, num_stages=3),
                 dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
                 dict(block_m=64, block_n=32, num_warps=4, num_stages=2)]


class Clock:
    """Time per call of `fn`: replayed from a CUDA graph of `calls` calls on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, calls: int, replays: int) -> None:
        self.device, self.calls, self.replays = device, calls, replays

    def us(self, fn) -> float:
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            fn(0)
            return (time.perf_counter() - t0) * 1e6
        fn(0)  # compile
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(0)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.calls):
                fn(i)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (self.calls * self.replays)


def copy_bandwidth_gbs(device: torch.device, nbytes: int, clock: Clock) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), the practical roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    return round(2 * nbytes / clock.us(lambda i: dst.copy_(src)) / 1e3, 1)


def make_cache(num_blocks, bs, kvh, d, kv, device, dtype):
    """(k, v, k_scale, v_scale): random paged caches in `kv` (bf16 = the compute dtype, or int8 / fp8)."""
    k = torch.randn(num_blocks, bs, kvh, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    if kv == "bf16":
        return k, v, None, None
    (kq, ks), (vq, vs) = quantize_kv(k, kv), quantize_kv(v, kv)
    return kq, vq, ks, vs


def run_decode(a, device, dtype, clock, deadline, record):
    h, kvh, d, bs = a.heads, a.kv_heads, a.head_dim, a.block_size
    for ctx in a.contexts:
        for batch in a.batches:
            bf16_us = {}
            for kv in KV_DTYPES:
                elem = 2 if kv == "bf16" else 1
                per_token = kvh * d * elem * 2 + (kvh * 4 * 2 if kv != "bf16" else 0)  # K + V (+ scales)
                nbytes = batch * ctx * per_token
                copies = max(1, min(clock.calls, math.ceil(a.l2_flush_bytes / nbytes)))
                nb = ctx // bs
                k, v, ks, vs = make_cache(copies * batch * nb + 1, bs, kvh, d, kv, device, dtype)
                perm = torch.randperm(copies * batch * nb, device=device)
                tables = perm.view(copies, batch, nb)
                seq_lens = torch.full((batch,), ctx, dtype=torch.long, device=device)
                q = torch.randn(batch, h, d, device=device, dtype=dtype)
                out = torch.empty_like(q)
                auto = choose_num_splits(batch, kvh, ctx, torch.cuda.get_device_properties(device).multi_processor_count
                                         if device.type == "cuda" else 132, quantized=kv != "bf16")
                configs = [{}]  # the kernel's defaults first, then the sweep: tiles x split counts
                for splits in dict.fromkeys((auto, min(128, auto * 2), max(1, auto // 2))):
                    configs += [dict(t, num_splits=splits) for t in DECODE_TILES]
                results = []
                for cfg in configs if not a.smoke else configs[:2]:
                    if results and time.perf_counter() > deadline:
                        break
                    us = clock.us(lambda i, cfg=cfg: paged_decode_attention(
                        q, k, v, tables[i % copies], seq_lens, d ** -0.5, None, out, k_scale=ks, v_scale=vs, **cfg))
                    results.append((us, cfg))
                default_us = results[0][0]
                best_us, best_cfg = min(results, key=lambda r: r[0])
                if kv == "bf16":
                    bf16_us = {"default": default_us, "best": best_us}
                gbs = nbytes / best_us / 1e3
                row = dict(kind="decode", context=ctx, batch=batch, kv=kv, kv_bytes=nbytes, cache_copies=copies,
                           default_splits=auto,
                           default_us=round(default_us, 2), best_us=round(best_us, 2), best_config=best_cfg or "default",
                           configs_tried=len(results), achieved_GBs=round(gbs, 1),
                           bandwidth_fraction=round(gbs / record["copy_bandwidth_GBs"], 3),
                           speedup_vs_bf16=round(bf16_us["best"] / best_us, 2),
                           default_speedup_vs_bf16=round(bf16_us["default"] / default_us, 2))
                record["decode"].append(row)
                print(f"decode ctx {ctx:5d} batch {batch:3d} {kv:4s}: {best_us:8.1f} us (default {default_us:8.1f}) "
                      f"{nbytes / 1e6:8.1f} MB {gbs:7.0f} GB/s = {row['bandwidth_fraction']:.0%} of copy, "
                      f"x{row['speedup_vs_bf16']:.2f} vs bf16  {best_cfg}")
                del k, v, ks, vs
                a.write(record)


MIXED_TILES = [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
               for m in (16, 32, 64) for n in (32, 64) for w in (2, 4) for st in (2, 3)]
OLD_PREFILL_DEFAULT = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)  # before mixed batches had their own


def run_mixed(a, device, dtype, clock, deadline, record):
    """Mixed steps: one prompt chunk beside many decode rows (what a serving loop runs), through the varlen
    kernel with its default tiles (which follow tokens per sequence), the 128-row tiles it used for every
    batch before, and a sweep; beside the decode kernel over the decode rows alone (their floor)."""
    h, kvh, d, bs = a.heads, a.kv_heads, a.head_dim, a.block_size
    for chunk, decodes, ctx in a.mixed:
        nb_chunk, nb = -(-chunk // bs), -(-(ctx + 1) // bs)
        tables = [list(range(nb_chunk))] + [list(range(nb_chunk + i * nb, nb_chunk + (i + 1) * nb))
                                            for i in range(decodes)]
        seqs = [SequenceInput([0] * chunk, 0, tables[0])] + [SequenceInput([7], ctx, t) for t in tables[1:]]
        batch = ForwardBatch.build(seqs, bs, device=device)
        k, v, _, _ = make_cache(nb_chunk + decodes * nb + 1, bs, kvh, d, "bf16", device, dtype)
        q = torch.randn(batch.num_tokens, h, d, device=device, dtype=dtype)
        out = torch.empty_like(q)
        configs = [{}, OLD_PREFILL_DEFAULT] + ([] if a.smoke else MIXED_TILES)
        results = []
        for cfg in configs if not a.smoke else configs[:1]:
            if len(results) >= 2 and time.perf_counter() > deadline:
                break
            us = clock.us(lambda i, cfg=cfg: paged_prefill_attention(
                q, k, v, batch.query_start_loc, batch.seq_lens, batch.block_tables, d ** -0.5, None, out, **cfg))
            results.append((us, cfg))
        best_us, best_cfg = min(results, key=lambda r: r[0])
        qd, outd = q[chunk:].contiguous(), torch.empty_like(q[chunk:])
        dec_tables, dec_lens = batch.block_tables[1:].contiguous(), batch.seq_lens[1:].contiguous()
        decode_us = clock.us(lambda i: paged_decode_attention(qd, k, v, dec_tables, dec_lens, d ** -0.5, None, outd))
        n = batch.num_tokens
        row = dict(kind="mixed", case=f"{chunk}-token chunk + {decodes} decodes at {ctx}", num_tokens=n,
                   num_seqs=batch.num_seqs,
                   default_config=default_prefill_config(d, dtype, device, n, batch.num_seqs, h // kvh),
                   default_us=round(results[0][0], 1), best_us=round(best_us, 1), best_config=best_cfg or "default",
                   configs_tried=len(results), decode_rows_alone_decode_kernel_us=round(decode_us, 1))
        if len(results) > 1:
            row["old_128_row_tiles_us"] = round(results[1][0], 1)
            row["speedup_vs_old_tiles"] = round(results[1][0] / results[0][0], 2)
        record.setdefault("mixed", []).append(row)
        print(f"mixed {row['case']:40s}: default {row['default_us']:8.1f} us, 128-row tiles "
              f"{row.get('old_128_row_tiles_us', float('nan')):8.1f}, best {best_us:8.1f} {best_cfg}; "
              f"decode kernel on the decode rows {decode_us:8.1f} us")
        del k, v
        a.write(record)


def causal_flops(lens, h, d):
    return sum(4 * h * d * n * (n + 1) / 2 for n in lens)


def run_prefill(a, device, dtype, clock, deadline, record):
    h, kvh, d, bs = a.heads, a.kv_heads, a.head_dim, a.block_size
    cases = [(f"{b} x {a.prompt}", [a.prompt] * b) for b in a.prefill_batches]
    g = torch.Generator().manual_seed(0)
    ragged = torch.randint(a.prompt // 16, a.prompt + 1, (a.prefill_batches[-1],), generator=g).tolist()
    cases.append((f"ragged {len(ragged)} x {min(ragged)}..{max(ragged)}", ragged))
    for name, lens in cases:
        nbs = [-(-n // bs) for n in lens]
        tables, start = [], 0
        for n in nbs:
            tables.append(list(range(start, start + n)))
            start += n
        batch = ForwardBatch.build([SequenceInput([0] * n, 0, t) for n, t in zip(lens, tables)], bs, device=device)
        k, v, _, _ = make_cache(start, bs, kvh, d, "bf16", device, dtype)
        q = torch.randn(batch.num_tokens, h, d, device=device, dtype=dtype)
        out = torch.empty_like(q)
        flops = causal_flops(lens, h, d)
        configs = [{}] + ([] if a.smoke else PREFILL_TILES)  # the kernel's defaults first
        results = []
        for cfg in configs:
            if results and time.perf_counter() > deadline:
                break
            us = clock.us(lambda i, cfg=cfg: paged_prefill_attention(
                q, k, v, batch.query_start_loc, batch.seq_lens, batch.block_tables, d ** -0.5, None, out, **cfg))
            results.append((us, cfg))
        best_us, best_cfg = min(results, key=lambda r: r[0])
        row = dict(kind="prefill", case=name, num_tokens=batch.num_tokens, default_config=default_prefill_config(
                   d, dtype, device), default_us=round(results[0][0], 1),
                   best_us=round(best_us, 1), best_config=best_cfg or "default", configs_tried=len(results),
                   TFLOPs=round(flops / best_us / 1e6, 1), peak_fraction=round(flops / best_us / 1e6 / PEAK_BF16_TFLOPS, 3))
        if len(set(lens)) == 1:  # SDPA on the same data, dense (B, H, L, D); GQA by enable_gqa and by expanding K/V
            n_seqs, L = len(lens), lens[0]
            kd = k.view(-1, kvh, d)[batch.slot_mapping].view(n_seqs, L, kvh, d).transpose(1, 2).contiguous()
            vd = v.view(-1, kvh, d)[batch.slot_mapping].view(n_seqs, L, kvh, d).transpose(1, 2).contiguous()
            qd = q.view(n_seqs, L, h, d).transpose(1, 2).contiguous()
            ke, ve = kd.repeat_interleave(h // kvh, 1), vd.repeat_interleave(h // kvh, 1)
            gqa_us = clock.us(lambda i: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True))
            dense_us = clock.us(lambda i: F.scaled_dot_product_attention(qd, ke, ve, is_causal=True))
            sdpa_us = min(gqa_us, dense_us)
            row.update(sdpa_gqa_us=round(gqa_us, 1), sdpa_expanded_kv_us=round(dense_us, 1),
                       sdpa_TFLOPs=round(flops / sdpa_us / 1e6, 1), speedup_vs_sdpa=round(sdpa_us / best_us, 2))
        else:  # the reference: gather every sequence's blocks into a padded copy, one masked SDPA
            ref_us = clock.us(lambda i: paged_attention(q, k, v, batch, d ** -0.5))
            row.update(reference_padded_us=round(ref_us, 1), speedup_vs_reference=round(ref_us / best_us, 2))
        record["prefill"].append(row)
        base = (f"SDPA x{row['speedup_vs_sdpa']:.2f}" if "speedup_vs_sdpa" in row
                else f"padded reference x{row['speedup_vs_reference']:.2f}")
        print(f"prefill {name:24s}: {best_us:9.1f} us (default {row['default_us']:9.1f}) {row['TFLOPs']:6.1f} TFLOP/s "
              f"= {row['peak_fraction']:.0%} of peak; {base}  {best_cfg}")
        a.write(record)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    p.add_argument("--budget-s", type=float, default=70.0, help="stop sweeping (not measuring defaults) after this")
    p.add_argument("--cases", nargs="+", choices=["decode", "prefill", "mixed"], default=["decode", "prefill", "mixed"])
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.smoke:
        a.heads, a.kv_heads, a.head_dim, a.block_size = 8, 2, 16, 16
        a.contexts, a.batches, a.prompt, a.prefill_batches = (32, 64), (1, 2), 32, (1, 2)
        a.mixed = [(16, 3, 32)]
        a.l2_flush_bytes, copy_bytes, clock = 0, 1 << 20, Clock(device, 1, 1)
    else:
        a.heads, a.kv_heads, a.head_dim, a.block_size = 32, 8, 128, 16
        a.contexts, a.batches, a.prompt, a.prefill_batches = (256, 2048, 8192), (1, 64), 1024, (1, 16)
        a.mixed = [(128, 62, 256), (128, 62, 2048), (1024, 63, 256)]
        a.l2_flush_bytes, copy_bytes, clock = 256 << 20, 1 << 30, Clock(device, 20, 5)

    def write(record):
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)
    a.write = write
    t0 = time.perf_counter()
    record = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__, dtype=str(dtype).replace("torch.", ""),
                  shapes=dict(heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, block_size=a.block_size),
                  copy_bandwidth_GBs=copy_bandwidth_gbs(device, copy_bytes, clock),
                  peak_bf16_TFLOPs=PEAK_BF16_TFLOPS, decode=[], prefill=[])
    print(f"{record['device']}: copy bandwidth {record['copy_bandwidth_GBs']:.0f} GB/s")
    share = {"decode": 0.5, "prefill": 0.3, "mixed": 0.2}
    spent = 0.0
    for case, run in (("decode", run_decode), ("prefill", run_prefill), ("mixed", run_mixed)):
        if case in a.cases:
            spent += share[case] / sum(share[c] for c in a.cases)
            run(a, device, dtype, clock, t0 + a.budget_s * spent, record)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    if "decode" not in a.cases:
        write(record)
        return
    at = {(r["context"], r["batch"], r["kv"]): r for r in record["decode"]}
    ctx, b = max(a.contexts), min(a.batches)
    record["targets"] = dict(
        decode_bf16_longest_context_batch1_bandwidth_fraction=at[(ctx, b, "bf16")]["bandwidth_fraction"],
        decode_int8_speedup_longest_context_batch1=at[(ctx, b, "int8")]["speedup_vs_bf16"],
        targets="bandwidth_fraction >= 0.70 and int8 speedup >= 1.6 at 8k context, batch 1")
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    write(record)
    print(f"targets: {record['targets']}  ({record['wall_s']} s)")


if __name__ == "__main__":
    main()
