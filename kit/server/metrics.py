"""Prometheus metrics of one server: load, KV cache, latencies, tokens, outcomes.

Each `ServerMetrics` owns its own `CollectorRegistry` (several servers can live in one
process, e.g. in tests). Gauges that mirror the engine (running / waiting requests,
KV-cache use, prefix-cache hit rate) are read from the `EngineClient` at scrape time.

    kit_num_requests_running / _waiting     gauge    requests in the batch / queued
    kit_num_requests_in_flight              gauge    requests the server holds open
    kit_kv_cache_usage_ratio                gauge    blocks owned by requests / all blocks
    kit_kv_cache_blocks_used                gauge
    kit_prefix_cache_hit_rate               gauge    hit / queried prompt tokens
    kit_time_to_first_token_seconds         histogram  HTTP arrival -> first token
    kit_time_per_output_token_seconds       histogram  (finish - first token) / (tokens - 1)
    kit_e2e_request_latency_seconds         histogram  HTTP arrival -> finish
    kit_prompt_tokens_total / kit_generation_tokens_total  counters
    kit_request_finished_total{finish_reason}               counter  (abort: client went away)
    kit_request_rejected_total{status}                      counter  4xx / 503 answers
"""

from __future__ import annotations

import pandas as pd
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kit.server.engine_client import EngineClient

__all__ = ["ServerMetrics", "parse_metrics", "metrics_frame"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """The server's Prometheus registry and the calls that update it."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.in_flight = 0
        self.running = Gauge("kit_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("kit_num_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        self.in_flight_g = Gauge("kit_num_requests_in_flight", "Requests the server holds open.", registry=r)
        self.kv_usage = Gauge("kit_kv_cache_usage_ratio", "KV-cache blocks owned by requests / all blocks.",
                              registry=r)
        self.kv_used = Gauge("kit_kv_cache_blocks_used", "KV-cache blocks owned by requests.", registry=r)
        self.kv_total = Gauge("kit_kv_cache_blocks_total", "KV-cache blocks in the pool.", registry=r)
        self.hit_rate = Gauge("kit_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / queried.",
                              registry=r)
        self.ttft = Histogram("kit_time_to_first_token_seconds", "HTTP arrival to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kit_time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("kit_e2e_request_latency_seconds", "HTTP arrival to the last token.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("kit_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("kit_generation_tokens", "Generated tokens (all completions).",
                                         registry=r)
        self.finished = Counter("kit_request_finished", "Requests finished, by the first completion's reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("kit_request_rejected", "Requests answered with an error status.", ["status"],
                                registry=r)
        Gauge("kit_model_info", "The served model.", ["model_name"], registry=r).labels(model_name).set(1)

    def admitted(self, num_prompt_tokens: int) -> None:
        self.in_flight += 1
        self.prompt_tokens.inc(num_prompt_tokens)

    def done(self, finish_reason: str, num_generated: int, arrival: float, first_token: float | None,
             finished: float | None, num_first_completion_tokens: int) -> None:
        """One request is over: count it, its tokens and (unless aborted) its latencies."""
        self.in_flight -= 1
        self.finished.labels(finish_reason).inc()
        self.generation_tokens.inc(num_generated)
        if finish_reason in ("abort", "error") or first_token is None or finished is None:
            return
        self.ttft.observe(max(0.0, first_token - arrival))
        self.e2e.observe(max(0.0, finished - arrival))
        if num_first_completion_tokens > 1:
            self.tpot.observe((finished - first_token) / (num_first_completion_tokens - 1))

    def render(self) -> bytes:
        load = self.engine.load()
        self.running.set(load.num_running)
        self.waiting.set(load.num_waiting)
        self.in_flight_g.set(self.in_flight)
        self.kv_usage.set(load.kv_usage)
        self.kv_used.set(load.kv_blocks_used)
        self.kv_total.set(load.kv_blocks_total)
        self.hit_rate.set(load.prefix_cache_hit_rate)
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with labels: value}, e.g. 'kit_request_finished_total{finish_reason="stop"}'."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metrics_frame(text: str) -> pd.DataFrame:
    """Prometheus text -> one row per sample. Columns: `metric` (sample name), `labels` (dict),
    `le` (a histogram bucket's upper bound, else NaN), `value`."""
    rows = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            rows.append({"metric": s.name, "labels": labels, "le": float(s.labels["le"]) if "le" in s.labels
                         else float("nan"), "value": float(s.value)})
    return pd.DataFrame(rows, columns=["metric", "labels", "le", "value"])
