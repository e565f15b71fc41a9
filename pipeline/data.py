"""Training inputs: a `datasets` source -> tokenized examples with a per-position loss mask.

Accepted sources (`data.path`): a .jsonl/.json/.parquet/.csv/.arrow file, a glob or directory of
them, or a dataset saved with `save_to_disk`. Each row has either a text field (every position is
trained) or a chat `messages` field (list of {role, content}, rendered with the tokenizer's chat
template; only assistant turns are trained). Errors name the file, the field and the example.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DataConfig

__all__ = ["Example", "load_rows", "tokenize_rows", "source_files", "source_sha256"]

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Example:
    example_id: int
    input_ids: np.ndarray   # [T] int32
    loss_mask: np.ndarray   # [T-1] bool: position i (predicting token i+1) is trained
    truncated: bool


# --- finding and loading the source -------------------------------------------------------
def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def source_files(path_text: str) -> list[Path]:
    """The data files behind `data.path`, sorted; a clear error when there are none."""
    path = Path(path_text)
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.suffix in LOADERS]
    else:
        files = [Path(p) for p in sorted(glob.glob(path_text))]
    if not files:
        raise FileNotFoundError(f"data.path {path_text!r}: no data files found (supported: {sorted(LOADERS)} or a saved dataset)")
    unsupported = [f for f in files if f.suffix not in LOADERS]
    if unsupported:
        raise ValueError(f"data.path: {unsupported[0]} has an unsupported extension (supported: {sorted(LOADERS)})")
    if len({f.suffix for f in files}) > 1:
        raise ValueError(f"data.path {path_text!r}: mixes file types {sorted({f.suffix for f in files})}")
    return files


def source_sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.name).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _first_bad_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def load_rows(cfg: DataConfig):
    """The raw rows as a `datasets.Dataset`, with the configured field checked to exist."""
    import datasets

    files = source_files(cfg.path)
    _check_utf8(files)
    datasets.disable_progress_bars()
    try:
        if _is_saved_dataset(Path(cfg.path)):
            loaded = datasets.load_from_disk(cfg.path)
            rows = loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            loader = LOADERS[files[0].suffix]
            rows = datasets.load_dataset(loader, data_files=[str(f) for f in files], split=cfg.split)
    except Exception as err:  # datasets/pyarrow raise many types; re-raise one that names the file
        raise ValueError(_explain_load_error(files, err)) from err
    finally:
        datasets.enable_progress_bars()
    field = cfg.messages_field or cfg.text_field
    if field not in rows.column_names:
        kind = "data.messages_field" if cfg.messages_field else "data.text_field"
        raise ValueError(f"{kind} {field!r} is not a column of {cfg.path} (columns: {rows.column_names})")
    if cfg.max_examples:
        rows = rows.select(range(min(cfg.max_examples, len(rows))))
    return rows


def _check_utf8(files: list[Path]) -> None:
    """Text inputs must be UTF-8; `datasets` would otherwise replace bad bytes silently."""
    for path in files:
        if path.suffix in (".jsonl", ".json", ".csv"):
            line = _first_bad_utf8_line(path)
            if line is not None:
                raise ValueError(f"{path}: line {line} is not valid UTF-8")


def _explain_load_error(files: list[Path], err: Exception) -> str:
    return f"could not read {', '.join(map(str, files[:3]))}: {type(err).__name__}: {err}"


# --- tokenization ---------------------------------------------------------------------------
def _text_example(text, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: empty or whitespace-only text")
    ids = tokenizer(text)["input_ids"]
    return ids, [True] * (len(ids) - 1)


def _chat_example(messages, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    """Render with the chat template; train only tokens inside assistant turns (by char offsets)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages")
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        raise ValueError(f"{where}: no non-empty assistant turn to train on")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)) if i else 0
            spans.append((start, len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))))
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    trained = [any(s <= begin < e for s, e in spans) for begin, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], trained[1:]


def tokenize_rows(rows, tokenizer, cfg: DataConfig, first_id: int = 0) -> list[Example]:
    """Tokenize rows (example ids counted from `first_id`), truncating to cfg.max_length."""
    field = cfg.messages_field or cfg.text_field
    examples = []
    for offset, row in enumerate(rows):
        example_id = first_id + offset
        where = f"{cfg.path}: example {example_id}, field {field!r}"
        make = _chat_example if cfg.messages_field else _text_example
        ids, mask = make(row[field], tokenizer, where)
        truncated = len(ids) > cfg.max_length
        ids, mask = ids[: cfg.max_length], mask[: cfg.max_length - 1]
        if len(ids) < 2 or not any(mask):
            raise ValueError(f"{where}: fewer than 2 tokens or no trained position after tokenization")
        examples.append(Example(example_id, np.asarray(ids, np.int32), np.asarray(mask, bool), truncated))
    return examples
