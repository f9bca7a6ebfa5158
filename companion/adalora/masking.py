"""From element scores to kept triplets: the triplet score (Eq. 9) and one global threshold (Eq. 8).

For triplet ``i`` of matrix ``k`` (``P[:, i]``, ``lambda_i``, ``Q[i, :]``) the paper scores

    S_{k,i} = s(lambda_{k,i}) + 1/d1 * sum_j s(P_{k,ji}) + 1/d2 * sum_j s(Q_{k,ij})        (Eq. 9)

a *sum*, in which the means keep long vectors from outweighing short ones. Then it keeps the
``b(t)`` triplets with the highest scores over *all* matrices together and sets the other
``lambda`` to zero (Eq. 8): a matrix can end with any rank from 0 to ``init_r``.

:func:`allocate_budget` reproduces PEFT's ``RankAllocator.mask_to_budget`` exactly: the
threshold is the ``k``-th smallest triplet score with ``k = n_triplets - budget``
(``torch.kthvalue``), and a triplet is masked when its score is ``<=`` that threshold. With
ties at the threshold, more than ``k`` triplets are masked, so fewer than ``budget`` survive;
we keep that behaviour so that the two implementations agree.
"""

from __future__ import annotations

import torch


def triplet_score(score_P: torch.Tensor, score_Lambda: torch.Tensor, score_Q: torch.Tensor) -> torch.Tensor:
    """Eq. 9 for every triplet of one matrix: (d_out, r), (r,) or (r, 1), (r, d_in) -> (r,).

    The sum is evaluated as ``s(lambda) + (mean_Q + mean_P)``, the order of PEFT's
    ``_combine_ipt``, so the result is bit-identical to PEFT's.
    """
    if score_P.dim() != 2 or score_Q.dim() != 2:
        raise ValueError(f"score_P must be (d_out, r) and score_Q (r, d_in); got shapes {tuple(score_P.shape)} "
                         f"and {tuple(score_Q.shape)}")
    r = score_Q.shape[0]
    if score_P.shape[1] != r or score_Lambda.numel() != r:
        raise ValueError(f"the three scores disagree on the rank: P has {score_P.shape[1]} columns, "
                         f"Lambda {score_Lambda.numel()} entries, Q {r} rows")
    mean_Q = torch.mean(score_Q, dim=1)  # (r, d_in) -> (r,): 1/d2 sum_j s(Q_ij)
    mean_P = torch.mean(score_P, dim=0)  # (d_out, r) -> (r,): 1/d1 sum_j s(P_ji)
    return score_Lambda.view(-1) + (mean_Q + mean_P)


def mask_threshold(scores: dict[str, torch.Tensor], budget: int) -> float:
    """The ``(n - budget)``-th smallest triplet score over all matrices (PEFT ``kthvalue``)."""
    if not scores:
        raise ValueError("no triplet scores given; pass {layer name: (r,) scores}")
    total = sum(s.numel() for s in scores.values())
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(f"budget must be an int (a number of triplets), got {type(budget).__name__}")
    if not 0 < budget < total:
        raise ValueError(f"budget must keep between 1 and {total - 1} of the {total} triplets, got {budget}; "
                         "a budget equal to the number of triplets would mask nothing (PEFT's kthvalue "
                         "fails with k = 0 there)")
    all_scores = torch.cat([s.reshape(-1) for s in scores.values()])
    return torch.kthvalue(all_scores, k=total - budget)[0].item()


def mask_to_budget(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """``{name: bool mask (r,)}``, True = kept, from precomputed triplet scores (Eq. 8)."""
    threshold = mask_threshold(scores, budget)
    return {name: ~(s.reshape(-1) <= threshold) for name, s in scores.items()}


def allocate_budget(layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    budget: int) -> dict[str, torch.Tensor]:
    """``{name: bool mask of length r}`` keeping the ``budget`` best triplets over all layers.

    ``layers`` maps a layer name to its element scores ``(score_P (d_out, r), score_Lambda
    (r,) or (r, 1), score_Q (r, d_in))``. True = kept. Equal to PEFT's ``mask_to_budget``,
    ties included (see the module docstring).
    """
    return mask_to_budget({name: triplet_score(*parts) for name, parts in layers.items()}, budget)
