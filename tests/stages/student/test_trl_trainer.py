"""TRL's SFTTrainer on the cache (stages/student/trl_trainer.py): the real TRL, loading the tiny model
from its path, gives the CLI's CacheTrainer's first-step loss, CE and KL, logs TRL's own metrics with
TRL's values, trains, and refuses what would misalign the cache."""
import shutil
from pathlib import Path

import pytest
import torch
import trl
from library_helpers import assert_same_step_loss, perturb_adapter, readme_snippet, run_snippet
from transformers import TrainingArguments, set_seed

from stages.student.adapters import lora_config, make_student
from stages.student.library import load_cache
from stages.student.settings import LoraSettings
from stages.student.trainer import CacheTrainer
from stages.student.trl_trainer import CacheSFTTrainer, cache_sft_config
from storage_schemas import FingerprintMismatch

LORA = LoraSettings(rank=4)
REG_WEIGHT, STEPS, BATCH, SEED = 0.5, 3, 4, 0


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """TRL pings the Hub (telemetry) at construction; these machines have no network."""
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def reference_trainer(model_dir, data, out: Path, fused: bool, state: dict[str, torch.Tensor]) -> CacheTrainer:
    """The CLI's CacheTrainer with the same adapter weights and the same loop settings."""
    set_seed(SEED)
    model = make_student(model_dir, LORA, torch.float32)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(params) == set(state)  # the same adapted modules, the same parameter names
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    args = TrainingArguments(str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=3e-3,
                             logging_steps=1, save_strategy="no", report_to="none", seed=SEED, use_cpu=True,
                             remove_unused_columns=False, lr_scheduler_type="constant")
    return CacheTrainer(model=model, args=args, train_dataset=data.dataset, data_collator=data.collator,
                        method=data.method, reg_weight=REG_WEIGHT, fused_loss=fused)


def first_batch(trainer) -> dict[str, torch.Tensor]:
    return next(iter(trainer.get_train_dataloader()))


@torch.no_grad()
def trl_fused_head_metrics(model, batch) -> tuple[float, float]:
    """(entropy, mean_token_accuracy) as TRL's own compute_loss gets them: its fused LM head, patched onto
    the model by SFTTrainer, called with fused_lm_head=True."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                fused_lm_head=True)
    valid = out.label_mask.sum()
    return (out.entropy.sum() / valid).item(), (out.is_top1.sum() / valid).item()


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_sft_trainer_matches_the_cache_trainer_logs_trl_metrics_and_trains(tiny_model_dir, tiny_cache, tmp_path, fused):
    data = load_cache(tiny_cache, tiny_model_dir, method="tail")
    args = cache_sft_config(tmp_path / "sft", max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=3e-3,
                            logging_steps=1, save_strategy="no", seed=SEED, use_cpu=True, lr_scheduler_type="constant")
    trainer = CacheSFTTrainer(model=str(tiny_model_dir), args=args, cache=data, reg_weight=REG_WEIGHT,
                              peft_config=lora_config(LORA), fused_loss=fused)
    assert isinstance(trainer, trl.SFTTrainer)
    # TRL's defaults (bf16 and gradient checkpointing on) are off; TRL loaded the model in float32
    assert not trainer.args.bf16 and not trainer.args.gradient_checkpointing
    assert not trainer.model.is_gradient_checkpointing
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    state = perturb_adapter(trainer.model)
    ref = reference_trainer(tiny_model_dir, data, tmp_path / "ref", fused, state)

    # the same batch: TRL kept every cache column and the collator's layout
    batch, ref_batch = first_batch(trainer), first_batch(ref)
    assert set(batch) == set(ref_batch) == {"input_ids", "attention_mask", "labels", "teacher_topk_ids",
                                            "teacher_topk_logprobs", "teacher_target_logprob"}
    assert all(torch.equal(batch[k], ref_batch[k]) for k in batch)
    loss, parts = assert_same_step_loss(trainer, ref, batch)  # lambda > 0 and a KL that moves the loss
    torch.testing.assert_close(loss, parts["ce"] + REG_WEIGHT * parts["kl"], rtol=0, atol=1e-6)
    entropy, accuracy = trl_fused_head_metrics(trainer.model, batch)

    trainer.train()
    ref.train()
    logs = [h for h in trainer.state.log_history if "ce" in h]
    ref_logs = [h for h in ref.state.log_history if "ce" in h]
    assert trainer.state.global_step == STEPS and [h["step"] for h in logs] == list(range(1, STEPS + 1))
    # the first training step: the same loss, CE and KL as the CLI's trainer
    for key in ("loss", "ce", "kl"):
        assert logs[0][key] == pytest.approx(ref_logs[0][key], rel=0, abs=1e-6), key
    assert logs[0]["loss"] == pytest.approx(loss.item(), rel=0, abs=1e-6)
    # TRL's own metrics, with the values TRL's fused head gives on that batch
    assert logs[0]["num_tokens"] == batch["attention_mask"].sum().item()
    assert logs[-1]["num_tokens"] > logs[0]["num_tokens"]
    assert logs[0]["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert logs[0]["entropy"] == pytest.approx(entropy, rel=1e-5)
    # it trained: the adapter moved
    after = dict(trainer.model.named_parameters())
    assert all(not torch.equal(after[n], state[n]) for n in state if "lora_B" in n)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_refuses_a_config_that_would_misalign_the_cache(tiny_model_dir, tiny_cache, tmp_path):
    data = load_cache(tiny_cache, tiny_model_dir, method="tail")
    plain = trl.SFTConfig(str(tmp_path / "sft"), use_cpu=True, report_to="none")  # TRL's own defaults
    with pytest.raises(ValueError) as err:
        CacheSFTTrainer(model=str(tiny_model_dir), args=plain, cache=data, reg_weight=1.0)
    assert "remove_unused_columns" in str(err.value) and "skip_prepare_dataset" in str(err.value)
    for bad in ({"packing": True}, {"completion_only_loss": True}, {"loss_type": "dft"}, {"max_length": 16}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CacheSFTTrainer(model=str(tiny_model_dir), args=cache_sft_config(tmp_path / "x", use_cpu=True, **bad),
                            cache=data, reg_weight=1.0)


def test_checks_the_fingerprint_of_the_model_trl_would_load(tiny_model_dir, tiny_cache, tmp_path):
    """Another model directory (same tokenizer, other weights) is refused before TRL loads it."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    from safetensors.torch import load_file, save_file

    weights = next(other.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    data = load_cache(tiny_cache, tiny_model_dir, method="tail")
    with pytest.raises(FingerprintMismatch, match="teacher.weights_sha256"):
        CacheSFTTrainer(model=str(other), args=cache_sft_config(tmp_path / "sft", use_cpu=True), cache=data, reg_weight=1.0)


def test_readme_trl_snippet_runs(tiny_model_dir, tiny_cache, tmp_path):
    namespace = run_snippet(readme_snippet("trl-trainer"), tiny_model_dir, tiny_cache, tmp_path / "out")
    trainer = namespace["trainer"]
    assert isinstance(trainer, trl.SFTTrainer) and trainer.state.global_step == trainer.args.max_steps
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert logged and all("mean_token_accuracy" in h and h["kl"] > 0 for h in logged)
