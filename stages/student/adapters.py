"""The student: the base model with a peft LoRA adapter of one of five variants.

    python -m pipeline train --config configs/demo.yaml train.lora.variant=dora

    from stages.student.adapters import make_student
    model = make_student("build/default/base-model", LoraSettings(variant="pissa"), torch.float32)

Variants (`LoraSettings.variant`):
    lora    plain LoRA, B = 0 at init (student == base model at step 0)
    rslora  scaling alpha / sqrt(r) instead of alpha / r (`use_rslora=True`)
    dora    weight-decomposed LoRA (`use_dora=True`); B = 0 at init
    pissa   fast-SVD PiSSA (`init_lora_weights="pissa_niter_4"`): A, B start at the top-r singular
            directions of W and the frozen base becomes the residual W - BA
    olora   OLoRA (`init_lora_weights="olora"`): A, B from a QR decomposition of W; base = W - BA

PiSSA and OLoRA MUTATE THE BASE WEIGHTS at init (`MUTATES_BASE`, stages/student/variants.py). What that means here:
- "Base weights unchanged" holds from init on: the frozen residual never changes during training,
  but it is not the checkpoint's W, so `disable_adapter()` runs W - BA, NOT the teacher.
- The `live` method needs the teacher from `disable_adapter()`; with these variants it is refused
  (its registry entry, stages/student/methods.py `check_variant`) rather than silently regularizing
  towards the residual. Keeping a second copy of the base would double weight memory and distort
  the live-vs-cache benchmark.
  Cached estimators are unaffected: the cache holds the true base model's log-probs.
- The adapter as trained only works on top of the residual. `save_adapter` converts it (given the
  initial adapter saved by `save_initial_adapter`) into an ordinary rank-2r LoRA on the ORIGINAL
  base weights, loadable with stock `PeftModel.from_pretrained(base, dir)`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from stages.student.settings import QUANTIZATIONS, LoraSettings

__all__ = [
    "lora_config", "make_student",
    "save_initial_adapter", "save_adapter", "adapter_state", "base_state", "adapted_modules", "render_adapted",
]

# peft's init_lora_weights per variant; "pissa_niter_4" is peft's fast randomized-SVD PiSSA
# (exact "pissa" runs a full SVD of every targeted matrix: minutes on a 7B model).
_INIT = {"lora": True, "rslora": True, "dora": True, "pissa": "pissa_niter_4", "olora": "olora"}


def lora_config(settings: LoraSettings) -> LoraConfig:
    """The peft `LoraConfig` for `settings` (causal LM, no bias training)."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # "all-linear": every nn.Linear but the output head (peft excludes get_output_embeddings())
        target_modules=settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules),
        bias="none",
        use_rslora=settings.variant == "rslora",
        use_dora=settings.variant == "dora",
        init_lora_weights=_INIT[settings.variant],
    )


def make_student(model_dir: str | os.PathLike, settings: LoraSettings, dtype: torch.dtype = torch.float32,
                 quantization: str = "none") -> PeftModel:
    """Load the base model from a local HF directory in `dtype` and wrap it with a fresh adapter.

    Only the adapter is trainable; peft keeps adapter weights in float32 even when the base is
    bfloat16. PiSSA's randomized SVD draws from torch's global RNG: seed before calling for a
    reproducible (and resumable) init. `quantization="4bit"`: QLoRA (`_load_4bit`).
    """
    if quantization == "4bit":
        base = _load_4bit(model_dir, dtype)
    elif quantization == "none":
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    else:
        raise ValueError(f"quantization {quantization!r} not in {QUANTIZATIONS}")
    base.config.use_cache = False  # training never decodes; the KV cache would only cost memory
    return get_peft_model(base, lora_config(settings))


def _load_4bit(model_dir: str | os.PathLike, dtype: torch.dtype):
    """QLoRA's base: every linear layer but the output head stored as NF4 (double-quantized), matmuls in
    `dtype`, on this process's device (bitsandbytes >= 0.50 runs 4-bit on CPU too); norms and
    embeddings upcast to float32 and input gradients enabled by peft's `prepare_model_for_kbit_training`.
    Gradient checkpointing stays train.trainer_args' switch. ImportError without bitsandbytes."""
    try:
        import bitsandbytes  # noqa: F401  (transformers' own message for a missing package names no fix)
    except ImportError as err:
        raise ImportError("train.quantization=4bit needs bitsandbytes: pip install -e '.[quant]'") from err
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    # 4-bit weights cannot be moved after loading: load them where this process (its DDP rank) trains
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, quantization_config=quant, device_map={"": device})
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)


# --- saving ---------------------------------------------------------------------------------
def save_initial_adapter(model: PeftModel, path: str | os.PathLike) -> None:
    """Save the adapter as initialized (before any step), for `save_adapter`'s conversion.

    Its config says `init_lora_weights=True` so that peft, when loading it for the conversion, does
    not decompose the (already residual) base weights a second time.
    """
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = init


def save_adapter(model: PeftModel, path: str | os.PathLike, initial_adapter: str | os.PathLike | None = None) -> None:
    """Save the trained adapter so that stock `PeftModel.from_pretrained(original_base, path)` works.

    For PiSSA/OLoRA pass the directory written by `save_initial_adapter`: the update
    B A - B0 A0 is saved as a rank-2r LoRA on the original weights (peft's
    `path_initial_model_for_weight_conversion`). Other variants are saved as they are.
    """
    variant_mutates = str(model.peft_config["default"].init_lora_weights).startswith(("pissa", "olora"))
    if variant_mutates and initial_adapter is None:
        raise ValueError("this adapter changed the base weights at init (PiSSA/OLoRA): pass initial_adapter")
    if not variant_mutates:
        model.save_pretrained(str(path))
        return
    model.save_pretrained(str(path), path_initial_model_for_weight_conversion=str(Path(initial_adapter)))


# --- inspection (tests, sanity checks) ----------------------------------------------------
def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable (adapter) parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapted_modules(model: torch.nn.Module) -> dict[str, int]:
    """Module leaf name -> how many modules of that name carry an adapter, in model order
    (e.g. {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2} for a 2-layer Phi-3)."""
    from peft.tuners.lora import LoraLayer

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def render_adapted(counts: dict[str, int]) -> str:
    """{"q_proj": 2, "o_proj": 2} -> "q_proj x2, o_proj x2"."""
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen (base) parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
