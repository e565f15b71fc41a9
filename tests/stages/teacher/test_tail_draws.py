"""tail_draws: the integer hash, the keyed uniforms, the draws from the teacher's within-tail distribution,
and topk_and_tail_draws (the engines' entry: everything stage one stores, from the logits).

The expected values here are computed independently: the hash in pure Python on unsigned 32-bit
integers, the within-tail distribution p_T and its entropy in float64 numpy from the log-probs.
"""
import numpy as np
import pytest
import torch

from stages.teacher.select import select_nontarget_topk_torch
from stages.teacher.tail_draws import hash32, tail_draws, topk_and_tail_draws, uniforms

stats = pytest.importorskip("scipy.stats")

MASK32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """C. Wellons' lowbias32, written on Python ints reduced mod 2^32 after every step."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def teacher_problem(n: int, vocab: int, k: int, seed: int, scale: float = 1.5):
    """Float32 full-vocabulary log-probs [n, V], targets [n], and the k largest non-target ids [n, k],
    chosen the way the engines do (top k+1, then drop the target)."""
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale, -1).float()
    targets = torch.randint(0, vocab, (n,), generator=g)
    top_lp, top_ids = logprobs.topk(k + 1, -1)
    head_ids, _ = select_nontarget_topk_torch(top_ids, top_lp, targets, k)
    return logprobs, targets, head_ids


def reference_tail(logprobs: torch.Tensor, targets: torch.Tensor, head_ids: torch.Tensor):
    """(p_T [n, V], H_T [n]) in float64 numpy: p(v) / sum_T p over the tail, 0 on the head and the target."""
    p = np.exp(logprobs.double().numpy())
    rows = np.arange(p.shape[0])[:, None]
    p[rows, head_ids.long().numpy()] = 0.0
    p[rows[:, 0], targets.numpy()] = 0.0
    p_T = p / p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p_T > 0, p_T * np.log(p_T), 0.0).sum(-1)
    return p_T, entropy


# --- hash32 ----------------------------------------------------------------------------------------
def test_hash32_equals_the_unsigned_32_bit_reference():
    rng = np.random.default_rng(0)
    values = [0, 1, 2, 3, 0x7FEB352D, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1] + rng.integers(0, 2**32, 500).tolist()
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32(v) for v in values]
    assert all(0 <= h <= MASK32 for h in got)


def test_hash32_reads_only_the_low_32_bits():
    # The uniforms mask keys and positions to 32 bits; the hash must agree with that on wider input.
    x = torch.tensor([5, 2**32 - 1, 123456789], dtype=torch.int64)
    torch.testing.assert_close(hash32(x + 2**32), hash32(x), rtol=0, atol=0)
    torch.testing.assert_close(hash32(torch.tensor([-1])), torch.tensor([lowbias32(MASK32)]), rtol=0, atol=0)


# --- uniforms --------------------------------------------------------------------------------------
def test_uniforms_are_a_deterministic_float64_array_strictly_inside_0_1():
    keys, positions = torch.arange(300), torch.arange(300) % 17
    u = uniforms(7, keys, positions, 12)
    assert u.shape == (300, 12) and u.dtype == torch.float64
    assert torch.equal(u, uniforms(7, keys, positions, 12))
    assert (u > 0).all() and (u < 1).all()


def test_a_rows_uniforms_do_not_depend_on_the_other_rows_or_the_draw_count():
    """What makes a cache the same whatever the batching: each value is a function of its own
    (seed, key, position, draw index) only."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 2**32, (200,), generator=g, dtype=torch.int64)
    positions = torch.randint(0, 4096, (200,), generator=g)
    full = uniforms(3, keys, positions, 16)
    perm = torch.randperm(200, generator=g)
    assert torch.equal(uniforms(3, keys[perm], positions[perm], 16), full[perm])
    subset = perm[:13]
    assert torch.equal(uniforms(3, keys[subset], positions[subset], 16), full[subset])
    assert torch.equal(uniforms(3, keys[:1], positions[:1], 16), full[:1])
    # Fewer draws are the first columns of more draws.
    assert torch.equal(uniforms(3, keys, positions, 5), full[:, :5])


def test_seeds_keys_and_positions_each_change_every_value():
    keys, positions = torch.arange(2000), torch.zeros(2000, dtype=torch.int64)
    base = uniforms(0, keys, positions, 8)
    for other in (uniforms(1, keys, positions, 8), uniforms(0, keys + 1, positions, 8), uniforms(0, keys, positions + 1, 8)):
        # A 32-bit hash collision has probability ~2^-32 per value: none is expected among 16,000.
        assert (other != base).all()


def test_uniforms_are_uniform_and_uncorrelated_between_neighbours():
    n_keys, draws = 10_000, 10
    keys = torch.arange(n_keys)
    u = uniforms(0, keys, torch.zeros(n_keys, dtype=torch.int64), draws).numpy()
    flat = u.ravel()  # 10^5 values
    se = np.sqrt(1 / 12 / flat.size)
    assert abs(flat.mean() - 0.5) <= 4 * se, f"mean {flat.mean():.5f} is > 4 SE ({se:.1e}) from 1/2"
    assert stats.kstest(flat, "uniform").pvalue > 1e-3
    # Neighbouring keys, positions and draw indices must give unrelated values (each goes through its
    # own hash round): correlations of order 1/sqrt(n), far below what a linear mix would give.
    shifted_position = uniforms(0, keys, torch.ones(n_keys, dtype=torch.int64), draws).numpy()
    pairs = {"key": (u[:-1], u[1:]), "draw index": (u[:, :-1], u[:, 1:]), "position": (u, shifted_position)}
    for name, (a, b) in pairs.items():
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) <= 4 / np.sqrt(a.size), f"neighbouring {name}s: correlation {r:.4f}"


# --- tail_draws ------------------------------------------------------------------------------------
def test_draws_avoid_the_head_and_the_target_and_come_sorted_int32():
    logprobs, targets, head_ids = teacher_problem(n=64, vocab=40, k=6, seed=0)
    ids, entropy = tail_draws(logprobs, targets, head_ids, torch.arange(64), torch.zeros(64, dtype=torch.int64), 32, seed=0)
    assert ids.shape == (64, 32) and ids.dtype == torch.int32
    assert entropy.shape == (64,) and entropy.dtype == torch.float32
    assert (ids[:, 1:] >= ids[:, :-1]).all()
    assert ((ids >= 0) & (ids < 40)).all()
    assert not (ids.long()[:, :, None] == head_ids.long()[:, None, :]).any()
    assert not (ids.long() == targets[:, None]).any()


def test_draw_frequencies_follow_the_within_tail_distribution():
    """Chi-square of 2 x 20,000 draws (2,500 keys x 8 draws at each of two positions) against p_T."""
    logprobs, targets, head_ids = teacher_problem(n=2, vocab=60, k=5, seed=2, scale=1.2)
    # Vocabulary padding has log-prob -inf: it must never be drawn.
    logprobs[:, -3:] = float("-inf")
    logprobs = torch.log_softmax(logprobs.double(), -1).float()
    repeats, draws = 2500, 8
    ids, _ = tail_draws(logprobs.repeat_interleave(repeats, 0), targets.repeat_interleave(repeats),
                        head_ids.repeat_interleave(repeats, 0), torch.arange(2 * repeats), torch.full((2 * repeats,), 11), draws, 5)
    p_T, _ = reference_tail(logprobs, targets, head_ids)
    for row in range(2):
        counts = np.bincount(ids[row * repeats:(row + 1) * repeats].ravel().numpy(), minlength=60)
        expected = p_T[row] * repeats * draws
        assert counts[expected == 0].sum() == 0, "drew a token of the head, the target or the padding"
        # Bins with fewer than 5 expected draws are pooled so the chi-square approximation holds.
        big = expected >= 5
        obs = np.append(counts[big], counts[~big & (expected > 0)].sum())
        exp = np.append(expected[big], expected[~big & (expected > 0)].sum())
        obs, exp = obs[exp > 0], exp[exp > 0]
        pvalue = stats.chisquare(obs, exp).pvalue
        assert pvalue > 1e-3, f"row {row}: chi-square p = {pvalue:.2e} over {len(obs)} bins"


def test_tail_entropy_equals_a_float64_reference():
    logprobs, targets, head_ids = teacher_problem(n=50, vocab=120, k=8, seed=3, scale=2.5)
    logprobs[:5, 100:] = float("-inf")  # padding: excluded from the tail, no NaN from 0 * log 0
    logprobs = torch.log_softmax(logprobs.double(), -1).float()
    _, entropy = tail_draws(logprobs, targets, head_ids, torch.arange(50), torch.arange(50), 4, seed=0)
    _, want = reference_tail(logprobs, targets, head_ids)
    assert np.isfinite(want).all() and (want > 0.5).all()
    np.testing.assert_allclose(entropy.numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_one_token_tail_has_zero_entropy_and_always_draws_that_token():
    logprobs, targets, head_ids = teacher_problem(n=4, vocab=9, k=7, seed=4)
    ids, entropy = tail_draws(logprobs, targets, head_ids, torch.arange(4), torch.zeros(4, dtype=torch.int64), 5, seed=0)
    for row in range(4):
        (tail,) = set(range(9)) - set(head_ids[row].tolist()) - {int(targets[row])}
        assert (ids[row] == tail).all()
    assert entropy.abs().max() <= 1e-6


def test_an_empty_tail_gives_zero_entropy_and_the_first_head_id():
    """k = V - 1 (every non-target token cached), mixed in one batch with rows that have a tail."""
    vocab, k = 10, 9
    logprobs, targets, head_ids = teacher_problem(n=6, vocab=vocab, k=k, seed=5)
    # Rows 3..5: the same teachers with head = the first 4 non-target ids only, so they have a tail.
    partial = head_ids.clone()
    partial[3:, 4:] = partial[3:, :1]  # pad the unused head columns with a repeat (same k for the batch)
    keys, positions = torch.arange(6), torch.zeros(6, dtype=torch.int64)
    ids, entropy = tail_draws(logprobs, targets, partial, keys, positions, 7, seed=0)
    assert torch.equal(entropy[:3], torch.zeros(3))
    assert (ids[:3] == head_ids[:3, :1]).all() and ids.dtype == torch.int32
    assert (entropy[3:] > 0).all()
    # A row with a tail draws the same with or without the empty rows beside it.
    alone, alone_entropy = tail_draws(logprobs[3:], targets[3:], partial[3:], keys[3:], positions[3:], 7, seed=0)
    assert torch.equal(alone, ids[3:]) and torch.equal(alone_entropy, entropy[3:])


def test_a_tail_without_float32_mass_counts_as_empty():
    # The tail tokens are > 200 nats down: exp underflows to 0 in float32, so P_T = 0 and nothing can be drawn.
    logits = torch.full((2, 8), -300.0, dtype=torch.float64)
    logits[:, :4] = torch.tensor([2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    logprobs = torch.log_softmax(logits, -1).float()
    targets, head_ids = torch.tensor([0, 3]), torch.tensor([[1, 2, 3], [0, 1, 2]])
    ids, entropy = tail_draws(logprobs, targets, head_ids, torch.arange(2), torch.zeros(2, dtype=torch.int64), 3, seed=0)
    assert torch.equal(entropy, torch.zeros(2))
    assert torch.equal(ids, head_ids[:, :1].int().expand(-1, 3))


# --- topk_and_tail_draws: from the logits -----------------------------------------------------------
def float64_reference(logits: torch.Tensor, targets: torch.Tensor, num_top: int):
    """(log-probs [n, V] float64, top ids [n, num_top] by float64 log-prob, the target's log-prob) in numpy."""
    lp = torch.log_softmax(logits.double(), -1)
    return lp.numpy(), lp.topk(num_top, -1).indices.numpy(), lp.gather(1, targets[:, None])[:, 0].numpy()


@pytest.mark.parametrize("vocab,num_top,scale", [(50, 5, 1.0), (300, 17, 3.0), (2048, 33, 6.0)])
def test_topk_and_draws_from_logits_equal_a_float64_reference(vocab, num_top, scale):
    g = torch.Generator().manual_seed(vocab)
    n = 40
    logits = (torch.randn(n, vocab, generator=g) * scale + 7.0).float()  # an offset: the log-sum-exp must remove it
    targets = torch.randint(0, vocab, (n,), generator=g)
    keys, positions = torch.arange(n), torch.arange(n) * 3
    values, ids, target, draw_ids, entropy = topk_and_tail_draws(logits, targets, num_top, keys, positions, 8, 1)
    lp, want_ids, want_target = float64_reference(logits, targets, num_top)
    assert ids.dtype == torch.int64 and values.dtype == target.dtype == entropy.dtype == torch.float32
    assert (values[:, 1:] <= values[:, :-1]).all(), "log-probs not in descending order"
    np.testing.assert_array_equal(np.sort(ids.numpy(), 1), np.sort(want_ids, 1))  # distinct values: one top set
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(lp, ids.numpy(), 1), rtol=0, atol=2e-6)
    np.testing.assert_allclose(target.numpy(), want_target, rtol=0, atol=2e-6)
    # The draws and H_T outside the num_top - 1 largest non-target tokens: as tail_draws makes them from log-probs.
    head, _ = select_nontarget_topk_torch(ids, values, targets, num_top - 1)
    _, want_entropy = reference_tail(torch.from_numpy(lp).float(), targets, head)
    # sum_T p x - lse R_T cancels in float32 when the logits are large (here up to ~30): a relative error ~1e-5,
    # 50x below the float16 that stores H_T (2^-11).
    np.testing.assert_allclose(entropy.numpy(), want_entropy, rtol=1e-4, atol=1e-5)
    from_logprobs, _ = tail_draws(torch.from_numpy(lp).float(), targets, head, keys, positions, 8, 1)
    same = (draw_ids == from_logprobs).float().mean().item()
    assert same >= 0.99, f"only {same:.1%} of the draws equal tail_draws' from the log-probs"  # boundary rounding only
    assert not (draw_ids.long()[:, :, None] == head[:, None, :]).any() and not (draw_ids.long() == targets[:, None]).any()


def test_tokens_whose_probability_underflows_still_come_in_descending_log_prob_order():
    """Below ~103 nats under the top, float32 probabilities are 0 (or a few denormal steps): the top entries
    tie there, are chosen among the ties, and must still be stored in descending log-prob order."""
    vocab = 64
    logits = torch.full((3, vocab), -120.0)
    logits[:, 0] = 0.0
    logits[:, 1:] -= torch.arange(1, vocab) * 1e-3  # distinct logits, equal (zero) probabilities
    targets = torch.tensor([0, 5, 63])
    positions = torch.zeros(3, dtype=torch.int64)
    values, ids, target, draw_ids, entropy = topk_and_tail_draws(logits, targets, 6, torch.arange(3), positions, 4, 0)
    assert (values[:, 1:] <= values[:, :-1]).all()
    np.testing.assert_allclose(values.numpy(), torch.log_softmax(logits.double(), -1).gather(1, ids).numpy(), atol=1e-5)
    assert torch.isfinite(target).all() and (target[1:] < -119).all()
    assert torch.equal(entropy, torch.zeros(3))  # no float32 mass outside the head: an empty tail
