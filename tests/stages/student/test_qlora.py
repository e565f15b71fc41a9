"""train.quantization=4bit (QLoRA through bitsandbytes, which runs NF4 on CPU (0.50.2 checked)): the base's
linear layers really are 4-bit, stage two trains on the cache of the full-precision teacher (the same
fingerprint: identity is the weight files, not the loaded copy), and the adapter moves."""
import csv
import json

import pytest
import torch
from run_configs import make_config
from safetensors.torch import load_file

from stages.student.adapters import make_student
from stages.student.runner import run_train
from stages.student.settings import LoraSettings, TrainConfig

bnb = pytest.importorskip("bitsandbytes", reason="the optional extra `quant` (pip install -e '.[quant]')")


def test_the_4bit_student_holds_nf4_weights_and_trains_only_the_adapter(tiny_model_dir):
    model = make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32, quantization="4bit")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert not isinstance(model.base_model.model.lm_head, bnb.nn.Linear4bit)  # the head stays full precision
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_qlora_trains_two_steps_on_the_full_precision_cache(tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=2, quantization="4bit", report_to="none")
    metrics = run_train(config)  # open_cache's fingerprint check runs without allow_model_mismatch
    assert metrics["steps"] == 2 and metrics["quantization"] == "4bit"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["quantization"] == "4bit"
    with open(tmp_path / "run" / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # At step 1 B = 0, so the student is the NF4-rounded base: its KL to the float32 teacher's cache is
    # the rounding error, > 0 (it is < 1e-6 for a float32 student, tests/stages/student/test_ddp.py).
    assert float(rows[0]["kl"]) > 1e-4 and all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_variants_that_rewrite_the_base_are_refused_with_4bit(variant):
    with pytest.raises(ValueError, match=f"train.quantization=4bit: not with train.lora.variant={variant}"):
        TrainConfig(quantization="4bit", lora=LoraSettings(variant=variant))


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match=r"train.quantization: '8bit' not in none\|4bit"):
        TrainConfig(quantization="8bit")
