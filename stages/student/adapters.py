"""The student: the base model with a peft adapter of one of seven variants (`train.lora.variant`).

    python -m pipeline train --config configs/demo.yaml train.lora.variant=dora

    from stages.student.adapters import make_student, load_adapter
    model = make_student("build/default/base-model", LoraSettings(variant="pissa"), torch.float32)
    trained = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), "runs/demo/train/adapter")

Variants (`LoraSettings.variant`):
    lora      plain LoRA, B = 0 at init (student == base model at step 0)
    rslora    scaling alpha / sqrt(r) instead of alpha / r (`use_rslora=True`)
    dora      weight-decomposed LoRA (`use_dora=True`); B = 0 at init
    pissa     fast-SVD PiSSA (`init_lora_weights="pissa_niter_4"`): A, B start at the top-r singular
              directions of W and the frozen base becomes the residual W - BA
    olora     OLoRA (`init_lora_weights="olora"`): A, B from a QR decomposition of W; base = W - BA
    randlora  RandLoRA (peft `RandLoraConfig`; Albert et al., ICLR 2025, arXiv 2502.00987): a FULL-rank
              update sum_n B_n diag(lambda_n) A diag(gamma_n) * scaling over N frozen random bases of rank
              r_b shared by all layers (N = ceil(min(in, out) / r_b) per layer, so N * r_b covers the full
              rank); only the scaling vectors lambda (zero at init: student == base) and gamma train
    sinelora  SineLoRA (stages/student/sine_lora.py; Ji et al., ICLR 2025, arXiv 2403.19243): delta W =
              sin(omega * B A) / g * alpha / r, B = 0 at init; a peft custom LoRA layer

How `LoraSettings` maps onto RandLoRA, whose `r` is not LoRA's (fewer parameters as it grows: a layer
trains N * (r_b + m) numbers, m = min(in, out), N = ceil(m / r_b)):
- `rank` stays the trainable-parameter budget in LoRA units: r_b is the smallest basis rank whose
  RandLoRA has no more trainable parameters than a LoRA of rank `rank` on the same modules
  (`randlora_basis_rank`, solved from the model's layer shapes: e.g. 293 for rank 8 on 4096 x 4096
  layers, 14 bases), the paper's comparison at equal parameter budgets. peft's r is that r_b (saved
  in adapter_config.json).
- `alpha`: the update is scaled by alpha / rank, LoRA's factor, whatever r_b is (randlora_alpha =
  alpha / rank * r_b, as peft scales by randlora_alpha / r). The RandLoRA authors suggest a larger
  factor (peft: "typically 20 times the rank", i.e. a scaling of 20); raise train.lora.alpha for that.
- `dropout` -> randlora_dropout, `target_modules` as for LoRA ("all-linear": peft resolves it for
  RandLoRA too, the output head excluded). The random bases are drawn from peft's fixed key
  (`projection_prng_key=0`) and saved with the adapter (`save_projection=True`), so loading is exact.
SineLoRA keeps every LoRA setting (rank r, alpha / r, dropout, targets) and adds
`sine_frequency` (omega) and `sine_scale` (g), saved in its adapter_config.json.

Loading a trained adapter: `load_adapter(base, adapter_dir)` (eval, export and the studies use it). It is
stock `PeftModel.from_pretrained` for every variant but sinelora, whose layer peft does not know: its
adapter_config.json says peft_type "SINELORA", and stock peft refuses it (KeyError) rather than load it as
a plain LoRA. train.quantization=4bit is refused for sinelora (`make_student`: the custom layer wraps
torch.nn.Linear, not bitsandbytes' Linear4bit).

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
RandLoRA and SineLoRA leave the base as it is: `disable_adapter()` is the base model, `live` works.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, RandLoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from stages.student.settings import QUANTIZATIONS, LoraSettings
from stages.student.sine_lora import DEFAULT_FREQUENCY, SineLoraConfig, check_sine_layers, is_sine_adapter

__all__ = [
    "lora_config", "randlora_basis_rank", "make_student", "load_adapter",
    "save_initial_adapter", "save_adapter", "adapter_state", "base_state", "adapted_modules", "render_adapted",
]

# peft's init_lora_weights per variant; "pissa_niter_4" is peft's fast randomized-SVD PiSSA
# (exact "pissa" runs a full SVD of every targeted matrix: minutes on a 7B model).
_INIT = {"lora": True, "rslora": True, "dora": True, "pissa": "pissa_niter_4", "olora": "olora", "sinelora": True}

# variants that cannot train on a 4-bit base, and why (make_student)
_NO_4BIT = {"sinelora": "its custom peft layer (stages/student/sine_lora.py) wraps torch.nn.Linear, not bitsandbytes' "
                        "Linear4bit: it would dequantize nothing and merge into packed NF4 bytes"}


def lora_config(settings: LoraSettings, model: torch.nn.Module | None = None) -> PeftConfig:
    """The peft config for `settings` (causal LM, no bias training). randlora needs `model`: its basis
    rank is solved from the targeted layers' shapes (`randlora_basis_rank`)."""
    # "all-linear": every nn.Linear but the output head (peft excludes get_output_embeddings())
    targets = settings.target_modules if isinstance(settings.target_modules, str) else list(settings.target_modules)
    if settings.variant == "randlora":
        if model is None:
            raise ValueError("train.lora.variant=randlora: its basis rank is solved from the model's layers; pass model")
        r = randlora_basis_rank(model, settings)
        return RandLoraConfig(task_type="CAUSAL_LM", r=r, randlora_alpha=settings.alpha / settings.rank * r,
                              randlora_dropout=settings.dropout, target_modules=targets, bias="none")
    common = dict(task_type="CAUSAL_LM", r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                  target_modules=targets, bias="none", init_lora_weights=_INIT[settings.variant])
    if settings.variant == "sinelora":
        return SineLoraConfig(**common, sine_frequency=settings.sine_frequency or DEFAULT_FREQUENCY,
                              sine_scale=settings.sine_scale)
    return LoraConfig(**common, use_rslora=settings.variant == "rslora", use_dora=settings.variant == "dora")


def _targeted(model: torch.nn.Module, target_modules: str | list[str]) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear layer `target_modules` names, as peft matches them: "all-linear" = every
    nn.Linear / Conv1D but the output head; a list = modules whose name is, or ends with ".", an entry."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
             and (target_modules == "all-linear" or any(name == t or name.endswith("." + t) for t in target_modules))]
    if not found:
        raise ValueError(f"train.lora.target_modules={target_modules!r}: no linear layer of the model matches")
    return found


def _targeted_shapes(model: torch.nn.Module, target_modules: str | list[str]) -> list[tuple[int, int]]:
    """(in, out) of every targeted linear layer (`_targeted`)."""
    return [(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape)
            for _, m in _targeted(model, target_modules)]


def randlora_basis_rank(model: torch.nn.Module, settings: LoraSettings) -> int:
    """RandLoRA's basis rank r_b for `settings.rank`: the smallest r_b whose trainable parameters
    (per layer ceil(m / r_b) * (r_b + m), m = min(in, out)) do not exceed LoRA's rank * (in + out),
    summed over the layers `settings.target_modules` adapts (the largest m if none does)."""
    dims = [(min(shape), sum(shape)) for shape in _targeted_shapes(model, settings.target_modules)]
    budget = settings.rank * sum(total for _, total in dims)
    largest = max(m for m, _ in dims)
    return next((r for r in range(1, largest + 1) if sum(math.ceil(m / r) * (r + m) for m, _ in dims) <= budget), largest)


def make_student(model_dir: str | os.PathLike, settings: LoraSettings, dtype: torch.dtype = torch.float32,
                 quantization: str = "none") -> PeftModel:
    """Load the base model from a local HF directory in `dtype` and wrap it with a fresh adapter.

    Only the adapter is trainable; peft keeps adapter weights in float32 even when the base is
    bfloat16. PiSSA's randomized SVD draws from torch's global RNG: seed before calling for a
    reproducible (and resumable) init. `quantization="4bit"`: QLoRA (`_load_4bit`); ValueError for a
    variant that cannot train on it (sinelora).
    """
    if quantization == "4bit" and settings.variant in _NO_4BIT:
        raise ValueError(f"train.quantization=4bit: not with train.lora.variant={settings.variant} "
                         f"({_NO_4BIT[settings.variant]})")
    if quantization == "4bit":
        base = _load_4bit(model_dir, dtype)
    elif quantization == "none":
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    else:
        raise ValueError(f"quantization {quantization!r} not in {QUANTIZATIONS}")
    base.config.use_cache = False  # training never decodes; the KV cache would only cost memory
    if settings.variant == "olora":
        _check_no_conv1d(base, settings)
    model = get_peft_model(base, lora_config(settings, base))
    if settings.variant == "sinelora":
        check_sine_layers(model)
    return model


def _check_no_conv1d(base: torch.nn.Module, settings: LoraSettings) -> None:
    """OLoRA's init on GPT-2-style Conv1D layers (weights stored [in, out]) builds A and B for the transposed
    shape in peft 0.21, and the first forward fails on a shape mismatch: refused here by name instead."""
    from transformers.pytorch_utils import Conv1D

    conv = [name for name, _ in _targeted(base, settings.target_modules) if isinstance(base.get_submodule(name), Conv1D)]
    if conv:
        raise ValueError(f"train.lora.variant=olora: not on Conv1D layers ({', '.join(conv[:3])}{' ...' if len(conv) > 3 else ''}: "
                         "GPT-2-style weights stored [in, out], which peft's OLoRA init does not transpose); use pissa or lora")


def load_adapter(base: torch.nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> PeftModel:
    """A saved adapter on `base` (a transformers model with the ORIGINAL base weights): stock
    `PeftModel.from_pretrained`, given the SineLoRA config (its custom layer) for a sinelora adapter."""
    config = SineLoraConfig.from_adapter_dir(adapter_dir) if is_sine_adapter(adapter_dir) else None
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=is_trainable)
    if config is not None:
        check_sine_layers(model)
    return model


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


def _mutates_base(config: PeftConfig) -> bool:
    """PiSSA/OLoRA (LoraConfig.init_lora_weights); RandLoraConfig and the others have no such init."""
    return str(getattr(config, "init_lora_weights", "")).startswith(("pissa", "olora"))


def save_adapter(model: PeftModel, path: str | os.PathLike, initial_adapter: str | os.PathLike | None = None) -> None:
    """Save the trained adapter so that `load_adapter(original_base, path)` works (stock
    `PeftModel.from_pretrained` for every variant but sinelora).

    For PiSSA/OLoRA pass the directory written by `save_initial_adapter`: the update
    B A - B0 A0 is saved as a rank-2r LoRA on the original weights (peft's
    `path_initial_model_for_weight_conversion`). Other variants are saved as they are.
    """
    variant_mutates = _mutates_base(model.peft_config["default"])
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
    (e.g. {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2} for a 2-layer Phi-3).
    Every peft tuner layer counts: LoRA's (SineLoRA's is one) and RandLoRA's."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            leaf = name.rsplit(".", 1)[-1]
            counts[leaf] = counts.get(leaf, 0) + 1
    return counts


def render_adapted(counts: dict[str, int]) -> str:
    """{"q_proj": 2, "o_proj": 2} -> "q_proj x2, o_proj x2"."""
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the frozen (base) parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
