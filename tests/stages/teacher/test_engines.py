"""Teacher engines on the tiny real Llama: vLLM against a transformers forward (docs/design.md §5, test 4).

vLLM starts its engine core and workers with `spawn`; under pytest that needs no setting (pytest's
entry point is `__main__`-guarded, and the children unpickle only vLLM objects). One vLLM engine is
shared by this module (start ~30 s on 2 cores); close() stops its processes so the session ends.
"""
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stages.teacher.engine import open_engine
from stages.teacher.vllm_engine import topk_from_prompt_logprobs

K = 8
DRAWS, DRAW_SEED = 6, 3  # the hf engine and vLLM's pooler also make tail draws (stages/teacher/tail_draws.py)
MAX_LENGTH = 512  # = the tiny model's max_position_embeddings: exercises the vLLM +1 slot
LENGTHS = (1, 2, 3, 17, 64, 200, 333, MAX_LENGTH)
ATOL = 1e-5


@pytest.fixture(scope="module")
def sequences(tiny_model_dir):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=n) for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, sequences):
    """Full-vocabulary log-softmax [T-1, V] per sequence, from one plain forward each."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=torch.from_numpy(s)[None]).logits[0, :-1].float(), -1).numpy()
                for s in sequences]


@pytest.fixture(scope="module")
def hf_scores(tiny_model_dir, sequences):
    # Small batches and output-layer chunks so packing and chunking are both exercised.
    engine = open_engine("hf", str(tiny_model_dir), k=K, max_length=MAX_LENGTH, batch_tokens=1024,
                         device="cpu", chunk_bytes=392 * 50 * 20, draws=DRAWS, draw_seed=DRAW_SEED)  # 50 positions a chunk
    try:
        return engine.score(sequences, keys=list(range(100, 100 + len(sequences))))
    finally:
        engine.close()


@pytest.fixture(scope="module", params=["pooler", "prompt_logprobs"])
def vllm_scores(request, tiny_model_dir, sequences):
    """Both ways out of vLLM: the top-k pooler twin (default) and the stock prompt log-probs."""
    draws = dict(draws=DRAWS, draw_seed=DRAW_SEED) if request.param == "pooler" else {}
    engine = open_engine("vllm", str(tiny_model_dir), k=K, max_length=MAX_LENGTH, batch_tokens=700,
                         output=request.param, **draws)
    try:
        yield engine.score(sequences, keys=list(range(100, 100 + len(sequences))) if draws else None)
    finally:
        engine.close()


def check_against_reference(scores, sequences, reference):
    """Values to ATOL; id sets equal wherever the k-th and (k+1)-th non-target values are > ATOL apart."""
    for seq, got, ref in zip(sequences, scores, reference):
        targets = seq[1:]
        P = len(targets)
        assert got.topk_ids.shape == (P, K) and got.topk_logprobs.shape == (P, K) and got.target_logprob.shape == (P,)
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
        np.testing.assert_allclose(got.target_logprob, ref[np.arange(P), targets], rtol=0, atol=ATOL)
        masked = ref.copy()
        masked[np.arange(P), targets] = -np.inf
        ref_sorted = -np.sort(-masked, axis=1)[:, : K + 1]
        np.testing.assert_allclose(got.topk_logprobs, ref_sorted[:, :K], rtol=0, atol=ATOL)
        # The stored values are the teacher's values at the stored ids.
        np.testing.assert_allclose(got.topk_logprobs, np.take_along_axis(ref, got.topk_ids, 1), rtol=0, atol=ATOL)
        separated = ref_sorted[:, K - 1] - ref_sorted[:, K] > ATOL
        ref_ids = np.argsort(-masked, axis=1, kind="stable")[:, :K]
        for p in np.flatnonzero(separated):
            assert set(got.topk_ids[p]) == set(ref_ids[p]), f"position {p}"


def check_invariants(scores, sequences):
    for seq, got in zip(sequences, scores):
        assert not (got.topk_ids == seq[1:, None]).any(), "a target is stored as a non-target"
        assert np.all(np.diff(got.topk_logprobs, axis=1) <= 0), "not in descending order"
        mass = np.exp(got.topk_logprobs.astype(np.float64)).sum(1) + np.exp(got.target_logprob.astype(np.float64))
        assert np.all(mass <= 1 + ATOL)


# --- hf engine ---------------------------------------------------------------------------------

def test_hf_matches_full_forward(hf_scores, sequences, reference):
    check_against_reference(hf_scores, sequences, reference)
    check_invariants(hf_scores, sequences)


def test_hf_triton_kernel_path_matches_full_forward(tiny_model_dir, sequences, reference, hf_scores):
    """The GPU path (one-pass Triton top-k + log-sum-exp), run by Triton's interpreter on CPU."""
    engine = open_engine("hf", str(tiny_model_dir), k=K, max_length=MAX_LENGTH, batch_tokens=1024,
                         device="cpu", chunk_bytes=392 * 50 * 4, topk_kernel=True)
    try:
        scores = engine.score(sequences[:6])
    finally:
        engine.close()
    check_against_reference(scores, sequences[:6], reference[:6])
    check_invariants(scores, sequences[:6])
    for got, plain in zip(scores, hf_scores):
        np.testing.assert_array_equal(got.topk_ids, plain.topk_ids)


def test_hf_exact_mode_keeps_every_non_target(tiny_model_dir, sequences):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    engine = open_engine("hf", str(tiny_model_dir), k=vocab - 1, max_length=MAX_LENGTH, device="cpu")
    scores = engine.score(sequences[3:5])
    engine.close()
    for seq, got in zip(sequences[3:5], scores):
        all_ids = np.concatenate([got.topk_ids, seq[1:, None]], axis=1)
        np.testing.assert_array_equal(np.sort(all_ids, axis=1), np.broadcast_to(np.arange(vocab), all_ids.shape))
        total = np.logaddexp(np.logaddexp.reduce(got.topk_logprobs.astype(np.float64), axis=1), got.target_logprob)
        np.testing.assert_allclose(total, 0.0, atol=ATOL)


# --- vLLM engine --------------------------------------------------------------------------------

@pytest.mark.vllm
def test_vllm_matches_hf_and_full_forward(vllm_scores, hf_scores, sequences, reference):
    check_against_reference(vllm_scores, sequences, reference)
    check_invariants(vllm_scores, sequences)
    for v, h in zip(vllm_scores, hf_scores):
        np.testing.assert_allclose(v.target_logprob, h.target_logprob, rtol=0, atol=ATOL)
        np.testing.assert_allclose(v.topk_logprobs, h.topk_logprobs, rtol=0, atol=ATOL)


def check_draws(scores, sequences, reference):
    """The tail draws: never the target or a head id, H_T = the within-tail entropy of the reference (float64)."""
    for seq, got, ref in zip(sequences, scores, reference):
        P = len(seq) - 1
        assert got.tail_draw_ids.shape == (P, DRAWS) and got.tail_draw_ids.dtype == np.int32
        assert not (got.tail_draw_ids == seq[1:, None]).any()
        assert not (got.tail_draw_ids[:, :, None] == got.topk_ids[:, None, :]).any()
        p = np.exp(ref.astype(np.float64))
        p[np.arange(P), seq[1:]] = 0
        np.put_along_axis(p, got.topk_ids.astype(np.int64), 0.0, 1)
        p_T = p / p.sum(1, keepdims=True)
        entropy = -(np.where(p_T > 0, p_T * np.log(np.where(p_T > 0, p_T, 1)), 0)).sum(1)
        np.testing.assert_allclose(got.tail_entropy, entropy, rtol=1e-4, atol=1e-5)


def test_hf_tail_draws(hf_scores, sequences, reference):
    check_draws(hf_scores, sequences, reference)


@pytest.mark.vllm
def test_vllm_pooler_draws_equal_the_hf_engines(vllm_scores, hf_scores, sequences, reference):
    """The same (seed, key, position) uniforms in both engines, batched differently: the same draws, but for
    a draw whose uniform falls within float rounding of a CDF boundary (none expected at this size)."""
    if vllm_scores[0].tail_draw_ids is None:  # the prompt_logprobs engine, opened without draws (it refuses them)
        assert all(s.tail_draw_ids is None and s.tail_entropy is None for s in vllm_scores)
        return
    check_draws(vllm_scores, sequences, reference)
    same = np.concatenate([(v.tail_draw_ids == h.tail_draw_ids).ravel() for v, h in zip(vllm_scores, hf_scores)])
    assert same.size == DRAWS * sum(len(s) - 1 for s in sequences) and same.mean() >= 0.99, same.mean()


def test_prompt_logprobs_refuses_draws(tiny_model_dir):
    with pytest.raises(ValueError, match="vllm_output='prompt_logprobs' cannot make tail draws"):
        open_engine("vllm", str(tiny_model_dir), k=4, output="prompt_logprobs", draws=4)
    engine = open_engine("hf", str(tiny_model_dir), k=4, max_length=16, device="cpu", draws=2)
    try:
        with pytest.raises(ValueError, match="needs one key per sequence"):
            engine.score([np.array([1, 2, 3])])
    finally:
        engine.close()


def flat(positions):
    """A FlatLogprobs-like object from per-position [(id, logprob), ...] lists (position 0 empty)."""
    starts, ends, ids, lps = [0], [0], [], []
    for entries in positions:
        starts.append(len(ids))
        ids += [i for i, _ in entries]
        lps += [lp for _, lp in entries]
        ends.append(len(ids))
    return SimpleNamespace(start_indices=starts, end_indices=ends, token_ids=ids, logprobs=lps)


def test_prompt_logprob_layouts():
    seq = np.array([0, 5, 6, 7])
    # Flat layout: the prompt token first, then the top 3 by rank (it may appear twice).
    got = topk_from_prompt_logprobs(flat([
        [(5, -0.5), (5, -0.5), (1, -1.0), (2, -2.0)],
        [(6, -9.0), (1, -0.1), (2, -0.2), (3, -0.3)],
        [(7, -1.0), (8, -1.0), (7, -1.0), (9, -3.0)],   # tie between the target and 8
    ]), seq, 3)
    np.testing.assert_array_equal(got[0], [[5, 1, 2], [1, 2, 3], [8, 7, 9]])
    np.testing.assert_array_equal(got[2], np.array([-0.5, -9.0, -1.0], np.float32))
    # Dict layout: the prompt token only when it is outside the top; order not guaranteed.
    got = topk_from_prompt_logprobs(flat([
        [(2, -2.0), (5, -0.5), (1, -1.0)],
        [(6, -9.0), (3, -0.3), (1, -0.1), (2, -0.2)],
    ]), seq[:3], 3)
    np.testing.assert_array_equal(got[0], [[5, 1, 2], [1, 2, 3]])
    np.testing.assert_array_equal(got[1], np.array([[-0.5, -1.0, -2.0], [-0.1, -0.2, -0.3]], np.float32))
    with pytest.raises(ValueError, match="prompt token"):
        topk_from_prompt_logprobs(flat([[(1, -0.1), (2, -0.2), (3, -0.3)]]), seq[:2], 3)


# --- validation ----------------------------------------------------------------------------------

def test_unknown_vllm_output_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown vLLM engine output 'logits'; known: pooler, prompt_logprobs"):
        open_engine("vllm", str(tiny_model_dir), k=4, output="logits")


def test_pooler_output_is_checked():
    from stages.teacher.vllm_engine import topk_from_pooler

    ids = torch.tensor([[3, 1], [2, 0]], dtype=torch.int32).view(torch.float32)
    packed = torch.cat([ids, torch.tensor([[-0.1, -2.0], [-0.5, -0.9]]), torch.tensor([[-3.0], [-0.5]])], 1)
    top_ids, top_lp, target = topk_from_pooler(packed, np.array([7, 1, 2]), 2)
    np.testing.assert_array_equal(top_ids, [[3, 1], [2, 0]])
    np.testing.assert_array_equal(target, np.array([-3.0, -0.5], np.float32))
    with pytest.raises(ValueError, match="2 positions for a sequence of 4 tokens"):
        topk_from_pooler(packed, np.arange(4), 2)
    with pytest.raises(ValueError, match="unexpected top-k pooler output"):
        topk_from_pooler(packed, np.arange(3), 3)


@pytest.mark.parametrize("name", ["hf", "vllm"])
def test_k_out_of_range_refused(tiny_model_dir, name):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    for k in (vocab, vocab + 10, 0):
        with pytest.raises(ValueError, match=f"k={k}.*vocab_size={vocab}"):
            open_engine(name, str(tiny_model_dir), k=k)


def test_bad_model_path_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        open_engine("hf", str(missing), k=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty"))):
        open_engine("vllm", str(tmp_path / "empty"), k=4)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "corrupt"))):
        open_engine("hf", str(tmp_path / "corrupt"), k=4)


def test_unknown_engine_and_bad_sequences(tiny_model_dir):
    with pytest.raises(ValueError, match="known engines: vllm, hf"):
        open_engine("onnx", str(tiny_model_dir), k=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        open_engine("hf", str(tiny_model_dir), k=4, max_length=4096)
    engine = open_engine("hf", str(tiny_model_dir), k=4, max_length=16, device="cpu")
    with pytest.raises(ValueError, match="sequence 1: length 17 exceeds max_length=16"):
        engine.score([np.arange(3), np.arange(17)])
    with pytest.raises(ValueError, match="sequence 0: token ids"):
        engine.score([np.array([0, 10**6])])
    engine.close()
