"""LaLoRA's curvatures kept on disk, so the runs of a sweep that differ only in lambda (or steps, or
learning rate) compute the curvature once.

    <train.curvature_dir or parent of train.output_dir/curvature>/<key[:24]>.safetensors   the tensors
                                                                   <key[:24]>.json          key parts, cost

The key is the sha256 of what the curvature is computed from: the base model's weights and config,
the tokenizer, the adapter's settings (variant, rank, alpha, targets, ...; not dropout, off in eval
mode) and its initial trainable tensors (so the seed's draw, and any init, are in it exactly), the proxy
data's files, how many texts of it (fisher_examples, or fisher_batches x batch_size) at what length,
the curvature form and the base's dtype. The .json records the key and the sha256 of the tensor file:
a file whose key or bytes differ, that cannot be read or holds non-finite values is recomputed and
replaced, and the run says so. Writes go to a temporary name and are renamed, so a killed run leaves
no half file.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from stages.student.curvature import Curvature

__all__ = ["curvature_key", "cached_curvature", "store_dir"]


def store_dir(train) -> Path:
    """train.curvature_dir, or <parent of train.output_dir>/curvature (a sweep's runs share their parent)."""
    return Path(train.curvature_dir) if train.curvature_dir else Path(train.output_dir).resolve().parent / "curvature"


def _tensor_sha(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()


def curvature_key(train, model: torch.nn.Module, model_dir: str) -> tuple[str, dict[str, Any]]:
    """(sha256 hex, its parts) of the curvature `train` (a TrainConfig) asks for on `model` at its current weights."""
    from dataclasses import asdict

    from stages.data.inputs import source_files
    from storage_schemas.fingerprints import files_sha256, teacher_fingerprint, tokenizer_fingerprint

    teacher = teacher_fingerprint(model_dir)
    frozen = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
    parts = {
        "model_weights_sha256": teacher.weights_sha256, "model_config_sha256": teacher.config_sha256,
        "tokenizer_sha256": tokenizer_fingerprint(model_dir).sha256,
        # the adapter as built: its settings (dropout aside: the curvature runs in eval mode) and its initial
        # tensors, which hold the seed's draw and any init (PiSSA, OLoRA) exactly
        "lora": {k: v for k, v in asdict(train.lora).items() if k != "dropout"}, "quantization": train.quantization,
        "base_dtype": str(frozen), "initial_adapter_sha256": _tensor_sha(model),
        # the proxy texts read: fisher_batches x batch_size and fisher_examples name the same count
        "fisher_data_sha256": files_sha256(source_files(train.fisher_data)), "fisher_texts": train.fisher_texts,
        "fisher_max_length": train.fisher_max_length, "curvature": train.lalora_curvature,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), parts


def cached_curvature(train, model: torch.nn.Module, model_dir: str,
                     compute: Callable[[], Curvature]) -> tuple[Curvature, dict[str, Any]]:
    """The stored curvature for this key, or `compute()`d and stored. Returns it (on the model's device)
    and a report: {"key", "path", "reused", "seconds" (to compute, as recorded), "bytes" (tensors in
    memory), "file_bytes", "sequences", "positions"}. A stored file that cannot be trusted (unreadable,
    another key, bytes that do not match the sha256 recorded beside them, non-finite values) is
    recomputed and replaced, and said. ValueError naming train.curvature_dir when the store cannot be
    written (checked before computing), and for a computed curvature with non-finite values."""
    from safetensors.torch import save_file

    try:
        key, parts = curvature_key(train, model, model_dir)
    except (OSError, ValueError) as err:  # stages.data.inputs names "data.path": say which key it was
        raise ValueError(f"train.fisher_data: {err}") from err
    folder = store_dir(train)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"train.curvature_dir: cannot create the curvature store {folder} ({err}); "
                         "set train.curvature_dir to a writable directory") from err
    stem = folder / key[:24]
    device = next(p.device for p in model.parameters() if p.requires_grad)
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if meta_path.exists() or data_path.exists():
        stored, problem = _load(meta_path, data_path, key, parts["curvature"])
        if stored is not None:
            curvature, meta = stored
            return curvature.to(device, _dtype(curvature)), {**meta["report"], "path": str(data_path), "reused": True}
        print(f"lalora: recomputing the stored curvature {data_path}: {problem}")
    start = time.perf_counter()
    curvature = compute()
    seconds = time.perf_counter() - start
    if not all(bool(torch.isfinite(t).all()) for t in curvature.tensors().values()):
        raise ValueError("lalora: the curvature of train.fisher_data has non-finite values (the model's loss on the proxy "
                         "texts overflowed?); nothing was stored")
    tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    save_file({k: v.cpu() for k, v in curvature.tensors().items()}, str(tmp))
    tmp.replace(data_path)
    report = {"key": key, "seconds": round(seconds, 3), "bytes": curvature.nbytes(), "file_bytes": data_path.stat().st_size,
              "sequences": curvature.sequences, "positions": curvature.positions, "curvature": parts["curvature"]}
    meta = {"key": key, "parts": parts, "sequences": curvature.sequences, "positions": curvature.positions,
            "sha256": _file_sha(data_path), "report": report}
    tmp_meta = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, default=str))
    tmp_meta.replace(meta_path)
    return curvature, {**report, "path": str(data_path), "reused": False}


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load(meta_path: Path, data_path: Path, key: str, kind: str) -> tuple[tuple[Curvature, dict] | None, str]:
    """((curvature, meta), "") when the stored pair is whole and is this key's, else (None, why not)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{meta_path.name} is missing or not valid JSON ({err})"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None, f"{meta_path.name} records another key"
    try:
        if meta.get("sha256") != _file_sha(data_path):
            return None, "its bytes do not match the sha256 recorded when it was written"
        flat = load_file(str(data_path))
        curvature = Curvature.from_tensors(kind, flat, meta["sequences"], meta["positions"])
    except Exception as err:  # noqa: BLE001 (a damaged file raises whatever safetensors raises: recompute it)
        return None, f"it cannot be read ({type(err).__name__}: {err})"
    if not all(bool(torch.isfinite(t).all()) for t in flat.values()):
        return None, "it holds non-finite values"
    return (curvature, meta), ""


def _dtype(curvature: Curvature) -> torch.dtype:
    first = next(iter(curvature.tensors().values()))
    return first.dtype
