"""Whether a cache holds the data a config names: the `data:` section against a manifest's dataset.

    problems = data_differences(config.data, manifest.dataset, max_length=manifest.settings.max_length)

Stage two trains on the cache, never on `data.path`; a config whose `data:` names other data than the
cache holds would record one dataset in the run's config.yaml and train on another. Compared: the
bytes of the data files (not their path: a moved file is the same data), the split, the format and
the column(s) read, the input-rules version, data.assistant_eos, the tools column and
data.max_length. Each difference names the key and both values.
"""
from __future__ import annotations

from stages.data.inputs import INPUT_RULES, DataConfig, _fields, source_files
from storage_schemas import DatasetFingerprint
from storage_schemas.fingerprints import files_sha256

__all__ = ["data_differences"]


def data_differences(data: DataConfig, cached: DatasetFingerprint, max_length: int) -> list[str]:
    """One line per `data.*` setting under which stage one would not have written this cache
    (empty: the cache holds this data). A data.path that is not on this machine is not compared by
    content (a cache may be trained where its data is not); the other keys still are."""
    problems = []

    def differ(key: str, mine, theirs) -> None:
        if mine != theirs:
            problems.append(f"data.{key}: this config has {mine!r}, the cache was made with {theirs!r}")

    try:
        differ("path (its files' sha256)", files_sha256(source_files(data.path)), cached.source_sha256)
    except (FileNotFoundError, ValueError):
        pass  # the data is not here: the other keys still say whether it is the same data
    if problems:
        problems[0] = (f"data.path {data.path!r}: its files are not the data the cache was made from "
                       f"({cached.source})")
    differ("split", data.split, cached.split)
    if data.format != "auto":
        differ("format", data.format, cached.format)
    if cached.format in INPUT_RULES:
        keys = {"text": "text_field", "chat": "messages_field", "prompt-completion": "prompt_field, data.completion_field"}
        differ(keys[cached.format], ",".join(_fields(data)[cached.format]), cached.field)
        differ("input rules (stages/data/inputs.py INPUT_RULES)", INPUT_RULES[cached.format], cached.input_rules)
    if cached.format != "text":
        differ("assistant_eos", data.assistant_eos, cached.assistant_eos)
        differ("tools_field", data.tools_field, cached.tools_field)
    differ("max_length", data.max_length, max_length)
    differ("heldout_fraction", data.heldout_fraction, cached.heldout_fraction)
    ids = cached.num_examples + len(cached.skipped_examples) + len(cached.heldout_examples)  # the rows stage one read
    if data.max_examples and data.max_examples < ids:
        problems.append(f"data.max_examples: this config has {data.max_examples}, the cache was made from {ids} examples")
    return problems
