"""The scheduler's value types: its config (step budgets, policy) and what one step hands the executor.

`SchedulerConfig` is built once from a `BuildConfig` (`SchedulerConfig.from_build_config`);
`SchedulerOutput` holds the `ScheduledSequence`s of one step (vLLM v1 keeps these in
`sched/output.py` beside its scheduler).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["PLACEHOLDER_TOKEN", "ScheduledSequence", "SchedulerConfig", "SchedulerOutput", "SchedulerPolicy"]

# NOTE: overlapped scheduling appends this in place of a token still being sampled on the device
# (`Scheduler.advance`); `Scheduler.commit` writes the real id over it one step later. Never a vocabulary id.
PLACEHOLDER_TOKEN = -1


class SchedulerPolicy(enum.Enum):
    GUARANTEED_NO_EVICT = "guaranteed_no_evict"
    MAX_UTILIZATION = "max_utilization"


@dataclass(frozen=True)
class SchedulerConfig:
    """Budgets of one step. `policy` also accepts its value as a string ('max_utilization')."""

    max_batch_size: int = 16  # sequences per step
    max_num_tokens: int = 1024  # tokens per step, all sequences together
    enable_chunked_prefill: bool = True
    policy: SchedulerPolicy = SchedulerPolicy.GUARANTEED_NO_EVICT
    max_seq_len: int | None = None  # prompt + output tokens of one sequence; None: only max_tokens limits it
    max_bypass_steps: int = 16  # MAX_UTILIZATION: steps a blocked waiting head may be passed (0: strict FCFS)

    def __post_init__(self) -> None:
        def positive(name: str, value: object, minimum: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SchedulerConfig.{name} must be an integer >= {minimum}, got {value!r}")

        positive("max_batch_size", self.max_batch_size)
        positive("max_num_tokens", self.max_num_tokens)
        positive("max_bypass_steps", self.max_bypass_steps, 0)
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError(f"SchedulerConfig.max_num_tokens ({self.max_num_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}): every running sequence needs a token per step")
        if self.max_seq_len is not None:
            positive("max_seq_len", self.max_seq_len, 2)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"SchedulerConfig.enable_chunked_prefill must be a bool, got "
                             f"{self.enable_chunked_prefill!r}")
        try:
            object.__setattr__(self, "policy", SchedulerPolicy(self.policy))
        except ValueError:
            raise ValueError(f"SchedulerConfig.policy must be one of {[p.value for p in SchedulerPolicy]}, "
                             f"got {self.policy!r}") from None


    @classmethod
    def from_build_config(cls, build_config: Any, *, enable_chunked_prefill: bool = True,
                          policy: SchedulerPolicy | str = SchedulerPolicy.GUARANTEED_NO_EVICT) -> SchedulerConfig:
        """The step budgets of an engine built with `build_config` (a `BuildConfig`)."""
        return cls(max_batch_size=build_config.max_batch_size, max_num_tokens=build_config.max_num_tokens,
                   enable_chunked_prefill=enable_chunked_prefill, policy=policy,
                   max_seq_len=build_config.max_seq_len)


class ScheduledSequence(NamedTuple):
    """One request's share of a step (immutable).

    NOTE: a NamedTuple, not a frozen dataclass: one is built per running request per step,
    and a frozen dataclass's `__init__` (a `object.__setattr__` per field) costs ~3x as much.
    """

    request_id: str
    token_ids: tuple[int, ...]  # the tokens to compute this step (positions num_computed_tokens, ...)
    num_computed_tokens: int  # tokens already in the cache before this step
    block_table: tuple[int, ...]  # covers num_computed_tokens + len(token_ids) slots
    is_last_chunk: bool  # computes the last known token: sample from the logits of its last row
    num_draft_tokens: int = 0  # speculative drafts at the end of token_ids (verified, not sampled from)

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)

    @classmethod
    def decode(cls, request_id: str, token_id: int, num_computed_tokens: int,
               block_table: tuple[int, ...]) -> "ScheduledSequence":
        """A decode step's sequence: its newest token, the last chunk, no drafts.

        NOTE: through `tuple.__new__`, past the NamedTuple's generated `__new__`: half the cost, once per
        running request per step."""
        return tuple.__new__(cls, (request_id, (token_id,), num_computed_tokens, block_table, True, 0))


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the executor needs to run one step.

    `preempted_request_ids` is informational (the scheduler recomputes them itself);
    `rejected` lists (request_id, reason) of requests that ended with FINISHED_ERROR
    and must be reported to their callers, even when nothing is scheduled.
    """

    scheduled: tuple[ScheduledSequence, ...] = ()
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted_request_ids: tuple[str, ...] = ()
    rejected: tuple[tuple[str, str], ...] = ()
    num_waiting: int = 0
    kv_blocks_used: int = 0
    step: int = 0

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens

    @property
    def batch_size(self) -> int:
        return len(self.scheduled)
