"""The one-pass Triton top-(k+1) + log-sum-exp kernel against an independent torch expectation.

Without a GPU the kernel runs under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when CUDA is absent), so the same kernel code is checked on every machine; on a GPU it runs compiled.
The expectation is computed here in float64 with torch.topk / torch.logsumexp / log_softmax, never
with the module's own `topk_logsumexp_reference` (the CPU fallback): the `kernel_only` fixture makes
that fallback raise, so a test cannot pass by comparing the reference with itself. Where the kernel
cannot run at all (no Triton, or a CPU run without the interpreter), the module is skipped, saying why.

Tolerances: the top values are logits themselves, so they must be exact; the ids too where values
are distinct. The log-sum-exp is an online float32 reduction over <= 3000 terms, and a float32 result
alone is off by up to 2^-24 of its size (3.6e-5 at the lse ~600 of the worst-case test): held to
1e-5 + 1e-6 * |lse| (a few float32 epsilons; a wrong rescale of the running sum moves it by >= 1e-3).
"""
from __future__ import annotations

import os

import pytest
import torch

from stages.teacher import topk_kernel
from stages.teacher.topk_kernel import kernel_available, topk_logsumexp

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LSE_ATOL, LSE_RTOL = 1e-5, 1e-6

if topk_kernel.triton is None:
    pytestmark = pytest.mark.skip(reason="Triton is not installed: the kernel cannot run here")
elif not kernel_available(DEVICE):
    pytestmark = pytest.mark.skip(reason=f"no CUDA and TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: "
                                         "the kernel runs on CPU only under Triton's interpreter")


@pytest.fixture(autouse=True)
def kernel_only(monkeypatch):
    """Any fall back to the torch reference inside `topk_logsumexp` fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("topk_logsumexp fell back to its torch reference: the kernel did not run")

    monkeypatch.setattr(topk_kernel, "topk_logsumexp_reference", refuse)


def expected(logits: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, ids, lse, log-probs of the top k1) in float64, straight from torch."""
    x = logits.double()
    values, ids = x.topk(k1, dim=-1, sorted=True)
    return values, ids, x.logsumexp(-1), torch.log_softmax(x, -1).gather(-1, ids)


def check(logits: torch.Tensor, k1: int, block: int, ids_exact: bool = True) -> None:
    values, ids, lse = topk_logsumexp(logits, k1, block=block)
    want_values, want_ids, want_lse, want_logprobs = expected(logits, k1)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64 and values.shape == (logits.shape[0], k1)
    torch.testing.assert_close(values.double(), want_values, rtol=0, atol=0)
    if ids_exact:
        torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(logits.double().gather(1, ids), want_values, rtol=0, atol=0)  # ids point at them
    assert all(len(set(row.tolist())) == k1 for row in ids)
    allowed = LSE_ATOL + LSE_RTOL * want_lse.abs()
    assert ((lse.double() - want_lse).abs() <= allowed).all(), (lse.double() - want_lse).abs().max()
    got_logprobs = values.double() - lse.double()[:, None]  # what stage one stores
    assert ((got_logprobs - want_logprobs).abs() <= allowed[:, None]).all(), (got_logprobs - want_logprobs).abs().max()


@pytest.mark.parametrize("vocab,k1,block", [(1000, 33, 256), (2048, 5, 512), (300, 33, 128), (64, 64, 64),
                                            (777, 1, 128)])
def test_matches_torch_on_random_logits(vocab, k1, block):
    torch.manual_seed(vocab + k1)
    check((torch.randn(9, vocab) * 3).to(DEVICE), k1, block)  # distinct random values: no ties


def test_worst_case_order_and_masked_entries():
    """Logits increasing with the id insert at every element; -inf entries never enter the set."""
    logits = torch.arange(600.0).repeat(3, 1)
    logits[1, 100:] = float("-inf")
    logits[2] = logits[2].flip(0)
    check(logits.to(DEVICE), 9, block=128)


def test_bfloat16_logits_with_ties():
    """bf16 logits tie often: values must equal torch's, ids must point at those values, no id twice."""
    torch.manual_seed(1)
    check((torch.randn(6, 3000) * 2).to(torch.bfloat16).to(DEVICE), 33, block=512, ids_exact=False)


def test_empty_and_bad_input():
    values, ids, lse = topk_logsumexp(torch.zeros(0, 50, device=DEVICE), 4)
    assert values.shape == (0, 4) and ids.shape == (0, 4) and lse.shape == (0,)
    with pytest.raises(ValueError, match="k1=51"):
        topk_logsumexp(torch.zeros(2, 50, device=DEVICE), 51)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        topk_logsumexp(torch.zeros(2, 3, 50, device=DEVICE), 4)
