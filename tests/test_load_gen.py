"""kit.server.load_gen / load_client: `kit bench-serve` with several client processes against a real uvicorn."""

import json
import os

import pytest

from helpers import make_hf_checkpoint, tiny_llm
from kit.bench import make_prompts
from kit.cli import main
from kit.server import ServerConfig, ServerThread
from kit.server.load_gen import default_client_procs, run_online_benchmark

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("load-gen") / "llama"
    make_hf_checkpoint("llama", path, seed=11)
    with tiny_llm(path) as llm, ServerThread(llm, ServerConfig(MODEL, shutdown_engine=False)) as s:
        s.vocab_size = llm.engine.config.vocab_size
        yield s


def test_two_client_processes_send_every_request_and_time_it(server):
    prompts = make_prompts(server.vocab_size, 8, 10, seed=1)
    one = run_online_benchmark(server.url, MODEL, prompts, output_len=5, concurrency=4, progress=False,
                               client_procs=1)
    two = run_online_benchmark(server.url, MODEL, prompts, output_len=5, concurrency=4, progress=False,
                               client_procs=2)
    assert one["client_procs"] == 1 and two["client_procs"] == 2
    for r in (one, two):
        assert r["num_requests"] == 10 and r["output_tokens"] == 50 and r["concurrency"] == 4
        assert 10 <= r["stream_chunks"] <= 50  # at least one chunk per request, at most one per token
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] < 1e3 * r["wall_s"]
        assert 0 < r["tpot_ms"]["p50"] < 1e3 * r["wall_s"]
        assert r["output_tokens_per_s"] == pytest.approx(50 / r["wall_s"])
        assert r["kv_blocks_total"] > 0
    poisson = run_online_benchmark(server.url, MODEL, prompts[:6], output_len=3, concurrency=3, request_rate=40.0,
                                   progress=False, client_procs=2)
    assert poisson["request_rate"] == 40.0 and poisson["output_tokens"] == 18 and poisson["client_procs"] == 2
    # more processes than streams: one per stream
    assert run_online_benchmark(server.url, MODEL, prompts[:2], output_len=2, concurrency=2, progress=False,
                                client_procs=8)["client_procs"] == 2


def test_default_client_procs_and_bad_values(server):
    cores = os.cpu_count() or 1
    assert default_client_procs(1) == 1 and default_client_procs(16) == 1
    assert default_client_procs(64) == min(4, cores) and default_client_procs(1000) == cores
    prompts = make_prompts(server.vocab_size, 4, 2, seed=2)
    with pytest.raises(ValueError, match="client_procs must be an int >= 1"):
        run_online_benchmark(server.url, MODEL, prompts, output_len=2, concurrency=2, client_procs=0)
    with pytest.raises(ValueError, match="concurrency must be an int >= 1, got 0"):
        run_online_benchmark(server.url, MODEL, prompts, output_len=2, concurrency=0)
    with pytest.raises(RuntimeError, match="HTTP 404.*does not exist"):  # the server's error reaches the caller
        run_online_benchmark(server.url, "no-such-model", prompts, output_len=2, concurrency=2, progress=False,
                             client_procs=2)


def test_cli_client_procs(server, tmp_path, capsys):
    out = tmp_path / "online.json"
    assert main(["bench-serve", "--endpoint", server.url, "--input-len", "8", "--output-len", "4",
                 "--concurrency", "4", "--num-requests", "6", "--client-procs", "2", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]["kit"]
    assert run["client_procs"] == 2 and run["output_tokens"] == 24 and run["num_requests"] == 6
    assert main(["bench-serve", "--endpoint", server.url, "--client-procs", "0"]) == 2
    assert "--client-procs must be an int >= 1, got 0" in capsys.readouterr().err
