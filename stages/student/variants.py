"""The LoRA variants (`train.lora.variant`) and the one fact about them the training methods need.

    lora | rslora | dora | pissa | olora      peft's LoraConfig (stages/student/adapters.py)
    randlora                                  peft's RandLoraConfig: scaling vectors over shared random bases
    sinelora                                  SineLoRA, delta W = sin(omega * B A) / g * alpha / r: a peft custom
                                              LoRA layer (stages/student/sine_lora.py)

Kept apart from adapters.py (peft, transformers) so that the settings and the method registry
(stages/student/methods.py) can name them without importing a model library.
"""
from __future__ import annotations

__all__ = ["LORA_VARIANTS", "MUTATES_BASE", "LALORA_CURVATURES", "NO_KFAC"]

LORA_VARIANTS = ("lora", "rslora", "dora", "pissa", "olora", "randlora", "sinelora")

# PiSSA and OLoRA move the principal part of every adapted weight into the adapter at init: the frozen
# base becomes the residual W - BA, so `disable_adapter()` no longer runs the base model (adapters.py).
# RandLoRA (scales 0 at init) and SineLoRA (B = 0, sin 0 = 0) leave the base as it is, like LoRA.
MUTATES_BASE = frozenset({"pissa", "olora"})

# LaLoRA's curvature forms (train.lalora_curvature; stages/student/curvature.py). K-FAC factors exist
# only for weights applied as a Linear layer's `input @ W^T`; these variants' trainable tensors are not:
LALORA_CURVATURES = ("diag", "kfac", "tri_kfac")
NO_KFAC = {
    "randlora": "its trainable tensors are scaling vectors over shared random bases, not a Linear layer's weight",
    "sinelora": "its update sin(w * BA) / g is a non-linear function of A and B, not a Linear layer's input @ W^T",
}
