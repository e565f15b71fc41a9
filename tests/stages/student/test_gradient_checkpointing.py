"""train.trainer_args.gradient_checkpointing with every LoRA variant: engaged (the flag, and each decoder
layer's forward runs twice per micro-batch: once forward, once recomputed in backward) and the same
first-step loss and LoRA gradients as without it (float32)."""
import pytest
import torch
from run_configs import make_config
from transformers import TrainerCallback

from stages.student.runner import run_train
from stages.student.trainer import CacheTrainer
from stages.student.variants import LORA_VARIANTS

# the adapter tensors that are zero at init and get the first step's gradient: LoRA's B (SineLoRA's too), RandLoRA's lambda
ZERO_AT_INIT = ("lora_B", "randlora_lambda")


class Probe(TrainerCallback):
    """Counts decoder-layer forward calls and keeps the first step's LoRA gradients and checkpointing flag."""

    def __init__(self):
        self.calls, self.grads, self.engaged = 0, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        assert len(layers) == 2  # the tiny model
        for layer in layers:
            # a pre-hook: torch's non-reentrant recomputation stops as soon as it has the saved tensors it needs
            # (checkpoint early stop), so the layer's post-forward hook never runs in backward
            layer.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        self.calls += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            self.engaged = model.is_gradient_checkpointing
            self.calls_per_step = self.calls


@pytest.fixture
def record_losses(monkeypatch):
    """Keeps each compute_loss result (the real method runs; its return value is only copied)."""
    losses, original = [], CacheTrainer.compute_loss

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out

    monkeypatch.setattr(CacheTrainer, "compute_loss", recording)
    return losses


@pytest.mark.parametrize("variant", LORA_VARIANTS)
def test_gradient_checkpointing_engages_and_changes_nothing(variant, tiny_model_dir, tiny_cache, tmp_path, record_losses):
    runs = {}
    for checkpointing in (False, True):
        probe = Probe()
        config = make_config(tiny_model_dir, tiny_cache, tmp_path / str(checkpointing), max_steps=1, report_to="none",
                             reg_weight=0.5, trainer_args={"gradient_checkpointing": checkpointing})
        config.train.lora.variant = variant
        run_train(config, callbacks=[probe])
        runs[checkpointing] = (probe, record_losses[-1])
    (plain, loss_plain), (checked, loss_checked) = runs[False], runs[True]
    assert plain.engaged is False and checked.engaged is True
    assert (plain.calls_per_step, checked.calls_per_step) == (2, 4)  # 2 layers x 1 micro-batch, x 2 when recomputed
    torch.testing.assert_close(loss_checked, loss_plain, rtol=0, atol=1e-6)
    assert loss_plain.item() > 0
    assert plain.grads.keys() == checked.grads.keys() and any(z in n for n in plain.grads for z in ZERO_AT_INIT)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(checked.grads[name], grad, rtol=0, atol=1e-6, msg=name)
    assert any(g.abs().max() > 1e-4 for n, g in plain.grads.items() if any(z in n for z in ZERO_AT_INIT))  # a real gradient
