"""Run: pytest tests/embedded/test_corpora.py

The corpora are deterministic and disjoint; the tokenizer round-trips both domains."""
from __future__ import annotations

import ast
import json

import pytest
from transformers import AutoTokenizer

from pipeline.embedded.corpora import SPLIT_FILES, CorpusCaps, build_corpora, write_corpora
from pipeline.embedded.tokenizer import train_tokenizer


def _assert_disjoint(splits: dict[str, list[str]]) -> None:
    for name, texts in splits.items():
        assert len(set(texts)) == len(texts), f"duplicates in {name}"
    source = set(splits["source_train"]) | set(splits["source_heldout"])
    target = set(splits["target_train"]) | set(splits["target_heldout"])
    assert not source & target
    assert not set(splits["source_train"]) & set(splits["source_heldout"])
    assert not set(splits["target_train"]) & set(splits["target_heldout"])


def test_written_twice_gives_identical_bytes(mini_stdlib, tmp_path):
    first = write_corpora(tmp_path / "a", root=mini_stdlib)
    second = write_corpora(tmp_path / "b", root=mini_stdlib)
    assert first == second
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(SPLIT_FILES.values())
    for name in SPLIT_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "a" / "source_train.jsonl").read_text().splitlines()]
    assert rows and all(list(row) == ["text"] for row in rows)


def test_mini_corpora_disjoint_and_within_bounds(mini_splits):
    caps = CorpusCaps()
    _assert_disjoint(mini_splits)
    for name, texts in mini_splits.items():
        assert texts, name
        low, high = ((caps.source_min_chars, caps.source_max_chars) if name.startswith("source")
                     else (caps.target_min_chars, caps.target_max_chars))
        assert all(low <= len(t) <= high for t in texts), name


def test_target_is_docstring_free_code_and_source_is_prose(mini_splits):
    for text in mini_splits["target_train"][:50]:
        func = ast.parse(text).body[0]
        assert isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert all(ast.get_docstring(n) is None for n in ast.walk(func)
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    assert all("\n" not in t and ">>>" not in t for t in mini_splits["source_train"])


def test_skips_test_dirs_and_unparseable_files(mini_splits, skipped_marker):
    everything = "\n".join(t for texts in mini_splits.values() for t in texts)
    assert skipped_marker not in everything
    assert "97531864" not in everything


def test_split_sizes_follow_caps(mini_stdlib):
    splits = build_corpora(CorpusCaps(heldout_max=5, target_max_train=30,
                                      source_max_train_chars=5000), mini_stdlib)
    assert len(splits["source_heldout"]) == len(splits["target_heldout"]) == 5
    assert len(splits["target_train"]) == 30
    assert sum(map(len, splits["source_train"])) <= 5000


def test_real_stdlib_corpora_are_large_and_disjoint():
    splits = build_corpora()  # the real stdlib, default caps: ~8 s
    _assert_disjoint(splits)
    assert sum(map(len, splits["source_train"])) > 500_000
    assert len(splits["target_train"]) == CorpusCaps().target_max_train
    assert len(splits["source_heldout"]) == len(splits["target_heldout"]) == CorpusCaps().heldout_max


# --- tokenizer

ROUND_TRIP = [
    "Return a new list containing all items from the iterable in ascending order.",
    "def f(a, b=None):\n    if b is None:\n        return {'a': a}\n\treturn [a, b]\n",
    "Unicode: naïve café — ✓ 日本語, and trailing spaces   ",
]


@pytest.fixture(scope="module")
def mini_tokenizer_dir(mini_splits, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(mini_splits["source_train"] + mini_splits["target_train"], out, vocab_size=512)
    return out


def test_tokenizer_round_trips_and_adds_bos(mini_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(mini_tokenizer_dir)
    assert len(tok) == 512
    assert [tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token] == ["<s>", "</s>", "<pad>", "<unk>"]
    for text in ROUND_TRIP:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_is_deterministic(mini_splits, mini_tokenizer_dir, tmp_path):
    train_tokenizer(mini_splits["source_train"] + mini_splits["target_train"], tmp_path, vocab_size=512)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (mini_tokenizer_dir / name).read_bytes()


def test_chat_template_marks_assistant_tokens(mini_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(mini_tokenizer_dir)
    chat = [{"role": "user", "content": "Sort these."}, {"role": "assistant", "content": "Done."}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<s><|user|>\nSort these.\n<|assistant|>\nDone.</s>\n")
    out = tok.apply_chat_template(chat, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    learned = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(learned) == "Done.</s>"
    assert tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n")
