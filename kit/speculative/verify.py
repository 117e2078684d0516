"""Verifying drafted tokens against the target's logits, vectorised over a batch of requests.

A request that drafted `d` tokens x_1..x_d computed `d + 1` target rows in one forward:
row j is the target's distribution p_j of the token after x_1..x_j (row 0: after the
last accepted token). Padded to K = max d over the batch:

    greedy:  accept x_j while x_j == argmax p_{j-1}; then emit argmax of the first row not matched.
             The output is the one plain greedy decoding gives, token for token.
    random:  (Leviathan et al. 2023; Chen et al. 2023) accept x_j with probability
             min(1, p(x_j) / q(x_j)), q the distribution x_j was drawn from; at the first
             rejection draw from norm(max(0, p - q)); if all d are accepted, draw a bonus token
             from p_d. Every emitted token is then distributed exactly as the target's.
             A drafter that proposes deterministically (n-gram) has q = one-hot(x_j).

Both return `(num_accepted (B,), next_token (B,))`: a request emits x_1..x_a then next_token.
"""

from __future__ import annotations

import torch

__all__ = ["verify_greedy", "verify_rejection", "residual_distribution"]


def _check(draft: torch.Tensor, num_draft: torch.Tensor, rows: int) -> None:
    if draft.dim() != 2 or num_draft.shape != draft.shape[:1]:
        raise ValueError(f"draft must be (B, K) and num_draft (B,), got {tuple(draft.shape)} and "
                         f"{tuple(num_draft.shape)}")
    if rows != draft.shape[1] + 1:
        raise ValueError(f"the target needs K + 1 = {draft.shape[1] + 1} rows per request, got {rows}")
    if bool((num_draft < 0).any()) or bool((num_draft > draft.shape[1]).any()):
        raise ValueError(f"num_draft must be in [0, K={draft.shape[1]}], got {num_draft.tolist()}")


def _accepted_prefix(accept: torch.Tensor, num_draft: torch.Tensor) -> torch.Tensor:
    """(B, K) bool -> (B,) length of the leading run of accepted drafts, within each row's num_draft."""
    K = accept.shape[1]
    valid = torch.arange(K, device=accept.device)[None, :] < num_draft[:, None]  # (B, K)
    return (accept & valid).long().cumprod(dim=1).sum(dim=1)


def verify_greedy(target_argmax: torch.Tensor, draft: torch.Tensor,
                  num_draft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """target_argmax (B, K+1), draft (B, K), num_draft (B,) -> (num_accepted (B,), next_token (B,))."""
    _check(draft, num_draft, target_argmax.shape[1])
    num_accepted = _accepted_prefix(draft == target_argmax[:, :-1], num_draft)  # (B,)
    return num_accepted, target_argmax.gather(1, num_accepted[:, None]).squeeze(1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; where p <= q everywhere (only by rounding), p itself."""
    r = (p - q).clamp_min_(0.0)
    total = r.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


def verify_rejection(p: torch.Tensor, q: torch.Tensor | None, draft: torch.Tensor, num_draft: torch.Tensor,
                     uniform: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection-sampling rule, for a batch.

    p (B, K+1, V): the target's (warped) distributions; q (B, K, V): the drafter's, or None for
    a deterministic drafter (q = one-hot of the draft); draft (B, K); num_draft (B,);
    uniform (B, K) in [0, 1): one draw per drafted token; noise (B, V) ~ Exp(1): the final
    draw (residual or bonus) by the exponential race argmax(r / noise).
    """
    _check(draft, num_draft, p.shape[1])
    B, K = draft.shape
    V = p.shape[2]
    idx = draft[:, :, None]  # (B, K, 1)
    p_x = p[:, :K].gather(2, idx).squeeze(2)  # (B, K): p_{j-1}(x_j)
    q_x = torch.ones_like(p_x) if q is None else q.gather(2, idx).squeeze(2)  # (B, K)
    # NOTE: u < p/q written as u*q < p: no division, and q(x) > 0 for a drawn x anyway
    num_accepted = _accepted_prefix(uniform * q_x < p_x, num_draft)  # (B,)
    a = num_accepted[:, None, None].expand(B, 1, V)
    p_a = p.gather(1, a).squeeze(1)  # (B, V): the target row after the accepted drafts
    rejected = num_accepted < num_draft  # (B,): a draft was rejected (else: the bonus token)
    if K:
        a_q = num_accepted.clamp_max(K - 1)[:, None]  # (B, 1)
        if q is None:
            q_a = torch.nn.functional.one_hot(draft.gather(1, a_q).squeeze(1), V).to(p.dtype)  # (B, V)
        else:
            q_a = q.gather(1, a_q[:, :, None].expand(B, 1, V)).squeeze(1)  # (B, V)
        final = torch.where(rejected[:, None], residual_distribution(p_a, q_a), p_a)
    else:
        final = p_a
    next_token = (final / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)  # (B,)
    return num_accepted, next_token
