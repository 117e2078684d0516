"""A generation request as the scheduler and the KV-cache manager see it.

A `Request` is a growing list of token ids (the prompt, then the tokens sampled so
far) plus one number that says how far the model has got: `num_computed_tokens`, the
tokens whose keys and values are already in the KV cache. Everything the serving side
does is phrased in these two quantities, so prefill and decode are the same thing:

    tokens:    p0 p1 p2 p3 p4 | o0 o1
    computed:  p0 p1 p2 p3 p4   o0          num_computed_tokens = 6, num_tokens = 7
    to compute this step:             o1    (a decode step: one token)

A step computes the tokens `all_token_ids[num_computed_tokens : num_computed_tokens + n]`;
when it reaches the last known token, the logits of that position are sampled and the
new token is appended to `output_token_ids`. The newest sampled token is therefore
never computed until the next step, and `num_computed_tokens <= num_tokens - 1` for a
request that is waiting for its next token.

The scheduler owns `status`, `num_computed_tokens`, `num_preemptions` and
`num_cached_tokens`; the executor owns `payload` (sampling state) and reads
`output_token_ids`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Request", "RequestStatus"]


class RequestStatus(enum.Enum):
    """Life cycle: WAITING -> RUNNING (<-> PREEMPTED -> RUNNING) -> FINISHED_*."""

    WAITING = "waiting"  # queued, never admitted
    RUNNING = "running"  # admitted: holds KV blocks and is scheduled every step it can be
    PREEMPTED = "preempted"  # evicted by MAX_UTILIZATION, queued again, will be recomputed
    FINISHED_STOPPED = "finished_stopped"  # stop token / stop string (decided by the executor)
    FINISHED_LENGTH = "finished_length"  # max_tokens or max_seq_len reached
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the caller
    FINISHED_ERROR = "finished_error"  # rejected (e.g. can never fit the KV cache) or failed

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED_")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI-style reason: 'stop', 'length', 'abort', 'error', or None while unfinished."""
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass(eq=False)
class Request:
    """One sequence to generate. Identity is the object (eq=False); ids must be unique.

    `max_tokens` is the budget of generated tokens: the request finishes with
    FINISHED_LENGTH once it has that many outputs, and GUARANTEED_NO_EVICT reserves KV
    blocks for `prompt + max_tokens - 1` tokens (the last sampled token is never fed back).
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # tokens served by the prefix cache (or a fork) at first admission
    payload: Any = None  # opaque to the scheduler; the executor keeps its sampling state here
    # NOTE: a request that needs the logits of every prompt position (prompt_logprobs) must
    # compute its whole prompt, so it opts out of prefix-cache hits (as vLLM does)
    use_prefix_cache: bool = True

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        """Known tokens whose K/V are not in the cache yet (1 for a decode step)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while the request still computes tokens other than the one it sampled last.

        Precisely: it has sampled nothing yet (`num_output_tokens == 0`: the prompt is
        being computed, possibly one chunk at a time, possibly after a prefix-cache hit),
        or more than one known token is uncomputed (`num_tokens - num_computed_tokens > 1`:
        a preempted request recomputing prompt + outputs, or a forked child recomputing
        its tail). Otherwise it is decoding: exactly the newest sampled token is left.
        """
        return self.num_output_tokens == 0 or self.num_tokens_to_compute > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}/{self.max_tokens}, computed={self.num_computed_tokens})"
        )
