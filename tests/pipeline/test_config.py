"""Config: YAML + dotted overrides into typed dataclasses; bad keys and values are named."""
import subprocess
import sys

import pytest

from pipeline.config import Config, load_config, save_config


def test_demo_config_loads_and_overrides_apply():
    config = load_config("configs/demo.yaml", ["cache.k=64", "train.kl_weight=0.25", "train.lora.rank=4"])
    assert isinstance(config, Config)
    assert (config.cache.k, config.train.kl_weight, config.train.lora.rank) == (64, 0.25, 4)
    assert isinstance(config.train.kl_weight, float)


def test_defaults_without_a_file():
    assert load_config(None).cache.engine == "vllm"


@pytest.mark.parametrize("override, named", [
    ("train.lora.rnk=3", "train.lora.rnk"),
    ("cachee.k=3", "cachee"),
    ("cache.k=abc", "cache.k"),
    ("cache.engine=tensorrt", "cache.engine"),
    ("train.estimator=kl", "train.estimator"),
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


@pytest.mark.parametrize("command", ["build-default", "cache-teacher", "merge-manifest", "verify", "inspect", "train", "eval", "sweep", "approx-study", "demo"])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "pipeline", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage" in result.stdout
