"""Where an engine's time goes, layer by layer.

`ProfiledEngine(engine).profile(batch_size, seq_len, phase)` runs a synthetic batch
through the engine `iters` times with a timer around every layer (CUDA events on a GPU,
`perf_counter` on the CPU, where every op is synchronous) and an NVTX range named after
the layer, so Nsight Systems shows the same names. It returns one row per layer:

    layer, kind, block            the layer
    latency_ms, latency_ms_p50, latency_ms_min    over the iterations
    share_pct                     of the summed layer time
    flops, bytes                  estimated from the shapes (the least a kernel must do / move)
    achieved_gbps, achieved_tflops, arithmetic_intensity (flops / byte)

With bandwidth and peak FLOP/s of the device, `bytes / bandwidth` and `flops / peak` are
each layer's two floors: decode layers sit on the bandwidth floor (intensity ~ 1-2
FLOP/byte at batch 1), prefill GEMMs on the compute one. Timing every layer costs
something: `last_summary` holds the unprofiled total of the same batch and the overhead.

Beside the per-layer times (all on the last profiled batch):

    roofline(bandwidth)      per layer kind and for the whole step: bytes, roofline_ms, achieved fraction
    graphed_step_ms()        the decode step replayed from a CUDA graph, timed as a whole (GPU only)
    top_kernels(n)           the kernels (GPU) or ops (CPU) that take the most time, from the PyTorch profiler
    count_kernels()          kernels launched per layer (`kit.kernels.LaunchCounter`; works on the CPU)

`step_kernels(step, iters)` (`kit/kernel_trace.py`, re-exported here) traces any step the way it really runs, CUDA-graph
replays and tensor-parallel collectives included: the kernels one step runs on the GPU, their
time per step, and how much of the step the GPU spent idle between them.

With the PyTorch backend's fused kernels a layer's time is that of its kernels: an
`rmsnorm` row includes the residual add of the o_proj / mlp before it, and `rope`
includes the K/V cache write (see kit/backends/torch_backend.py).
"""

from __future__ import annotations

import html
import statistics
import time
from typing import Any, Mapping

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from kit.backends.base import LayerHook
from kit.backends.cuda_graphs import CUDAGraphRunner
from kit.batch import ForwardBatch, SequenceInput
from kit.engine import Engine
from kit.kernels import LaunchCounter
from kit.kernel_trace import step_kernels
from kit.layer_kinds import LAYER_KINDS, CostShape
from kit.network import Layer, Network
from kit.roofline import H100_BF16_FLOPS, H100_COPY_BANDWIDTH

try:  # the nvtx package is a dependency; fall back to torch's binding if absent
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None

__all__ = ["ProfiledEngine", "layer_cost", "step_kernels"]


def _nvtx_push(name: str) -> None:
    if _nvtx is not None:
        _nvtx.push_range(name, domain="kit")
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)


def _nvtx_pop() -> None:
    if _nvtx is not None:
        _nvtx.pop_range(domain="kit")
    elif torch.cuda.is_available():
        torch.cuda.nvtx.range_pop()


class _NamedRanges(LayerHook):
    """An NVTX range per layer (Nsight Systems shows the kit's names), and a PyTorch-profiler range if asked."""

    def __init__(self, record: bool = False) -> None:
        self.record = record
        self._open: list[Any] = []

    def before(self, layer: Layer, inputs: Mapping[str, torch.Tensor]) -> None:
        _nvtx_push(layer.name)
        if self.record:
            rf = record_function(layer.name)
            rf.__enter__()
            self._open.append(rf)

    def after(self, layer: Layer, outputs: Mapping[str, torch.Tensor]) -> None:
        if self.record:
            self._open.pop().__exit__(None, None, None)
        _nvtx_pop()


class _LayerTimer(LayerHook):
    """Each layer's time: CUDA events on a GPU, `perf_counter` on the CPU (where every op is synchronous)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.events: list[tuple[str, Any, Any]] = []
        self._start: Any = None

    def before(self, layer: Layer, inputs: Mapping[str, torch.Tensor]) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def after(self, layer: Layer, outputs: Mapping[str, torch.Tensor]) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self.events.append((layer.name, self._start, end))

    def milliseconds(self) -> list[tuple[str, float]]:
        """(layer name, ms) of every layer timed; on a GPU, call after synchronizing."""
        return [(name, a.elapsed_time(b) if self.cuda else 1e3 * (b - a)) for name, a, b in self.events]


class _Scope(LayerHook):
    """Names the layer that is running for a `LaunchCounter`."""

    def __init__(self, counter: LaunchCounter) -> None:
        self.counter = counter

    def before(self, layer: Layer, inputs: Mapping[str, torch.Tensor]) -> None:
        self.counter.scope = layer.name

    def after(self, layer: Layer, outputs: Mapping[str, torch.Tensor]) -> None:
        self.counter.scope = ""


def layer_cost(layer: Layer, network: Network, num_tokens: int, num_seqs: int, q_len: int, ctx_len: int,
               elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) a layer must at least do / move for a batch of `num_seqs` sequences with
    `q_len` new tokens each over `ctx_len` context tokens (weights read once, activations once).
    The formulas are each kind's `LayerKind.cost` (kit/layer_kinds.py)."""
    tensors = [network.weights[w] for w in layer.weights]
    wbytes = sum(t.numel() * t.element_size() for t in tensors)
    params = sum(t.numel() for t in tensors)
    shape = CostShape(num_tokens=num_tokens, num_seqs=num_seqs, q_len=q_len, ctx_len=ctx_len, elem=elem)
    return LAYER_KINDS[layer.kind].cost(network.config, params, wbytes, shape)


class ProfiledEngine:
    """Times an `Engine` layer by layer; NVTX-annotated; exports a PyTorch profiler trace."""

    def __init__(self, engine: Engine, block_size: int = 16) -> None:
        self.engine = engine
        self.block_size = block_size
        self.last_summary: dict[str, Any] = {}
        self.last_frame: pd.DataFrame | None = None

    # ------------------------------------------------------------------ inputs
    def _batch(self, batch_size: int, seq_len: int, phase: str):
        if not self.engine.backend.can_execute:
            raise ValueError(f"ProfiledEngine needs an engine that executes: {self.engine.backend.capabilities}")
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        bs = self.block_size
        per_seq = -(-(seq_len + 1) // bs)
        kv = self.engine.allocate_kv_cache(batch_size * per_seq, bs, capture_graphs=False) if not hasattr(self, "_kv") or \
            self._kv.num_blocks < batch_size * per_seq or self._kv.block_size != bs else self._kv
        self._kv = kv
        g = torch.Generator().manual_seed(0)
        vocab = self.engine.config.vocab_size
        seqs = []
        for i in range(batch_size):
            table = list(range(i * per_seq, (i + 1) * per_seq))
            if phase == "prefill":
                tokens = torch.randint(0, vocab, (seq_len,), generator=g).tolist()
                seqs.append(SequenceInput(tokens, 0, table))
            else:  # one new token over `seq_len` tokens of context (the cache holds seq_len - 1)
                seqs.append(SequenceInput([int(torch.randint(0, vocab, (1,), generator=g))], seq_len - 1, table))
        batch = ForwardBatch.build(seqs, bs, device=self.engine.device)
        q_len = seq_len if phase == "prefill" else 1
        return batch, kv, q_len

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    # ----------------------------------------------------------------- profile
    @torch.inference_mode()
    def profile(self, batch_size: int = 1, seq_len: int = 128, phase: str = "prefill", iters: int = 10,
                warmup: int = 2) -> pd.DataFrame:
        """Per-layer latency of one forward pass; see the module docstring for the columns."""
        batch, kv, q_len = self._batch(batch_size, seq_len, phase)
        layers = list(self.engine.network.layers)
        cuda = self.engine.device.type == "cuda"
        samples: dict[str, list[float]] = {layer.name: [] for layer in layers}
        run = self.engine.forward

        for _ in range(warmup):
            run(batch, kv)
        self._sync()
        # unprofiled: the same batch, whole forward passes (a scratch cache: never a CUDA graph)
        totals = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run(batch, kv)
            self._sync()
            totals.append(1e3 * (time.perf_counter() - t0))

        for _ in range(iters):
            timer = _LayerTimer(cuda)
            run(batch, kv, hooks=[_NamedRanges(), timer])
            self._sync()
            for name, ms in timer.milliseconds():
                samples[name].append(ms)

        elem = torch.empty(0, dtype=self.engine.dtype).element_size()
        rows = []
        for layer in layers:
            xs = samples[layer.name]
            flops, nbytes = layer_cost(layer, self.engine.network, batch.num_tokens, batch.num_seqs, q_len,
                                       seq_len, elem)
            mean = statistics.fmean(xs)
            rows.append({"layer": layer.name, "kind": layer.kind, "block": layer.block, "latency_ms": mean,
                         "latency_ms_p50": statistics.median(xs), "latency_ms_min": min(xs), "flops": flops,
                         "bytes": nbytes})
        df = pd.DataFrame(rows)
        df["share_pct"] = 100.0 * df["latency_ms"] / df["latency_ms"].sum()
        secs = df["latency_ms"] / 1e3
        df["achieved_gbps"] = df["bytes"] / secs / 1e9
        df["achieved_tflops"] = df["flops"] / secs / 1e12
        df["arithmetic_intensity"] = df["flops"] / df["bytes"].where(df["bytes"] > 0)
        df["phase"] = phase
        profiled = float(df["latency_ms"].sum())
        unprofiled = statistics.median(totals)
        self.last_summary = {
            "phase": phase, "batch_size": batch_size, "seq_len": seq_len, "iters": iters,
            "device": torch.cuda.get_device_name(self.engine.device) if cuda else "cpu",
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "unprofiled_ms": unprofiled, "profiled_sum_ms": profiled,
            "overhead_ms": profiled - unprofiled, "overhead_pct": 100.0 * (profiled - unprofiled) / unprofiled,
            "total_bytes": float(df["bytes"].sum()), "total_flops": float(df["flops"].sum()),
        }
        self.last_frame = df
        return df

    @torch.inference_mode()
    def collectives(self, batch_size: int = 1, seq_len: int = 128, phase: str = "decode",
                    iters: int = 5) -> pd.DataFrame:
        """Tensor parallel: every all-reduce / logits gather per layer per rank, the mean of `iters` eager
        steps. Columns `rank, layer, op, latency_ms, bytes` (kit/parallel/comm.py times them)."""
        if not hasattr(self.engine, "collective_timings"):
            raise ValueError("collectives() needs a tensor-parallel engine: LLM(model, tensor_parallel_size=N)")
        batch, kv, _ = self._batch(batch_size, seq_len, phase)
        eager = [LayerHook()]  # NOTE: eager on every rank: collectives replayed inside a CUDA graph are not timed
        self.engine.forward(batch, kv, hooks=eager)
        self.engine.collective_timings()  # drop what came before
        self.engine.time_collectives(True)
        try:
            for _ in range(iters):
                self.engine.forward(batch, kv, hooks=eager)
        finally:
            self.engine.time_collectives(False)
        df = self.engine.collective_timings()
        return df.groupby(["rank", "layer", "op"], sort=False).agg(
            latency_ms=("latency_ms", "mean"), bytes=("bytes", "first")).reset_index()

    # ---------------------------------------------------------------- roofline
    def roofline(self, bandwidth: float = H100_COPY_BANDWIDTH, peak_flops: float = H100_BF16_FLOPS) -> pd.DataFrame:
        """The last profile against its roofline, one row per layer kind and one for the whole step.

        Columns: `kind, count, latency_ms, bytes, flops, roofline_ms` (max of bytes / bandwidth and
        flops / peak_flops), `achieved_fraction` (roofline_ms / latency_ms), `share_pct`. The `step`
        row is the unprofiled forward pass; a `graphed step` row is added once `graphed_step_ms()`
        has timed the same batch from a CUDA graph.
        """
        if self.last_frame is None:
            raise ValueError("roofline() reads the last profile: call profile() first")
        if not (bandwidth > 0 and peak_flops > 0):
            raise ValueError(f"bandwidth and peak_flops must be > 0, got {bandwidth!r} and {peak_flops!r}")
        g = self.by_kind(self.last_frame)[["kind", "count", "latency_ms", "bytes", "flops", "share_pct"]]
        s = self.last_summary
        steps = [{"kind": "step", "count": len(self.last_frame), "latency_ms": s["unprofiled_ms"],
                  "bytes": s["total_bytes"], "flops": s["total_flops"], "share_pct": 100.0}]
        if s.get("graphed_step_ms") is not None:
            steps.append({**steps[0], "kind": "graphed step", "latency_ms": s["graphed_step_ms"]})
        df = pd.concat([g, pd.DataFrame(steps)], ignore_index=True)
        df["roofline_ms"] = 1e3 * pd.concat([df["bytes"] / bandwidth, df["flops"] / peak_flops], axis=1).max(axis=1)
        df["achieved_fraction"] = df["roofline_ms"] / df["latency_ms"]
        return df[["kind", "count", "latency_ms", "bytes", "flops", "roofline_ms", "achieved_fraction", "share_pct"]]

    @torch.inference_mode()
    def graphed_step_ms(self, iters: int = 50) -> float | None:
        """The last profiled decode batch replayed from a CUDA graph (captured here, on the profiler's
        own cache; the engine's graphs are not touched), timed as a whole; None where graphs cannot run."""
        s = self.last_summary
        if not s or s["phase"] != "decode":
            raise ValueError("graphed_step_ms() replays the last profiled batch: profile a decode batch first")
        backend = self.engine.backend
        if self.engine.device.type != "cuda" or not hasattr(backend, "run_layers"):
            return None
        batch, kv, _ = self._batch(s["batch_size"], s["seq_len"], "decode")
        runner = CUDAGraphRunner(backend, kv, (s["batch_size"],), batch.block_tables.shape[1])
        for _ in range(3):
            runner.run(batch)
        self._sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            runner.run(batch)
        end.record()
        self._sync()
        self.last_summary["graphed_step_ms"] = start.elapsed_time(end) / iters
        return self.last_summary["graphed_step_ms"]

    @torch.inference_mode()
    def top_kernels(self, n: int = 10, batch_size: int = 1, seq_len: int = 128, phase: str = "decode") -> pd.DataFrame:
        """The `n` kernels (GPU) or ops (CPU) that take the most time in one forward pass.

        Columns: `name, calls, time_ms` (device time on a GPU, self CPU time on the CPU), `share_pct`.
        """
        batch, kv, _ = self._batch(batch_size, seq_len, phase)
        cuda = self.engine.device.type == "cuda"
        self.engine.forward(batch, kv)
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            self.engine.forward(batch, kv)
            self._sync()
        rows = []
        for e in prof.key_averages():
            if cuda and e.device_type.name != "CUDA":
                continue  # on a GPU: the kernels themselves, not the CPU ops that launched them
            us = e.device_time_total if cuda else e.self_cpu_time_total
            if us > 0:
                rows.append({"name": e.key, "calls": e.count, "time_ms": us / 1e3})
        df = pd.DataFrame(rows, columns=["name", "calls", "time_ms"]).sort_values("time_ms", ascending=False)
        df["share_pct"] = 100.0 * df["time_ms"] / df["time_ms"].sum() if len(df) else []
        return df.head(n).reset_index(drop=True)

    @torch.inference_mode()
    def count_kernels(self, batch_size: int = 1, seq_len: int = 128, phase: str = "decode") -> pd.DataFrame:
        """Kernels each layer launches in one forward pass (`layer, kind, kernels`), counted on any device.

        A fused op of `kit/kernels/` counts once; on a GPU every row is what one eager pass (and the
        CUDA graph that records it) launches. `attrs["host_syncs"]` counts `.item()`-like waits.
        """
        batch, kv, _ = self._batch(batch_size, seq_len, phase)
        with LaunchCounter() as counter:
            self.engine.forward(batch, kv, hooks=[_Scope(counter)])
        per_layer = counter.by_scope()
        df = pd.DataFrame([{"layer": layer.name, "kind": layer.kind, "kernels": per_layer.get(layer.name, 0)}
                           for layer in self.engine.network.layers])
        df.attrs["host_syncs"] = counter.syncs
        df.attrs["outside_layers"] = per_layer.get("", 0)
        return df

    @staticmethod
    def by_kind(df: pd.DataFrame) -> pd.DataFrame:
        """Totals per layer kind: `kind, count, latency_ms, share_pct, bytes, flops, achieved_gbps`."""
        g = df.groupby("kind", sort=False).agg(count=("layer", "size"), latency_ms=("latency_ms", "sum"),
                                               bytes=("bytes", "sum"), flops=("flops", "sum")).reset_index()
        g["share_pct"] = 100.0 * g["latency_ms"] / g["latency_ms"].sum()
        g["achieved_gbps"] = g["bytes"] / (g["latency_ms"] / 1e3) / 1e9
        return g.sort_values("latency_ms", ascending=False, ignore_index=True)

    # ------------------------------------------------------------------- trace
    @torch.inference_mode()
    def export_trace(self, path: str, batch_size: int = 1, seq_len: int = 128, phase: str = "decode") -> str:
        """Write a Chrome trace (PyTorch profiler) of one forward pass, each layer a named range."""
        batch, kv, _ = self._batch(batch_size, seq_len, phase)
        self.engine.forward(batch, kv)
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.engine.device.type == "cuda" else [])
        with profile(activities=activities) as prof, torch.inference_mode():
            self.engine.forward(batch, kv, hooks=[_NamedRanges(record=True)])
            self._sync()
        prof.export_chrome_trace(str(path))
        return str(path)

    def _repr_html_(self) -> str:
        if self.last_frame is None:
            return f"<b>ProfiledEngine</b> over {html.escape(repr(self.engine))}: call <code>profile()</code>"
        s = self.last_summary
        head = (f"<b>ProfiledEngine</b> {s['phase']} &middot; batch {s['batch_size']} &middot; seq {s['seq_len']} "
                f"&middot; {html.escape(s['device'])} {s['dtype']} &middot; unprofiled {s['unprofiled_ms']:.3f} ms, "
                f"sum of layers {s['profiled_sum_ms']:.3f} ms (timing overhead {s['overhead_pct']:.0f}%)")
        top = self.last_frame.sort_values("latency_ms", ascending=False).head(10)[
            ["layer", "kind", "latency_ms", "share_pct", "achieved_gbps", "arithmetic_intensity"]]
        return (f"<div>{head}<p><b>By kind</b></p>{self.by_kind(self.last_frame).to_html(index=False, border=0)}"
                f"<p><b>Slowest layers</b></p>{top.to_html(index=False, border=0, float_format='%.3f')}</div>")
