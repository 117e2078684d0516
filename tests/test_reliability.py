"""One bad request never harms another: every bad value is refused at the boundary naming its
field, a failure inside the loop fails only its request, abandoned requests are aborted, and
a long run leaks no thread, no memory and no stats."""

import argparse
import asyncio
import gc
import math
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kit.bench import check_arguments, run_benchmark
from kit.builder import BuildConfig
from kit.kv_cache_config import KvCacheConfig
from kit.llm import LLM
from kit.loader import ModelLoader
from kit.request import GenerationRequest
from kit.sampling_params import SamplingParams

BC = dict(max_batch_size=16, max_input_len=48, max_seq_len=80, max_num_tokens=128, block_size=4)
FIXED = [5, 6, 7, 8, 9]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return ModelLoader(tiny_checkpoints["llama"][0]).load()


@pytest.fixture(scope="module")
def llm(tiny):
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC)) as llm:
        yield llm


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(FIXED, GREEDY).outputs[0].token_ids


# ---- property: valid and invalid values, each labelled ------------------------------------------
def _field(valid, invalid):
    return st.one_of(st.sampled_from([(v, True) for v in valid]), st.sampled_from([(v, False) for v in invalid]))


FIELDS = {
    "max_tokens": _field([1, 3, np.int64(2)], [0, -1, 2.0, True, "4", None, 2**64, math.nan]),
    "seed": _field([None, 0, 7, 2**63 - 1, np.int64(5)], [-1, 2**63, 2**64, 1.5, True, "1", np.float64(3)]),
    "temperature": _field([None, 0, 0.0, 0.8, np.float32(0.5)], [-1.0, math.nan, math.inf, "1", True]),
    "top_p": _field([1.0, 0.5], [0, 1.5, math.nan, "0.5"]),
    "top_k": _field([0, -1, 5], [-2, 2.5, False]),
    "stop": _field([None, "x", ["ab"], ()], [[""], [1], 5, b"x"]),
    "stop_token_ids": _field([None, [], [5], (7, 9), np.array([3])],
                             [[-1], [2**63], [1.5], [True], "5", [211], [10**6]]),
    "n": _field([1, 2], [0, 1.0, None]),
    "logprobs": _field([None, 0, 3], [21, -1, 1.5]),
    "min_tokens": _field([0, 1], [-1, 1.0, 10**9]),
}
PROMPTS = _field(
    [[3, 4, 5], (10, 11), np.array([12, 13, 14]), [np.int32(20), np.int64(21)], list(range(3, 40))],
    [b"abc", bytearray(b"ab"), [3, 4.5], [True, 3], ["12"], None, [], [211], [-1], [2**70], np.array([1.5]), 3.7,
     np.float64(2.0), {"ids": [1]}, [[1, 2], 3], list(range(3, 100))])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(fields=st.fixed_dictionaries({}, optional=FIELDS), prompt=PROMPTS)
def test_bad_values_are_refused_by_name_and_never_disturb_another_request(llm, reference, fields, prompt):
    kwargs = {k: v for k, (v, _) in fields.items()}
    bad_fields = {k for k, (_, ok) in fields.items() if not ok}
    ok = {k: v for k, (v, good) in fields.items() if good}
    greedy = (ok.get("temperature") is not None and ok["temperature"] < 1e-5) or ok.get("top_k") == 1 or all(
        ok.get(k) is None for k in ("temperature", "top_k", "top_p"))
    if ok.get("n") == 2 and greedy:
        bad_fields.add("n")  # TensorRT-LLM's rule: n > 1 needs sampling
    prompt_value, prompt_ok = prompt
    fixed = llm.generate_async(FIXED, GREEDY)  # in flight while the other one is tried
    try:
        bad = llm.generate_async(prompt_value, SamplingParams(**kwargs))
    except (TypeError, ValueError) as e:
        msg = str(e)
        named = [f for f in bad_fields if f"SamplingParams.{f}" in msg] or (["prompt"] if "prompt" in msg else [])
        assert named, f"the error does not name a bad field {sorted(bad_fields)} / the prompt: {msg}"
        if "prompt" in named and not bad_fields:
            assert not prompt_ok, f"a valid prompt {prompt_value!r} was refused: {msg}"
        assert bad_fields or not prompt_ok, f"valid input refused: {kwargs} {prompt_value!r}: {msg}"
    else:
        assert not bad_fields and prompt_ok, f"invalid input accepted: {bad_fields} / prompt {prompt_value!r}"
        out = bad.result(timeout=120)
        assert out.finished and all(o.finish_reason in ("stop", "length") for o in out.outputs)
    assert fixed.result(timeout=120).outputs[0].token_ids == reference


# ---- the cases of the report, by name ------------------------------------------------------------
def test_the_reported_cases_fail_alone(llm, reference):
    for kwargs, field in [({"seed": 2**64}, "seed"), ({"stop_token_ids": [2**63]}, "stop_token_ids"),
                          ({"stop": None, "stop_token_ids": None}, None)]:
        fixed = llm.generate_async(FIXED, GREEDY)
        if field is None:
            assert llm.generate([3, 4], SamplingParams(max_tokens=2, **kwargs)).finished
        else:
            with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
                llm.generate_async([3, 4], SamplingParams(max_tokens=2, **kwargs))
        assert fixed.result(timeout=60).outputs[0].token_ids == reference
    with pytest.raises(ValueError, match=r"SamplingParams\.stop_token_ids must be token ids in \[0, 211\)"):
        llm.generate_async([3, 4], SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**6]))
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams.*dict"):
        llm.generate([3, 4], {"max_tokens": 4})
    with pytest.raises(TypeError, match="bytes"):
        llm.generate(b"hello")
    with pytest.raises(TypeError, match=r"prompt\[1\] must be an int token id, got 3.7"):
        llm.generate([504 % 211, 3.7])
    with pytest.raises(TypeError, match=r"prompt\[0\] must be an int token id, got True"):
        llm.generate_async([True, False])
    for call in (llm.generate, llm.generate_async):  # the same answers from both
        with pytest.raises(TypeError, match=r"prompt\[0\] must be an int token id, got 50.9"):
            call([50.9, 3.2])
        with pytest.raises(TypeError, match=r"prompt\[1\] must be an int token id, got '12'"):
            call([50, "12"])
    arr = np.array([3, 4, 5])
    assert llm.generate(arr, GREEDY).prompt_token_ids == [3, 4, 5]
    assert llm.generate_async(arr, GREEDY).result(timeout=60).prompt_token_ids == [3, 4, 5]


def test_a_failure_inside_the_loop_fails_only_its_request(llm, reference):
    proc, sampler = llm.executor.output_processor, llm.executor.sampler
    real_check, real_sample, real_sample_async = proc.check_stop, sampler.sample, sampler.sample_async

    def check(state, comp, token):
        if state.greq.request_id == "detok-victim":
            raise RuntimeError("injected detokenizer failure")
        return real_check(state, comp, token)

    def sample(logits, contexts, eos=()):
        if any(c.params.seed == 4242 for c in contexts):
            raise IndexError("injected sampler failure")
        return real_sample(logits, contexts, eos)

    def sample_async(logits, contexts, eos=()):  # the executor's batch pass; `sample` is its per-row retry
        if any(c.params.seed == 4242 for c in contexts):
            raise IndexError("injected sampler failure")
        return real_sample_async(logits, contexts, eos)

    proc.check_stop, sampler.sample, sampler.sample_async = check, sample, sample_async
    try:
        fixed = llm.generate_async(FIXED, GREEDY)
        victim = llm.executor.submit(GenerationRequest([3, 4, 5], GREEDY, request_id="detok-victim"))
        seeded = llm.generate_async([6, 7, 8], SamplingParams(max_tokens=4, seed=4242, temperature=1.0))
        with pytest.raises(RuntimeError, match="injected detokenizer failure"):
            victim.result(timeout=60)
        with pytest.raises(IndexError, match="injected sampler failure"):
            seeded.result(timeout=60)
        assert fixed.result(timeout=60).outputs[0].token_ids == reference
    finally:
        proc.check_stop, sampler.sample, sampler.sample_async = real_check, real_sample, real_sample_async
    _wait_idle(llm)


def _wait_idle(llm, timeout=60.0):
    t0 = time.monotonic()
    while llm.executor.num_inflight or llm.kv_cache_manager.num_used_blocks:
        assert time.monotonic() - t0 < timeout, "requests still in flight"
        time.sleep(0.01)
    llm.kv_cache_manager.check_invariants()


# ---- abandoned requests --------------------------------------------------------------------------
def test_abandoned_streams_and_cancelled_tasks_are_aborted(llm):
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for snap in llm.generate([3, 4, 5], long, streaming=True):
        break  # the consumer walks away after the first snapshot
    _wait_idle(llm)
    with pytest.raises(KeyError):
        for snap in llm.generate_async([3, 4, 5], long, streaming=True):
            raise KeyError("consumer failure")
    _wait_idle(llm)

    async def cancel_await():
        r = llm.generate_async([3, 4, 6], long)
        task = asyncio.ensure_future(r.aresult())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return r

    async def cancel_iteration():
        r = llm.generate_async([3, 4, 7], long, streaming=True)

        async def consume():
            async for _ in r:
                await asyncio.sleep(0)
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return r

    for make in (cancel_await, cancel_iteration):
        r = asyncio.run(make())
        out = r.result(timeout=60)
        assert out.outputs[0].finish_reason == "cancelled" and len(out.outputs[0].token_ids) < 60
        _wait_idle(llm)


def test_dropped_llm_stops_its_thread_and_stats_are_bounded(tiny):
    def executor_threads():
        return [t for t in threading.enumerate() if t.name == "kit-executor" and t.is_alive()]

    before = len(executor_threads())
    llm = LLM(tiny, device="cpu", build_config=BuildConfig(**BC), max_stats_rows=5)
    llm.generate([[3, 4, 5]] * 3, SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(llm.executor.stats()) == 5 and llm.executor.stats()["iteration"].iloc[-1] > 5
    executor = llm.executor  # NOTE: holding the executor must not keep the LLM alive
    del llm
    gc.collect()
    t0 = time.monotonic()
    while executor.is_alive and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert not executor.is_alive and len(executor_threads()) == before
    with pytest.raises(ValueError, match="max_stats_rows must be an int >= 1, got 0"):
        LLM(tiny, device="cpu", build_config=BuildConfig(**BC), max_stats_rows=0)


def test_bench_refuses_impossible_flags(llm):
    ns = dict(input_len=8, output_len=4, num_requests=None, concurrency=[1], request_rate=math.inf)
    check_arguments(argparse.Namespace(**ns))
    for flag, change in [("--concurrency", {"concurrency": [0, 1]}), ("--concurrency", {"concurrency": []}),
                         ("--request-rate", {"request_rate": 0.0}), ("--request-rate", {"request_rate": math.nan}),
                         ("--output-len", {"output_len": -1}), ("--num-requests", {"num_requests": 0})]:
        with pytest.raises(ValueError, match=flag):
            check_arguments(argparse.Namespace(**{**ns, **change}))
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1, got 0"):
        run_benchmark(llm, [[3, 4]], 2, 0, progress=False)
    with pytest.raises(ValueError, match="request_rate must be a number > 0"):
        run_benchmark(llm, [[3, 4]], 2, 1, request_rate=-1.0, progress=False)


def test_surrogates_and_bytes_with_a_tokenizer(smollm2):
    with LLM(smollm2, device="cpu", build_config=BuildConfig(max_batch_size=2, max_seq_len=64, max_input_len=32,
                                                             max_num_tokens=64)) as llm:
        for call in (llm.generate, llm.generate_async):
            with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 2"):
                call("ab\ud800cd")
            with pytest.raises(TypeError, match="bytes"):
                call(b"hello")
        assert llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0)).finished


# ---- soak ------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _soak(tiny, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    bc = BuildConfig(**{**BC, "max_batch_size": 32})
    with LLM(tiny, device="cpu", build_config=bc, kv_cache_config=KvCacheConfig(num_blocks=64),
             max_stats_rows=200) as llm:
        threads0 = threading.active_count()

        async def wave(k: int):
            results, tasks = [], []
            for i in range(k):
                prompt = [rng.randrange(3, 211) for _ in range(rng.randrange(1, 12))]
                sp = SamplingParams(max_tokens=rng.randrange(1, 6), temperature=rng.choice([0.0, 1.0]),
                                    seed=rng.choice([None, i]))
                kind = rng.random()
                if kind < 0.1:  # abandoned stream
                    r = llm.generate_async(prompt, sp, streaming=True)
                    it = iter(r)
                    next(it)
                    it.close()
                elif kind < 0.2:  # cancelled task
                    t = asyncio.ensure_future(llm.generate_async(prompt, sp).aresult())
                    tasks.append(t)
                    asyncio.get_running_loop().call_later(rng.random() * 0.01, t.cancel)
                    continue
                else:
                    r = llm.generate_async(prompt, sp)
                    if kind < 0.3:
                        llm.abort(r.request_id)
                results.append(r)
            outs = await asyncio.gather(*(r.aresult() for r in results))
            await asyncio.gather(*tasks, return_exceptions=True)
            return results, outs

        done = 0
        rss0 = None
        while done < n:
            k = min(100, n - done)
            results, outs = asyncio.run(wave(k))
            assert all(r.done for r in results) and all(o.finished for o in outs)
            done += k
            _wait_idle(llm)
            if rss0 is None:
                gc.collect()
                rss0 = _rss_mb()  # after the warm-up wave
        gc.collect()
        assert threading.active_count() <= threads0
        assert _rss_mb() - rss0 < 50
        assert len(llm.executor.stats()) <= 200


def test_soak_500(tiny):
    _soak(tiny, 500)


@pytest.mark.slow
def test_soak_5000(tiny):
    _soak(tiny, 5000, seed=1)


def test_prompt_token_ids_are_copied_into_a_list_of_python_ints():
    from kit.request import prompt_token_ids_of

    ids = [5, 6, 7]
    out = prompt_token_ids_of(ids)
    assert out == ids and out is not ids and type(out) is list  # a copy: the caller's list may change later
    assert prompt_token_ids_of((5, 6)) == [5, 6]
    mixed = prompt_token_ids_of([np.int64(5), 6])
    assert mixed == [5, 6] and all(type(t) is int for t in mixed)
    with pytest.raises(TypeError, match=r"prompt\[1\] must be an int token id, got True"):
        prompt_token_ids_of([5, True])
