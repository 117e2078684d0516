"""kit.server.engine_process: the LLM in a child process, driven through ProcessEngineClient."""

import asyncio
import functools
import os
import pickle
import signal

import httpx
import pytest

from helpers import make_hf_checkpoint, tiny_llm
from kit.server import ServerConfig, ServerThread
from kit.outputs import CompletionOutput, RequestOutput
from kit.server.engine_process import EngineProcessError, ProcessEngineClient
from kit.server.snapshot_delta import SnapshotDecoder, SnapshotEncoder
from kit.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("engine-process") / "llama"
    make_hf_checkpoint("llama", path, seed=5)
    return path


@pytest.fixture(scope="module")
def local(ckpt):
    with tiny_llm(ckpt) as llm:
        yield llm


@pytest.fixture(scope="module")
def remote(ckpt, tmp_path_factory):
    os.environ.setdefault("KIT_CACHE_DIR", str(tmp_path_factory.mktemp("kc")))
    client = ProcessEngineClient(tiny_llm, (ckpt,))
    yield client
    client.shutdown()


def test_results_equal_the_in_process_llm_and_streams_arrive_token_by_token(local, remote):
    prompts = [[3, 4, 5], [7, 8, 9, 10], [11, 12]]
    for ids in prompts:
        ref = local.generate(ids, GREEDY, use_tqdm=False)
        out = remote.submit(ids, GREEDY, streaming=False).result(timeout=60)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    snaps = list(remote.submit(prompts[0], GREEDY, streaming=True))
    assert [len(s.outputs[0].token_ids) for s in snaps] == list(range(1, 9))
    assert snaps[-1].finished and remote.num_blocks_held() == 0


def test_bad_request_raises_at_submit_and_the_engine_goes_on(remote):
    with pytest.raises(ValueError, match="max_input_len"):
        remote.submit(list(range(3, 90)), GREEDY, streaming=False)
    assert remote.submit([3, 4], GREEDY, streaming=False).result(timeout=60).finished
    load = remote.load()
    assert load.num_running == 0 and load.kv_blocks_total > 0


def test_abort_and_async_consumers(remote):
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def run():
        r = remote.submit([5, 6, 7], long, streaming=True)
        got = 0
        async for _ in r:  # leaving the loop early abandons (aborts) the request
            got += 1
            if got == 3:
                break
        done = await remote.submit([5, 6], GREEDY, streaming=False).aresult()
        return r, done

    r, done = asyncio.run(run())
    assert done.finished and len(done.outputs[0].token_ids) == 8
    final = r.result(timeout=60)
    assert final.outputs[0].finish_reason in ("abort", "cancelled") and len(final.outputs[0].token_ids) < 100
    assert remote.num_blocks_held() == 0


def test_a_dead_engine_process_fails_pending_requests_and_health_turns_503(ckpt):
    client = ProcessEngineClient(tiny_llm, (ckpt,))
    with ServerThread(client, ServerConfig("tiny")) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        pending = client.submit([3, 4, 5], SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True),
                                streaming=True)
        pending.wait(60)  # its first token: running, far from finished
        os.kill(client.process.pid, signal.SIGKILL)
        with pytest.raises(EngineProcessError, match=r"engine process \(pid \d+\) exited"):
            pending.result(timeout=60)
        assert httpx.get(f"{server.url}/health").status_code == 503
        with pytest.raises(EngineProcessError):
            client.submit([3], GREEDY, streaming=False)
    client.shutdown()
    assert not client.process.is_alive()


def test_a_factory_that_fails_is_reported_by_name(ckpt, tmp_path):
    with pytest.raises((EngineProcessError, ValueError, FileNotFoundError), match="missing"):
        ProcessEngineClient(tiny_llm, (tmp_path / "missing",))
    with pytest.raises(ValueError, match="max_batch_size"):  # a bad configuration comes back as itself
        ProcessEngineClient(functools.partial(tiny_llm, max_batch_size=0), (ckpt,))


def test_snapshot_deltas_rebuild_every_snapshot_exactly(local):
    """The pipe carries deltas; the HTTP side rebuilds the very snapshots the engine published."""
    params = SamplingParams(max_tokens=7, temperature=0.8, seed=3, n=2, logprobs=2, ignore_eos=True)
    snaps = list(local.generate_async([3, 4, 5, 6], params, streaming=True))
    assert len(snaps) >= 7
    enc, prev, sizes = SnapshotEncoder(), None, []
    for snap in snaps:
        delta = enc.encode("k", snap)
        sizes.append(len(pickle.dumps(delta)))
        prev = SnapshotDecoder.decode(delta, prev)
        assert prev == snap
    assert sizes[-2] < len(pickle.dumps(snaps[-2])) / 2  # a delta, not the whole request again
    # a completion that does not extend the previous one (e.g. a beam overtaken) travels whole
    a = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "ab", [7, 8], text_diff="ab", token_ids_diff=[7, 8])])
    b = RequestOutput("r", None, [1, 2], [CompletionOutput(0, "xyz", [9, 8, 5], "length", text_diff="z",
                                                           token_ids_diff=[5])], finished=True)
    enc = SnapshotEncoder()
    first = SnapshotDecoder.decode(enc.encode("r", a), None)
    assert first == a and SnapshotDecoder.decode(enc.encode("r", b), first) == b
    with pytest.raises(ValueError, match="before the request's first snapshot"):
        SnapshotDecoder.decode((None,) + SnapshotEncoder().encode("r", a)[1:], None)  # its head lost
