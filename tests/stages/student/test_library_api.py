"""The library API (stages/student/library.py): the cached examples, their collator and the loss mixin in a
user's own HF Trainer subclass give the CLI's CacheTrainer's first-step loss, CE and KL; the
docs/library.md snippet runs as printed."""
import pytest
import torch
from library_helpers import assert_same_step_loss, perturb_adapter, readme_snippet, run_snippet
from transformers import Trainer, TrainingArguments, set_seed

from stages.student.adapters import make_student
from stages.student.library import CacheLossMixin, load_cache
from stages.student.settings import LoraSettings
from stages.student.trainer import CacheTrainer
from storage_schemas import FingerprintMismatch

LORA = LoraSettings(rank=4)
REG_WEIGHT, STEPS, BATCH, SEED = 0.5, 2, 4, 0


class UsersTrainer(CacheLossMixin, Trainer):
    """A user's own Trainer subclass with its own behaviour, the cache loss mixed in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps_seen = 0

    def training_step(self, *args, **kwargs):
        self.steps_seen += 1
        return super().training_step(*args, **kwargs)


def make_trainer(cls, model_dir, data, out, fused: bool, state=None):
    set_seed(SEED)
    model = make_student(model_dir, LORA, torch.float32)
    if state is None:
        state = perturb_adapter(model)  # B != 0: the adapter takes part in the compared loss
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to="none", seed=SEED, use_cpu=True,
                             remove_unused_columns=False)
    trainer = cls(model=model, args=args, train_dataset=data.dataset, data_collator=data.collator,
                  method=data.method, reg_weight=REG_WEIGHT, fused_loss=fused)
    return trainer, state


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_users_trainer_with_the_mixin_matches_the_cache_trainer(tiny_model_dir, tiny_cache, tmp_path, fused):
    data = load_cache(tiny_cache, tiny_model_dir, method="tail")
    assert len(data.dataset) == data.manifest.num_rows == 30
    mine, state = make_trainer(UsersTrainer, tiny_model_dir, data, tmp_path / "mine", fused)
    ref, _ = make_trainer(CacheTrainer, tiny_model_dir, data, tmp_path / "ref", fused, state)
    loss, parts = assert_same_step_loss(mine, ref, next(iter(mine.get_train_dataloader())))
    torch.testing.assert_close(loss, parts["ce"] + REG_WEIGHT * parts["kl"], rtol=0, atol=1e-6)

    mine.train()
    ref.train()
    logs = [h for h in mine.state.log_history if "ce" in h]
    ref_logs = [h for h in ref.state.log_history if "ce" in h]
    assert mine.steps_seen == STEPS and len(logs) == STEPS
    for key in ("loss", "ce", "kl"):
        assert logs[0][key] == pytest.approx(ref_logs[0][key], rel=0, abs=1e-6), key
    assert logs[0]["loss"] == pytest.approx(loss.item(), rel=0, abs=1e-6)


def test_load_cache_checks_the_fingerprint_and_the_mixin_refuses_column_removal(tiny_model_dir, tiny_cache, tmp_path,
                                                                               tool_chat_model_dir):
    with pytest.raises(FingerprintMismatch, match="tokenizer"):
        load_cache(tiny_cache, tool_chat_model_dir)
    data = load_cache(tiny_cache, tiny_model_dir, method="none")
    assert "teacher_topk_ids" not in data.dataset.column_names and not data.collator.with_teacher
    args = TrainingArguments(str(tmp_path / "x"), report_to="none", use_cpu=True)  # remove_unused_columns: True
    with pytest.raises(ValueError, match="remove_unused_columns"):
        UsersTrainer(model=make_student(tiny_model_dir, LORA, torch.float32), args=args, train_dataset=data.dataset,
                     data_collator=data.collator, method="none", reg_weight=0.0)


def test_readme_trainer_snippet_runs(tiny_model_dir, tiny_cache, tmp_path):
    namespace = run_snippet(readme_snippet("own-trainer"), tiny_model_dir, tiny_cache, tmp_path / "out")
    trainer = namespace["trainer"]
    assert isinstance(trainer, CacheLossMixin) and isinstance(trainer, Trainer)
    assert trainer.state.global_step == trainer.args.max_steps
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert logged and all(h["kl"] > 0 and h["ce"] > 0 for h in logged)
