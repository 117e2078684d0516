"""TensorRT-LLM's LLM-API example scenarios (examples/llm-api/*.py), rewritten for the kit, on SmolLM2 (CPU).

One LLM serves the module (sizing through LLM keyword arguments, as the examples do); the
scenarios that configure the LLM itself (KV cache, CUDA graphs, quantization, save/load,
beam width) make their own small one.
"""

import asyncio
import json
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import torch

from kit import LLM, BuildConfig, KvCacheConfig, SamplingParams
from kit.guided_decoding import GuidedDecodingParams
from kit.llm_args import CudaGraphConfig
from kit.logits_processors import BatchedLogitsProcessor, LogitsProcessor
from kit.outputs import Logprob
from kit.quantization import CalibConfig, QuantAlgo, QuantConfig

PROMPTS = ["Hello, my name is", "The capital of France is", "The future of AI is"]


@pytest.fixture(scope="module")
def llm(smollm2):
    with LLM(smollm2, device="cpu", max_batch_size=16, max_seq_len=256, max_num_tokens=256,
             guided_decoding_backend="xgrammar", batched_logits_processor=OnlyToken(1000)) as llm:
        yield llm


class OnlyToken(LogitsProcessor, BatchedLogitsProcessor):
    """examples/llm-api/llm_logits_processor.py: allow one token id only."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        self.calls = 0

    def __call__(self, req_id, logits, token_ids, stream_ptr, client_id):
        self.calls += 1
        for lg in (logits if isinstance(logits, list) else [logits]):
            assert lg.dim() == 3 and lg.shape[:2] == (1, 1)  # (1, beam_width, vocab)
            mask = torch.full_like(lg, float("-inf"))
            mask[:, :, self.token_id] = 0
            lg += mask


def test_quickstart(llm):  # quickstart_example.py / llm_inference.py
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.95, seed=0))
    assert [o.prompt for o in outs] == PROMPTS
    for o in outs:
        assert o.finished and o.outputs[0].text and len(o.outputs[0].token_ids) <= 32
    assert "Paris" in llm.generate(PROMPTS[1], SamplingParams(max_tokens=4)).outputs[0].text


def test_default_sampling_params_are_greedy_and_32_tokens(llm):
    sp = SamplingParams()
    assert sp.max_tokens == 32 and sp.is_greedy and sp.temperature == 0.0
    a, b = (llm.generate(PROMPTS[0], SamplingParams(ignore_eos=True)) for _ in range(2))
    assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 32
    assert SamplingParams(top_p=0.9).temperature == 1.0 and not SamplingParams(top_p=0.9).is_greedy
    assert SamplingParams(temperature=None, top_k=None, top_p=None).is_greedy
    with pytest.raises(ValueError, match="SamplingParams.n must be 1 under greedy decoding"):
        SamplingParams(n=2)
    assert len(llm.generate(PROMPTS[0], SamplingParams(n=2, temperature=1.0, max_tokens=4)).outputs) == 2


def test_prompt_dicts_and_token_ids(llm):
    sp = SamplingParams(max_tokens=4)
    one = llm.generate({"prompt": PROMPTS[1]}, sp)
    assert one.prompt == PROMPTS[1]  # a single dict is one prompt, not a batch
    ids = llm.tokenizer.encode(PROMPTS[1])
    two = llm.generate([{"prompt_token_ids": ids}, ids], sp)
    assert [o.outputs[0].token_ids for o in two] == [one.outputs[0].token_ids] * 2
    with pytest.raises(TypeError, match="exactly one of 'prompt'"):
        llm.generate({"text": "x"}, sp)


def test_output_options(llm):
    ids = llm.tokenizer.encode(PROMPTS[1])
    base = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4)).outputs[0]
    full = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, exclude_input_from_output=False)).outputs[0]
    assert full.token_ids == ids + base.token_ids and full.text == PROMPTS[1] + base.text
    raw = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, detokenize=False)).outputs[0]
    assert raw.text == "" and raw.token_ids == base.token_ids
    ended = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, end_id=base.token_ids[1])).outputs[0]
    assert ended.token_ids == base.token_ids[:1] and ended.finish_reason == "stop"  # a request-level end token
    no_bos = llm.generate(PROMPTS[1], SamplingParams(max_tokens=1, add_special_tokens=False))
    assert no_bos.prompt_token_ids == llm.tokenizer.encode(PROMPTS[1], add_special_tokens=False)


def test_async(llm):  # llm_inference_async.py
    async def main():
        futs = [llm.generate_async(p, SamplingParams(max_tokens=6)) for p in PROMPTS]
        return [await f.aresult() for f in futs]

    outs = asyncio.run(main())
    sync = llm.generate(PROMPTS, SamplingParams(max_tokens=6))
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in sync]
    fut = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=5))
    res = fut.result()
    assert fut.finished and fut.prompt == PROMPTS[0] and fut.prompt_token_ids == llm.tokenizer.encode(PROMPTS[0])
    assert fut.outputs[0].text == res.outputs[0].text


def test_async_streaming_diffs(llm):  # llm_inference_async_streaming.py
    async def main():
        texts, ids, last = [], [], None
        async for out in llm.generate_async(PROMPTS[1], SamplingParams(max_tokens=12, stop="."), streaming=True):
            texts.append(out.outputs[0].text_diff)
            ids += out.outputs[0].token_ids_diff
            last = out
        return texts, ids, last

    texts, ids, last = asyncio.run(main())
    assert "".join(texts) == last.outputs[0].text and ids == last.outputs[0].token_ids
    assert llm.tokenizer.decode(ids) == last.outputs[0].text


def test_abort_is_cancelled(llm):
    fut = llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), streaming=True)
    for _ in fut:
        fut.abort()
    assert fut.outputs[0].finish_reason == "cancelled" and len(fut.outputs[0].token_ids) < 200


def test_stop_eos_and_token_ids_cut_together(llm):
    tok = llm.tokenizer
    o = llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop="."))
    c = o.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "." and "." not in c.text
    assert tok.decode(c.token_ids) == c.text
    c = llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop=".", include_stop_str_in_output=True)).outputs[0]
    assert c.text.endswith(".") and tok.decode(c.token_ids) == c.text
    dot = tok.encode(".", add_special_tokens=False)[0]
    c = llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop_token_ids=[dot])).outputs[0]
    assert c.stop_reason == dot and dot not in c.token_ids and tok.decode(c.token_ids) == c.text
    c = llm.generate(PROMPTS[1], SamplingParams(max_tokens=20, stop_token_ids=[dot],
                                                include_stop_str_in_output=True)).outputs[0]
    assert c.token_ids[-1] == dot and c.text.endswith(".")
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True)
    c = llm.generate(chat, SamplingParams(max_tokens=100, logprobs=0)).outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None and tok.eos_token_id not in c.token_ids
    assert len(c.logprobs) == len(c.token_ids) < 100


def test_logprobs(llm):  # llm_inference_logprob.py
    c = llm.generate(PROMPTS[1], SamplingParams(max_tokens=6, temperature=0.7, top_p=0.95, seed=1,
                                                logprobs=1)).outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    for t, entry in zip(c.token_ids, c.logprobs):
        assert t in entry and all(isinstance(v, Logprob) for v in entry.values())
        assert 1 <= len(entry) <= 2 and min(v.rank for v in entry.values()) == 1
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
    assert SamplingParams(logprobs=True).logprobs == 1


def test_logits_processors(llm):  # llm_logits_processor.py
    proc = OnlyToken(42)
    c = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=1.0, logits_processor=proc)).outputs[0]
    assert c.token_ids == [42] * 5 and proc.calls == 5
    batched = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, apply_batched_logits_processor=True))
    assert [o.outputs[0].token_ids for o in batched] == [[1000] * 3] * 2
    c = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, return_generation_logits=True,
                                                return_context_logits=True))
    gen, ctx = c.outputs[0].generation_logits, c.context_logits
    assert gen.shape == (3, llm.engine.config.vocab_size) and gen.argmax(-1).tolist() == c.outputs[0].token_ids
    assert ctx.shape == (len(c.prompt_token_ids), llm.engine.config.vocab_size)
    assert int(ctx[-1].argmax()) == c.outputs[0].token_ids[0]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "student": {"type": "boolean"}},
          "required": ["name", "age", "student"], "additionalProperties": False}


@pytest.mark.parametrize("samples", [12, pytest.param(50, marks=pytest.mark.slow)])
def test_guided_json_seeded_samples_validate(llm, samples):  # llm_guided_decoding.py
    sp = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, guided_decoding=GuidedDecodingParams(json=SCHEMA))
          for s in range(samples)]
    outs = llm.generate(["Describe a person as JSON:"] * samples, sp)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


def test_guided_regex_grammar_and_json_object(llm):
    regex = r"[0-9]{3}-[a-z]{2,4}"
    outs = llm.generate(["Code:"] * 10, [SamplingParams(max_tokens=16, temperature=1.0, seed=s,
                                                        guided_decoding=GuidedDecodingParams(regex=regex))
                                         for s in range(10)])
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in outs)
    grammar = 'root ::= "yes" | "no"'
    o = llm.generate("Answer:", SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(grammar=grammar)))
    assert o.outputs[0].text in ("yes", "no")
    o = llm.generate("JSON:", SamplingParams(max_tokens=48, guided_decoding=GuidedDecodingParams(json_object=True)))
    if o.outputs[0].finish_reason == "stop":
        json.loads(o.outputs[0].text)
    with pytest.raises(ValueError, match="exactly one of"):
        GuidedDecodingParams(regex="a", grammar="root ::= \"a\"")


def test_sampling_variants(llm):  # llm_sampling.py
    variants = [SamplingParams(max_tokens=8, temperature=0.8, seed=3), SamplingParams(max_tokens=8, top_k=10, seed=3),
                SamplingParams(max_tokens=8, top_p=0.9, seed=3), SamplingParams(max_tokens=8, repetition_penalty=1.3),
                SamplingParams(max_tokens=8, n=3, temperature=1.0, seed=3),
                SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=0.5)]
    outs = llm.generate([PROMPTS[2]] * len(variants), variants)
    assert [len(o.outputs) for o in outs] == [1, 1, 1, 1, 3, 1]
    again = llm.generate(PROMPTS[2], variants[0])
    assert again.outputs[0].token_ids == outs[0].outputs[0].token_ids  # seeded


def test_stats_and_tokenizer(llm):  # llm_inference_kv_events.py (stats half), the HF-style tokenizer
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=3))
    stats = llm.get_stats(timeout=2)
    assert stats and {"iter", "iterLatencyMS", "kvCacheStats", "inflightBatchingStats"} <= set(stats[-1])
    assert llm.get_stats(timeout=0) == []  # drained
    tok = llm.tokenizer
    assert tok("hi")["input_ids"] == tok.encode("hi") and tok.pad_token_id is not None
    assert tok.batch_decode([tok.encode("a b"), tok.encode("c")]) == ["a b", "c"]
    msgs = [{"role": "user", "content": "hi"}]
    assert not tok.apply_chat_template(msgs, tokenize=False).endswith("<|im_start|>assistant\n")
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).endswith("assistant\n")


def test_kv_cache_config_and_events(smollm2):  # llm_inference_kv_events.py
    kvc = KvCacheConfig(free_gpu_memory_fraction=None, enable_block_reuse=True, tokens_per_block=8,
                        event_buffer_max_size=64, max_tokens=512)
    with LLM(smollm2, device="cpu", max_batch_size=2, max_seq_len=128, kv_cache_config=kvc) as llm:
        assert llm.executor.kv_cache_manager.block_size == 8
        llm.generate("The quick brown fox jumps over the lazy dog " * 2, SamplingParams(max_tokens=2))
        events = llm.get_kv_cache_events(timeout=2)
        assert events[0]["data"]["type"] == "created"
        stored = [e for e in events if e["data"]["type"] == "stored"]
        assert stored and len(stored[0]["data"]["blocks"][0]["tokens"]) == 8
    with pytest.raises(ValueError, match="host_cache_size"):
        KvCacheConfig(host_cache_size=1 << 30)


def test_runtime_cuda_graph_config_and_beam_width(smollm2):  # llm_runtime.py, llm_inference_customize.py
    with LLM(smollm2, device="cpu", max_batch_size=4, max_seq_len=64,
             cuda_graph_config=CudaGraphConfig(batch_sizes=[1, 2, 4]), enable_chunked_prefill=True,
             trust_remote_code=True) as llm:
        assert llm.build_config.cuda_graph_batch_sizes == (1, 2, 4) and llm.build_config.use_cuda_graphs
        assert llm.build_config.max_input_len == 64  # follows max_seq_len
        assert llm.generate("Hi", SamplingParams(max_tokens=2)).finished
    bc = BuildConfig(max_seq_len=256)
    bc.max_beam_width = 4  # as the customize example does: beam search then runs up to 4 beams
    with LLM(smollm2, device="cpu", build_config=bc) as llm:
        out = llm.generate("Hi", SamplingParams(max_tokens=4, use_beam_search=True, best_of=4, n=2))
        assert len(out.outputs) == 2 and out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob
        with pytest.raises(ValueError, match="max_beam_width"):  # more beams than the build allows
            llm.generate("Hi", SamplingParams(max_tokens=4, use_beam_search=True, best_of=8))
    with pytest.raises(ValueError, match="max_beam_width"):
        LLM(smollm2, device="cpu", max_beam_width=0)
    with pytest.raises(TypeError, match="unexpected keyword argument.*max_batch"):
        LLM(smollm2, max_batchsize=4)


def test_quantization_config(smollm2):  # llm_quantization.py
    qc = QuantConfig(quant_algo=QuantAlgo.W8A16, group_size=64)
    with LLM(smollm2, device="cpu", max_batch_size=2, max_seq_len=64, quant_config=qc,
             calib_config=CalibConfig(calib_batches=2, calib_max_seq_length=32), enable_build_cache=False) as llm:
        assert "Paris" in llm.generate(PROMPTS[1], SamplingParams(max_tokens=4)).outputs[0].text
    with pytest.raises(ValueError, match="calib_dataset"):
        CalibConfig(calib_dataset="cnn_dailymail")


def test_save_and_load(llm, tmp_path):  # the engine directory round trip
    path = llm.save(tmp_path / "engine")
    sp = SamplingParams(max_tokens=6)
    with LLM(str(path), device="cpu") as again:
        assert again.generate(PROMPTS[1], sp).outputs[0].token_ids == llm.generate(PROMPTS[1], sp).outputs[0].token_ids


_LOOP = textwrap.dedent("""
    import gc, os, sys, threading, resource
    from kit import LLM
    engine = LLM("smollm2-135m", device="cpu", max_batch_size=2, max_seq_len=64).engine  # the build cache
    n = int(sys.argv[1])
    base_threads, rss = None, []
    for i in range(n):
        llm = LLM(engine)
        del llm
        gc.collect()
        if i == 4:
            base_threads = threading.active_count()
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(base_threads, threading.active_count(), rss[4], rss[-1])
""")


def _run_loop(smollm2, n: int) -> None:
    out = subprocess.run([sys.executable, "-c", _LOOP, str(n)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    base, end, rss_early, rss_end = map(int, out.stdout.split()[-4:])
    assert end == base <= 2  # no executor thread outlives its LLM
    assert rss_end - rss_early < 200 * 1024  # KiB: no per-LLM growth beyond allocator noise


def test_100_llms_created_and_dropped_leave_no_growth(smollm2):
    _run_loop(smollm2, 100)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(20))
def test_100_llms_loop_20_runs(smollm2, run):
    _run_loop(smollm2, 100)
