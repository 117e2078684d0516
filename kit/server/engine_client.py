"""The server's one point of contact with the engine: an `EngineClient` around `kit.LLM`.

Everything the HTTP layer needs from the kit goes through here (tokenize, apply the chat
template, submit, stream, abort, read the load and the KV cache), so that the server
depends on the public `LLM` API in one small place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kit.executor import GenerationResult
from kit.llm import LLM
from kit.sampling_params import SamplingParams

__all__ = ["EngineClient", "EngineLimits", "EngineLoad"]


@dataclass(frozen=True)
class EngineLimits:
    """What a request may ask for: prompt and sequence lengths, batch size, vocabulary."""

    max_input_len: int
    max_seq_len: int
    max_batch_size: int
    vocab_size: int


@dataclass(frozen=True)
class EngineLoad:
    """A reading of the engine's load, for /metrics and the queue limit."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_usage: float  # fraction of blocks owned by a request, 0..1
    prefix_cache_hit_rate: float  # hit / queried prompt tokens, 0..1


class EngineClient:
    """Submits token-id prompts to an `LLM` and streams their snapshots back to asyncio."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        bc = llm.build_config
        self.limits = EngineLimits(bc.max_input_len, bc.max_seq_len, bc.max_batch_size,
                                   int(llm.engine.config.vocab_size))

    @property
    def tokenizer(self) -> Any:
        return self.llm.tokenizer

    @property
    def alive(self) -> bool:
        """False once the engine can serve no more (its loop has stopped)."""
        return self.llm.executor.is_alive

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        return self.tokenizer.encode(text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of `messages` in the tokenizer's chat template, ready for the assistant's turn."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def decode_token(self, token_id: int) -> str:
        """One token's text as the logprobs fields show it (special tokens kept)."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, streaming: bool) -> GenerationResult:
        """Queue one request; ValueError for a prompt or parameters the engine cannot take."""
        return self.llm.generate_async(list(prompt_token_ids), params, streaming=streaming)

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)

    def load(self) -> EngineLoad:
        stats = self.llm.kv_cache_inspector.stats()
        scheduler = getattr(self.llm.executor, "scheduler", None)
        return EngineLoad(
            num_running=int(getattr(scheduler, "num_running", 0)),
            num_waiting=int(getattr(scheduler, "num_waiting", 0)),
            kv_blocks_used=int(stats["used"]), kv_blocks_total=int(stats["num_blocks"]),
            kv_usage=float(stats["usage_pct"]) / 100.0, prefix_cache_hit_rate=float(stats["hit_rate"]))

    def num_blocks_held(self) -> int:
        """KV blocks owned by requests right now (cached prefix blocks are free)."""
        return int(self.llm.kv_cache_inspector.stats()["used"])

    def shutdown(self) -> None:
        self.llm.shutdown()
