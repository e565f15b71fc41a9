"""SineLoRA (`train.lora.variant=sinelora`): LoRA whose update is the element-wise sine of B A.

    python -m pipeline train --config configs/demo.yaml train.lora.variant=sinelora train.lora.sine_frequency=200

    delta W = sin(omega * B A) / g * scaling        (B: [out, r], A: [r, in], sin element-wise)
    scaling = alpha / r (LoRA's), g = sqrt(in_features) of the layer unless train.lora.sine_scale is set

"Efficient Learning With Sine-Activated Low-rank Matrices", Ji, Saratchandran, Gordon, Zhang, Lucey,
ICLR 2025 (arXiv 2403.19243): the sine of the rank-r product has a higher rank than B A for a large
enough frequency omega, with LoRA's r (in + out) parameters. Where the formula and the defaults come
from (offline copies; the paper's own text was not readable here):
- the authors' code, github.com/samy-ji/Sine-Low-Rank, llm/peft/src/peft/tuners/sinlora.py: the layer
  adds dropout(x) @ sin(freq * A^T B^T) / s * scaling, scaling = lora_alpha / r (LoRA's is kept), and
  sets s = sqrt(in_features) in its __init__ (overriding any configured s); B = 0 at init (sin 0 = 0:
  the student is the base model at step 0, as with LoRA). Their peft PR (huggingface/peft#2457) keeps
  the formula, with `sinelora_scaling=None` meaning sqrt(in_features).
- the frequency omega has NO default in either: their finetune.py and evaluation scripts take `--freq`
  as a required argument. DEFAULT_FREQUENCY = 200 below is this project's choice, NOT confirmed from
  the paper; set train.lora.sine_frequency to the value of the experiment you reproduce.

The layer is a peft custom LoRA layer (`LoraConfig._register_custom_module({nn.Linear: SineLoraLinear})`,
an experimental peft API): a subclass of peft's lora.Linear whose only LoRA variant is `SineLoraVariant`
(forward, merge, unmerge), so `merge_and_unload` writes W + delta W and export gives plain weights.
omega and g are fields of `SineLoraConfig` and are saved in adapter_config.json, whose peft_type reads
"SINELORA": stock `PeftModel.from_pretrained` then refuses the adapter (KeyError 'SINELORA') instead of
loading it as a plain LoRA, which would compute B A without the sine. Load it with
`stages.student.adapters.load_adapter(base, adapter_dir)` (eval, export and the studies do).

Cost: the sine needs the full [out, in] product in every forward, and backward keeps the sine's
argument and value: about two float32 [out, in] tensors per adapted layer and micro-batch, i.e. twice
the adapted weights in float32 (gradient checkpointing frees them between forward and backward).
Only torch.nn.Linear layers are adapted (`check_sine_layers` refuses anything else, e.g. GPT-2's Conv1D).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer, LoraVariant

__all__ = ["DEFAULT_FREQUENCY", "PEFT_TYPE", "SineLoraConfig", "SineLoraLinear", "SineLoraVariant",
           "sine_delta", "is_sine_adapter", "check_sine_layers"]

DEFAULT_FREQUENCY = 200.0  # this project's choice, not the paper's (see the module docstring)
PEFT_TYPE = "SINELORA"     # adapter_config.json's peft_type: stock peft refuses it rather than drop the sine


def sine_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, frequency: float, scale: float, scaling: float) -> torch.Tensor:
    """delta W [out, in] = sin(frequency * B A) / scale * scaling, for A [r, in] and B [out, r]."""
    return torch.sin(frequency * (lora_B @ lora_A)) / scale * scaling


@dataclass
class SineLoraConfig(LoraConfig):
    """peft's LoraConfig plus SineLoRA's frequency omega and divisor g (0 = sqrt(in_features) per layer)."""

    sine_frequency: float = field(default=DEFAULT_FREQUENCY, metadata={"help": "omega in sin(omega * B A) / g"})
    sine_scale: float = field(default=0.0, metadata={"help": "g in sin(omega * B A) / g; 0 = sqrt(in_features) of each layer"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.sine_frequency > 0 and self.sine_scale >= 0):
            raise ValueError(f"SineLoraConfig: sine_frequency must be > 0 and sine_scale >= 0, got "
                             f"{self.sine_frequency} and {self.sine_scale}")
        self._register_custom_module({torch.nn.Linear: SineLoraLinear})

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["peft_type"] = PEFT_TYPE
        return out

    @classmethod
    def from_adapter_dir(cls, adapter_dir: str | os.PathLike) -> SineLoraConfig:
        """The config saved in `adapter_dir`/adapter_config.json (ValueError if it is not a SineLoRA adapter)."""
        saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        if saved.get("peft_type") != PEFT_TYPE:
            raise ValueError(f"{adapter_dir}: peft_type {saved.get('peft_type')!r} is not a SineLoRA adapter ({PEFT_TYPE})")
        known = {f.name for f in fields(cls)} - {"peft_type"}
        return cls(**{k: v for k, v in saved.items() if k in known})


def is_sine_adapter(adapter_dir: str | os.PathLike) -> bool:
    """Whether `adapter_dir` holds an adapter saved by `SineLoraConfig` (its peft_type is PEFT_TYPE)."""
    path = Path(adapter_dir) / "adapter_config.json"
    return path.is_file() and json.loads(path.read_text()).get("peft_type") == PEFT_TYPE


class SineLoraVariant(LoraVariant):
    """The LoRA variant behind `SineLoraLinear`: forward adds dropout(x) @ delta W^T; merges add delta W."""

    def supports_lora_conversion(self) -> bool:
        return False  # sin(omega * B A) is not a rank-r product

    @staticmethod
    def init(module: SineLoraLinear, adapter_name: str, config: SineLoraConfig, **kwargs) -> None:
        module.sine_frequency[adapter_name] = float(config.sine_frequency)
        module.sine_scale[adapter_name] = float(config.sine_scale) or math.sqrt(module.in_features)

    @staticmethod
    def merge_safe(module: SineLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: SineLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: SineLoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: SineLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        # [out, in] in the adapter's float32 even under bf16 autocast: the sine of a high-frequency argument
        # would amplify bf16's rounding of B A (peft cast x to the adapter's dtype already)
        with torch.autocast(x.device.type, enabled=False):
            delta = module.sine_delta_weight(active_adapter)
        return result + F.linear(module.lora_dropout[active_adapter](x), delta)


class SineLoraLinear(LoraLinear):
    """peft's lora.Linear with `SineLoraVariant` as its one variant (DoRA and the other peft variants are refused
    by peft's `resolve_lora_variant`: "Invalid or unsupported variant combination")."""

    other_param_names = LoraLinear.other_param_names + ("sine_frequency", "sine_scale")

    def __init__(self, base_layer, adapter_name: str, config: SineLoraConfig, **kwargs) -> None:
        self.sine_frequency: dict[str, float] = {}  # filled by SineLoraVariant.init, inside super().__init__
        self.sine_scale: dict[str, float] = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self):
        return {(): SineLoraVariant}

    def sine_delta_weight(self, adapter: str) -> torch.Tensor:
        return sine_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.sine_frequency[adapter],
                          self.sine_scale[adapter], self.scaling[adapter])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """delta W for merging; half-precision adapters on CPU are computed in float32 (as peft's LoRA does)."""
        dtype = self.lora_A[adapter].weight.dtype
        if self.lora_A[adapter].weight.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = self.lora_A[adapter].weight.float(), self.lora_B[adapter].weight.float()
            return sine_delta(a, b, self.sine_frequency[adapter], self.sine_scale[adapter], self.scaling[adapter]).to(dtype)
        return self.sine_delta_weight(adapter)

    def __repr__(self) -> str:
        return "sine" + super().__repr__()


def check_sine_layers(model: torch.nn.Module) -> None:
    """ValueError naming any LoRA layer of `model` that is not a SineLoraLinear (a layer type other than
    torch.nn.Linear, e.g. transformers' Conv1D, would otherwise get a plain LoRA without the sine)."""
    other = sorted({f"{name} ({type(module.get_base_layer()).__name__})" for name, module in model.named_modules()
                    if isinstance(module, LoraLayer) and not isinstance(module, SineLoraLinear)})
    if other:
        raise ValueError(f"train.lora.variant=sinelora adapts torch.nn.Linear layers only; these targeted modules are "
                         f"not: {', '.join(other[:5])}{' ...' if len(other) > 5 else ''} (narrow train.lora.target_modules)")
