"""Every stepwise object shows its state when it ends a notebook cell."""

from kit import BuildCache, BuildConfig, LLM, SamplingParams
from kit.quantization import QuantConfig, Quantizer


def test_every_stepwise_object_has_html(smollm2, tiny_checkpoints):
    with LLM(smollm2, device="cpu", build_config=BuildConfig(max_batch_size=2, max_seq_len=64, max_input_len=32,
                                                             max_num_tokens=64)) as llm:
        result = llm.generate_async("Hello", SamplingParams(max_tokens=2, temperature=0))
        out = result.result()
        objects = {"LoadedModel": smollm2, "Tokenizer": smollm2.tokenizer, "Network": llm.network,
                   "Engine": llm.engine, "Executor": llm.executor, "Scheduler": llm.executor.scheduler,
                   "KVCacheManager": llm.kv_cache_manager, "LLM": llm, "RequestOutput": out,
                   "GenerationResult": result, "SamplingParams": SamplingParams(temperature=0.5),
                   "BuildConfig": llm.build_config, "BuildCache": BuildCache()}
        for name, obj in objects.items():
            html = obj._repr_html_()
            assert isinstance(html, str) and len(html) > 20, name
    q = Quantizer(QuantConfig.from_name("int8_wo"))
    assert "QuantConfig" in q._repr_html_()
    from kit.loader import ModelLoader

    q.quantize(ModelLoader(tiny_checkpoints["llama"][0]).load(), progress=False)
    assert "relative weight error" in q._repr_html_()
