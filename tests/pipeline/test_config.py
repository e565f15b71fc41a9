"""Config: YAML + dotted overrides into typed dataclasses; bad keys and values are named."""
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, load_config
from stages.common.stage_config import save_config

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_loads_and_overrides_apply():
    config = load_config("configs/demo.yaml", ["cache.k=64", "train.reg_weight=0.25", "train.lora.rank=4"])
    assert isinstance(config, Config)
    assert (config.cache.k, config.train.reg_weight, config.train.lora.rank) == (64, 0.25, 4)
    assert isinstance(config.train.reg_weight, float)


def test_defaults_without_a_file():
    assert load_config(None).cache.engine == "vllm"


@pytest.mark.parametrize("override, named", [
    ("train.lora.rnk=3", "train.lora.rnk"),
    ("cachee.k=3", "cachee"),
    ("cache.k=abc", "cache.k"),
    ("cache.engine=tensorrt", "cache.engine"),
    ("train.method=kl", "train.method"),
    ("cache.encoding=int3", "int3"),
])
def test_bad_keys_and_values_are_named(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config("configs/demo.yaml", [override])


def test_bad_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache:\n  kk: 3\n")
    with pytest.raises(ValueError, match=r"cache\.kk"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    config = load_config("configs/demo.yaml", ["train.lora.target_modules=[q_proj]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_cli_reports_a_bad_override_without_a_traceback():
    result = subprocess.run([sys.executable, "-m", "pipeline", "cache-teacher", "cache.kk=1"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "cache.kk" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["build-default", "cache-teacher", "merge-manifest", "verify", "inspect", "train", "eval",
                                     "sweep", "approx-study", "demo"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "pipeline", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage" in result.stdout


@pytest.mark.parametrize("old, new", [
    ("train.estimator=topk", "train.method"), ("train.kl_weight=0.25", "train.reg_weight"),
    ("sweep.kl_weights=[0.5]", "sweep.reg_weights"), ("sweep.method_kl_weights={l2: [0.1]}", "sweep.method_reg_weights"),
])
def test_an_old_key_on_the_command_line_is_refused_naming_the_new_one(old, new):
    with pytest.raises(ValueError, match=rf"'{old.split('=')[0]}' was renamed: use '{new}' \(override"):
        load_config(None, [old])
    section, leaf = old.split("=")[0].split(".")
    with pytest.raises(ValueError, match=rf"'{section}.{leaf}' was renamed: use '{new}'"):  # inside a section value too
        load_config(None, [f"{section}={{{leaf}: {old.split('=', 1)[1]}}}"])


@pytest.mark.parametrize("text, old, new", [
    ("train:\n  estimator: live\n", "train.estimator", "'train.method'"),
    ("train:\n  method: tail\n  kl_weight: 3\n", "train.kl_weight", "'train.reg_weight'"),
    ("sweep:\n  kl_weights: [1]\n", "sweep.kl_weights", "'sweep.reg_weights'"),
    ("sweep:\n  method_kl_weights: {l2: [0.1]}\n", "sweep.method_kl_weights", "'sweep.method_reg_weights'"),
    ("eval:\n  text_field: body\n", "eval.text_field", "data.text_field"),
])
def test_an_old_key_in_a_hand_written_yaml_is_refused_naming_the_new_one(tmp_path, text, old, new):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"'{old}' was (renamed|removed): use {new}.*{path.name}"):
        load_config(path)


def test_a_saved_config_with_old_names_is_read_under_the_new_ones(tmp_path):
    """The artifact reader (a config.yaml the project saved) translates; the same text hand-written is refused."""
    from stages.common.saved_config import read_saved_config

    path = tmp_path / "config.yaml"
    path.write_text("train:\n  estimator: live\n  kl_weight: 3\nsweep:\n  kl_weights: [1]\n  method_kl_weights: {l2: [0.1]}\n"
                    "eval:\n  text_field: ''\n")
    assert read_saved_config(path) == {"train": {"method": "live", "reg_weight": 3}, "sweep": {"reg_weights": [1],
                                       "method_reg_weights": {"l2": [0.1]}}, "eval": {}}
    path.write_text("eval:\n  text_field: body\n")  # a value that would be lost: refused, saying what to set
    with pytest.raises(ValueError, match=r"eval.text_field='body'.*data.text_field=body"):
        read_saved_config(path)


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/sweep_demo.yaml"])
def test_loading_a_config_does_not_import_torch(config):
    """Each stage's settings stand alone: reading a config pulls in no stage's machinery (torch,
    transformers, vLLM); only a non-empty train.trainer_args needs transformers to validate."""
    code = (f"import sys; from pipeline.config import load_config; load_config({config!r}); "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
