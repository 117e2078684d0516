"""Speculative decoding: a drafter proposes k tokens, the target verifies them in one forward.

| module | what |
| --- | --- |
| `configs.py` | `DraftTargetDecodingConfig`, `NGramDecodingConfig` (TensorRT-LLM's names) |
| `ngram.py` | `NGramDrafter`: prompt lookup over the prompt and the generated text |
| `draft_target.py` | `DraftModelDrafter`: a smaller engine with its own paged KV cache |
| `verify.py` | greedy verification and the rejection-sampling rule, vectorised |
| `speculator.py` | `Speculator`: propose before the target forward, verify after it |
| `stats.py` | `SpeculativeStats` per request, the token-by-token acceptance frame |

    llm = LLM("smollm2-135m", speculative_config=NGramDecodingConfig(max_draft_len=4))
    out = llm.generate(prompt, SamplingParams(max_tokens=64, temperature=0))
    out.outputs[0].spec_stats.acceptance_rate
"""

from kit.speculative.configs import DecodingBaseConfig, DraftTargetDecodingConfig, NGramDecodingConfig
from kit.speculative.draft_target import DraftModelDrafter
from kit.speculative.ngram import NGramDrafter
from kit.speculative.speculator import Speculator, speculates
from kit.speculative.stats import ACCEPTANCE_COLUMNS, SpeculativeStats, VerifyRecord, acceptance_frame
from kit.speculative.verify import residual_distribution, verify_greedy, verify_rejection

__all__ = ["DecodingBaseConfig", "DraftTargetDecodingConfig", "NGramDecodingConfig", "DraftModelDrafter",
           "NGramDrafter", "Speculator", "speculates", "SpeculativeStats", "VerifyRecord", "acceptance_frame",
           "ACCEPTANCE_COLUMNS", "residual_distribution", "verify_greedy", "verify_rejection"]
