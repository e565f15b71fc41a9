"""The stubs scenario: deterministic rows, separate seeds for train and held-out, single-token names."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.embedded.scenarios import STUB_NAMES, STUB_TEMPLATES, STUBS_FILES, StubsSpec, stub_rows, write_stubs


def test_rows_follow_the_templates_from_a_seeded_generator():
    rows = stub_rows(40, seed=7)
    assert rows == stub_rows(40, seed=7) and rows != stub_rows(40, seed=8)
    names = "|".join(STUB_NAMES)
    for i, row in enumerate(rows):
        template = STUB_TEMPLATES[sorted(STUB_TEMPLATES)[i % 4]]  # templates take turns, row by row
        statement = re.escape(template).replace(r"\{name\}", f"(?:{names})").replace(r"\{digit\}", "[0-9]")
        assert re.fullmatch(f"{statement}(?: ; {statement}){{1,2}}", row), row


def test_write_stubs_is_deterministic_and_rewrites_only_changed_files(tmp_path):
    digests = write_stubs(tmp_path)
    paths = {split: tmp_path / name for split, name in STUBS_FILES.items()}
    lines = {split: [json.loads(line)["text"] for line in path.read_text().splitlines()] for split, path in paths.items()}
    spec = StubsSpec()
    assert lines["train"] == stub_rows(spec.train_rows, spec.train_seed)
    assert lines["heldout"] == stub_rows(spec.heldout_rows, spec.heldout_seed)
    assert not set(lines["train"]) & set(lines["heldout"]) or len(set(lines["train"]) & set(lines["heldout"])) < 30
    stamps = {split: path.stat().st_mtime_ns for split, path in paths.items()}
    assert write_stubs(tmp_path) == digests and stamps == {s: p.stat().st_mtime_ns for s, p in paths.items()}
    paths["heldout"].write_text("damaged\n")
    assert write_stubs(tmp_path) == digests and lines["heldout"][0] in paths["heldout"].read_text()


@pytest.mark.skipif(not Path("build/default/base-model/tokenizer.json").is_file(), reason="needs make build-default")
def test_every_name_is_one_token_of_the_default_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("build/default/base-model")
    assert [n for n in STUB_NAMES if len(tokenizer(" " + n, add_special_tokens=False)["input_ids"]) != 1] == []
