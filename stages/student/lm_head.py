"""The student split at its output head, for the fused loss: last hidden state [B, T, H] and lm_head W.

    python -m pipeline train --config configs/demo.yaml train.fused_loss=true

    hidden, autocast = final_hidden_state(model, peft_model, input_ids, attention_mask)  # no [B, T, V] logits
    weight, bias = output_head(peft_model)

`final_hidden_state` calls the top-level model (so DDP's and peft's forward hooks run as usual)
with `logits_to_keep` = an empty index tensor, so the lm_head projects zero positions, and captures
the decoder body's `last_hidden_state` (after the final norm) with a forward hook, together with the
autocast dtype the forward ran under: the Trainer (accelerate) may enable autocast inside the
model's forward only, and the fused loss must compute the logits in the dtype the lm_head would.
"""
from __future__ import annotations

import torch

__all__ = ["final_hidden_state", "output_head", "UNSUPPORTED_HEAD_CONFIG"]

# Config attributes that put a transform between hidden @ W.T and the logits (Gemma 2/3 softcap,
# Cohere logit_scale, Granite logits_scaling, Falcon-H1 lm_head_multiplier, MiniCPM width scaling).
UNSUPPORTED_HEAD_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                           "output_multiplier", "dim_model_base")


def _base(peft_model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM under a peft wrapper (or the model itself)."""
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def output_head(peft_model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, H], bias [V] or None) of a plain linear lm_head; a clear error for anything else."""
    base = _base(peft_model)
    name = type(base).__name__
    for attr in UNSUPPORTED_HEAD_CONFIG:
        value = getattr(base.config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"train.fused_loss: {name} config has {attr}={value!r}, a transform between the hidden "
                             "state and the logits that the fused loss does not apply; set train.fused_loss=false")
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # a peft-wrapped or custom head would change hidden @ W.T
        raise ValueError(f"train.fused_loss: {name}'s output head is {type(head).__name__}, not a plain "
                         "torch.nn.Linear (is lm_head in lora.target_modules?); set train.fused_loss=false")
    if head.weight.shape != (head.out_features, head.in_features):  # e.g. a flattened FSDP shard
        raise ValueError(f"train.fused_loss: lm_head weight has shape {tuple(head.weight.shape)}, expected "
                         f"[{head.out_features}, {head.in_features}] (sharded weights are not supported)")
    return head.weight, head.bias


def final_hidden_state(model: torch.nn.Module, peft_model: torch.nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.dtype | None]:
    """(the decoder's last hidden state [B, T, H], the autocast dtype in force there or None), from one
    forward of `model` that projects no logits.

    `model` is what the Trainer calls (possibly DDP-wrapped); `peft_model` its unwrapped PeftModel.
    """
    decoder = _base(peft_model).get_decoder()
    captured: list[torch.Tensor] = []
    device = input_ids.device.type
    autocast: list[torch.dtype | None] = []

    def keep(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])
        autocast.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)

    handle = decoder.register_forward_hook(keep)
    try:
        none = torch.empty(0, dtype=torch.long, device=input_ids.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=none).logits
    finally:
        handle.remove()
    if logits.shape[1] != 0 or len(captured) != 1:
        raise ValueError(f"train.fused_loss: {type(_base(peft_model)).__name__} ignored logits_to_keep (got logits "
                         f"{tuple(logits.shape)}) or ran its decoder {len(captured)} times; set train.fused_loss=false")
    return captured[0], autocast[0]
