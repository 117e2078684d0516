"""Speculative decoding on SmolLM2, CPU: how often drafts are accepted, and tokens per target forward.

Three measurements, each against plain greedy decoding of the same prompts in the same run
(the outputs must be token-identical; the script stops if they are not):

- n-gram prompt lookup on a repetitive task (editing code given in the prompt: the answer
  copies most of it) and on free text (short open prompts);
- SmolLM2 quantized to int4 (weight-only, RTN) drafting for SmolLM2 in float: the real
  acceptance rate of a quantized draft. (SmolLM2's published weights are already 4-bit
  Q4_1, dequantized to float by the kit: the draft is re-quantized to int4 groups of its own.)

    python bench/spec_acceptance.py --out bench/results/spec_acceptance_cpu.json [--smoke]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from kit.builder import BuildConfig
from kit.llm import LLM
from kit.sampling_params import SamplingParams
from kit.speculative import DraftTargetDecodingConfig, NGramDecodingConfig

CODE = [
    ("def area(width, height):\n    result = width * height\n    return result\n",
     "Rename `result` to `value`"),
    ("def greet(name):\n    message = 'Hello, ' + name\n    print(message)\n    return message\n",
     "Rename `message` to `text`"),
    ("class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n"
     "        self.count += 1\n        return self.count\n", "Rename `count` to `total`"),
    ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
     "Rename `values` to `numbers`"),
    ("def is_even(n):\n    if n % 2 == 0:\n        return True\n    return False\n", "Rename `n` to `number`"),
    ("def largest(items):\n    best = items[0]\n    for item in items:\n        if item > best:\n"
     "            best = item\n    return best\n", "Rename `best` to `top`"),
    ("def fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n\n\ndef celsius(fahrenheit):\n"
     "    return (fahrenheit - 32) * 5 / 9\n", "Add a docstring to each function"),
    ("def count_words(text):\n    words = text.split()\n    return len(words)\n", "Rename `words` to `tokens`"),
]
FREE = ["The history of the printing press", "Why the sky is blue", "A short story about a lighthouse keeper",
        "The benefits of walking every day", "How bees make honey", "What makes a good friend",
        "The first day at a new school", "Describe a thunderstorm at sea"]


def code_prompt(code: str, task: str) -> str:
    return f"Here is some Python code:\n\n```python\n{code}```\n\n{task}. Write the whole code again:\n\n```python\n"


def run(llm_kwargs: dict, prompts: list[str], sp: SamplingParams, bc: BuildConfig) -> tuple[list, float, dict]:
    with LLM("smollm2-135m", device="cpu", build_config=bc, **llm_kwargs) as llm:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        stats = llm.executor.stats()
    return outs, seconds, {"target_forwards": len(stats)}


def measure(name: str, cfg, prompts: list[str], sp: SamplingParams, bc: BuildConfig) -> dict:
    plain, t_plain, _ = run({}, prompts, sp, bc)
    spec, t_spec, _ = run({"speculative_config": cfg}, prompts, sp, bc)
    identical = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(plain, spec))
    if not identical:
        raise SystemExit(f"{name}: speculative output differs from plain decoding")
    total = sum((o.spec_stats for o in spec[1:]), spec[0].spec_stats)
    row = {"name": name, "config": type(cfg).__name__, "max_draft_len": cfg.max_draft_len,
           "num_prompts": len(prompts), "max_tokens": sp.max_tokens, "token_identical": identical,
           **total.to_dict(), "seconds_plain": round(t_plain, 2), "seconds_speculative": round(t_spec, 2)}
    print(f"{name:28s} drafted {total.num_draft_tokens:5d}  accepted {total.num_accepted_draft_tokens:5d}  "
          f"acceptance {total.acceptance_rate:6.1%}  tokens/target forward {total.tokens_per_forward:.2f}  "
          f"(plain {t_plain:.1f} s, speculative {t_spec:.1f} s)", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="2 prompts each, few tokens")
    p.add_argument("--max-draft-len", type=int, default=4)
    args = p.parse_args()
    n, tokens = (2, 12) if args.smoke else (8, 64)
    bc = BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=384, max_num_tokens=2048)
    sp = SamplingParams(max_tokens=tokens, temperature=0.0)
    k = args.max_draft_len
    ngram = NGramDecodingConfig(max_draft_len=k, max_matching_ngram_size=3)
    out = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "model": "smollm2-135m (float32; draft int4_wo)", "greedy": True, "runs": []}
    out["runs"].append(measure("ngram, code editing", ngram, [code_prompt(c, t) for c, t in CODE[:n]], sp, bc))
    out["runs"].append(measure("ngram, free text", ngram, FREE[:n], sp, bc))
    draft = DraftTargetDecodingConfig(max_draft_len=k, speculative_model_dir="smollm2-135m",
                                      speculative_model_quantization="int4_wo")
    sp_draft = SamplingParams(max_tokens=tokens // 2, temperature=0.0)
    out["runs"].append(measure("int4 draft, free text", draft, FREE[:n], sp_draft, bc))
    out["runs"].append(measure("int4 draft, code editing", draft, [code_prompt(c, t) for c, t in CODE[:n]],
                               sp_draft, bc))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
