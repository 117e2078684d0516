"""kit/bench.py: workloads, goodput under SLOs, the same-run decode-only step, the --overlap flags."""

import argparse
import math

import pytest

from kit.bench import add_arguments, check_arguments, decode_only, make_prompts, run_benchmark, workloads
from kit.builder import BuildConfig
from kit.llm import LLM


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    from kit.loader import ModelLoader

    tiny = ModelLoader(tiny_checkpoints["llama"][0]).load()
    bc = BuildConfig(max_batch_size=4, max_input_len=16, max_seq_len=32, max_num_tokens=64, block_size=4)
    with LLM(tiny, device="cpu", build_config=bc, overlap=True, enable_prefix_caching=True) as llm:
        yield llm


def test_workloads_pair_input_and_output_lengths():
    assert workloads([128, 1024], [128]) == [(128, 128), (1024, 128)]
    assert workloads(8, 4) == [(8, 4)]
    assert workloads([1, 2], [3, 4]) == [(1, 3), (2, 4)]
    with pytest.raises(ValueError, match="as many values"):
        workloads([1, 2, 3], [4, 5])
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--input-len", "128", "1024", "--output-len", "128", "--no-overlap", "--slo-ttft-ms", "300"])
    assert args.input_len == [128, 1024] and args.overlap is False and args.slo_ttft_ms == 300.0
    assert p.parse_args([]).overlap is None and p.parse_args([]).decode_only is True
    check_arguments(args)
    with pytest.raises(ValueError, match="--slo-tpot-ms must be a number > 0"):
        check_arguments(argparse.Namespace(**{**vars(args), "slo_tpot_ms": -1.0}))
    with pytest.raises(ValueError, match="--input-len must be an integer >= 1, got 0"):
        check_arguments(argparse.Namespace(**{**vars(args), "input_len": [8, 0]}))


def test_goodput_counts_the_requests_within_the_slos(llm):
    prompts = make_prompts(llm.engine.config.vocab_size, 6, 4, seed=1)
    loose = run_benchmark(llm, prompts, 3, 2, progress=False, slo_ttft_ms=1e9, slo_tpot_ms=1e9)
    assert loose["goodput"]["num_requests"] == 4 and loose["overlap"] is True
    assert math.isclose(loose["goodput"]["output_tokens_per_s"], loose["output_tokens_per_s"])
    tight = run_benchmark(llm, prompts, 3, 2, progress=False, slo_ttft_ms=1e-6)
    assert tight["goodput"]["num_requests"] == 0 and tight["goodput"]["requests_per_s"] == 0.0
    assert set(tight["loop_ms"]) >= {"schedule_ms", "forward_ms", "output_ms", "device_idle_ms"}
    split = tight["loop_by_step"]  # 4 prompts of 6 tokens, 3 tokens each, 2 at a time: both kinds of step ran
    assert split["decode"]["steps"] + split["prompt"]["steps"] == tight["iterations"]
    assert all(v >= 0 for kind in split.values() for v in kind.values())
    poisson = run_benchmark(llm, prompts, 2, 4, request_rate=200.0, seed=3, progress=False)
    assert poisson["request_rate"] == 200.0 and poisson["output_tokens"] == 8


def test_decode_only_leaves_the_serving_cache_alone(llm):
    kv = llm.kv_cache_manager
    prompt = make_prompts(llm.engine.config.vocab_size, 12, 1, seed=2)[0]
    first = run_benchmark(llm, [prompt], 3, 1, progress=False)
    cached = kv.num_cached_blocks
    before = llm.executor.kv_cache.k[:, :kv.num_blocks].clone()
    r = decode_only(llm, 3, 14, steps=2, warmup=1)
    assert r["batch_size"] == 3 and r["context_len"] == 14 and r["output_tokens_per_s"] > 0
    assert (llm.executor.kv_cache.k[:, :kv.num_blocks] == before).all()  # only the scratch block was written
    again = run_benchmark(llm, [prompt], 3, 1, progress=False)
    assert kv.num_cached_blocks == cached and first["output_tokens"] == again["output_tokens"] == 3


def test_ramp_spreads_the_first_wave_and_steady_counts_the_full_window(llm):
    prompts = make_prompts(llm.engine.config.vocab_size, 6, 6, seed=4)
    r = run_benchmark(llm, prompts, 3, 2, progress=False, ramp_s=0.05)
    assert r["ramp_s"] == 0.05 and r["output_tokens"] == 18
    # the second arrival of the first wave waits half the ramp; the window ends at the last submission
    assert r["steady"]["start_s"] >= 0.025 and r["steady"]["end_s"] > r["steady"]["start_s"]
    assert r["steady"]["output_tokens_per_s"] > 0
    one_wave = run_benchmark(llm, prompts[:2], 3, 2, progress=False)
    assert one_wave["steady"] is None  # nothing was submitted after the first wave
    with pytest.raises(ValueError, match="ramp_s must be a number of seconds >= 0, got -1"):
        run_benchmark(llm, prompts, 3, 2, progress=False, ramp_s=-1)


def test_tokens_between_spreads_each_request_over_its_decode():
    from kit.bench import _tokens_between

    # a request: first token at 1.0, 4 more tokens evenly up to 3.0; another entirely inside [0, 10]
    spans = [(1.0, 3.0, 5), (4.0, 5.0, 3)]
    assert _tokens_between(spans, 2.0, 3.0) == 2.0  # half of the 4 later tokens, first token outside
    assert _tokens_between(spans, 0.0, 10.0) == 8.0
    assert _tokens_between(spans, 1.0, 2.0) == 3.0  # the first token + half of the rest


def test_main_warms_each_shape_and_reports_steady_over_decode_only(tiny_checkpoints, tmp_path, capsys):
    import json

    from kit.bench import main

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "bench.json"
    args = p.parse_args(["--model", str(tiny_checkpoints["llama"][0]), "--input-len", "6", "--output-len", "3",
                         "--concurrency", "1", "2", "--device", "cpu", "--out", str(out)])
    assert args.warmup is True and args.stagger is True
    assert main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["kit"]["num_requests"] for r in runs] == [8, 8]  # max(8, 4 x concurrency)
    assert all(r["kit"]["ramp_s"] == 3 * r["decode_only"]["step_ms"] / 1e3 for r in runs)  # one output length
    assert all(r["steady_over_decode_only"] is not None for r in runs)
    printed = capsys.readouterr().out
    assert "steady/dec" in printed
    # the decode step's bytes against its roofline: on the CPU bytes only (no measured copy bandwidth)
    from kit.loader import ModelLoader
    from kit.roofline import decode_step_cost

    config = ModelLoader(str(tiny_checkpoints["llama"][0]), device="cpu").load().config
    for r in runs:
        roof, dec = r["decode_only"]["roofline"], r["decode_only"]
        cost = decode_step_cost(config, dec["batch_size"], dec["context_len"], dtype="float32")
        assert roof["bytes_per_step"] == cost.total_bytes and "no measured copy bandwidth for cpu" in roof["note"]
        assert "kernels" not in dec  # traced kernels: CUDA only
    assert "GB/step, measured" in printed


def test_roofline_of_the_decode_step_uses_the_gpus_measured_copy_bandwidth():
    from kit.roofline import COPY_BANDWIDTH, copy_bandwidth, describe_row, roofline_row

    assert copy_bandwidth("NVIDIA H200") == COPY_BANDWIDTH["H200"] == 4.26e12
    assert copy_bandwidth("NVIDIA H100 80GB HBM3") == 3.0e12 and copy_bandwidth("NVIDIA A10G") is None
    from kit.config import ModelConfig
    from kit.loader import SYNTHETIC_PRESETS

    cfg = ModelConfig(**SYNTHETIC_PRESETS["llama-3.1-8b"])
    row = roofline_row(cfg, 1, 256, 4.65, bandwidth=copy_bandwidth("NVIDIA H200"))
    assert abs(row["roofline_ms"] - 1e3 * row["bytes_per_step"] / 4.26e12) < 1e-9  # batch 1: bandwidth-bound
    assert 0.75 < row["roofline_fraction"] < 0.85  # 16 GB of weights in 4.65 ms on an H200
    assert "of roofline" in describe_row(row)


def test_loop_split_takes_medians_per_kind_of_step():
    import pandas as pd

    from kit.iteration_stats import loop_split

    stats = pd.DataFrame({"num_prefill_tokens": [0, 0, 0, 128],
                          "schedule_ms": [0.2, 0.3, 0.1, 0.5], "prepare_ms": [0.5, 0.5, 0.6, 1.0],
                          "cpu_launch_s": [1.0, 2.0, 3.0, 4.0], "cpu_launch_end_s": [1.0008, 2.0009, 3.0007, 4.0014],
                          "output_ms": [0.4, 0.3, 0.4, 0.5], "forward_ms": [1.4, 1.5, 1.5, 2.0],
                          "sampling_ms": [0.1, 0.1, 0.2, 0.1], "device_idle_ms": [0.5, 0.6, 0.7, 1.6],
                          "token_wait_ms": [0.0, 0.0, 0.0, 0.2]})
    split = loop_split(stats)
    dec, prompt = split["decode"], split["prompt"]
    assert dec["steps"] == 3 and prompt["steps"] == 1
    assert dec["schedule_ms"] == pytest.approx(0.2) and dec["launch_ms"] == pytest.approx(0.8, abs=1e-6)
    assert dec["host_ms"] == pytest.approx(1.9, abs=1e-6)  # the median of 1.9, 2.0, 1.8 (per-step sums)
    assert dec["device_ms"] == pytest.approx(1.6) and dec["device_idle_ms"] == pytest.approx(0.6)
    assert prompt["host_ms"] == pytest.approx(3.2, abs=1e-6)  # its output lane waited 0.2 ms for the tokens and prompt["device_ms"] == pytest.approx(2.1)
    assert loop_split(stats.iloc[:0]) == {} and set(loop_split(stats.iloc[:3])) == {"decode"}
