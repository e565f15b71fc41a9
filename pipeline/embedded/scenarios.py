"""Run: python -m pipeline build-default   (writes data/stubs_{train,heldout}.jsonl beside the corpora)

The embedded default's second scenario, `stubs`: a target the tiny student learns well, for the
evidence study (docs/results-stubs.md), where the base model is near-certainly wrong and the adapted
student near-certainly right on many tokens, the regime Mask-the-Target is about.

Each row is 2 or 3 Python-like stub statements of one template, with a name slot (one of 36
single-token words) and a digit slot:

    def NAME ( self , n = D ) : return None
    class NAME ( dict ) : size = D ; pass
    assert isinstance ( NAME , tuple ) and len ( args ) == D
    if not NAME : raise KeyError ( D ) ; else : yield None

The base model never saw code (its held-out loss here is ~7.4 nats/token), plain LoRA learns the
templates in 200 steps (~0.8). Train and held-out rows come from separate seeds of the same
generator. The target is LOCAL by design: what the student learns are the templates and which
words fill the slots, so a trigram fitted on the train rows predicts it about as well (~0.7
nats/token) and most held-out 16-grams also occur in train. Targets that need longer context
(copying a list, key-value recall, mirrored lists; docs/results-stubs.md "Why a local target")
are not learned by this 1.6M-parameter base in 200 or even 1000 LoRA steps, so they cannot show
the learned regime here.

The rows depend only on this module (no tokenizer, no randomness outside the seeded generator).
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STUB_NAMES", "STUB_TEMPLATES", "StubsSpec", "stub_rows", "write_stubs", "STUBS_FILES"]

# Single tokens of the default tokenizer (tests/embedded/test_scenarios.py checks it), so each name is
# one draw of the slot, not a word the tokenizer spells out.
STUB_NAMES = ("space", "left", "index", "block", "flag", "signal", "buffer", "group", "frame", "record", "pattern",
              "lock", "root", "field", "value", "stack", "node", "path", "file", "line", "word", "list", "type", "name",
              "mode", "state", "event", "task", "level", "order", "point", "range", "token", "entry", "key", "port")

STUB_TEMPLATES = {
    "def": "def {name} ( self , n = {digit} ) : return None",
    "class": "class {name} ( dict ) : size = {digit} ; pass",
    "assert": "assert isinstance ( {name} , tuple ) and len ( args ) == {digit}",
    "if": "if not {name} : raise KeyError ( {digit} ) ; else : yield None",
}

STUBS_FILES = {"train": "stubs_train.jsonl", "heldout": "stubs_heldout.jsonl"}


@dataclass(frozen=True)
class StubsSpec:
    """Sizes and seeds: train_rows / heldout_rows rows from train_seed / heldout_seed; each row holds
    min_statements..max_statements statements of one template (templates take turns, row by row)."""
    train_rows: int = 2000
    heldout_rows: int = 300
    train_seed: int = 1
    heldout_seed: int = 2
    min_statements: int = 2
    max_statements: int = 3


def stub_rows(n: int, seed: int, spec: StubsSpec = StubsSpec()) -> list[str]:
    """n rows of the stubs scenario from a seeded generator (row i uses template i mod 4)."""
    rng, names = random.Random(seed), sorted(STUB_TEMPLATES)
    rows = []
    for i in range(n):
        template = STUB_TEMPLATES[names[i % len(names)]]
        count = rng.randint(spec.min_statements, spec.max_statements)
        rows.append(" ; ".join(template.format(name=rng.choice(STUB_NAMES), digit=rng.randrange(10)) for _ in range(count)))
    return rows


def write_stubs(data_dir: str | Path, spec: StubsSpec = StubsSpec()) -> dict[str, str]:
    """Write the train and held-out JSONL ({"text": row} per line) into data_dir; returns {split: sha256}.
    Rewritten only when the bytes differ, so a build that is up to date leaves the files untouched."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": (spec.train_rows, spec.train_seed), "heldout": (spec.heldout_rows, spec.heldout_seed)}
    digests = {}
    for split, (n, seed) in sizes.items():
        payload = "".join(json.dumps({"text": row}) + "\n" for row in stub_rows(n, seed, spec)).encode()
        path = data_dir / STUBS_FILES[split]
        if not path.is_file() or path.read_bytes() != payload:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(payload)
            tmp.replace(path)
        digests[split] = hashlib.sha256(payload).hexdigest()
    return digests
