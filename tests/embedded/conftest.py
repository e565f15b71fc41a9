"""Fixtures for the embedded default: a small copy of the stdlib and a tiny recipe built once.

The real stdlib takes ~8 s to mine; a 14-file copy takes well under a second and still has
sub-packages, a skipped test directory and a file that does not parse.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.embedded.build import build_default
from pipeline.embedded.corpora import CorpusCaps, build_corpora, stdlib_root
from pipeline.embedded.recipe import DefaultRecipe

MINI_FILES = ["textwrap.py", "argparse.py", "difflib.py", "fractions.py", "statistics.py",
              "heapq.py", "shlex.py", "string.py", "json/__init__.py", "json/decoder.py",
              "json/encoder.py", "calendar.py", "bisect.py", "pathlib.py"]
# Text that only appears in files the miner must skip.
SKIPPED_MARKER = "This paragraph lives in a skipped file and must never reach either corpus."


@pytest.fixture(scope="session")
def mini_stdlib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini-stdlib")
    for name in MINI_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib_root() / name, root / name)
    (root / "test").mkdir()
    (root / "test" / "test_skipped.py").write_text(
        f'def test_it(value, other):\n    """{SKIPPED_MARKER}"""\n    return value + other + 97531864\n')
    (root / "broken.py").write_text(f'"""{SKIPPED_MARKER}"""\ndef broken(:\n    pass\n')
    return root


@pytest.fixture(scope="session")
def mini_splits(mini_stdlib) -> dict[str, list[str]]:
    """The four splits mined from the mini stdlib with default caps."""
    return build_corpora(CorpusCaps(), mini_stdlib)


@pytest.fixture(scope="session")
def skipped_marker() -> str:
    return SKIPPED_MARKER


@pytest.fixture(scope="session")
def tiny_recipe(mini_stdlib) -> DefaultRecipe:
    """A recipe that builds in a few seconds: mini corpora, vocab 512, 2 layers, 20 steps."""
    return DefaultRecipe(
        corpus=CorpusCaps(heldout_max=20, target_max_train=200),
        stdlib_dir=str(mini_stdlib), vocab_size=512, n_layers=2, intermediate=256,
        seq_len=64, batch_size=4, steps=20, warmup_steps=2)


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory, tiny_recipe) -> dict:
    """The tiny recipe built once; returns build_default's summary."""
    out = tmp_path_factory.mktemp("embedded") / "default"
    return build_default(out, recipe=tiny_recipe, progress=False)
