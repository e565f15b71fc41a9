"""Fingerprints of what a cache was made from: teacher weights, tokenizer, input data.

Stage one writes them into the manifest; stage two recomputes them for its student base model and
refuses a cache whose tokenizer (or, unless allowed, weights) differ.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage_schemas.manifest import TeacherFingerprint, TokenizerFingerprint

__all__ = ["teacher_fingerprint", "tokenizer_fingerprint", "files_sha256", "model_vocab_size", "check_model_dir"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state", "scaler")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def files_sha256(paths: list[Path] | list[str], with_names: bool = True) -> str:
    """The project's one file digest: sha256 over the files' bytes in the order given, each preceded by
    its name and a NUL when `with_names` (a single file without its name: the plain `sha256sum`)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if with_names:
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _by_name(paths: list[Path]) -> list[Path]:
    return sorted(paths, key=lambda p: p.name)  # independent of how the directory lists them


def check_model_dir(model_dir: str | Path) -> Path:
    """The model directory as a Path, or a clear error if it is not a loadable HF model directory."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory (expected a local HF model directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {str(path)!r} has no config.json")
    return path


def model_vocab_size(model_dir: str | Path) -> int:
    """Rows of the output layer: what teacher log-probs range over."""
    config = json.loads((check_model_dir(model_dir) / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    if not isinstance(size, int):
        raise ValueError(f"{model_dir}/config.json: no integer vocab_size")
    return size


def teacher_fingerprint(model_dir: str | Path, revision: str | None = None) -> TeacherFingerprint:
    path = check_model_dir(model_dir)
    # Prefer safetensors; never hash a Trainer checkpoint's optimizer/args files as "weights".
    weights = sorted(path.glob("*.safetensors")) or [
        p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file() and not p.name.startswith(NOT_WEIGHTS)]
    if not weights:
        raise FileNotFoundError(f"model path {str(path)!r} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    return TeacherFingerprint(
        model_path=str(path.resolve()), revision=revision,
        weights_sha256=files_sha256(_by_name(weights)), config_sha256=files_sha256([path / "config.json"]),
    )


def tokenizer_fingerprint(model_dir: str | Path) -> TokenizerFingerprint:
    path = check_model_dir(model_dir)
    files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not files:
        raise FileNotFoundError(f"model path {str(path)!r} holds no tokenizer files")
    return TokenizerFingerprint(sha256=files_sha256(_by_name(files)), vocab_size=model_vocab_size(path))
