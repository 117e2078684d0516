"""kit.server end to end: a real uvicorn server on 127.0.0.1, driven by the official `openai` client."""

import asyncio
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from helpers import make_hf_checkpoint
from kit.bench import make_prompts, run_benchmark
from kit.builder import BuildConfig
from kit.cli import main
from kit.llm import LLM, SamplingParams
from kit.server import EngineClient, ServerConfig, ServerMetrics, ServerProcess, ServerThread, metrics_frame, parse_metrics
from kit.server.load_gen import run_online_benchmark
from kit.server.protocol import ChatCompletionRequest, CompletionRequest
from kit.server.serving import OpenAIServing

MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colours are",
           "Q: What is 2 + 2?\nA:", "My favourite animal is", "import numpy as np\n", "The sun rises in the"]


@pytest.fixture(scope="module")
def llm(smollm2):
    bc = BuildConfig(max_batch_size=64, max_seq_len=256, max_input_len=64, max_num_tokens=512)
    with LLM(smollm2, device="cpu", build_config=bc) as llm:
        yield llm


@pytest.fixture(scope="module")
def server(llm):
    with ServerThread(llm, ServerConfig(MODEL, shutdown_engine=False)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-server") / "llama"
    make_hf_checkpoint("llama", path, seed=3)
    return path


def greedy(llm, prompt, max_tokens, **kw):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), use_tqdm=False)


def metrics(url):
    return parse_metrics(httpx.get(f"{url}/metrics").text)


def test_models_and_health(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == 256 and card.vocab_size == 49152


def test_completion_equals_llm_generate_and_usage_counts_tokens(llm, client):
    ref = greedy(llm, PROMPTS[0], 12)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0])) == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ids = llm.tokenizer.encode(PROMPTS[1])  # a prompt of token ids gives the same as its text
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == greedy(llm, PROMPTS[1], 6).text


def test_several_prompts_in_one_request_keep_their_order(llm, client):
    # NOTE: n > 1 samples (TensorRT-LLM refuses n > 1 under greedy decoding: n identical copies)
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:3], max_tokens=5, temperature=1.0, seed=7, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3, 4, 5]
    for i, p in enumerate(PROMPTS[:3]):
        ref = llm.generate(p, SamplingParams(max_tokens=5, temperature=1.0, seed=7, n=2))
        assert [r.choices[2 * i].text, r.choices[2 * i + 1].text] == [o.text for o in ref.outputs]
    with pytest.raises(openai.BadRequestError, match="SamplingParams.n must be 1 under greedy decoding"):
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0, n=2)


def test_chat_completion_uses_the_chat_template(llm, client):
    msgs = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]
    ids = llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = greedy(llm, ids, 10)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_streamed_chunks_join_to_the_non_streamed_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    msgs = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content


def test_n2_stop_and_seed(llm, client):
    story = dict(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=12,
                 temperature=0.9, seed=7, n=2, logprobs=True)
    r, again = client.chat.completions.create(**story), client.chat.completions.create(**story)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeded
    assert r.choices[0].message.content != r.choices[1].message.content  # two samples, two seeds
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    joined = {0: "", 1: ""}  # streamed, the two samples interleave and join to the same texts
    for chunk in client.chat.completions.create(**story, stream=True):
        for ch in chunk.choices:
            joined[ch.index] += ch.delta.content or ""
    assert [joined[0], joined[1]] == [c.message.content for c in r.choices]
    full = greedy(llm, PROMPTS[0], 12).text  # " Paris. ..." : cut at the first "."
    assert "." in full
    s = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=["."])
    assert s.choices[0].text == full[:full.index(".")] and s.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=["."],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == s.choices[0].text


def test_logprobs(llm, client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(val, abs=1e-5)  # greedy: the best one
        assert top[tok] == pytest.approx(val, abs=1e-6)
    ref = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=0), use_tqdm=False)
    assert sum(lp.token_logprobs) == pytest.approx(ref.outputs[0].cumulative_logprob, abs=1e-4)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


BAD = [
    ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": 42, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": -3}, 400, "SamplingParams.max_tokens must be an int >= 1, got -3"),
    ({"prompt": "hi", "temperature": -1}, 400, "SamplingParams.temperature must be a finite float >= 0"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "word " * 200, "max_tokens": 4}, 400, "max_input_len=64"),
    ({"prompt": "hi", "max_tokens": 300}, 400, "exceeds max_seq_len=256"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "`gpt-4` does not exist"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "n": 0}, 400, "SamplingParams.n"),
    ({"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ({"prompt": "hi", "min_tokens": 2, "stop_token_ids": [10**6]}, 400, "stop_token_ids must be token ids in [0, 49152)"),
    ({"prompt": [504, 3.7]}, 400, "prompt"),
    ({"prompt": [504, 10**6]}, 400, "prompt token ids out of the vocabulary"),
]


@pytest.mark.parametrize("patch,status,needle", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_parameters_get_a_4xx_naming_the_problem(server, client, patch, status, needle):
    body = {"model": MODEL, **patch}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == ("model_not_found" if status == 404 else status)
    known = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "logprobs"}
    with pytest.raises(openai.APIStatusError) as e:  # the official client raises the matching error
        client.completions.create(**{k: v for k, v in body.items() if k in known},
                                  extra_body={k: v for k, v in body.items() if k not in known})
    assert e.value.status_code == status and needle in str(e.value)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_malformed_json_huge_body_and_unknown_route(server, client):
    bad = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "x", "prompt": ', timeout=30,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    huge = httpx.post(f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "a" * (10 * 2**20), "max_tokens": 1})
    assert huge.status_code == 413 and "over this server's limit" in huge.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": []}).status_code == 400
    nf = httpx.get(f"{server.url}/v1/nothing")
    assert nf.status_code == 404 and "error" in nf.json()
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_64_streams_with_every_5th_disconnecting(llm, server):
    """Each completed stream has its greedy-alone text; aborted ones free their blocks; /metrics agrees."""
    max_tokens = 12
    refs = {p: greedy(llm, p, max_tokens) for p in PROMPTS}
    alone = {p: r.text for p, r in refs.items()}
    before = metrics(server.url)
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                  stream=True)
        text, n = "", 0
        async for chunk in stream:
            text += chunk.choices[0].text
            n += 1
            if i % 5 == 0 and n == 2:
                await stream.close()  # the client goes away mid-stream
                return None
        return prompt, text

    async def run_all():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    completed = [r for r in results if r is not None]
    assert len(completed) == 51
    for prompt, text in completed:
        assert text == alone[prompt]
    t0 = time.monotonic()  # the aborts land at the executor's next step
    while (llm.kv_cache_inspector.stats()["num_requests"] or metrics(server.url)["kit_num_requests_in_flight"]) \
            and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    kv = llm.kv_cache_inspector.stats()
    assert kv["num_requests"] == 0 and kv["used"] == 0  # no blocks held for any finished or aborted request
    after = metrics(server.url)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('kit_request_finished_total{finish_reason="abort"}') == 13
    assert delta('kit_request_finished_total{finish_reason="length"}') + \
        delta('kit_request_finished_total{finish_reason="stop"}') == 51
    ids = {p: len(llm.tokenizer.encode(p)) for p in PROMPTS}
    assert delta("kit_prompt_tokens_total") == sum(ids[PROMPTS[i % len(PROMPTS)]] for i in range(64))
    assert delta("kit_time_to_first_token_seconds_count") == delta("kit_e2e_request_latency_seconds_count") == 51
    done_tokens = sum(len(refs[p].outputs[0].token_ids) for p, _ in completed)
    assert done_tokens + 13 * 2 <= delta("kit_generation_tokens_total") <= done_tokens + 13 * max_tokens
    assert after["kit_num_requests_running"] == after["kit_num_requests_waiting"] == 0
    assert after["kit_kv_cache_blocks_used"] == 0 and after["kit_kv_cache_usage_ratio"] == 0


def test_api_key_and_full_queue(tiny_dir):
    tiny = LLM(str(tiny_dir), device="cpu", enable_build_cache=False,
               build_config=BuildConfig(max_batch_size=1, max_seq_len=256, max_input_len=16))
    with ServerThread(tiny, ServerConfig("tiny", api_key="sekrit", max_queue=0)) as s:
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekrit", max_retries=0)
        assert client.models.list().data[0].id == "tiny"
        assert httpx.get(f"{s.url}/health").status_code == 200  # health and metrics need no key
        body = dict(model="tiny", prompt=[5, 6, 7], max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        stream = client.completions.create(stream=True, **body)
        next(iter(stream))  # admitted and running: the one batch slot is taken, max_queue=0
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**body)
        assert e.value.status_code == 503 and "the server is full" in str(e.value)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert client.completions.create(**{**body, "max_tokens": 4}).usage.completion_tokens == 4
        m = metrics(s.url)
        assert m['kit_request_rejected_total{status="503"}'] == 1 and m['kit_request_rejected_total{status="401"}'] == 2


def test_sigterm_drains_requests_in_flight_then_exits(tiny_dir, tmp_path):
    """Three long requests on one batch slot: SIGTERM after the first token; all three finish, then exit 0."""
    with ServerProcess(str(tiny_dir), "--max-batch-size", "1", "--max-seq-len", "256", "--max-input-len", "16",
                       env={"KIT_CACHE_DIR": str(tmp_path)}) as proc:
        url = proc.url
        got: dict[int, list] = {}
        first = threading.Barrier(2)

        def consume(i):
            body = {"model": str(tiny_dir), "prompt": [3 + i, 4, 5], "max_tokens": 40, "ignore_eos": True,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            chunks = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        if i == 0 and len(chunks) == 1:
                            first.wait()
            got[i] = chunks

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        first.wait()
        time.sleep(0.05)  # let the other two connect and queue
        proc.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert proc.proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    for i in range(3):
        assert got[i][-1] == "[DONE]"
        assert json.loads(got[i][-2])["usage"]["completion_tokens"] == 40


def test_bench_serve_reports_the_offline_fields(llm, server):
    prompts = make_prompts(llm.engine.config.vocab_size, 8, 6, seed=0)
    online = run_online_benchmark(server.url, MODEL, prompts, output_len=4, concurrency=3, progress=False)
    offline = run_benchmark(llm, prompts, 4, 3, progress=False)
    shared = {"num_requests", "input_len", "output_len", "concurrency", "request_rate", "wall_s", "output_tokens",
              "output_tokens_per_s", "requests_per_s", "ttft_ms", "tpot_ms", "peak_kv_blocks", "kv_blocks_total"}
    assert shared <= set(online) and shared <= set(offline)
    assert online["output_tokens"] == offline["output_tokens"] == 24 and online["num_requests"] == 6
    assert online["kv_blocks_total"] == offline["kv_blocks_total"]
    assert set(online["ttft_ms"]) == {"mean", "p50", "p99"} and online["tpot_ms"]["p50"] > 0
    poisson = run_online_benchmark(server.url, MODEL, prompts[:4], output_len=3, concurrency=2, request_rate=50.0,
                                   progress=False)
    assert poisson["request_rate"] == 50.0 and poisson["output_tokens"] == 12


def test_bench_serve_cli_writes_the_bench_json_layout(server, tmp_path, capsys):
    out = tmp_path / "online.json"
    assert main(["bench-serve", "--endpoint", server.url, "--input-len", "8", "--output-len", "3",
                 "--concurrency", "1", "2", "--num-requests", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["model"] == MODEL and [r["kit"]["concurrency"] for r in data["runs"]] == [1, 2]
    assert all(r["kit"]["output_tokens"] == 9 and r["kit"]["num_requests"] == 3 for r in data["runs"])
    assert "TTFT p50 ms" in capsys.readouterr().out
    # user errors: one line on stderr, exit status 2 (kit.cli.main)
    assert main(["bench-serve", "--endpoint", server.url, "--concurrency", "0"]) == 2
    assert "concurrency must be ints >= 1" in capsys.readouterr().err
    assert main(["bench-serve", "--endpoint", server.url, "--request-rate", "0"]) == 2
    assert "request-rate must be > 0" in capsys.readouterr().err


def test_serve_refuses_tensor_parallelism_and_bad_configs(capsys):
    assert main(["serve", MODEL, "--tp", "2"]) == 2  # SmolLM2's 9 heads do not split 2 ways
    assert "tensor_parallel_size=2 must divide num_attention_heads=9" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ServerConfig.max_queue must be an int >= 0, got -1"):
        ServerConfig(MODEL, max_queue=-1)
    with pytest.raises(ValueError, match="ServerConfig.model_name"):
        ServerConfig("")


def test_metrics_frame_has_one_row_per_sample(server):
    text = httpx.get(f"{server.url}/metrics").text
    df = metrics_frame(text)
    assert list(df.columns) == ["metric", "labels", "le", "value"]
    assert len(df) == len(parse_metrics(text))
    assert df[df.metric == "kit_kv_cache_blocks_total"].value.item() == 512  # 8192 tokens / 16 on the CPU
    buckets = df[df.metric == "kit_time_to_first_token_seconds_bucket"]
    assert buckets["le"].iloc[-1] == float("inf") and buckets["value"].is_monotonic_increasing


def _read_stream(serving, req, runs):
    async def read():
        return [c async for c in serving.stream(req, runs, time.monotonic())]
    chunks = asyncio.run(read())
    assert chunks[-1] == "data: [DONE]\n\n"
    return [json.loads(c[len("data: "):]) for c in chunks[:-1]]


def test_a_stream_behind_its_request_gets_the_pending_tokens_in_one_chunk(llm, client):
    """Every snapshot is published before the stream reads one: a single chunk carries all the tokens."""
    engine = EngineClient(llm)
    serving = OpenAIServing(engine, ServerMetrics(engine, MODEL), MODEL, max_queue=8)
    req = CompletionRequest(model=MODEL, prompt=PROMPTS[2], max_tokens=10, temperature=0, logprobs=2, stream=True,
                            stream_options={"include_usage": True})
    runs = serving.start_completion(req)
    runs[0].result.result(timeout=120)
    assert len(runs[0].result.snapshots()) == 10  # one snapshot per token ...
    bodies = _read_stream(serving, req, runs)
    assert [len(b["choices"]) for b in bodies] == [1, 0]  # ... one chunk for all of them, then the usage
    ch, full = bodies[0]["choices"][0], greedy(llm, PROMPTS[2], 10)
    assert ch["text"] == full.text and ch["finish_reason"] == "length"
    lp = ch["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 10
    assert "".join(lp["tokens"]) == ch["text"] and lp["text_offset"][0] == 0
    assert bodies[-1]["usage"] == {"prompt_tokens": len(llm.tokenizer.encode(PROMPTS[2])), "completion_tokens": 10,
                                   "total_tokens": len(llm.tokenizer.encode(PROMPTS[2])) + 10}
    # chat, n=2, logprobs: each sample's pending deltas join into its own choice
    story = dict(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}], max_tokens=12,
                 temperature=0.9, seed=7, n=2, logprobs=True)
    ref = client.chat.completions.create(**story)
    creq = ChatCompletionRequest(**story, stream=True)
    runs = serving.start_chat(creq)
    runs[0].result.result(timeout=120)
    bodies = _read_stream(serving, creq, runs)
    assert bodies[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    choices = [c for b in bodies[1:] for c in b["choices"]]
    assert sorted(c["index"] for c in choices) == [0, 1]  # one chunk, both samples in it
    for c in choices:
        want = ref.choices[c["index"]]
        assert c["delta"]["content"] == want.message.content and c["finish_reason"] == want.finish_reason
        assert [t["token"] for t in c["logprobs"]["content"]] == [t.token for t in want.logprobs.content]
    assert sum(len(c["logprobs"]["content"]) for c in choices) == ref.usage.completion_tokens
