"""Training inputs: a `datasets` source -> tokenized examples with a per-position loss mask.

Accepted sources (`data.path`): a .jsonl/.json/.parquet/.csv/.arrow file, a glob or directory of
them, or a dataset saved with `save_to_disk`; a Hub dataset id (`org/name`, `hf://datasets/org/name/...`)
arrives here already resolved to such local files (stages/data/hub.py, when the config is loaded).
Three input formats (`input_format`, picked from the columns unless `data.format` names one):
text (every position is trained), chat (a messages column of {role, content, ...} lists, rendered
with the tokenizer's chat template, assistant bodies trained: stages/data/chat_masks.py) and
prompt-completion (TRL's format, strings or message lists, only the completion trained). Which
tokens are trained: docs/chat-data.md. Errors name the file, the field and the example.
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common.checks import require
from stages.data.chat_masks import ChatMaskError, StopSet, mask_conversation, stop_token_ids

__all__ = ["DataConfig", "Example", "InputFormat", "InputReport", "FORMATS", "INPUT_RULES", "heldout_ids", "input_format",
           "is_saved_dataset", "load_rows", "resolved_split", "tokenize_rows", "source_files"]

FORMATS = ("text", "chat", "prompt-completion")
# Bump a format's version when its tokenization or trained-token mask changes (cache identity): chat
# and prompt-completion moved to 3 with issue 23's header/closer rules; text is unchanged since 2.
INPUT_RULES = {"text": 2, "chat": 3, "prompt-completion": 3}
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
    format: str = field(default="auto", metadata={"help": (
        "auto | text | chat | prompt-completion. auto: the one format whose column(s) the data has "
        "(text_field; messages_field; prompt_field + completion_field); two at once is an error asking to choose")})
    text_field: str = field(default="text", metadata={"help": "text data: a string column, every token is trained"})
    messages_field: str = field(default="messages", metadata={"help": (
        "chat data: a column of [{role, content, ...}] lists (or JSON strings of them); only assistant bodies "
        "are trained (docs/chat-data.md)")})
    prompt_field: str = field(default="prompt", metadata={"help": (
        "prompt-completion data: the prompt column (a string, or a message list); never trained")})
    completion_field: str = field(default="completion", metadata={"help": (
        "prompt-completion data: the completion column (a string, or a message list); only it is trained")})
    tools_field: str = field(default="tools", metadata={"help": (
        "chat data: a column of tool definitions (a list, or a JSON string) passed to the template (`tools=`), "
        "when present; never trained")})
    assistant_eos: str = field(default="none", metadata={"help": (
        "none | append. append: for a chat template that closes assistant turns with no stop token, insert the "
        "tokenizer's EOS after each assistant content (trained, scored by the teacher); refused where the "
        "template closes turns itself")})
    max_length: int = field(default=256, metadata={"help": "longer sequences are truncated on the right (counted, reported)"})
    max_examples: int = field(default=0, metadata={"help": "0 = all; else the first N (quick runs)"})
    heldout_fraction: float = field(default=0.0, metadata={"help": (
        "share of the examples stage one keeps out of the cache, chosen by example id (heldout_ids: deterministic, "
        "the same for any data of that many rows), listed in the manifest (dataset.heldout_examples); eval scores "
        "them as its target set when eval.target_path is not set. 0 = none")})
    on_bad_example: str = field(default="refuse", metadata={"help": (
        "refuse (stop, naming file + example) | skip (leave it out, id kept as a gap, counted, listed in the "
        "manifest's dataset.skipped_examples)")})

    def __post_init__(self) -> None:
        require(bool(self.path), "data.path: empty")
        require(self.format in ("auto", *FORMATS), f"data.format: {self.format!r} not in auto|{'|'.join(FORMATS)}")
        require(self.assistant_eos in ("none", "append"), f"data.assistant_eos: {self.assistant_eos!r} not in none|append")
        require(self.on_bad_example in ("refuse", "skip"), f"data.on_bad_example: {self.on_bad_example!r} not in refuse|skip")
        require(self.max_length >= 2, f"data.max_length: must be >= 2, got {self.max_length}")
        require(self.max_examples >= 0, f"data.max_examples: must be >= 0, got {self.max_examples}")
        require(0.0 <= self.heldout_fraction < 1.0, f"data.heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")


def heldout_ids(example_ids, fraction: float) -> list[int]:
    """The example ids kept out of the cache at `fraction` (data.heldout_fraction): id i is held out
    when the first 8 bytes of sha256("heldout:<i>"), read as a number in [0, 1), fall below
    `fraction`. Deterministic and independent of the data's content and order of processing, so
    stage one and eval pick the same ids, and appending rows never moves an earlier one. Sorted."""
    import hashlib

    scale = float(2 ** 64)
    return sorted(i for i in example_ids
                  if int.from_bytes(hashlib.sha256(f"heldout:{i}".encode()).digest()[:8], "big") / scale < fraction)


# --- which format ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputFormat:
    """The format rows are read in and the column(s) read."""

    kind: str                 # one of FORMATS
    fields: tuple[str, ...]   # (text,) | (messages,) | (prompt, completion)

    @property
    def rules(self) -> int:
        """The input-rules version of this format (INPUT_RULES): part of a cache's identity."""
        return INPUT_RULES[self.kind]


def _fields(cfg: DataConfig) -> dict[str, tuple[str, ...]]:
    return {"text": (cfg.text_field,), "chat": (cfg.messages_field,), "prompt-completion": (cfg.prompt_field, cfg.completion_field)}


def _formats_help(cfg: DataConfig) -> str:
    return (f"supported formats and the keys that select them: text (a string column data.text_field={cfg.text_field!r}; "
            f"every token trained), chat (a column data.messages_field={cfg.messages_field!r} of [{{role, content}}] lists "
            f"or JSON strings of them; assistant turns trained), prompt-completion (columns data.prompt_field="
            f"{cfg.prompt_field!r} and data.completion_field={cfg.completion_field!r}, both strings or both message lists; "
            "the completion trained); data.format=text|chat|prompt-completion picks one")


def _mapping_hint(columns: list[str]) -> str:
    names = {c.lower() for c in columns}
    if {"instruction", "output"} <= names:
        return ("; Alpaca-style rows (instruction/input/output): write them as a 'messages' column, [{role: user, content: "
                "instruction + \"\\n\\n\" + input}, {role: assistant, content: output}] (the chat template writes the "
                "headers), or as prompt/completion columns with the headers in the prompt: prompt = \"### Instruction:\\n\" + "
                "instruction + \"\\n\\n### Input:\\n\" + input + \"\\n\\n### Response:\\n\", completion = output")
    if "conversations" in names:
        return ("; ShareGPT rows ('conversations' of {from, value}): convert each to {role, content} (human -> user, "
                "gpt -> assistant) in a 'messages' column")
    return ""


def input_format(cfg: DataConfig, columns: list[str], source: str = "") -> InputFormat:
    """The format of rows with these `columns` under `cfg` (module doc). ValueError naming `source`,
    the columns and the keys that select each format when no format, or more than one, fits."""
    source = source or cfg.path
    fields = _fields(cfg)
    if cfg.format != "auto":
        missing = [f for f in fields[cfg.format] if f not in columns]
        if missing:
            raise ValueError(f"{source}: data.format={cfg.format} needs column(s) {missing}, not found (columns: {columns}); "
                             + _formats_help(cfg) + _mapping_hint(columns))
        return InputFormat(cfg.format, fields[cfg.format])
    found = [kind for kind in FORMATS if fields[kind][0] and fields[kind][0] in columns]
    if len(found) > 1:
        raise ValueError(f"{source}: the columns {columns} fit more than one input format ({', '.join(found)}): "
                         f"choose one with data.format={'|'.join(found)}")
    if found == ["prompt-completion"] and cfg.completion_field not in columns:
        raise ValueError(f"{source}: a prompt column {cfg.prompt_field!r} but no completion column {cfg.completion_field!r} "
                         f"(columns: {columns}); set data.completion_field to the column to train")
    if not found:
        raise ValueError(f"{source}: no column of a supported input format (columns: {columns}); "
                         + _formats_help(cfg) + _mapping_hint(columns))
    return InputFormat(found[0], fields[found[0]])


# --- finding and loading the source -------------------------------------------------------
def is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def source_files(path_text: str) -> list[Path]:
    """The data files behind `data.path`, sorted; a clear error when there are none."""
    path = Path(path_text)
    if is_saved_dataset(path):
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


def _check_text_files(files: list[Path]) -> None:
    """Text inputs must be UTF-8 (`datasets` would otherwise replace bad bytes silently) and hold
    rows (`datasets` stops with a bare StopIteration, or "no data" for a CSV header alone); errors
    name the file and the 1-based line."""
    for path in files:
        if path.suffix not in (".jsonl", ".json", ".csv"):
            continue
        with open(path, "rb") as fh:
            filled = 0
            for number, line in enumerate(fh, start=1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}: line {number} is not valid UTF-8") from None
                filled += bool(text.strip())
        if not filled:
            raise ValueError(f"{path}: the file is empty (no rows); remove it, or point the path setting at the data")
        if path.suffix == ".csv" and filled == 1:
            raise ValueError(f"{path}: a header line and no rows; remove it, or point the path setting at the data")


def _json_problem(path: Path) -> str | None:
    """What is wrong with a .json/.jsonl file, by 1-based line: a .json file is one JSON document (an
    array or object of rows) or JSON Lines; a .jsonl file is JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    first = text.lstrip()[:1]
    if path.suffix == ".json" and first in "[{":
        try:
            json.loads(text)
            return None
        except json.JSONDecodeError as err:
            if first == "[" or err.msg != "Extra data":  # "Extra data": several objects, i.e. JSON Lines
                return f"line {err.lineno} is not valid JSON ({err.msg}, column {err.colno})"
    if path.suffix == ".jsonl" and first == "[":
        return "line 1 starts a JSON array, not JSON Lines (one object per line): name the file .json"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number} is not valid JSON ({err.msg}, column {err.colno}): {line.strip()[:80]!r}"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object of columns: {line.strip()[:80]!r}"
    return None


def load_rows(cfg: DataConfig, check_field: bool = True):
    """The raw rows as a `datasets.Dataset`, with their input format checked (`input_format`; not
    when `check_field` is False). ValueError naming the file (and the 1-based line of a malformed
    JSON Lines row) when the source cannot be read; an empty source is an error."""
    import datasets

    files = source_files(cfg.path)
    _check_text_files(files)
    bars_were_on = not datasets.utils.are_progress_bars_disabled()  # off for a quiet run (pipeline/quiet.py)
    datasets.disable_progress_bars()
    try:
        if is_saved_dataset(Path(cfg.path)):
            rows = datasets.load_from_disk(cfg.path)
        else:
            loader = LOADERS[files[0].suffix]
            rows = datasets.load_dataset(loader, data_files=[str(f) for f in files], split=cfg.split or "train")
    except Exception as err:  # datasets/pyarrow raise many types; re-raise one that names the file
        raise ValueError(_explain_load_error(files, err)) from err
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if isinstance(rows, datasets.DatasetDict):
        rows = rows[_split_of(cfg, list(rows))]
    if len(rows) == 0:
        raise ValueError(f"{cfg.path}: no rows (split {cfg.split!r})")
    if check_field:
        input_format(cfg, rows.column_names)
    if cfg.max_examples:
        rows = rows.select(range(min(cfg.max_examples, len(rows))))
    return rows


def resolved_split(cfg: DataConfig) -> str:
    """The split load_rows reads for `cfg`: a dataset folder's (cfg.split, or its only one), else
    cfg.split or "train" (data files have one split, named train)."""
    listing = Path(cfg.path) / "dataset_dict.json"
    if listing.is_file():
        return _split_of(cfg, list(json.loads(listing.read_text()).get("splits", [])))
    return cfg.split or "train"


def _split_of(cfg: DataConfig, splits: list[str]) -> str:
    """The split to read from a dataset folder holding `splits`: cfg.split, or ("") its only one."""
    if cfg.split in splits or (not cfg.split and len(splits) == 1):
        return cfg.split or splits[0]
    wanted = f"has no split {cfg.split!r}" if cfg.split else "holds several splits"
    raise ValueError(f"{cfg.path} {wanted} (splits: {splits}); name the one to read (data.split for training "
                     "data, eval.split for an eval set)")


def _explain_load_error(files: list[Path], err: Exception) -> str:
    for path in files:
        if path.suffix in (".jsonl", ".json"):
            bad = _json_problem(path)
            if bad:
                return f"{path}: {bad}"
    return f"could not read {', '.join(map(str, files[:3]))}: {type(err).__name__}: {err}"


# --- tokenization ---------------------------------------------------------------------------
@dataclass
class InputReport:
    """What tokenizing a source did besides producing examples (summary and manifest)."""

    format: InputFormat | None = None
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (example id, reason): data.on_bad_example=skip
    leading_bos_dropped: int = 0   # text rows that began with the BOS string (one BOS kept)
    heldout: list[int] = field(default_factory=list)  # example ids kept out of the cache (data.heldout_fraction)
    unclosed_turns: int = 0        # chat assistant turns the template closes with no stop token or closing text
    eos_appended: int = 0          # of those, the ones given the tokenizer's EOS (data.assistant_eos=append)

    def warnings(self) -> list[str]:
        """One line per thing a user must know before spending teacher time on these examples."""
        if not self.unclosed_turns:
            return []
        if self.eos_appended:
            return [f"{self.eos_appended:,} assistant turns end with an EOS inserted by data.assistant_eos=append "
                    "(the chat template closes them with no stop token)"]
        return [f"{self.unclosed_turns:,} assistant turns are closed by no stop token or closing text: the model will not "
                "learn to stop from this chat template (data.assistant_eos=append inserts the tokenizer's EOS)"]


def _tokenized_text(text: str, tokenizer, report: InputReport, offsets: bool = False) -> dict:
    """The tokenizer's encoding of `text` (special-token strings parsed, BOS added where the
    tokenizer adds one); a text that already starts with the BOS string keeps one BOS (counted)."""
    encoded = dict(tokenizer(text, return_offsets_mapping=offsets))
    ids, bos = encoded["input_ids"], tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos and text.startswith(tokenizer.bos_token):
        encoded = {key: value[1:] for key, value in encoded.items()}
        report.leading_bos_dropped += 1
    return encoded


def _text_example(text, tokenizer, where: str, report: InputReport) -> tuple[list[int], list[bool]]:
    """Text as the tokenizer parses it (no EOS appended: a text row may be a slice of a longer
    document); every position trained."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{where}: empty or whitespace-only text")
    ids = _tokenized_text(text, tokenizer, report)["input_ids"]
    return ids, [True] * (len(ids) - 1)


def _chat_example(messages, tokenizer, where: str, report: InputReport, cfg: DataConfig, tools=None) -> tuple[list[int], list[bool]]:
    """The conversation's one rendering; trained = the assistant bodies (stages/data/chat_masks.py)."""
    try:
        mask = mask_conversation(messages, tokenizer, _stops(tokenizer), tools=tools, append_eos=cfg.assistant_eos == "append")
    except ChatMaskError as err:
        raise ChatMaskError(f"{where}: {err}".replace("assistant_eos=", "data.assistant_eos=")) from None
    report.unclosed_turns += mask.unclosed_turns
    report.eos_appended += mask.eos_appended
    return mask.ids, mask.trained[1:]


def _standard_completion_example(prompt: str, completion: str, tokenizer, where: str, report: InputReport):
    """A standard prompt-completion pair as TRL's SFTTrainer trains it: the tokenizer's EOS string
    appended to the completion unless it already ends with it, prompt + completion tokenized as one
    text (BOS where the tokenizer adds one), and trained = every token holding a character of the
    completion (offset >= len(prompt)), so a token merged across the boundary is trained."""
    if not completion.strip():
        raise ValueError(f"{where}: empty or whitespace-only completion")
    eos = tokenizer.eos_token
    if eos and not completion.endswith(eos):
        completion += eos
    text = prompt + completion
    encoded = _tokenized_text(text, tokenizer, report, offsets=True)
    trained = [end > len(prompt) and end > begin for begin, end in encoded["offset_mapping"]]
    return encoded["input_ids"], trained[1:]


def _conversational_completion_example(prompt: list, completion: list, tokenizer, where: str, report: InputReport,
                                       cfg: DataConfig, tools=None):
    """A conversational pair: prompt + completion rendered as one conversation by the chat rule,
    the prompt's assistant turns not trained (weight 0)."""
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
        raise ValueError(f"{where}: the completion has no assistant message to train (roles: "
                         f"{[m.get('role') if isinstance(m, dict) else type(m).__name__ for m in completion]})")
    frozen = [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
    return _chat_example(frozen + list(completion), tokenizer, where, report, cfg, tools)


def _completion_example(row: dict, fmt: InputFormat, tokenizer, where: str, report: InputReport, cfg: DataConfig):
    prompt, completion = (row[f] for f in fmt.fields)
    if isinstance(prompt, str) and isinstance(completion, str):
        return _standard_completion_example(prompt, completion, tokenizer, where, report)
    if isinstance(prompt, list) and isinstance(completion, list):
        return _conversational_completion_example(prompt, completion, tokenizer, where, report, cfg, row.get(cfg.tools_field))
    raise ValueError(f"{where}: prompt is a {type(prompt).__name__} and completion a {type(completion).__name__}; "
                     "both must be strings (standard) or both message lists (conversational)")


def _stops(tokenizer) -> StopSet:
    stops = getattr(tokenizer, "_mtcache_stop_ids", None)  # computed once per tokenizer object
    if stops is None:
        stops = stop_token_ids(tokenizer)
        tokenizer._mtcache_stop_ids = stops
    return stops


def tokenize_rows(rows, tokenizer, cfg: DataConfig, first_id: int = 0, report: InputReport | None = None,
                  fmt: InputFormat | None = None) -> list[Example]:
    """Tokenize rows (example ids counted from `first_id`), truncating to cfg.max_length.

    `fmt` is the input format (default: `input_format` of rows.column_names); it is recorded in
    `report.format`. A row that cannot be used raises ValueError naming cfg.path, the example and
    the field; with cfg.on_bad_example == "skip" it is left out instead (its id stays a gap) and
    recorded in `report.skipped`. Returns the examples in id order."""
    report = InputReport() if report is None else report
    fmt = fmt or input_format(cfg, rows.column_names)
    report.format = fmt
    examples = []
    for offset, row in enumerate(rows):
        example_id = first_id + offset
        where = f"{cfg.path}: example {example_id}, field{'s' if len(fmt.fields) > 1 else ''} {', '.join(map(repr, fmt.fields))}"
        try:
            if fmt.kind == "chat":
                tokenized = _chat_example(row[fmt.fields[0]], tokenizer, where, report, cfg, tools=row.get(cfg.tools_field))
            elif fmt.kind == "prompt-completion":
                tokenized = _completion_example(row, fmt, tokenizer, where, report, cfg)
            else:
                tokenized = _text_example(row[fmt.fields[0]], tokenizer, where, report)
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
