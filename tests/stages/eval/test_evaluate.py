"""Eval metrics match a hand computation on the tiny model; drift is zero for an untouched adapter."""
import json
import math

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import config_for_run, load_config
from stages.common.stage_config import save_config
from stages.eval.evaluate import run_eval


def hand_metrics(model, tokenizer, texts, base=None):
    """Per example, unpadded: summed NLL, correct argmaxes, positions, and KL(base || model)."""
    nll = correct = count = drift = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(tokenizer(text)["input_ids"][:32])[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            y = ids[0, 1:]
            nll -= logp[torch.arange(len(y)), y].sum().item()
            correct += (logp.argmax(-1) == y).sum().item()
            count += len(y)
            if base is not None:
                b = torch.log_softmax(base(ids).logits[0, :-1].double(), -1)
                drift += (b.exp() * (b - logp)).sum().item()
    return nll / count, correct / count, drift / count


@pytest.fixture
def run_dir(tiny_model_dir, tiny_jsonl, tmp_path):
    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    model.save_pretrained(run / "adapter")
    save_config(load_config(None, [f"model={tiny_model_dir}", f"eval.source_path={tiny_jsonl}", f"eval.target_path={tiny_jsonl}",
                                   "eval.max_length=32", "eval.max_examples=12", "eval.batch_size=5"]), run / "config.yaml")
    return run


def test_eval_matches_hand_computation(run_dir, tiny_model_dir, tiny_jsonl):
    results = run_eval(config_for_run(str(run_dir), []), str(run_dir))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(line)["text"] for line in tiny_jsonl.read_text().splitlines()][:12]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    from peft import PeftModel
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run_dir / "adapter")).eval()
    base_loss, base_acc, _ = hand_metrics(base, tokenizer, texts)
    loss, acc, drift = hand_metrics(adapted, tokenizer, texts, base=base)
    assert results["base"]["source"]["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert results["base"]["target"]["accuracy"] == pytest.approx(base_acc)
    assert results["adapted"]["source"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert results["adapted"]["source"]["ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert results["adapted"]["source"]["drift_kl"] == pytest.approx(drift, rel=1e-4) and drift > 1e-3
    assert results["forgetting"]["source_loss_increase"] == pytest.approx(loss - base_loss, rel=1e-4, abs=1e-6)
    assert json.loads((run_dir / "eval.json").read_text())["forgetting"] == results["forgetting"]


def test_untouched_adapter_has_no_drift(run_dir, tiny_model_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(run_dir / "adapter")  # B = 0: the adapted model is the base model
    results = run_eval(config_for_run(str(run_dir), []), str(run_dir))
    assert results["adapted"]["source"]["drift_kl"] < 1e-6
    assert results["forgetting"]["source_loss_increase"] == pytest.approx(0.0, abs=1e-5)


def test_a_directory_without_a_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        config_for_run(str(tmp_path), [])


def test_eval_sets_are_read_as_stage_one_reads_data(tool_chat_jsonl, tiny_jsonl, tiny_model_dir, tmp_path):
    """A set with the chat column is chat (assistant bodies scored), a set with the text column text,
    read with data.text_field (the old eval.text_field is refused, naming it)."""
    from stages.data.inputs import input_format, load_rows
    from stages.eval.evaluate import eval_data_config

    config = load_config(None, [f"model={tiny_model_dir}", "data.format=text"])  # the training set's format is not the eval set's
    kind = lambda path, data: input_format(cfg := eval_data_config(str(path), data, config.eval), load_rows(cfg).column_names).kind  # noqa: E731
    assert kind(tool_chat_jsonl, config.data) == "chat"
    assert kind(tiny_jsonl, config.data) == "text"
    renamed = tmp_path / "body.jsonl"
    renamed.write_text("".join(json.dumps({"body": json.loads(line)["text"]}) + "\n" for line in tiny_jsonl.read_text().splitlines()))
    with pytest.raises(ValueError, match="'eval.text_field' was removed: use data.text_field"):
        load_config(None, [f"model={tiny_model_dir}", "eval.text_field=body"])
    body = load_config(None, [f"model={tiny_model_dir}", "data.text_field=body"])
    assert kind(renamed, body.data) == "text"
    with pytest.raises(ValueError, match=r"body\.jsonl: no column of a supported input format \(columns: \['body'\]\)"):
        eval_data_config(str(renamed), config.data, config.eval)


def test_an_old_run_dir_passes_eval_run(run_dir, capsys):
    """A run directory saved before the renames (train.estimator / kl_weight, sweep.kl_weights, an empty
    eval.text_field) is read by `eval --run` through the artifact reader, with the same result."""
    from pipeline.cli import main

    new = run_eval(config_for_run(str(run_dir), []), str(run_dir))
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    raw["train"]["estimator"], raw["train"]["kl_weight"] = raw["train"].pop("method"), raw["train"].pop("reg_weight")
    raw["sweep"]["kl_weights"] = raw["sweep"].pop("reg_weights")
    raw["eval"]["text_field"] = ""
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert json.loads((run_dir / "eval.json").read_text())["forgetting"] == new["forgetting"]
