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

__all__ = ["uniforms", "tail_draws", "topk_and_tail_draws", "hash32", "check_keys"]

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

    This is the entry point for callers that hold log-probs (the approximation study, the step bench);
    the engines use `topk_and_tail_draws`, which starts from the logits and makes the same draws up to
    float32 rounding of the probabilities."""
    return _draws_from_weights(logprobs.exp(), logprobs, 0.0, targets, head_ids, keys, positions, draws, seed)


def topk_and_tail_draws(logits: torch.Tensor, targets: torch.Tensor, num_top: int, keys: torch.Tensor,
                        positions: torch.Tensor, draws: int, seed: int) -> tuple[torch.Tensor, ...]:
    """What stage one stores per position for an encoding with tail draws, from one chunk's logits.

    logits [n, V] (any float dtype; computed in float32), targets [n] (integer), num_top: how many of the
    largest entries to return (k + 1: the k non-target tokens then come from
    stages.teacher.select), keys / positions [n] (see `uniforms`). Returns
    (values [n, num_top] float32 log-probs, descending; ids [n, num_top] int64; the target's log-prob [n]
    float32; draw ids [n, m] int32; H_T [n] float32), the draws and H_T as `tail_draws` makes them, outside
    the num_top - 1 largest non-target tokens.

    Why not log_softmax + `tail_draws`: one softmax gives the probabilities the draws need, and every stored
    log-prob is read off the logits, x_v - lse with lse = x_top1 - log p_top1 (exact: p_top1 = 1 / sum of
    exp(x - max)), so no float32 [n, V] pass is spent on a log-softmax and another on its exp. The top
    entries are chosen by probability and then ordered by log-prob; tokens whose probability underflows
    float32 (> 103 nats below the top) tie at 0 and are chosen among arbitrarily, which only matters where
    fewer than num_top tokens have any probability.

    H_T = log R_T - (sum_T p x - lse R_T) / R_T: the difference cancels in float32 when the logits are large, a
    relative error ~1e-5 at logits ~30 (float16, which stores H_T, rounds at 2^-11 = 5e-4).

    Cost: softmax, top-num_top, the tail's sum of p x, its cumulative sum (each one pass over [n, V]
    float32), the inverse CDF by binary search. Memory: the float32 logits and one float32 [n, V] buffer.
    """
    from stages.teacher.select import select_nontarget_topk_torch

    x = logits.float()
    probs = x.softmax(-1)
    top_p, ids = probs.topk(num_top, dim=-1)
    lse = x.gather(1, ids[:, :1])[:, 0] - top_p[:, 0].log()
    # Probabilities equal in float32 may hide log-probs that are not: order by the log-probs themselves.
    values, order = (x.gather(1, ids) - lse[:, None]).sort(dim=-1, descending=True)
    ids = ids.gather(1, order)
    targets = targets.long()
    target = x.gather(1, targets[:, None])[:, 0] - lse
    head, _ = select_nontarget_topk_torch(ids, values, targets, num_top - 1)
    draw_ids, entropy = _draws_from_weights(probs, x, lse, targets, head, keys, positions, draws, seed)
    return values, ids, target, draw_ids, entropy


def _draws_from_weights(weights: torch.Tensor, scores: torch.Tensor, offset: torch.Tensor | float, targets: torch.Tensor,
                        head_ids: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, draws: int,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws and H_T from weights [n, V] float32 = the probabilities (overwritten: the tail's cumulative
    sum) and scores [n, V] with log p = scores - offset (the log-probs and 0.0, or the logits and the
    log-sum-exp [n] per row)."""
    weights.scatter_(-1, torch.cat([head_ids.long(), targets.long()[:, None]], 1), 0.0)
    # sum_T p x: a batched row product (einsum -> bmm: no [n, V] temporary, which linalg.vecdot would make);
    # a -inf score (a masked token, p = 0) makes it NaN, and only then the masked sum runs.
    pscore = torch.einsum("nv,nv->n", weights, scores)
    bad = ~torch.isfinite(pscore)
    if bad.any():
        pscore[bad] = torch.where(weights[bad] > 0, weights[bad] * scores[bad], 0.0).sum(-1)
    cdf = weights.cumsum_(-1)  # in place: the weights are not needed any more
    mass = cdf[:, -1].clone()
    u = uniforms(seed, keys, positions, draws).to(cdf.device)
    ids = torch.searchsorted(cdf, (u * mass[:, None].double()).float(), right=True).clamp_(max=cdf.shape[-1] - 1)
    empty = mass <= 0
    if empty.any():
        ids[empty] = head_ids[empty, :1].long().expand(-1, draws)
    # H_T = log R_T - sum_T p log p / R_T (the within-tail distribution's entropy), sum_T p log p = pscore -
    # offset R_T.
    safe = mass.clamp_min(torch.finfo(torch.float32).tiny)
    entropy = torch.where(empty, 0.0, safe.log() - (pscore - offset * mass) / safe)
    return ids.sort(-1).values.to(torch.int32), entropy.clamp_min(0.0)


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
