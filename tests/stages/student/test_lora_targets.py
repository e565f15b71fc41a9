"""LoRA targets default to every linear layer but the output head (issue 14, fault 8): fused
projections (Phi-3's qkv_proj, gate_up_proj) get adapters too, and the run says which modules did."""
import json

import pytest
import torch
from run_configs import make_config
from tiny_models import build_tokenizer

from pipeline.config import load_config
from stages.student.adapters import adapted_modules, make_student
from stages.student.runner import run_train
from stages.student.settings import LoraSettings

LLAMA_ALL_LINEAR = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "gate_proj": 2, "up_proj": 2, "down_proj": 2}
PHI3_ALL_LINEAR = {"qkv_proj": 2, "o_proj": 2, "gate_up_proj": 2, "down_proj": 2}
OLD_DEFAULT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # before issue 14


@pytest.fixture(scope="module")
def tiny_phi3_dir(tmp_path_factory):
    """A random 2-layer Phi-3 (fused qkv_proj and gate_up_proj) with the tests' tiny tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-phi3")
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    Phi3ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def test_default_targets_every_linear_layer_of_a_fused_phi3_but_the_head(tiny_phi3_dir):
    model = make_student(tiny_phi3_dir, LoraSettings(rank=4))
    assert LoraSettings().target_modules == "all-linear"
    assert adapted_modules(model) == PHI3_ALL_LINEAR
    assert "lm_head" not in adapted_modules(model) and isinstance(model.get_output_embeddings(), torch.nn.Linear)
    # the old Llama name list matched only two of the four kinds here, silently
    assert adapted_modules(make_student(tiny_phi3_dir, LoraSettings(rank=4, target_modules=OLD_DEFAULT))) == {
        "o_proj": 2, "down_proj": 2}


def test_default_targets_every_linear_layer_of_llama(tiny_model_dir):
    model = make_student(tiny_model_dir, LoraSettings(rank=4))
    assert adapted_modules(model) == LLAMA_ALL_LINEAR
    assert adapted_modules(make_student(tiny_model_dir, LoraSettings(rank=4, target_modules=["q_proj", "v_proj"]))) == {
        "q_proj": 2, "v_proj": 2}


@pytest.mark.parametrize("value", ["[]", "attention", "[q_proj, 3]"])
def test_target_modules_must_be_all_linear_or_names(value):
    with pytest.raises(ValueError, match=r"train\.lora\.target_modules: expected \"all-linear\" or a non-empty list"):
        load_config(None, [f"train.lora.target_modules={value}"])


def test_run_summary_and_metrics_list_the_adapted_modules(tiny_model_dir, tiny_cache, tmp_path, capsys):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=1, save_steps=1)
    config.train.lora = LoraSettings(rank=4)  # the default targets
    metrics = run_train(config)
    assert metrics["adapted_modules"] == LLAMA_ALL_LINEAR
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["adapted_modules"] == LLAMA_ALL_LINEAR
    assert ("adapted modules: q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2, up_proj x2, down_proj x2"
            in capsys.readouterr().out)
