"""Training inputs: a `datasets` source -> tokenized examples with a per-position loss mask.

Accepted sources (`data.path`): a .jsonl/.json/.parquet/.csv/.arrow file, a glob or directory of
them, or a dataset saved with `save_to_disk`; a Hub dataset id (`org/name`, `hf://datasets/org/name/...`)
arrives here already resolved to such local files (stages/data/hub.py, when the config is loaded).
Each row has either a text field (every position is trained) or a chat `messages` field (list of
{role, content, ...}, rendered with the tokenizer's chat template; which tokens are trained:
docs/chat-data.md, implemented in stages/data/chat_masks.py). Errors name the file, the field and the example.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common.checks import require
from stages.data.chat_masks import ChatMaskError, StopSet, assistant_body_mask, stop_token_ids

__all__ = ["DataConfig", "Example", "InputReport", "INPUT_RULES_VERSION", "load_rows", "tokenize_rows", "source_files"]

INPUT_RULES_VERSION = 2  # bump when tokenization or the trained-token mask changes (cache identity)
LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class Example:
    example_id: int
    input_ids: np.ndarray   # [T] int32
    loss_mask: np.ndarray   # [T-1] bool: position i (predicting token i+1) is trained
    truncated: bool


@dataclass
class DataConfig:
    path: str = field(default="build/default/data/target_train.jsonl", metadata={"help": (
        "file, glob, directory or saved dataset (.jsonl/.json/.parquet/.csv/.arrow, or `save_to_disk` output); "
        "or a Hub dataset id org/name, hf://datasets/org/name/path/in/repo (stages/data/hub.py)")})
    split: str = field(default="train", metadata={"help": "split to read"})
    text_field: str = field(default="text", metadata={"help": "used when messages_field is empty: plain text, every token is trained"})
    messages_field: str = field(default="", metadata={"help": (
        "chat data: list of {role, content, ...}; only assistant bodies are trained (docs/chat-data.md)")})
    tools_field: str = field(default="tools", metadata={"help": (
        "chat data: a column of tool definitions (a list, or a JSON string) passed to the template (`tools=`), "
        "when present; never trained")})
    max_length: int = field(default=256, metadata={"help": "longer sequences are truncated on the right (counted, reported)"})
    max_examples: int = field(default=0, metadata={"help": "0 = all; else the first N (quick runs)"})
    on_bad_example: str = field(default="refuse", metadata={"help": (
        "refuse (stop, naming file + example) | skip (leave it out, id kept as a gap, counted, listed in the "
        "manifest's dataset.skipped_examples)")})

    def __post_init__(self) -> None:
        require(bool(self.path), "data.path: empty")
        require(self.on_bad_example in ("refuse", "skip"), f"data.on_bad_example: {self.on_bad_example!r} not in refuse|skip")
        require(self.max_length >= 2, f"data.max_length: must be >= 2, got {self.max_length}")
        require(self.max_examples >= 0, f"data.max_examples: must be >= 0, got {self.max_examples}")



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


def _first_bad_utf8_line(path: Path) -> int | None:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return None


def load_rows(cfg: DataConfig, check_field: bool = True):
    """The raw rows as a `datasets.Dataset`, with the configured field checked to exist (unless
    `check_field` is False: callers that pick the field from the columns)."""
    import datasets

    files = source_files(cfg.path)
    _check_utf8(files)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()  # off for a quiet run (pipeline/quiet.py)
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
        if bars_were_on:
            datasets.enable_progress_bars()
    field = cfg.messages_field or cfg.text_field
    if check_field and field not in rows.column_names:
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
@dataclass
class InputReport:
    """What tokenizing a source did besides producing examples (summary and manifest)."""

    skipped: list[tuple[int, str]] = field(default_factory=list)  # (example id, reason): data.on_bad_example=skip
    leading_bos_dropped: int = 0   # text rows that began with the BOS string (one BOS kept)


def _text_example(text, tokenizer, where: str, report: InputReport) -> tuple[list[int], list[bool]]:
    """Text as the tokenizer parses it (special-token strings included; BOS where the tokenizer adds
    one, no EOS appended: a text row may be a slice of a longer document). A row that already starts
    with the BOS string would get a second BOS: one is dropped and the row counted."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: empty or whitespace-only text")
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(tokenizer.bos_token):
        ids = ids[1:]
        report.leading_bos_dropped += 1
    return ids, [True] * (len(ids) - 1)


def _chat_example(messages, tokenizer, where: str, report: InputReport, tools=None) -> tuple[list[int], list[bool]]:
    """The conversation's one rendering; trained = the assistant bodies (stages/data/chat_masks.py)."""
    try:
        ids, trained = assistant_body_mask(messages, tokenizer, _stops(tokenizer), tools=tools)
    except ChatMaskError as err:
        raise ChatMaskError(f"{where}: {err}") from None
    return ids, trained[1:]


def _stops(tokenizer) -> StopSet:
    stops = getattr(tokenizer, "_mtcache_stop_ids", None)  # computed once per tokenizer object
    if stops is None:
        stops = stop_token_ids(tokenizer)
        tokenizer._mtcache_stop_ids = stops
    return stops


def tokenize_rows(rows, tokenizer, cfg: DataConfig, first_id: int = 0, report: InputReport | None = None) -> list[Example]:
    """Tokenize rows (example ids counted from `first_id`), truncating to cfg.max_length.

    A row that cannot be used raises ValueError naming cfg.path, the example and the field; with
    cfg.on_bad_example == "skip" it is left out instead (its id stays a gap) and recorded in
    `report.skipped`. Returns the examples in id order."""
    report = InputReport() if report is None else report
    field_name = cfg.messages_field or cfg.text_field
    examples = []
    for offset, row in enumerate(rows):
        example_id = first_id + offset
        where = f"{cfg.path}: example {example_id}, field {field_name!r}"
        try:
            if cfg.messages_field:
                tokenized = _chat_example(row[field_name], tokenizer, where, report, tools=row.get(cfg.tools_field))
            else:
                tokenized = _text_example(row[field_name], tokenizer, where, report)
            examples.append(_example(example_id, tokenized, cfg, where))
        except ValueError as err:
            if cfg.on_bad_example != "skip":
                raise
            report.skipped.append((example_id, str(err)))
    return examples


def _example(example_id: int, tokenized: tuple[list[int], list[bool]], cfg: DataConfig, where: str) -> Example:
    ids, mask = tokenized
    truncated = len(ids) > cfg.max_length
    ids, mask = ids[: cfg.max_length], mask[: cfg.max_length - 1]
    if len(ids) < 2 or not any(mask):
        raise ValueError(f"{where}: fewer than 2 tokens or no trained position after tokenization"
                         + (f" (truncated to data.max_length={cfg.max_length})" if truncated else ""))
    return Example(example_id, np.asarray(ids, np.int32), np.asarray(mask, bool), truncated)
