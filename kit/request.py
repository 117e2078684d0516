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
`num_cached_tokens`; the executor's output processor keeps its own sampling state.

`GenerationRequest` is what a caller submits (prompt ids + `SamplingParams`); it checks
the types of what it is given, so nothing malformed reaches the loop.
`length_finished` is the length rule, shared by the output processor (which decides
every stop) and the scheduler (which guards its KV reservations with it).
"""

from __future__ import annotations

import enum
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kit.sampling_params import SamplingParams

__all__ = ["GenerationRequest", "Request", "RequestStatus", "length_finished", "prompt_token_ids_of", "beam_tokens", "beam_extra_blocks"]


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
        """TensorRT-LLM's reason: 'stop', 'length', 'cancelled', 'error', or None while unfinished."""
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "cancelled",
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
    # NOTE: a request that needs the logits of every prompt position (prompt_logprobs) must
    # compute its whole prompt, so it opts out of prefix-cache hits (as vLLM does)
    use_prefix_cache: bool = True
    beam_width: int = 1  # beams decoded together (kit/beam_search.py): the scheduler budgets tokens and blocks for all

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """`all_token_ids[start:stop]` (0 <= start <= stop), without building the whole list."""
        # NOTE: the scheduler asks for every step's tokens; a decode step wants only the newest one
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

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


def length_finished(num_output_tokens: int, max_tokens: int, num_tokens: int, max_seq_len: int | None) -> bool:
    """The length rule: `max_tokens` outputs, or `max_seq_len` tokens in all."""
    return num_output_tokens >= max_tokens or (max_seq_len is not None and num_tokens >= max_seq_len)


def prompt_token_ids_of(prompt: Any, field_name: str = "prompt") -> list[int]:
    """Token ids of a prompt given as ids: a list/tuple of ints or a 1-D numpy integer array.

    bool, float, str, bytes and numpy floats are refused (TypeError naming the field);
    nothing is converted silently. Ranges (vocabulary, lengths) are checked by the executor.
    """
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise TypeError(f"{field_name} must be a str or a sequence of int token ids, got {type(prompt).__name__} "
                        "(decode it to str first)")
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise TypeError(f"{field_name} must be a 1-D integer numpy array of token ids, got an array of "
                            f"shape {prompt.shape} and dtype {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"{field_name} must be a str, a list of int token ids or a 1-D integer numpy array, "
                        f"got {type(prompt).__name__}")
    # NOTE: the common case, plain ints (`type(t) is int` excludes bool), without an isinstance against the
    # numbers.Integral ABC per token: ~10x faster, and a client thread submitting many requests holds the
    # GIL that the executor loop needs for that much less
    if all(type(t) is int for t in prompt):
        return list(prompt)
    ids = []
    for i, t in enumerate(prompt):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{field_name}[{i}] must be an int token id, got {t!r} ({type(t).__name__})")
        ids.append(int(t))
    return ids


@dataclass
class GenerationRequest:
    """One submitted prompt: token ids, how to sample them, and whether to stream snapshots."""

    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = None
    request_id: str | None = None
    streaming: bool = False

    def __post_init__(self) -> None:
        self.prompt_token_ids = prompt_token_ids_of(self.prompt_token_ids, "prompt_token_ids")
        if not isinstance(self.sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}"
                            " (build one: SamplingParams(max_tokens=...))")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str or None, got {type(self.prompt).__name__}")
        if self.request_id is not None and (not isinstance(self.request_id, str) or "#" in self.request_id):
            raise ValueError(f"request_id must be None or a str without '#' ('#' is reserved for the ids of "
                             f"n > 1 completions), got {self.request_id!r}")
        if not isinstance(self.streaming, bool):
            raise TypeError(f"streaming must be a bool, got {self.streaming!r}")


# beam search's budgets (kit/beam_search.py runs the search; the scheduler counts with these)
def beam_tokens(request: Request, num_tokens: int) -> int:
    """Tokens a step of `num_tokens` for `request` computes: every beam its own, once the beams exist."""
    return num_tokens * request.beam_width if request.beam_width > 1 and request.num_output_tokens else num_tokens


def beam_extra_blocks(request: Request, block_size: int, max_kv_tokens: int) -> int:
    """KV blocks the beams other than the leader may hold at most: their own blocks past the prompt's
    shared full blocks, plus one each for the partial block copied while re-mapping."""
    if request.beam_width <= 1:
        return 0
    shared = request.num_prompt_tokens // block_size * block_size
    return (request.beam_width - 1) * (-(-(max_kv_tokens - shared) // block_size) + 1)
