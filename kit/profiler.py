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
"""

from __future__ import annotations

import contextlib
import html
import statistics
import time
from typing import Any

import pandas as pd
import torch

from kit.batch import ForwardBatch, SequenceInput
from kit.engine import Engine
from kit.network import Layer

__all__ = ["ProfiledEngine", "layer_cost"]


def _nvtx_range(name: str) -> contextlib.AbstractContextManager:
    try:
        import nvtx

        return nvtx.annotate(name, domain="kit")
    except ImportError:  # the nvtx package is a dependency; fall back to torch's binding if absent
        if torch.cuda.is_available():
            @contextlib.contextmanager
            def rng():
                torch.cuda.nvtx.range_push(name)
                try:
                    yield
                finally:
                    torch.cuda.nvtx.range_pop()
            return rng()
        return contextlib.nullcontext()


def layer_cost(layer: Layer, network: Any, num_tokens: int, num_seqs: int, q_len: int, ctx_len: int,
               elem: int) -> tuple[float, float]:
    """(FLOPs, bytes) a layer must at least do / move for a batch of `num_seqs` sequences with
    `q_len` new tokens each over `ctx_len` context tokens (weights read once, activations once)."""
    c = network.config
    h, T = c.hidden_size, num_tokens
    wbytes = sum(network.weights[w].numel() * network.weights[w].element_size() for w in layer.weights)
    params = sum(network.weights[w].numel() for w in layer.weights)
    kind = layer.kind
    if kind in ("qkv_proj", "o_proj", "mlp", "lm_head"):
        rows = num_seqs if kind == "lm_head" else T
        if kind == "mlp":
            acts = rows * (2 * h + 3 * c.intermediate_size)
        elif kind == "qkv_proj":
            acts = rows * (h + c.q_size + 2 * c.kv_size)
        elif kind == "o_proj":
            acts = rows * (c.q_size + 2 * h)
        else:
            acts = rows * (h + c.vocab_size * 2)  # logits kept in float32
        return 2.0 * rows * params, float(wbytes + acts * elem)
    if kind == "embedding":
        return 0.0, float(2 * T * h * elem)
    if kind == "rmsnorm":
        return 4.0 * T * h, float(2 * T * h * elem + wbytes)
    if kind == "qk_norm":
        return 4.0 * T * (c.q_size + c.kv_size), float(2 * T * (c.q_size + c.kv_size) * elem)
    if kind == "rope":
        return 6.0 * T * (c.q_size + c.kv_size), float(2 * T * (c.q_size + c.kv_size) * elem)
    if kind == "attention":
        # each new token attends to its causal prefix: on average ctx - q_len/2 keys
        keys = max(1.0, ctx_len - (q_len - 1) / 2)
        flops = 4.0 * num_seqs * q_len * keys * c.num_attention_heads * c.head_dim
        kv_read = num_seqs * ctx_len * 2 * c.kv_size * elem
        return flops, float(kv_read + T * (2 * c.q_size + 2 * c.kv_size) * elem)
    return 0.0, 0.0


class ProfiledEngine:
    """Times an `Engine` layer by layer; NVTX-annotated; exports a PyTorch profiler trace."""

    def __init__(self, engine: Engine, block_size: int = 16) -> None:
        self.engine = engine
        self.block_size = block_size
        self.last_summary: dict[str, Any] = {}
        self.last_frame: pd.DataFrame | None = None

    # ------------------------------------------------------------------ inputs
    def _batch(self, batch_size: int, seq_len: int, phase: str):
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
        layers = [layer for layer, _ in self.engine.backend.ops]
        cuda = self.engine.device.type == "cuda"
        samples: dict[str, list[float]] = {layer.name: [] for layer in layers}
        backend = self.engine.backend
        run = backend.run_layers if hasattr(backend, "run_layers") else backend.forward

        for _ in range(warmup):
            run(batch, kv)
        self._sync()
        # unprofiled: the same batch, whole forward passes (graphs are not used for profiling)
        totals = []
        for _ in range(iters):
            t0 = time.perf_counter()
            run(batch, kv)
            self._sync()
            totals.append(1e3 * (time.perf_counter() - t0))

        for _ in range(iters):
            events: list[tuple[str, Any, Any]] = []

            @contextlib.contextmanager
            def timed(layer: Layer):
                with _nvtx_range(layer.name):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        yield
                        end.record()
                        events.append((layer.name, start, end))
                    else:
                        t0 = time.perf_counter()
                        yield
                        events.append((layer.name, t0, time.perf_counter()))

            run(batch, kv, timed)
            self._sync()
            for name, a, b in events:
                samples[name].append(a.elapsed_time(b) if cuda else 1e3 * (b - a))

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
        from torch.profiler import ProfilerActivity, profile, record_function

        batch, kv, _ = self._batch(batch_size, seq_len, phase)
        backend = self.engine.backend
        run = backend.run_layers if hasattr(backend, "run_layers") else backend.forward

        @contextlib.contextmanager
        def named(layer: Layer):
            with _nvtx_range(layer.name), record_function(layer.name):
                yield

        run(batch, kv)
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.engine.device.type == "cuda" else [])
        with profile(activities=activities) as prof, torch.inference_mode():
            run(batch, kv, named)
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
