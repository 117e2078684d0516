"""LLM.generate end to end: greedy parity with transformers, finish reasons, bad input."""

import asyncio

import pytest
import torch

from kit.builder import BuildConfig
from kit.llm import LLM, SamplingParams


@pytest.fixture(scope="module")
def smol_llm(smollm2):
    with LLM(smollm2, device="cpu", build_config=BuildConfig(max_batch_size=8, max_seq_len=256,
                                                             max_input_len=128, max_num_tokens=256)) as llm:
        yield llm


def _hf_model(loaded):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in loaded.config.to_hf_config().items() if k != "architectures"}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    hf.load_state_dict(loaded.weights, strict=False)
    hf.tie_weights()
    return hf


def _hf_greedy(hf, ids, n, eos):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    out = out[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out  # TensorRT-LLM's outputs end before the end token


def test_smollm2_greedy_matches_transformers(smol_llm):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
               "1, 2, 3, 4,"]
    outs = smol_llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0))
    hf = _hf_model(smol_llm.loaded)
    for prompt, out in zip(prompts, outs):
        ids = smol_llm.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids and out.prompt == prompt and out.finished
        assert out.outputs[0].token_ids == _hf_greedy(hf, ids, 20, 2)
        assert out.text == smol_llm.tokenizer.decode(out.outputs[0].token_ids)
    assert "Paris" in outs[0].text


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "llama3_rope"])
def test_tiny_families_greedy_match_transformers(family, tiny_checkpoints):
    path, hf = tiny_checkpoints[family]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 17, 6)]
    with LLM(str(path), device="cpu", build_config=BuildConfig(max_batch_size=4, max_seq_len=64, max_input_len=32,
                                                               max_num_tokens=64, block_size=4)) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _hf_greedy(hf, p, 12, 2)


def test_finish_reasons(smol_llm):
    out = smol_llm.generate("Hello", SamplingParams(max_tokens=3, temperature=0))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    chat = smol_llm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}],
                                                 add_generation_prompt=True, tokenize=False)
    out = smol_llm.generate(chat, SamplingParams(max_tokens=100, temperature=0))
    o = out.outputs[0]
    assert o.finish_reason == "stop" and 2 not in o.token_ids and len(o.token_ids) < 99
    assert o.text and "<|im_end|>" not in o.text
    # ignore_eos runs to max_tokens
    o2 = smol_llm.generate(chat, SamplingParams(max_tokens=len(o.token_ids) + 3, temperature=0, ignore_eos=True)).outputs[0]
    assert o2.finish_reason == "length" and o2.token_ids[:len(o.token_ids)] == o.token_ids


def test_bad_input_is_refused_clearly(smol_llm):
    with pytest.raises(ValueError, match="max_input_len=128"):
        smol_llm.generate("word " * 300, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="exceeds max_seq_len=256"):
        smol_llm.generate("Hi", SamplingParams(max_tokens=256))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        smol_llm.generate([[1, 2, 10**6]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt 1"):
        smol_llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    # the engine still serves afterwards
    assert smol_llm.generate("Hi", SamplingParams(max_tokens=2, temperature=0)).finished


def test_streaming_pieces_join_to_the_final_text(smol_llm):
    sp = SamplingParams(max_tokens=30, temperature=0)
    final = smol_llm.generate("Write a haiku about the sea:", sp)
    pieces, last = [], None
    for snap in smol_llm.generate("Write a haiku about the sea:", sp, streaming=True):
        pieces.append(snap.outputs[0].text_diff)
        last = snap
    assert last.finished and "".join(pieces) == last.text == final.text
    assert len([p for p in pieces if p]) > 3


def test_async_equals_sync(smol_llm):
    sp = SamplingParams(max_tokens=10, temperature=0)
    prompts = ["Tea or coffee?", "The sky is"]
    sync = [o.text for o in smol_llm.generate(prompts, sp)]

    async def main():
        outs = await asyncio.gather(*(smol_llm.generate_async(p, sp) for p in prompts))
        streamed = ""
        async for snap in smol_llm.generate_async(prompts[1], sp, streaming=True):
            streamed += snap.outputs[0].text_diff
        return [o.text for o in outs], streamed

    texts, streamed = asyncio.run(main())
    assert texts == sync and streamed == sync[1]


def test_shutdown_stops_the_thread(smollm2):
    llm = LLM(smollm2, device="cpu", build_config=BuildConfig(max_batch_size=2, max_seq_len=64, max_input_len=32,
                                                              max_num_tokens=64))
    assert llm.executor.is_alive
    llm.shutdown()
    assert not llm.executor.is_alive
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("Hi", SamplingParams(max_tokens=2))
