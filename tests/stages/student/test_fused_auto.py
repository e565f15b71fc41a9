"""`train.fused_loss: auto` (the default): the fused loss runs wherever it applies — asserted from the
model's own forward, which projects no position — and where it cannot apply it falls back and says
why. Its loss and LoRA gradients equal the unfused step's for every registered method it covers
(tests/stages/student/test_fused_loss.py::test_lora_gradients_equal_the_unfused_step)."""
import json

import pytest
import torch
from run_configs import make_config
from transformers import TrainerCallback

from stages.student.adapters import make_student
from stages.student.methods import get_method, methods
from stages.student.runner import run_train
from stages.student.settings import LoraSettings, TrainConfig
from stages.student.trainer import resolve_fused_loss

FUSED_METHODS = [m.name for m in methods() if m.supports_fused]


class LmHeadRows(TrainerCallback):
    """Counts, per forward of the output layer during training, how many positions it projected."""

    def __init__(self):
        self.rows, self.handle = [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        head = model.get_base_model().get_output_embeddings()
        self.handle = head.register_forward_hook(lambda module, inputs, out: self.rows.append(out.shape[-2]))

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


def test_the_default_is_auto_and_every_logit_reading_method_but_live_runs_fused(tiny_model_dir):
    assert TrainConfig().fused_loss == "auto"
    assert set(FUSED_METHODS) >= {"none", "tail", "topk", "full_kl", "l2", "lalora"} and "live" not in FUSED_METHODS
    student = make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32)
    for name in FUSED_METHODS:
        assert resolve_fused_loss("auto", get_method(name), student) == (True, "")
    assert resolve_fused_loss("false", get_method("tail"), student) == (False, "train.fused_loss=false")


@pytest.mark.parametrize("method", ["tail", "none"])
def test_under_auto_training_never_builds_full_logits(method, tiny_model_dir, tiny_cache, tmp_path):
    rows = LmHeadRows()
    metrics = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / "run", method=method, max_steps=2),
                        callbacks=[rows])
    assert metrics["fused_loss"] is True and metrics["fused_loss_reason"] == ""
    assert rows.rows and set(rows.rows) == {0}  # every forward asked the head for no position
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["fused_loss"] is True


def test_live_under_auto_falls_back_and_says_why(tiny_model_dir, tiny_cache, tmp_path, capsys):
    metrics = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / "live", method="live", max_steps=1))
    assert metrics["fused_loss"] is False and "'live' needs the full [B, T, V] logits" in metrics["fused_loss_reason"]
    assert "fused loss: off (method 'live' needs the full [B, T, V] logits)" in capsys.readouterr().out


def test_a_scaled_output_head_falls_back_under_auto_and_is_refused_under_true(tiny_model_dir):
    student = make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32)
    student.get_base_model().config.final_logit_softcapping = 30.0
    fused, why = resolve_fused_loss("auto", get_method("tail"), student)
    assert not fused and "final_logit_softcapping=30.0" in why
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        resolve_fused_loss("true", get_method("tail"), student)


def test_old_boolean_settings_still_read():
    assert TrainConfig(fused_loss=True).fused_loss == "true" and TrainConfig(fused_loss=False).fused_loss == "false"
    with pytest.raises(ValueError, match="train.fused_loss: 'sometimes' not in auto|true|false"):
        TrainConfig(fused_loss="sometimes")
