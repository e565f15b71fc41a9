"""select_nontarget_topk: from the teacher's top k+1 to the k largest non-target entries."""
import numpy as np
import pytest

from stages.teacher.select import select_nontarget_topk


def test_target_in_top_is_dropped_and_order_kept():
    top_ids = np.array([[5, 7, 2, 9], [4, 3, 1, 0]])
    top_lp = np.array([[-0.1, -1.0, -2.0, -3.0], [-0.5, -0.6, -0.7, -0.8]])
    ids, lp = select_nontarget_topk(top_ids, top_lp, np.array([7, 0]), k=3)
    np.testing.assert_array_equal(ids, [[5, 2, 9], [4, 3, 1]])
    np.testing.assert_array_equal(lp, np.array([[-0.1, -2.0, -3.0], [-0.5, -0.6, -0.7]], np.float32))
    assert ids.dtype == np.int32 and lp.dtype == np.float32


def test_target_not_in_top_drops_the_last():
    top_ids = np.array([[5, 7, 2, 9]])
    top_lp = np.array([[-0.1, -1.0, -2.0, -3.0]])
    ids, lp = select_nontarget_topk(top_ids, top_lp, np.array([11]), k=3)
    np.testing.assert_array_equal(ids, [[5, 7, 2]])
    np.testing.assert_array_equal(lp, np.array([[-0.1, -1.0, -2.0]], np.float32))


def test_ties_drop_the_target_not_its_twin():
    # The target (3) ties with 8; only the target goes, whichever side of the tie it sits on.
    top_ids = np.array([[8, 3, 1], [3, 8, 1], [4, 6, 9]])
    top_lp = np.full((3, 3), -1.0)
    ids, lp = select_nontarget_topk(top_ids, top_lp, np.array([3, 3, 0]), k=2)
    np.testing.assert_array_equal(ids, [[8, 1], [8, 1], [4, 6]])
    np.testing.assert_array_equal(lp, np.full((3, 2), -1.0, np.float32))


def test_target_first_and_mixed_rows_vectorized():
    rng = np.random.default_rng(0)
    P, k, V = 200, 5, 30
    logits = rng.normal(size=(P, V))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, : k + 1]
    targets = rng.integers(0, V, size=P)
    ids, vals = select_nontarget_topk(order, np.take_along_axis(lp, order, 1), targets, k)
    # Reference: mask the target, take the k largest.
    masked = lp.copy()
    masked[np.arange(P), targets] = -np.inf
    ref = np.argsort(-masked, axis=1)[:, :k]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(vals, np.take_along_axis(lp, ref, 1), rtol=0, atol=1e-6)
    assert not (ids == targets[:, None]).any()


def test_empty_and_bad_shapes():
    ids, lp = select_nontarget_topk(np.empty((0, 4), np.int64), np.empty((0, 4)), np.empty(0, np.int64), k=3)
    assert ids.shape == (0, 3) and lp.shape == (0, 3)
    with pytest.raises(ValueError, match="k\\+1"):
        select_nontarget_topk(np.zeros((2, 3), np.int64), np.zeros((2, 3)), np.zeros(2, np.int64), k=3)


def test_torch_version_equals_numpy_version():
    """The hf engine selects on the device with select_nontarget_topk_torch: same rows, same order."""
    import torch

    from stages.teacher.select import select_nontarget_topk_torch

    rng = np.random.default_rng(3)
    P, V, k = 500, 60, 7
    lp = np.log(rng.dirichlet(np.ones(V), size=P)).astype(np.float32)
    order = np.argsort(-lp, axis=1)[:, : k + 1]
    values = np.take_along_axis(lp, order, 1)
    targets = np.where(rng.random(P) < 0.5, order[np.arange(P), rng.integers(0, k + 1, P)], rng.integers(0, V, P))
    ids_np, lp_np = select_nontarget_topk(order, values, targets, k)
    ids_t, lp_t = select_nontarget_topk_torch(torch.from_numpy(order), torch.from_numpy(values), torch.from_numpy(targets), k)
    assert ids_t.dtype == torch.int32 and lp_t.dtype == torch.float32
    np.testing.assert_array_equal(ids_t.numpy(), ids_np)
    np.testing.assert_array_equal(lp_t.numpy(), lp_np)
    with pytest.raises(ValueError, match="positions, k\\+1"):
        select_nontarget_topk_torch(torch.from_numpy(order[:, :k]), torch.from_numpy(values[:, :k]), torch.from_numpy(targets), k)
