"""The configuration reference is the settings dataclasses' own help (pipeline/config_docs.py).

- every field of every section (data, cache, train, train.lora, eval, sweep, approx, top level) has help;
- the committed docs/configuration.md is exactly what the generator renders from them today.
"""
from __future__ import annotations

import dataclasses
import difflib

from pipeline.config_docs import COMMAND, REFERENCE, TOP_LEVEL, config_sections, field_help, render_config_reference

EXPECTED_SECTIONS = ["data", "cache", "train", "train.lora", "eval", "eval.lm_eval", "sweep", "approx", TOP_LEVEL]


def test_sections_are_found():
    assert [name for name, _ in config_sections()] == EXPECTED_SECTIONS


def test_every_field_has_help():
    missing = [f"{name}.{f.name} ({cls.__module__}.{cls.__qualname__})"
               for name, cls in config_sections() for f in dataclasses.fields(cls) if not field_help(f)]
    assert not missing, ("settings fields without help: " + ", ".join(missing)
                         + '\ndeclare each as field(default=..., metadata={"help": "..."})')


def test_every_field_is_in_the_reference():
    text = render_config_reference()
    for name, cls in config_sections():
        section = text.split(f'<a id="{name.replace(".", "")}"></a>', 1)[1].split("<a id=", 1)[0]
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in section, f"{name}.{f.name} missing from its table"


def test_committed_reference_is_current():
    expected = render_config_reference()
    committed = REFERENCE.read_text() if REFERENCE.exists() else ""
    if committed != expected:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                                 "docs/configuration.md (committed)", "generated", n=0))[:40])
        raise AssertionError(f"docs/configuration.md is stale; regenerate it with `{COMMAND}`\n{diff}")
