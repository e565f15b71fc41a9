"""Run: python -c "from pipeline.embedded.corpora import write_corpora; print(write_corpora('build/corpora'))"

The embedded default's two corpora, mined from the Python standard library's own source files.

Nothing can be downloaded here, so the stdlib is the one large, fixed text collection every
machine has. It is read as text and parsed with `ast`, never imported. Two domains come out:

- source: English prose, the paragraphs of module, class and function docstrings. The base model
  is pretrained on this; fine-tuning must not make it forget it.
- target: Python code, function definitions re-printed by `ast.unparse` with every docstring
  dropped (and so every comment, which `ast` never keeps). The base model never sees code, so
  fine-tuning on it is a real distribution shift.

Each corpus is split train / held-out by a seeded shuffle and written as JSONL `{"text": ...}`
lines, the same input format a user supplies. The output depends only on the arguments and the
Python version (which fixes the stdlib's contents).
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["CorpusCaps", "SPLIT_FILES", "iter_stdlib_modules", "docstring_paragraphs",
           "function_sources", "build_corpora", "write_corpora", "write_splits", "read_jsonl"]

# Directories that are tests, tools, vendored packages or generated boilerplate, not library code.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                       "turtledemo", "__pycache__", "encodings", "ensurepip", "pydoc_data"})

# Split name -> file name; the one place these names are spelled.
SPLIT_FILES = {
    "source_train": "source_train.jsonl",
    "source_heldout": "source_heldout.jsonl",
    "target_train": "target_train.jsonl",
    "target_heldout": "target_heldout.jsonl",
}


@dataclass(frozen=True)
class CorpusCaps:
    """Length filters and size caps for the two corpora.

    source_min_chars / source_max_chars: keep a docstring paragraph only within this length.
    target_min_chars / target_max_chars: keep an unparsed function only within this length.
    source_max_train_chars: stop adding source train paragraphs past this many characters.
    target_max_train: at most this many target train examples.
    heldout_fraction / heldout_max: held-out size = min(heldout_max, round(fraction * n)).
    seed: seed of the shuffle that picks the splits.
    """
    source_min_chars: int = 80
    source_max_chars: int = 1200
    target_min_chars: int = 80
    target_max_chars: int = 1500
    source_max_train_chars: int = 3_000_000
    target_max_train: int = 2000
    heldout_fraction: float = 0.08
    heldout_max: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.source_min_chars <= self.source_max_chars:
            raise ValueError("need 0 < source_min_chars <= source_max_chars")
        if not 0 < self.target_min_chars <= self.target_max_chars:
            raise ValueError("need 0 < target_min_chars <= target_max_chars")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5), got {self.heldout_fraction}")
        if self.heldout_max < 1 or self.target_max_train < 1 or self.source_max_train_chars < 1:
            raise ValueError("heldout_max, target_max_train and source_max_train_chars must be >= 1")


# --- reading the stdlib


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_modules(root: Path | None = None) -> Iterator[tuple[str, ast.Module]]:
    """Yield (relative path, parsed module) for every parseable .py file, in sorted order."""
    root = root or stdlib_root()
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order, which otherwise follows the file system.
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith(("config-", "lib-dynload")))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            tree = _parse(path)
            if tree is not None:
                yield path.relative_to(root).as_posix(), tree


def _parse(path: Path) -> ast.Module | None:
    try:
        text = path.read_text(encoding="utf-8")
        # Old files trigger SyntaxWarning (invalid escapes); they are data here, not code to fix.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(text)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None


# --- the two domains

_DOC_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


def docstring_paragraphs(tree: ast.Module, min_chars: int, max_chars: int) -> Iterator[str]:
    """Whitespace-normalized docstring paragraphs of one module, within the length bounds.

    Paragraphs that look like code (doctests, examples) are dropped: code belongs to target.
    """
    for node in ast.walk(tree):
        if not isinstance(node, _DOC_OWNERS):
            continue
        doc = ast.get_docstring(node, clean=True)
        for para in re.split(r"\n\s*\n", doc or ""):
            text = " ".join(para.split())
            if min_chars <= len(text) <= max_chars and _looks_like_prose(text):
                yield text


_CODE_START = re.compile(r"(def|class|import|from|async|@)\b")


def _looks_like_prose(text: str) -> bool:
    """Mostly letters and spaces, no doctest prompt, not opening like a statement."""
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters >= 0.85 * len(text) and ">>>" not in text and not _CODE_START.match(text)


def function_sources(tree: ast.Module, min_chars: int, max_chars: int) -> Iterator[str]:
    """Every function and method of one module as docstring-free source, within the bounds.

    Strips the docstrings of `tree` in place (copying each function first was 80% of the cost),
    so take the module's docstring paragraphs before calling this.
    """
    _strip_docstrings(tree)
    for node in ast.walk(tree):
        if not isinstance(node, _FUNCS):
            continue
        try:
            text = ast.unparse(node)
        except (ValueError, RecursionError):
            continue
        if min_chars <= len(text) <= max_chars:
            yield text


def _strip_docstrings(tree: ast.AST) -> None:
    """Drop every docstring in `tree`, nested ones included (target must hold no prose)."""
    for node in ast.walk(tree):
        if isinstance(node, _DOC_OWNERS) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]


# --- splitting and writing


def _dedup(texts: Iterator[str], exclude: set[str] = frozenset()) -> list[str]:
    seen: set[str] = set()
    out = []
    for text in texts:
        if text not in seen and text not in exclude:
            seen.add(text)
            out.append(text)
    return out


def _split(texts: list[str], caps: CorpusCaps, salt: str) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then held-out first; the salt gives each corpus its own permutation."""
    order = list(texts)
    random.Random(f"{caps.seed}:{salt}").shuffle(order)
    n_heldout = max(1, min(caps.heldout_max, round(caps.heldout_fraction * len(order))))
    if len(order) < n_heldout + 1:
        raise ValueError(f"{salt} corpus has only {len(order)} examples")
    return order[n_heldout:], order[:n_heldout]


def _cap_chars(texts: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for text in texts:
        if total + len(text) > max_chars:
            break
        out.append(text)
        total += len(text)
    return out


def build_corpora(caps: CorpusCaps = CorpusCaps(), root: Path | None = None) -> dict[str, list[str]]:
    """Mine both corpora and split them. Returns {split name: texts}, see SPLIT_FILES."""
    prose, code = [], []
    for _, tree in iter_stdlib_modules(root):
        prose.extend(docstring_paragraphs(tree, caps.source_min_chars, caps.source_max_chars))
        code.extend(function_sources(tree, caps.target_min_chars, caps.target_max_chars))
    source = _dedup(iter(prose))
    # Excluding source texts from target makes the two corpora disjoint by construction.
    target = _dedup(iter(code), exclude=set(source))
    source_train, source_heldout = _split(source, caps, "source")
    target_train, target_heldout = _split(target, caps, "target")
    return {
        "source_train": _cap_chars(source_train, caps.source_max_train_chars),
        "source_heldout": source_heldout,
        "target_train": target_train[:caps.target_max_train],
        "target_heldout": target_heldout,
    }


def write_corpora(out_dir: str | Path, caps: CorpusCaps = CorpusCaps(),
                  root: Path | None = None) -> dict[str, dict[str, int]]:
    """Mine, split and write the four JSONL files into out_dir; see write_splits.

    root: the directory tree to mine; None means this Python's stdlib (tests pass a small copy).
    """
    return write_splits(build_corpora(caps, root), out_dir)


def write_splits(splits: dict[str, list[str]], out_dir: str | Path) -> dict[str, dict[str, int]]:
    """Write {split name: texts} as JSONL; return {split name: {"examples", "chars"}}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, texts in splits.items():
        with open(out_dir / SPLIT_FILES[name], "w", encoding="utf-8", newline="\n") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        counts[name] = {"examples": len(texts), "chars": sum(len(t) for t in texts)}
    return counts


def read_jsonl(path: str | Path) -> list[str]:
    """The "text" field of every line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]
