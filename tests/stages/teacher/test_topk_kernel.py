"""The one-pass Triton top-(k+1) + log-sum-exp kernel against plain torch (topk, logsumexp).

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when CUDA is absent), so the same kernel code is checked on every machine; on a GPU it runs compiled.
"""
from __future__ import annotations

import pytest
import torch

from stages.teacher.topk_kernel import kernel_available, topk_logsumexp, topk_logsumexp_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernel_runs_here():
    assert kernel_available(DEVICE), "Triton is part of the test install; the kernel must be exercised"


@pytest.mark.parametrize("vocab,k1,block", [(1000, 33, 256), (2048, 5, 512), (300, 33, 128), (64, 64, 64),
                                            (777, 1, 128)])
def test_matches_torch_on_random_logits(vocab, k1, block):
    torch.manual_seed(vocab + k1)
    logits = (torch.randn(9, vocab) * 3).to(DEVICE)
    values, ids, lse = topk_logsumexp(logits, k1, block=block)
    ref_values, ref_ids, ref_lse = topk_logsumexp_reference(logits, k1)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64 and values.shape == (9, k1)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)  # distinct random values: no ties
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


def test_worst_case_order_and_masked_entries():
    """Logits increasing with the id insert at every element; -inf entries never enter the set."""
    logits = torch.arange(600.0).repeat(3, 1)
    logits[1, 100:] = float("-inf")
    logits[2] = logits[2].flip(0)
    logits = logits.to(DEVICE)
    values, ids, lse = topk_logsumexp(logits, 9, block=128)
    ref_values, ref_ids, ref_lse = topk_logsumexp_reference(logits, 9)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


def test_bfloat16_logits_with_ties():
    """bf16 logits tie often: values must equal torch's, ids must point at those values, no id twice."""
    torch.manual_seed(1)
    logits = (torch.randn(6, 3000) * 2).to(torch.bfloat16).to(DEVICE)
    values, ids, lse = topk_logsumexp(logits, 33, block=512)
    ref_values, _, ref_lse = topk_logsumexp_reference(logits, 33)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0)
    torch.testing.assert_close(logits.float().gather(1, ids), values, rtol=0, atol=0)
    assert all(len(set(row.tolist())) == 33 for row in ids)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)


def test_empty_and_bad_input():
    values, ids, lse = topk_logsumexp(torch.zeros(0, 50, device=DEVICE), 4)
    assert values.shape == (0, 4) and ids.shape == (0, 4) and lse.shape == (0,)
    with pytest.raises(ValueError, match="k1=51"):
        topk_logsumexp(torch.zeros(2, 50, device=DEVICE), 51)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        topk_logsumexp(torch.zeros(2, 3, 50, device=DEVICE), 4)
