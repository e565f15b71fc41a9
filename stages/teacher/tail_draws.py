"""Draws from the teacher's tail: the sampled half of the `sampled_tail` estimator (stages/student/loss.py).

    from stages.teacher.tail_draws import tail_draws
    ids, entropy = tail_draws(logprobs, targets, head_ids, keys, positions, draws=16, seed=0)

At each position the cache keeps the k most likely non-target tokens S exactly; the rest of the
non-target vocabulary, the tail T (mass P_T = 1 - p_y - sum_S p), is represented by m tokens drawn
i.i.d. from the teacher's within-tail distribution p_T(v) = p(v) / P_T, v in T, plus that
distribution's entropy H_T = -sum_T p_T log p_T. With them the masked KL's tail term
sum_T p~ log(p~ / q~) is estimated without bias (docs/design.md, "Sampled tail").

Each draw is the inverse CDF of p_T at a uniform that is a fixed function of (seed, key, position,
draw index) (`uniforms`: a 32-bit integer hash), so a cache is the same whatever the batching,
the number of workers or a resume; the engines pass the example id as the key.
"""
from __future__ import annotations

import torch

__all__ = ["uniforms", "tail_draws", "hash32", "check_keys", "DRAW_ELEMENT_BYTES"]

_MASK = 0xFFFFFFFF


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (the "lowbias32" finalizer, C. Wellons 2018) of int64 values in [0, 2^32).

    int64 products wrap modulo 2^64 on overflow and the mask keeps the low 32 bits, which are the
    same in two's complement: the result equals the unsigned 32-bit arithmetic of the reference."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def uniforms(seed: int, keys: torch.Tensor, positions: torch.Tensor, draws: int) -> torch.Tensor:
    """[n, draws] float64 in (0, 1): u = (h + 1/2) / 2^32 with h = hash(seed, key, position, draw index).

    keys, positions: [n] integer (e.g. example id and position within it, both >= 0). Each argument
    is mixed in by its own round of `hash32`, so neighbouring keys or positions give unrelated values."""
    index = torch.arange(draws, device=keys.device, dtype=torch.int64)
    h = hash32(torch.full_like(index, int(seed) & _MASK) ^ 0x9E3779B9)[None, :]
    h = hash32(h ^ (keys.to(torch.int64)[:, None] & _MASK))
    h = hash32(h ^ (positions.to(torch.int64)[:, None] & _MASK))
    h = hash32(h ^ hash32(index[None, :] + 0x632BE5AB))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def tail_draws(logprobs: torch.Tensor, targets: torch.Tensor, head_ids: torch.Tensor, keys: torch.Tensor,
               positions: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m = `draws` tokens per position drawn from the teacher's tail, and the tail's entropy.

    logprobs [n, V] float32 (full-vocabulary log-softmax), targets [n] (integer), head_ids [n, k]
    (the cached non-target ids), keys / positions [n] (see `uniforms`). Returns draw ids [n, m] int32,
    sorted ascending (repeats kept: each draw counts once), and H_T [n] float32 in nats (0 when the
    tail is empty or has no mass in float32; the draws are then the position's first head id and
    the estimator gives them weight R_T = 0).

    Cost: three float32 passes over [n, V] (exp, cumulative sum, sum of p log p), the inverse CDF by
    binary search; the CDF is float32, so a draw's probability is p_T(v) to float32 rounding of the
    cumulative sums (relative ~1e-7 x the number of tokens before v)."""
    weights = logprobs.exp()
    weights.scatter_(-1, head_ids.long(), 0.0)
    weights.scatter_(-1, targets.long()[:, None], 0.0)
    # sum_T p log p: a row product (no [n, V] temporary); a -inf log-prob (a masked token, p = 0) makes it NaN,
    # and only then the masked sum runs.
    plogp = torch.einsum("nv,nv->n", weights, logprobs)
    bad = ~torch.isfinite(plogp)
    if bad.any():
        plogp[bad] = torch.where(weights[bad] > 0, weights[bad] * logprobs[bad], 0.0).sum(-1)
    cdf = weights.cumsum_(-1)  # in place: the weights are not needed any more
    mass = cdf[:, -1].clone()
    u = uniforms(seed, keys, positions, draws).to(cdf.device)
    ids = torch.searchsorted(cdf, (u * mass[:, None].double()).float(), right=True).clamp_(max=cdf.shape[-1] - 1)
    empty = mass <= 0
    if empty.any():
        ids[empty] = head_ids[empty, :1].long().expand(-1, draws)
    # H_T = log R_T - sum_T p log p / R_T (the within-tail distribution's entropy).
    safe = mass.clamp_min(torch.finfo(torch.float32).tiny)
    entropy = torch.where(empty, 0.0, safe.log() - plogp / safe)
    return ids.sort(-1).values.to(torch.int32), entropy.clamp_min(0.0)


# Bytes per [row, vocabulary] element the draws add to an output-layer chunk: the float32 weights, summed
# in place (stages/teacher/chunking.py sizes chunks by these).
DRAW_ELEMENT_BYTES = 4


def check_keys(keys, count: int, draws: int) -> list[int]:
    """The per-sequence draw keys as ints (zeros when the engine makes no draws); ValueError when an engine
    with draws gets none, or a count that does not match the sequences."""
    if not draws:
        return [0] * count
    if keys is None or len(keys) != count:
        raise ValueError(f"an engine opened with draws={draws} needs one key per sequence (the example id), got "
                         f"{'none' if keys is None else len(keys)} for {count} sequences")
    keys = [int(key) for key in keys]
    if any(not 0 <= key < 2**32 for key in keys):
        raise ValueError("draw keys must lie in [0, 2^32)")
    return keys
