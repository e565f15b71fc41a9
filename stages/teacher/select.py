"""Turn a teacher's top k+1 per position into the k largest NON-target entries (docs/design.md §3).

    from stages.teacher.select import select_nontarget_topk
    ids, logprobs = select_nontarget_topk(top_ids, top_logprobs, targets, k)

Both engines compute the teacher's top k+1 and call this: if the target is among them it is
dropped, otherwise the (k+1)-th is, so exactly k non-target entries remain, in descending order.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["select_nontarget_topk", "select_nontarget_topk_torch"]


def select_nontarget_topk(
    top_ids: np.ndarray, top_logprobs: np.ndarray, targets: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k largest non-target entries per position.

    Args:
        top_ids: [P, k+1] int, the teacher's top k+1 ids per position, descending log-prob.
        top_logprobs: [P, k+1] float, their log-probs, same order.
        targets: [P] int, the ground-truth next token per position.
        k: entries to keep.

    Returns:
        (ids [P, k] int32, logprobs [P, k] float32), descending, never containing the target.
    """
    top_ids, top_logprobs = np.asarray(top_ids), np.asarray(top_logprobs)
    targets = np.asarray(targets).reshape(-1)
    P = targets.shape[0]
    if top_ids.shape != (P, k + 1) or top_logprobs.shape != (P, k + 1):
        raise ValueError(
            f"expected top_ids and top_logprobs of shape {(P, k + 1)} (positions, k+1), "
            f"got {top_ids.shape} and {top_logprobs.shape}"
        )
    is_target = top_ids == targets[:, None]
    # Drop the first column holding the target; rows without it drop column k (the (k+1)-th).
    has_target = is_target.any(axis=1)
    drop_col = np.where(has_target, is_target.argmax(axis=1), k)
    keep = np.ones((P, k + 1), dtype=bool)
    keep[np.arange(P), drop_col] = False
    # Boolean indexing walks rows in order, so each row's k survivors stay in descending order.
    ids = top_ids[keep].reshape(P, k).astype(np.int32, copy=False)
    logprobs = top_logprobs[keep].reshape(P, k).astype(np.float32, copy=False)
    return ids, logprobs


def select_nontarget_topk_torch(
    top_ids: torch.Tensor, top_logprobs: torch.Tensor, targets: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_nontarget_topk` on (device) tensors: the hf engine selects before the host copy,
    so only k columns cross to the host. Same arguments; returns (ids int32, logprobs float32)."""
    P = targets.shape[0]
    if top_ids.shape != (P, k + 1) or top_logprobs.shape != (P, k + 1):
        raise ValueError(f"expected top_ids and top_logprobs of shape {(P, k + 1)} (positions, k+1), "
                         f"got {tuple(top_ids.shape)} and {tuple(top_logprobs.shape)}")
    is_target = top_ids == targets.reshape(-1, 1)
    # Column to drop: the first holding the target, else the (k+1)-th. Kept columns are 0..k minus
    # that one, found arithmetically (a gather, no boolean indexing: no device-to-host sync).
    drop = torch.where(is_target.any(1), is_target.int().argmax(1), k)
    columns = torch.arange(k, device=top_ids.device)
    keep = columns[None, :] + (columns[None, :] >= drop[:, None]).long()
    return top_ids.gather(1, keep).int(), top_logprobs.gather(1, keep).float()
