"""Overlapped scheduling (kit/executor_loop.py) on the CPU: the same code path as on a GPU, one step late.

Every output must equal the synchronous loop's: greedy batched == alone, stops of every kind,
n > 1, seeds, aborts, preemption and prefix caching."""

import asyncio
import random
import threading
import time
import traceback
import warnings

import pytest
import torch

from kit.builder import BuildConfig
from kit.executor import Executor, KvCacheConfig
from kit.llm import LLM
from kit.request import GenerationRequest
from kit.sampling_params import SamplingParams
from tests.test_executor import BC, _workload, check_200_async_requests_with_aborts


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    from kit.loader import ModelLoader

    return ModelLoader(tiny_checkpoints["llama"][0]).load()


@pytest.fixture(scope="module")
def alone(tiny):
    prompts, params = _workload()
    with LLM(tiny, device="cpu", build_config=BuildConfig(**{**BC, "max_batch_size": 1}), overlap=False) as llm:
        return [llm.generate(p, sp).outputs[0].token_ids for p, sp in zip(prompts, params)]


def test_overlap_defaults_to_the_device_and_validates(tiny):
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC)) as llm:
        assert llm.executor.overlap is False  # CPU: off unless asked
    with pytest.raises(TypeError, match="overlap must be True, False or None"):
        LLM(tiny, device="cpu", build_config=BuildConfig(**BC), overlap="yes")


@pytest.mark.parametrize("chunked,prefix,policy", [(True, True, "max_utilization"), (False, True, "guaranteed_no_evict")])
def test_overlap_batched_greedy_equals_alone(tiny, alone, chunked, prefix, policy):
    prompts, params = _workload()
    bc = BuildConfig(**{**BC, "max_num_tokens": 32 if chunked else 128})
    with LLM(tiny, device="cpu", build_config=bc, enable_chunked_prefill=chunked, enable_prefix_caching=prefix,
             scheduler_policy=policy, kv_cache_config=KvCacheConfig(num_blocks=30), overlap=True) as llm:
        outs = llm.generate(prompts, params)
        stats = llm.executor.stats()
        hit_rate = llm.kv_cache_inspector.stats()["hit_rate"]
        llm.kv_cache_manager.check_invariants()
        assert llm.kv_cache_manager.num_used_blocks == 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert stats["overlap"].sum() > len(stats) // 2  # most steps ran one step late
    assert hit_rate > 0
    if policy == "max_utilization":
        assert stats["num_preemptions"].sum() > 0


def _generate_both(tiny, prompts, params, **kw):
    outs = {}
    for overlap in (False, True):
        with LLM(tiny, device="cpu", build_config=BuildConfig(**BC), overlap=overlap, **kw) as llm:
            outs[overlap] = llm.generate(prompts, params)
            assert llm.kv_cache_manager.num_used_blocks == 0
    return outs[False], outs[True]


def _as_tuples(outs):
    return [[(c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob) for c in o.outputs] for o in outs]


def test_overlap_stop_ids_eos_max_tokens_and_the_discarded_extra_token(tiny):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 211) for _ in range(rng.randrange(3, 20))] for _ in range(12)]
    with LLM(tiny, device="cpu", build_config=BuildConfig(**BC), overlap=False) as llm:
        free = [llm.generate(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)).outputs[0].token_ids
                for p in prompts]
    # stop on the 4th token of each greedy run: the overlapped loop has already scheduled one more step
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[f[3]]) for f in free]
    params += [SamplingParams(max_tokens=m, temperature=0.0) for m in (1, 2, 7)]  # eos possible, length
    sync, over = _generate_both(tiny, prompts + prompts[:3], params)
    assert _as_tuples(sync) == _as_tuples(over)
    for o, f in zip(over[:12], free):
        toks = o.outputs[0].token_ids
        # the stop token ends the output and is not part of it (TensorRT-LLM's rule)
        assert o.outputs[0].finish_reason == "stop" and toks == f[:f.index(f[3])]
    assert [len(o.outputs[0].token_ids) <= m for o, m in zip(over[12:], (1, 2, 7))] == [True] * 3


def test_overlap_n_seeds_logprobs_penalties_min_tokens(tiny):
    prompts = [list(range(10, 30)), [5, 6, 7, 8], [9, 9, 9], list(range(40, 49))]
    params = [SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=7),
              SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, logprobs=2),
              SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.5, presence_penalty=0.5,
                             min_tokens=4, stop_token_ids=[9], prompt_logprobs=1),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)]
    sync, over = _generate_both(tiny, prompts, params)
    assert _as_tuples(sync) == _as_tuples(over)
    assert [o.outputs[0].logprobs for o in sync] == [o.outputs[0].logprobs for o in over]
    assert sync[2].prompt_logprobs == over[2].prompt_logprobs
    assert len(over[0].outputs) == 3 and len({tuple(c.token_ids) for c in over[0].outputs}) > 1


def test_overlap_200_concurrent_async_requests_with_aborts(tiny):
    check_200_async_requests_with_aborts(tiny, overlap=True)


def test_overlap_stats_time_the_lanes(tiny):
    from kit.engine import Engine
    from kit.network import NetworkBuilder

    engine = Engine.from_network(NetworkBuilder(tiny).build(), device="cpu", dtype=torch.float32)
    with Executor(engine, build_config=BuildConfig(**BC), overlap=True) as ex:
        results = [ex.submit(GenerationRequest([5, 6, 7, i], SamplingParams(max_tokens=6, temperature=0.0,
                                                                             ignore_eos=True))) for i in range(4)]
        assert all(len(r.result(60).outputs[0].token_ids) == 6 for r in results)
        stats = ex.stats()
    for col in ("schedule_ms", "prepare_ms", "forward_ms", "sampling_ms", "output_ms", "device_idle_ms"):
        assert (stats[col] >= 0).all(), col
    # each lane's phases are in order: schedule <= prepare <= launch <= forward <= sampling <= end
    order = ["cpu_schedule_s", "cpu_prepare_s", "cpu_launch_s", "gpu_forward_s", "gpu_sampling_s", "gpu_end_s",
             "cpu_launch_end_s"]
    for a, b in zip(order, order[1:]):
        assert (stats[a] <= stats[b]).all(), (a, b)
    # overlapped: step N's output is processed after step N + 1 was launched
    over = stats[stats["overlap"]]
    assert len(over) >= 3
    nxt = stats.set_index("iteration")["cpu_launch_end_s"]
    for it, t_out in zip(over["iteration"], over["cpu_output_s"]):
        if it + 1 in nxt.index:
            assert t_out >= nxt[it + 1]


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlap_batched_greedy_equals_alone_and_200_async_with_aborts(tiny):
    prompts, params = _workload(32)
    cuda = tiny.to("cuda", torch.float32)  # float32: batch-size-dependent sums differ far below the logit gaps
    with LLM(cuda, device="cuda", build_config=BuildConfig(**{**BC, "max_batch_size": 1}), overlap=False) as llm:
        ref = [llm.generate(p, sp).outputs[0].token_ids for p, sp in zip(prompts, params)]
    with LLM(cuda, device="cuda", build_config=BuildConfig(**BC), enable_prefix_caching=True) as llm:
        assert llm.executor.overlap is True  # the default on CUDA
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ref
        assert llm.executor.stats()["overlap"].any()
        many, _ = _workload(200, seed=3)

        async def main():
            sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            results = [llm.generate_async(p, sp) for p in many]
            for r in results[::7]:
                llm.abort(r.request_id)
            return await asyncio.gather(*results)

        outs = asyncio.run(main())
        assert llm.executor.num_inflight == 0 and llm.kv_cache_manager.num_used_blocks == 0
    assert len(outs) == 200 and all(o.finished for o in outs)
    for i, o in enumerate(outs):
        if i % 7:
            assert o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_overlapped_loop_never_waits_for_the_device():
    """Once warm, the overlapped loop never blocks the host on the stream: torch's sync debug mode flags
    no synchronizing call (a blocking copy, an element read or written through the host, a stream or
    device sync) in prompt, mixed (replayed graphs) and decode steps, for greedy, top-p and seeded rows.
    The loop's one wait, on the event of a step's sampled tokens one step late, is not such a call."""
    from kit.loader import ModelLoader

    model = ModelLoader.synthetic("llama-3.2-1b", device="cuda", dtype=torch.bfloat16, num_layers=2)
    bc = BuildConfig(max_batch_size=16, max_seq_len=256, max_input_len=128, max_num_tokens=256)
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.7, top_k=20, seed=3, ignore_eos=True)]
    prompts = [list(range(100 + 5 * i, 140 + 9 * i)) for i in range(12)]
    syncs: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "called a synchronizing" in str(message):  # NOTE: not the mode's own "experimental" notice
            syncs.append(f"[{threading.current_thread().name}]\n" + "".join(traceback.format_stack(limit=10)[:-1]))

    with LLM(model, device="cuda", build_config=bc) as llm:
        assert llm.executor.overlap and llm.engine.backend.mixed_graphs is not None

        def serve(shift: int):
            futures = []
            for i, p in enumerate(prompts):  # staggered: prompt chunks beside decode tokens
                futures.append(llm.generate_async([t + shift for t in p], params[i % 3]))
                time.sleep(0.003)
            return [f.result() for f in futures]

        serve(0)  # warm: kernels compiled, pinned host blocks made
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show  # NOTE: process-wide, so the executor thread's warnings land here too
            torch.cuda.set_sync_debug_mode("warn")
            try:
                outs = serve(1)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        df = llm.executor.stats()
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    assert ((df["num_prefill_tokens"] > 0) & (df["num_decode_tokens"] > 0)).any()  # mixed steps ran
    assert not syncs, f"{len(syncs)} synchronizing calls; the first:\n{syncs[0]}"


def test_scheduler_advance_then_commit_equals_update():
    from kit.kv_cache import KVCacheManager
    from kit.request import Request, RequestStatus
    from kit.scheduler import PLACEHOLDER_TOKEN, Scheduler, SchedulerConfig

    def run(overlapped: bool):
        sched = Scheduler(SchedulerConfig(max_batch_size=4, max_num_tokens=16, max_seq_len=64),
                          KVCacheManager(16, 4, enable_prefix_caching=True))
        sched.add_request(Request("a", list(range(10, 19)), max_tokens=3))
        sched.add_request(Request("b", [5, 6, 7], max_tokens=5))
        tokens, steps = iter(range(100, 200)), 0
        while sched.has_unfinished():
            out = sched.schedule()
            steps += 1
            sampled = {s.request_id: next(tokens) for s in out.scheduled if s.is_last_chunk}
            verdicts = {"b": RequestStatus.FINISHED_STOPPED} if sampled.get("b") == 104 else {}
            if overlapped:
                placeholders = sched.advance(out)
                for rid in placeholders:
                    req = sched.get(rid)
                    assert req is None or req.output_token_ids[-1] == PLACEHOLDER_TOKEN
                sched.commit(placeholders, sampled, verdicts)
            else:
                sched.update(out, sampled, verdicts)
        return steps, sched.kv_cache_manager.num_used_blocks, sched.kv_cache_manager.num_cached_blocks

    assert run(True) == run(False)
    sched = Scheduler(SchedulerConfig(max_batch_size=2, max_num_tokens=8), KVCacheManager(8, 4))
    sched.add_request(Request("x", [1, 2, 3], max_tokens=1))
    out = sched.schedule()
    assert sched.advance(out) == {"x": 0} and sched.get("x") is None  # length known without the token: ended
    assert sched.kv_cache_manager.num_used_blocks == 0


def test_overlap_stop_strings_streaming_and_logprobs(smollm2):
    bc = BuildConfig(max_batch_size=4, max_seq_len=128, max_input_len=64, max_num_tokens=128)
    prompts = ["1, 2, 3, 4,", "a, b, c,", "Once upon a time"]
    sps = [SamplingParams(max_tokens=12, temperature=0.0, stop=[" 7"], logprobs=2),
           SamplingParams(max_tokens=10, temperature=0.0, stop=[" f", "e,"]),
           SamplingParams(max_tokens=8, temperature=0.0)]
    got = {}
    for overlap in (False, True):
        with LLM(smollm2, device="cpu", build_config=bc, overlap=overlap) as llm:
            outs = llm.generate(prompts, sps)
            streamed = "".join(s.outputs[0].text_diff for s in llm.generate(prompts[0], sps[0], streaming=True))
            assert llm.kv_cache_manager.num_used_blocks == 0
        got[overlap] = ([(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason,
                          o.outputs[0].stop_reason, o.outputs[0].logprobs) for o in outs], streamed)
    assert got[True] == got[False]
    (first, *_), streamed = got[True]
    assert first[0] == " 5, 6," and first[2] == "stop" and first[3] == " 7" and streamed == first[0]
