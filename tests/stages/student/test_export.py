"""`export` (issue 24): a run's adapter merged into a plain model directory (transformers loads it with
no peft; vLLM loads such directories as any model); greedy generation equals the unmerged model's."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    config = load_config(None, [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={root / 'cache'}",
                                "cache.engine=hf", "cache.k=8", "data.max_length=48", f"train.output_dir={root / 'run'}",
                                "train.max_steps=3", "train.batch_size=4", "train.learning_rate=0.05"])
    run_cache_teacher(config)
    run_train(config)
    return root / "run"


def greedy(model, ids: list[int], steps: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_the_merged_model_generates_what_the_adapter_does(tiny_model_dir, trained_run, tmp_path, capsys):
    assert cli_main(["export", "--run", str(trained_run), "--out", str(tmp_path / "merged")]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    prompt = tok("def add(a, b):")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected = greedy(adapted, prompt)
        assert greedy(merged, prompt) == expected
        torch.testing.assert_close(merged(torch.tensor([prompt])).logits, adapted(torch.tensor([prompt])).logits,
                                   atol=1e-4, rtol=1e-4)
    assert cli_main(["export", "--run", str(trained_run), "--out", str(tmp_path / "merged")]) == 2  # never overwrites
    assert "exists and is not empty; choose a new --out" in capsys.readouterr().err


def test_an_unfinished_run_is_not_exported_or_evaluated(trained_run, tmp_path, capsys):
    """A run being extended (train --resume with a larger max_steps, not finished): its adapter/ is from
    the earlier finish, not what its config.yaml describes."""
    import shutil

    run = tmp_path / "extended"
    shutil.copytree(trained_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("max_steps: 3", "max_steps: 300"))
    for command in (["export", "--run", str(run), "--out", str(tmp_path / "out")], ["eval", "--run", str(run)]):
        assert cli_main(command) == 2
        assert "training has not finished (3 of train.max_steps=300 steps in metrics.json" in capsys.readouterr().err


def test_an_adapter_with_nan_weights_is_not_exported(trained_run, tiny_model_dir, tmp_path):
    """A diverged adapter (nan in a lora_B) is refused by name and nothing is written."""
    from safetensors.torch import load_file, save_file

    from stages.student.export import export_merged

    broken = tmp_path / "adapter"
    broken.mkdir()
    for f in (trained_run / "adapter").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "adapter_model.safetensors"))
    name = next(n for n in tensors if "lora_B" in n)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"the merged weights hold nan/inf in 1 tensor\(s\), e.g. .*: the adapter diverged"):
        export_merged(broken, tiny_model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
