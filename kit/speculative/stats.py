"""Speculative-decoding statistics: per request (`SpeculativeStats`) and token by token (a DataFrame).

    drafted        tokens the drafter proposed and the target verified
    accepted       of those, tokens the target accepted
    acceptance     accepted / drafted
    tokens per target forward   generated tokens / target forwards that produced them
                   (plain decoding: 1.0; with k drafts at most k + 1)

`acceptance_frame(records)` lays out every verification, one row per token, with the
columns the acceptance widget (widgets/speculative.py) reads:

    request_id  step  position  token_id  text  kind  accepted
    kind: 'accepted' (a draft the target kept), 'rejected' (a draft it refused, and every draft
    after it), 'target' (the token the target itself produced: the correction or the bonus)

Only verifications are recorded: a step in which a request had no draft (no n-gram match,
no budget) decodes plainly, and its token is not in the frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import pandas as pd

__all__ = ["SpeculativeStats", "VerifyRecord", "acceptance_frame", "ACCEPTANCE_COLUMNS"]

ACCEPTANCE_COLUMNS = ("request_id", "step", "position", "token_id", "text", "kind", "accepted")


@dataclass(frozen=True)
class SpeculativeStats:
    """What speculation did for one completion (or, summed with +, for several)."""

    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_target_forwards: int = 0
    num_generated_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.num_generated_tokens / self.num_target_forwards if self.num_target_forwards else 0.0

    def __add__(self, other: "SpeculativeStats") -> "SpeculativeStats":
        return SpeculativeStats(self.num_draft_tokens + other.num_draft_tokens,
                                self.num_accepted_draft_tokens + other.num_accepted_draft_tokens,
                                self.num_target_forwards + other.num_target_forwards,
                                self.num_generated_tokens + other.num_generated_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"num_draft_tokens": self.num_draft_tokens, "num_accepted_draft_tokens": self.num_accepted_draft_tokens,
                "acceptance_rate": self.acceptance_rate, "num_target_forwards": self.num_target_forwards,
                "num_generated_tokens": self.num_generated_tokens, "tokens_per_forward": self.tokens_per_forward}


class VerifyRecord(NamedTuple):
    """One verification of one request: where its drafts started, the drafts, how many were kept."""

    request_id: str
    step: int  # the executor iteration
    position: int  # output index of the first draft
    draft_token_ids: tuple[int, ...]
    num_accepted: int
    target_token_id: int  # the correction (a draft was rejected) or the bonus (all accepted)


def acceptance_frame(records: Iterable[VerifyRecord], tokenizer: Any = None) -> pd.DataFrame:
    """One row per drafted or target-produced token (see the module docstring for the columns)."""
    rows = []
    for r in records:
        for j, t in enumerate(r.draft_token_ids):
            ok = j < r.num_accepted
            rows.append((r.request_id, r.step, r.position + j, t, ok and "accepted" or "rejected", ok))
        rows.append((r.request_id, r.step, r.position + r.num_accepted, r.target_token_id, "target", True))
    df = pd.DataFrame(rows, columns=["request_id", "step", "position", "token_id", "kind", "accepted"])
    df.insert(4, "text", [tokenizer.decode([t]) if tokenizer is not None else str(t) for t in df["token_id"]])
    return df[list(ACCEPTANCE_COLUMNS)]
