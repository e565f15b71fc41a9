"""Config: YAML + dotted overrides into typed dataclasses; bad keys and values are named."""
import subprocess
import sys

import pytest

from pipeline.config import Config, load_config, save_config


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
def test_old_keys_warn_naming_the_new_key_and_map_to_it(old, new):
    with pytest.warns(FutureWarning, match=f"use '{new}'"):
        config = load_config(None, [old])
    assert config == load_config(None, [f"{new}={old.split('=', 1)[1]}"])


def test_an_old_yaml_loads_under_the_new_names(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  estimator: live\n  kl_weight: 3\nsweep:\n  kl_weights: [1]\n  method_kl_weights: {l2: [0.1]}\n")
    with pytest.warns(FutureWarning) as caught:
        config = load_config(path, ["train.kl_weight=0.5"])  # an old-name override wins over the file
    assert {str(w.message).split("'")[1] for w in caught} == {"train.estimator", "train.kl_weight", "sweep.kl_weights",
                                                               "sweep.method_kl_weights"}
    assert (config.train.method, config.train.reg_weight) == ("live", 0.5)
    assert (config.sweep.reg_weights, config.sweep.method_reg_weights) == ([1.0], {"l2": [0.1]})
    path.write_text("train:\n  estimator: live\n  method: tail\n")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"'train.method' given twice, also as 'train.estimator'"):
        load_config(path)


def test_an_old_and_a_new_key_together_on_the_command_line_are_refused():
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"'train.method' and 'train.estimator' set the same key"):
        load_config(None, ["train.method=topk", "train.estimator=tail"])
