"""The one reader of the `config.yaml` an earlier run saved beside its cache or run directory.

    from stages.common.saved_config import read_saved_config
    tree = read_saved_config("runs/demo/train/config.yaml")     # a plain mapping, current key names

Used by `train --resume`, `eval --run` (pipeline/config.py `config_for_run`), the sweep (through
resume) and `plot-run`. A saved file is the project's own output: it may predate a key's rename, so
old names are translated silently here (`RENAMED_KEYS`). A config a person writes is not: hand-written
YAML and `key=value` overrides that use an old name are refused, naming the new key
(`check_current_keys`), so there is one spelling of each setting to read and to search for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["RENAMED_KEYS", "REMOVED_KEYS", "read_saved_config", "translate_saved_keys", "check_current_keys"]

# old dotted key -> its name now
RENAMED_KEYS = {
    "train.estimator": "train.method",
    "train.kl_weight": "train.reg_weight",
    "sweep.kl_weights": "sweep.reg_weights",
    "sweep.method_kl_weights": "sweep.method_reg_weights",
}
# old dotted key -> what replaced it (no value carries over)
REMOVED_KEYS = {
    "eval.text_field": "data.text_field (eval reads each set with data.text_field / data.messages_field, like stage one)",
}


def _section(tree: dict, dotted: str) -> tuple[dict | None, str]:
    """The mapping that holds `dotted`'s last part (None if a section on the way is missing), and that part."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return None, leaf
    return tree, leaf


def _pop(tree: dict, dotted: str) -> tuple[bool, Any]:
    section, leaf = _section(tree, dotted)
    return (True, section.pop(leaf)) if section is not None and leaf in section else (False, None)


def _has(tree: dict, dotted: str) -> bool:
    section, leaf = _section(tree, dotted)
    return section is not None and leaf in section


def translate_saved_keys(tree: dict, where: str) -> dict:
    """`tree` (a saved config, modified in place) with old key names replaced by the current ones.
    A removed key is dropped when it held its default (empty); otherwise ValueError naming `where`,
    the key and what replaced it, since its value would otherwise be lost without a word."""
    for old, new in RENAMED_KEYS.items():
        found, value = _pop(tree, old)
        if found and not _has(tree, new):
            section, leaf = new.rsplit(".", 1)
            tree.setdefault(section, {})[leaf] = value
    for old, replacement in REMOVED_KEYS.items():
        found, value = _pop(tree, old)
        if found and value not in ("", None):
            raise ValueError(f"{where}: sets {old}={value!r}, a key that no longer exists; use {replacement}, "
                             f"e.g. as an override {replacement.split()[0]}={value}")
    return tree


def read_saved_config(path: str | Path) -> dict:
    """A saved config.yaml as a mapping with current key names; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such saved config")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return translate_saved_keys(tree, str(path))


def check_current_keys(tree: dict, source: str) -> None:
    """ValueError naming the new key if a hand-written config (or an override, as a one-key tree) uses
    an old name."""
    for old, new in RENAMED_KEYS.items():
        if _has(tree, old):
            raise ValueError(f"config key '{old}' was renamed: use '{new}' ({source})")
    for old, replacement in REMOVED_KEYS.items():
        if _has(tree, old):
            raise ValueError(f"config key '{old}' was removed: use {replacement} ({source})")
