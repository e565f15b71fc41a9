"""Output-layer chunks sized by bytes (stages/teacher/chunking.py): the rows-from-budget rule, and the
same cached values whatever the chunk size (hf engine, and the vLLM pooler's chunk loop without vLLM)."""
import numpy as np
import pytest
import torch

from pipeline.bench.models import build_random_llama
from stages.teacher.chunking import CPU_BUDGET_BYTES, GPU_BUDGET_BYTES, chunk_rows, element_bytes, pooled_topk_rows
from stages.teacher.engine import open_engine

VOCAB = 32000
K = 8
LENGTHS = (1, 2, 3, 40, 129, 300)
# float32 rounding: a chunk size changes the GEMM's blocking, hence the logits' summation order, so
# log-probs of magnitude up to ~30 differ by a few ulps (ulp(30) = 1.9e-6).
ATOL, RTOL = 1e-5, 2e-6


# --- the rule ------------------------------------------------------------------------------------

def test_chunk_rows_known_numbers():
    assert CPU_BUDGET_BYTES == 64 * 2**20 and GPU_BUDGET_BYTES == 2**30
    assert chunk_rows(151936, "cpu") == 55            # 67,108,864 // (151,936 * 8)
    assert chunk_rows(2048, "cpu") == 4096            # 67,108,864 // 16,384
    assert chunk_rows(151936, "cuda", element_bytes=10) == 706   # bfloat16 logits + float32 copy + log-softmax
    assert chunk_rows(128256, "cuda", element_bytes=2) == 4185   # bfloat16 logits only (Triton kernel)
    assert chunk_rows(1000, torch.device("cpu"), budget_bytes=3 * 8000 + 7999) == 3
    assert chunk_rows(151936, "cpu", budget_bytes=1) == 1         # never below one row


def test_element_bytes():
    assert element_bytes(torch.float32) == 8
    assert element_bytes(torch.bfloat16) == 10 and element_bytes(torch.float16) == 10
    assert element_bytes(torch.bfloat16, log_softmax=False) == 2
    assert element_bytes(torch.float32, log_softmax=False) == 4


@pytest.mark.parametrize("args", [(0, "cpu"), (10, "cpu", 0), (10, "cpu", None, 0)])
def test_chunk_rows_rejects_nonsense(args):
    with pytest.raises(ValueError, match="chunk_rows"):
        chunk_rows(*args)


# --- the hf engine at a 32k vocabulary ---------------------------------------------------------

@pytest.fixture(scope="module")
def model_32k(tmp_path_factory):
    return build_random_llama(tmp_path_factory.mktemp("vocab32k"), vocab_size=VOCAB, hidden_size=64,
                              num_hidden_layers=1, num_attention_heads=1)


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(0)
    return [rng.integers(0, VOCAB, size=n) for n in LENGTHS]


def assert_same_scores(a, b):
    """Values equal to float32 rounding; top-k id sets equal except where ids swap at an exact tie."""
    np.testing.assert_allclose(a.target_logprob, b.target_logprob, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, rtol=RTOL, atol=ATOL)
    for p in range(a.topk_ids.shape[0]):
        only_a = np.setdiff1d(a.topk_ids[p], b.topk_ids[p])
        only_b = np.setdiff1d(b.topk_ids[p], a.topk_ids[p])
        # An id kept by one side only must tie (to rounding) with the other side's k-th value.
        for ids, mine, other in ((only_a, a, b), (only_b, b, a)):
            for token in ids:
                value = mine.topk_logprobs[p][mine.topk_ids[p] == token][0]
                assert abs(value - other.topk_logprobs[p, -1]) <= ATOL + RTOL * abs(value), f"position {p}: id {token} is no tie"


def hf_scores(model_dir, sequences, chunk_bytes):
    engine = open_engine("hf", str(model_dir), k=K, max_length=512, batch_tokens=600, device="cpu",
                         chunk_bytes=chunk_bytes)
    try:
        return engine.chunk_positions, engine.score(sequences)
    finally:
        engine.close()


def test_hf_engine_same_values_at_any_chunk_size(model_32k, sequences):
    rows_small, small = hf_scores(model_32k, sequences, chunk_bytes=7 * VOCAB * 8)
    rows_default, default = hf_scores(model_32k, sequences, chunk_bytes=None)
    assert (rows_small, rows_default) == (7, CPU_BUDGET_BYTES // (VOCAB * 8))  # 7 and 262 positions
    for a, b in zip(small, default):
        assert a.topk_ids.shape == (a.target_logprob.shape[0], K)
        assert_same_scores(a, b)


# --- the vLLM pooler's chunk loop, without a vLLM engine ---------------------------------------------

def test_pooler_chunk_loop_same_values_at_any_chunk_size():
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, 64) * 0.5
    hidden, targets = torch.randn(700, 64), torch.randint(0, VOCAB, (700,))
    logits = lambda h: torch.nn.functional.linear(h, weight)  # noqa: E731
    num_top = K + 1
    whole = pooled_topk_rows(hidden, targets, logits, num_top, rows=10**6)
    reference = logits(hidden).log_softmax(-1)
    np.testing.assert_allclose(whole[:, 2 * num_top].numpy(), reference[torch.arange(700), targets].numpy(), rtol=RTOL, atol=ATOL)
    for rows in (1, 7, chunk_rows(VOCAB, "cpu")):
        got = pooled_topk_rows(hidden, targets, logits, num_top, rows)
        assert got.shape == (700, 2 * num_top + 1) and got.dtype == torch.float32
        np.testing.assert_allclose(got[:, num_top:].numpy(), whole[:, num_top:].numpy(), rtol=RTOL, atol=ATOL)
        ids, ids_whole = got[:, :num_top].view(torch.int32), whole[:, :num_top].view(torch.int32)
        values = got[:, num_top:2 * num_top]
        for p in torch.nonzero((ids.sort(1).values != ids_whole.sort(1).values).any(1)).flatten().tolist():
            differing = set(ids[p].tolist()) ^ set(ids_whole[p].tolist())
            assert all(abs(reference[p, t] - values[p, -1]) <= ATOL + RTOL * abs(values[p, -1]) for t in differing), f"position {p}"
    empty = pooled_topk_rows(hidden[:0], targets[:0], logits, num_top, rows=5)
    assert empty.shape == (0, 2 * num_top + 1)
