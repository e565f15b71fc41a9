"""The collator's batch: padding, HF labels, and teacher arrays aligned row by row with the labels."""
import numpy as np
import pytest
import torch

from stages.student.collator import CacheCollator, pad_token_id
from stages.student.reader import load_cache_dataset, open_cache

K = 3


def coded_row(example: int, length: int, trained_from: int) -> dict:
    """A row whose cached values encode (example, position): position i holds example * 1000 + i."""
    mask = np.arange(length - 1) >= trained_from
    positions = np.flatnonzero(mask)
    code = example * 1000 + positions
    return {
        "example_id": np.int64(example),
        "input_ids": 10 + np.arange(length) + example,
        "loss_mask": mask,
        "target_logprob": -code.astype(np.float32),
        "topk_ids": np.repeat(code, K),
        "topk_logprobs": np.repeat(code, K).astype(np.float32),
    }


def test_padding_labels_and_alignment():
    rows = [coded_row(0, 6, 0), coded_row(1, 4, 2), coded_row(2, 7, 3)]
    batch = CacheCollator(pad_id=99, k=K, encoding="topk_f32")(rows)
    assert batch["input_ids"].shape == (3, 7) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == [11, 12, 13, 14, 99, 99, 99]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 4 + [0] * 3, [1] * 7]
    # labels[t] = input_ids[t] where loss_mask[t-1]; first and padded positions -100
    assert batch["labels"][1].tolist() == [-100, -100, -100, 14, -100, -100, -100]
    assert batch["labels"][0].tolist() == [-100, 11, 12, 13, 14, 15, -100]
    mask = batch["labels"][:, 1:] != -100
    b, t = torch.nonzero(mask, as_tuple=True)  # row-major, like logits[:, :-1][mask]
    expected = b * 1000 + t
    n = int(mask.sum())
    assert batch["teacher_target_logprob"].shape == (n,) and batch["teacher_target_logprob"].dtype == torch.float32
    assert torch.equal(-batch["teacher_target_logprob"], expected.float())
    assert batch["teacher_topk_ids"].shape == (n, K) and batch["teacher_topk_ids"].dtype == torch.long
    assert torch.equal(batch["teacher_topk_ids"], expected[:, None].expand(n, K))
    assert torch.equal(batch["teacher_topk_logprobs"], expected[:, None].expand(n, K).float())


def test_row_without_trained_positions_and_without_teacher():
    rows = [coded_row(0, 5, 4), coded_row(1, 3, 0)]  # row 0 trains nothing
    batch = CacheCollator(pad_id=0, k=K, encoding="topk_f32")(rows)
    assert (batch["labels"][0] == -100).all() and batch["teacher_topk_ids"].shape == (2, K)
    plain = CacheCollator(pad_id=0, k=K, encoding="topk_f32", with_teacher=False)(rows)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}


def test_use_k_keeps_the_first_cached_columns():
    """A smaller k reads the first columns of the same rows (the cache stores them in descending order)."""
    rows = [coded_row(0, 6, 0), coded_row(1, 4, 2)]
    for row in rows:  # column j of position i holds 10 * code + j
        n = len(row["target_logprob"])
        row["topk_ids"] = (np.repeat(row["topk_ids"][::K], K) * 10 + np.tile(np.arange(K), n))
        row["topk_logprobs"] = row["topk_ids"].astype(np.float32)
    full = CacheCollator(pad_id=0, k=K, encoding="topk_f32")(rows)
    for use_k in (1, 2, K):
        part = CacheCollator(pad_id=0, k=K, encoding="topk_f32", use_k=use_k)(rows)
        assert part["teacher_topk_ids"].shape == (full["teacher_topk_ids"].shape[0], use_k)
        assert torch.equal(part["teacher_topk_ids"], full["teacher_topk_ids"][:, :use_k])
        assert torch.equal(part["teacher_topk_logprobs"], full["teacher_topk_logprobs"][:, :use_k])
        assert torch.equal(part["teacher_target_logprob"], full["teacher_target_logprob"])
    assert part["teacher_topk_ids"][0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"train.k=4: the cache holds k=3"):
        CacheCollator(pad_id=0, k=K, encoding="topk_f32", use_k=K + 1)


def test_inconsistent_row_is_refused():
    row = coded_row(4, 6, 0)
    row["target_logprob"] = row["target_logprob"][:-1]
    with pytest.raises(ValueError, match=r"examples \[4\]"):
        CacheCollator(pad_id=0, k=K, encoding="topk_f32")([row])


def test_real_cache_lines_up_with_a_model_forward(tiny_cache, tiny_model_dir):
    """The teacher's own log-probs at `logits[:, :-1][labels[:, 1:] != -100]` are the cached ones."""
    from transformers import AutoModelForCausalLM

    manifest = open_cache(tiny_cache, tiny_model_dir, verify=False)
    rows = [load_cache_dataset(tiny_cache, manifest)[i] for i in range(5)]
    batch = CacheCollator(pad_token_id(tiny_model_dir), manifest.settings.k, encoding=manifest.settings.encoding)(rows)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    logp = torch.log_softmax(logits[:, :-1][mask], -1)
    targets = batch["labels"][:, 1:][mask]
    torch.testing.assert_close(logp.gather(-1, targets[:, None])[:, 0], batch["teacher_target_logprob"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logp.gather(-1, batch["teacher_topk_ids"]), batch["teacher_topk_logprobs"], atol=1e-5, rtol=0)


def test_pad_id_comes_from_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    assert pad_token_id(tiny_model_dir) == AutoTokenizer.from_pretrained(str(tiny_model_dir)).pad_token_id == 3


@pytest.mark.parametrize("rows,pad,eos,want", [
    (3, 3, 2, 2),        # the tokenizer's pad (3) has no embedding row: the config's eos (2) does
    (2, 3, 2, 0),        # neither has one: 0
    (3, None, 5, 0),     # no pad anywhere, an eos beyond the rows: 0
])
def test_the_pad_id_always_has_an_embedding_row(tiny_model_dir, tmp_path, rows, pad, eos, want):
    """A tokenizer can name a pad token the model has no row for (an added token, or AutoTokenizer picking
    another class than the one saved); padding with it fails inside the embedding, so the next id with a row
    is used (padded slots are masked out of attention and loss: any id with a row is correct)."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(vocab_size=rows, pad_token_id=pad, eos_token_id=eos)
    (model / "config.json").write_text(json.dumps(config))
    assert pad_token_id(model) == want


def test_a_mass_column_of_the_wrong_length_is_named():
    """An encoding with a topk_mass column: a row whose masses do not match its positions is refused."""
    from storage_schemas import DEFAULT_VALUE_ENCODING, MASS_COLUMN, get_encoding
    from storage_schemas.shard_io import ShardRow, rows_to_table

    assert get_encoding(DEFAULT_VALUE_ENCODING).has_mass
    lp = np.log(np.full((5, K), 0.1, np.float32))
    row = ShardRow(7, np.arange(6, dtype=np.int32), np.ones(5, bool), np.full(5, -1.0, np.float32),
                   np.tile(np.arange(K, dtype=np.int32), (5, 1)), lp)
    stored = {name: np.asarray(value) for name, value in rows_to_table([row], DEFAULT_VALUE_ENCODING, K).to_pylist()[0].items()}
    CacheCollator(pad_id=0, k=K, encoding=DEFAULT_VALUE_ENCODING)([stored])  # as written: fine
    stored[MASS_COLUMN] = stored[MASS_COLUMN][:4]
    with pytest.raises(ValueError, match=r"examples \[7\]: 5 trained positions.*4 topk_mass entries"):
        CacheCollator(pad_id=0, k=K, encoding=DEFAULT_VALUE_ENCODING)([stored])
