"""Models and data named by Hugging Face Hub id, resolved once (when the config is loaded) to local paths.

    python -m pipeline train model=Qwen/Qwen2.5-0.5B model_revision=main data.path=org/my-dataset

    from stages.data.hub import resolve_hub_ids
    resolve_hub_ids(config)   # config.model, data.path, eval.*_path, train.fisher_data -> local paths

Spellings (a local path that exists always wins over an id of the same spelling):
    model: org/name                           a model repo at `model_revision` ("" = main)
    data.path: org/name                       a dataset repo: its saved dataset, its one data file, or its
                                              one folder of data files (several: name one, below)
    data.path: hf://datasets/org/name[@rev]/path/in/repo.jsonl
                                              a file, folder or glob inside a dataset repo (HF's own URL form)
The same data spellings work for eval.source_path, eval.target_path and train.fisher_data.

Offline first: the local Hub cache (HF_HUB_CACHE, else HF_HOME/hub) is tried with
`snapshot_download(..., local_files_only=True)`; only on a miss, and only when HF_HUB_OFFLINE is not
set, is the repo downloaded. Every stage then receives a local directory or file as before, so a
cache's identity stays the weights' and tokenizer's hashes: a cache made from the snapshot's local
directory and one made from the id are the same cache. What each id resolved to (id, revision asked,
commit) is recorded in the config's `hub_sources` and, for the teacher, in the manifest.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from stages.data.inputs import LOADERS

__all__ = ["is_repo_id", "resolve_model", "resolve_data", "resolve_hub_ids", "teacher_with_hub"]

_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]"                    # org/name, as the Hub allows them
_HF_URL = re.compile(rf"^hf://datasets/(?P<id>{_ID})(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.+))?$")
_DATA_SUFFIXES = tuple(LOADERS)  # the data files stages/data/inputs.py reads
# Framework formats this project never reads: not downloaded (a repo often holds several copies).
_IGNORED = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite", "*.ot", "*.gguf"]


def is_repo_id(text: str) -> bool:
    """`org/name` spelled as the Hub allows (not a path that starts with / . ~, nor `dir/file.jsonl`)."""
    return bool(re.fullmatch(_ID, text)) and not text.endswith(_DATA_SUFFIXES)


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# Read at call time: huggingface_hub reads these once, at import, and a test or notebook may set them later.
def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def _hub_cache() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE


def _snapshot(repo_id: str, revision: str, repo_type: str, what: str) -> Path:
    """The local snapshot directory of `repo_id` at `revision`: from the local cache, else downloaded.

    Raises FileNotFoundError naming `what`, the id and the cache when offline and not cached, or when
    the download fails (no such repo, no network, gated)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    kwargs = dict(repo_id=repo_id, revision=revision or None, repo_type=repo_type, cache_dir=_hub_cache())
    try:
        return Path(snapshot_download(**kwargs, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = f"{what} {repo_id!r} (revision {revision or 'main'})"
    if _offline():
        raise FileNotFoundError(
            f"{where}: not a local path, and not in the local Hub cache {kwargs['cache_dir']}; HF_HUB_OFFLINE is set, "
            f"so it is not downloaded: run `hf download {repo_id}{' --repo-type dataset' if repo_type == 'dataset' else ''}` "
            "once with network access, or give a local path")
    try:
        return Path(snapshot_download(**kwargs, ignore_patterns=_IGNORED))
    except Exception as err:  # the hub raises many types (not found, gated, network): one message naming the id
        raise FileNotFoundError(f"{where}: not a local path, and the Hub download failed: {type(err).__name__}: {err}") from err


def _record(repo_id: str, revision: str, snapshot: Path, path: Path) -> dict[str, str]:
    # the snapshot directory is named by its commit hash (huggingface_hub's cache layout)
    return {"id": repo_id, "revision": revision or "main", "commit": snapshot.name, "path": str(path)}


def resolve_model(model: str, revision: str = "") -> tuple[str, dict[str, str] | None]:
    """(local model directory, record) for `model`; the record is None when `model` is used as given
    (an existing local path, or not spelled as an id: the model loaders' own errors then apply)."""
    if Path(model).expanduser().exists() or not is_repo_id(model):
        return model, None
    snapshot = _snapshot(model, revision, "model", "model")
    return str(snapshot), _record(model, revision, snapshot, snapshot)


def _data_in_repo(snapshot: Path, repo_id: str, key: str) -> Path:
    """What `org/name` means inside a dataset repo: a saved dataset, its one data file, or its one
    folder of same-type data files; else a ValueError listing them and the spelling that picks one."""
    if (snapshot / "dataset_info.json").exists() or (snapshot / "dataset_dict.json").exists():
        return snapshot
    files = sorted(p for p in snapshot.rglob("*") if p.suffix in _DATA_SUFFIXES and p.is_file() and ".cache" not in p.parts)
    folders = {(p.parent, p.suffix) for p in files}
    if len(files) == 1:
        return files[0]
    if len(folders) == 1:
        return files[0].parent
    listed = ", ".join(str(p.relative_to(snapshot)) for p in files[:8]) or "none"
    raise ValueError(f"{key} {repo_id!r}: the dataset repo holds {len(files)} data files in {len(folders)} folders/types "
                     f"({listed}); name one: {key}=hf://datasets/{repo_id}/<path in repo>")


def resolve_data(path: str, key: str = "data.path") -> tuple[str, dict[str, str] | None]:
    """(local file, folder or glob, record) for a data path; the record is None when `path` is used as
    given (an existing local path, or neither `org/name` nor `hf://datasets/...`)."""
    url = _HF_URL.match(path)
    if Path(path).expanduser().exists() or not (url or is_repo_id(path)):
        return path, None
    repo_id, revision, inner = (url["id"], url["rev"] or "", url["sub"]) if url else (path, "", None)
    snapshot = _snapshot(repo_id, revision, "dataset", f"{key} {path!r}:" if url else key)
    if inner is None:
        local = _data_in_repo(snapshot, repo_id, key)
    else:
        local = snapshot / inner
        if not (local.exists() or any(snapshot.glob(inner))):
            raise FileNotFoundError(f"{key} {path!r}: no {inner!r} in dataset repo {repo_id!r} (snapshot {snapshot})")
    return str(local), _record(repo_id, revision, snapshot, local)


def resolve_hub_ids(config) -> None:
    """Resolve, in place, the Hub ids among `config`'s model and data paths (a StageConfig) to local
    paths, recording each in `config.hub_sources` ({key: {id, revision, commit, path}})."""
    config.model = _keep(config, "model", *resolve_model(config.model, config.model_revision))
    data_paths = [(config.data, "path", "data.path"), (config.eval, "source_path", "eval.source_path"),
                  (config.eval, "target_path", "eval.target_path"), (config.train, "fisher_data", "train.fisher_data")]
    for section, name, key in data_paths:
        if getattr(section, name):
            setattr(section, name, _keep(config, key, *resolve_data(getattr(section, name), key)))


def _keep(config, key: str, local: str, record: dict[str, str] | None) -> str:
    """Record a resolution; keep an old record (a saved config.yaml reloaded) only while it still names this path."""
    if record is not None:
        config.hub_sources[key] = record
    elif config.hub_sources.get(key, {}).get("path") != local:
        config.hub_sources.pop(key, None)
    return local


def teacher_with_hub(teacher, hub_sources: dict):
    """The manifest's TeacherFingerprint with the Hub id and commit the model came from (recorded, not identity)."""
    record = hub_sources.get("model")
    return teacher if record is None else replace(teacher, hub_id=record["id"], revision=record["commit"])
