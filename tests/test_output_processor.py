"""OutputProcessor: every stop decision in one place and order, streaming hold-back, n > 1 fan-out,
prompt logprobs, snapshots."""

import torch

from kit.output_processor import OutputProcessor
from kit.outputs import GenerationResult
from kit.request import GenerationRequest, RequestStatus
from kit.sampling_params import SamplingParams

EOS = 2


class _Detok:
    """Token t -> the letter chr(ord('a') + t - 10); the eos id renders as nothing."""

    def __init__(self):
        self.ids = []

    def add(self, t):
        self.ids.append(t)
        return "" if t == EOS else chr(ord("a") + t - 10)

    def flush(self):
        return ""


class _Tok:
    eos_token_id = EOS

    def detokenizer(self, skip_special_tokens=True):
        return _Detok()


def _proc(max_seq_len=64):
    return OutputProcessor(_Tok(), (EOS,), max_seq_len, torch.device("cpu"))


def _add(proc, sp, prompt=(3, 4, 5), rid="r", streaming=False):
    result = GenerationResult(rid)
    req = proc.add(GenerationRequest(list(prompt), sp, request_id=rid, streaming=streaming), result)
    state, comp = proc.owner(req.request_id)
    return state, comp, result


def _feed(proc, state, comp, tokens):
    verdicts = []
    for t in tokens:
        verdicts.append(proc.add_token(state, comp, t, -0.5, None))
        if verdicts[-1] is not None:
            break
    return verdicts


def test_stop_string_then_stop_id_then_eos_then_length():
    proc = _proc()
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10, stop=["cd"], stop_token_ids=[20]))
    assert _feed(proc, state, comp, [10, 11, 12, 13, 14]) == [None, None, None, RequestStatus.FINISHED_STOPPED]
    assert (comp.text, comp.finish_reason, comp.stop_reason) == ("ab", "stop", "cd")
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10, stop_token_ids=[20]), rid="s")
    assert _feed(proc, state, comp, [10, 20])[-1] is RequestStatus.FINISHED_STOPPED and comp.stop_reason == 20
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10), rid="e")
    assert _feed(proc, state, comp, [10, EOS])[-1] is RequestStatus.FINISHED_STOPPED and comp.stop_reason is None
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10, ignore_eos=True), rid="i")
    assert _feed(proc, state, comp, [EOS, EOS]) == [None, None]
    state, comp, _ = _add(proc, SamplingParams(max_tokens=3), rid="l")
    assert _feed(proc, state, comp, [10, 11, 12]) == [None, None, RequestStatus.FINISHED_LENGTH]
    assert comp.finish_reason == "length"


def test_max_seq_len_ends_with_length_and_min_tokens_defers_every_stop():
    proc = _proc(max_seq_len=6)
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10))  # 3 prompt tokens + 3 outputs = 6
    assert _feed(proc, state, comp, [10, 11, 12])[-1] is RequestStatus.FINISHED_LENGTH
    proc = _proc()
    state, comp, _ = _add(proc, SamplingParams(max_tokens=10, min_tokens=3, stop=["a"], stop_token_ids=[20]))
    # the stop string "a", the stop id and eos within the first 2 tokens do not stop; the 3rd token may
    # (vLLM's rule: the sampler masks stop ids and eos while fewer than min_tokens outputs exist)
    assert _feed(proc, state, comp, [10, EOS, 20]) == [None, None, RequestStatus.FINISHED_STOPPED]
    assert comp.token_ids == [10, EOS, 20] and comp.stop_reason == 20


def test_streaming_holds_back_a_possible_stop_string():
    proc = _proc()
    state, comp, result = _add(proc, SamplingParams(max_tokens=10, stop=["xyz"]), streaming=True)
    shown = []
    for t in [10, 11, 12, 13]:  # "abcd": nothing can be a stop yet beyond the last 2 characters
        proc.add_token(state, comp, t, -0.1, None)
        proc.publish(state)
        shown.append(result.latest.outputs[0].text)
    assert shown == ["", "", "a", "ab"]
    v = proc.add_token(state, comp, 10 + ord("x") - ord("a"), -0.1, None)
    proc.publish(state)
    assert v is None and result.latest.outputs[0].text == "abc"
    for t in (10 + ord("y") - ord("a"), 10 + ord("z") - ord("a")):
        v = proc.add_token(state, comp, t, -0.1, None)
    assert v is RequestStatus.FINISHED_STOPPED
    proc.publish(state)
    final = result.result(timeout=0)
    assert final.text == "abcd" and "".join(s.outputs[0].text_diff for s in result.snapshots()) == "abcd"
    assert "r" not in proc.states  # forgotten once final


def test_n_siblings_sample_the_same_row_and_become_children():
    proc = _proc()
    state, comp, _ = _add(proc, SamplingParams(max_tokens=3, n=3, seed=5, temperature=1.0))
    rows = proc.sampling_rows("r")
    assert [c.index for c in rows] == [0, 1, 2] and [c.request_id for c in rows] == ["r", "r#1", "r#2"]
    assert proc.sampling_rows("r") == [comp]  # only once
    proc.add_token(state, rows[0], 10, -0.1, None)
    proc.add_token(state, rows[1], 11, -0.1, None)
    proc.add_token(state, rows[2], EOS, -0.1, None)  # ends at its first token: never scheduled
    kids = proc.children(state)
    assert [(c.index, r.request_id, r.output_token_ids) for c, r in kids] == [(1, "r#1", [11])]
    assert proc.children(state) == [] and rows[2].finish_reason == "stop"
    assert not state.finished


def test_prompt_logprobs_gather_over_chunks_and_restart():
    proc = _proc()
    prompt = [3, 4, 5, 6, 7]
    _add(proc, SamplingParams(max_tokens=2, prompt_logprobs=1), prompt=prompt)
    logits = torch.randn(4, 30)
    assert proc.wants_prompt_logits("r", 0)
    proc.add_prompt_logits("r", logits[:2])
    assert proc.wants_prompt_logits("r", 0)  # restarted (a preemption): the rows gathered so far are dropped
    proc.add_prompt_logits("r", logits[:3])
    assert proc.wants_prompt_logits("r", 3)
    proc.add_prompt_logits("r", logits[3:])
    state, _ = proc.owner("r")
    lp = torch.log_softmax(logits, -1)
    assert state.prompt_logprobs[0] is None and len(state.prompt_logprobs) == 5
    assert all(abs(state.prompt_logprobs[j][prompt[j]] - lp[j - 1, prompt[j]].item()) < 1e-6 for j in range(1, 5))
    assert not proc.wants_prompt_logits("r", 5)


def test_fail_and_abort_end_the_result():
    proc = _proc()
    state, _, result = _add(proc, SamplingParams(max_tokens=4, n=2, temperature=1.0))
    proc.end("r", RequestStatus.FINISHED_ABORTED)
    proc.publish(state, final=True)  # the sibling was never born: final anyway
    out = result.result(timeout=0)
    assert out.finished and out.outputs[0].finish_reason == "cancelled" and len(out.outputs) == 1
    state, _, result = _add(proc, SamplingParams(max_tokens=4), rid="f")
    proc.fail(state, RuntimeError("boom"))
    assert result.done and isinstance(result.error, RuntimeError) and "f" not in proc.states


def test_repr_lists_requests_in_flight():
    proc = _proc()
    _add(proc, SamplingParams(max_tokens=4, n=2, temperature=1.0), rid="req-7")
    assert "1 requests in flight" in repr(proc) and "<td>req-7</td><td>1/2</td>" in proc._repr_html_()
