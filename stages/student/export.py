"""A trained run as a plain Hugging Face model: the adapter merged into the base weights.

    python -m pipeline export --run runs/demo/train --out exported/demo-merged
    export_merged("runs/demo/train/adapter", "build/default/base-model", "exported/demo-merged")

The base is loaded in float32, the adapter applied with peft (`load_adapter`) and merged
(`merge_and_unload`: W + BA per adapted layer; DoRA's magnitude too; RandLoRA's full-rank sum of scaled
random bases; SineLoRA's sin(omega * B A) / g * scaling), and the result saved in the base's own dtype with the
base's tokenizer, chat template and generation config, so transformers' `from_pretrained` and vLLM
load it like any model directory. A run trained on a 4-bit base (train.quantization=4bit) merges
into the full-precision base it was quantized from.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["export_merged"]

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_merged(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype: str = "auto") -> Path:
    """Write the base in `model_dir` with the peft adapter in `adapter_dir` merged into `out_dir`
    (which must not exist or be empty). dtype: the saved weights' dtype, "auto" = the base's
    `config.json` dtype (float32 if it names none). Returns out_dir. ValueError for an unknown
    dtype or a non-empty out_dir; FileNotFoundError for a missing adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from stages.student.adapters import load_adapter

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r} not in {sorted(_DTYPES)}")
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json (is it a finished run's adapter/?)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is a file; --out must be a new or empty directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not empty; choose a new --out (an export never overwrites)")
    stored = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    target = _DTYPES[dtype] or (stored if isinstance(stored, torch.dtype) else _DTYPES.get(str(stored), torch.float32))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    merged = load_adapter(base, adapter_dir).merge_and_unload()  # merged in float32, then cast
    bad = [n for n, p in merged.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"{adapter_dir}: the merged weights hold nan/inf in {len(bad)} tensor(s), e.g. {bad[0]}: the adapter "
                         "diverged; nothing was written")
    merged.to(target).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)  # tokenizer files and chat template
    try:
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
    except OSError:  # the base has no generation_config.json: transformers' defaults apply, as for the base
        pass
    return out
