"""The method registry: a new method is one entry plus its loss; a run looks its method up once; the
settings import no torch; old key names still load and resume."""
import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from run_configs import cache_data, make_config

from pipeline.config import config_for_run, load_config
from pipeline.studies.sweep import plan_runs, record_weight
from stages.student import methods
from stages.student.loss import CachedTeacher
from stages.student.methods import Method, get_method, method_names, registered
from stages.student.runner import run_train
from stages.student.trainer import dataset_columns

REPO = Path(__file__).resolve().parents[3]


def reverse_kl(student_logits: torch.Tensor, targets: torch.Tensor, teacher: CachedTeacher) -> torch.Tensor:
    """KL(q || p) with student q and teacher p both renormalized over the k cached ids: [N, V] -> [N]."""
    lq = student_logits.float().gather(-1, teacher.topk_ids.long()).log_softmax(-1)
    lp = teacher.topk_logprobs.float().log_softmax(-1)
    return (lq.exp() * (lq - lp)).sum(-1)


TOY = Method("reverse_kl", teacher="cache", regularizer=reverse_kl)  # no fused form, every LoRA variant


def _train_overrides(model_dir, cache_dir, out, *extra):
    data = cache_data(cache_dir)  # the data the cache holds: train refuses a config naming other data
    return [f"model={model_dir}", f"cache.dir={cache_dir}", f"data.path={data.path}", f"data.max_length={data.max_length}",
            f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=2", "train.batch_size=4",
            "train.logging_steps=1", "train.learning_rate=0.003", "train.warmup_ratio=0", "train.lora.rank=4", *extra]


def test_a_toy_method_is_one_registry_entry(tiny_model_dir, tiny_cache, tmp_path):
    with registered(TOY):
        # config validation
        config = load_config(None, _train_overrides(tiny_model_dir, tiny_cache, tmp_path / "run", "train.method=reverse_kl",
                                                    "train.reg_weight=0.5"))
        assert (config.train.method, config.train.reg_weight) == ("reverse_kl", 0.5)
        with pytest.raises(ValueError, match="train.fused_loss: not supported with method 'reverse_kl'"):
            load_config(None, ["train.method=reverse_kl", "train.fused_loss=true"])
        # a real trainer step: the reader loads the teacher columns, the trainer calls the toy's loss
        columns = {name: dataset_columns(get_method(name), "topk_f32") for name in ("reverse_kl", "tail", "none")}
        assert columns["reverse_kl"] == columns["tail"] != columns["none"]
        metrics = run_train(config)
        assert metrics["steps"] == 2 and metrics["method"] == "reverse_kl" and metrics["final_kl"] > 0
        with open(tmp_path / "run" / "log.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert float(rows[0]["kl"]) < 1e-6 < float(rows[-1]["kl"])  # student = base at step 1, moved after
        # the sweep's grid: lambdas, and the k axis because the toy reads the cache
        grid = load_config(None, ["cache.k=8", "sweep.methods=[none, reverse_kl]", "sweep.reg_weights=[1]",
                                  "sweep.method_reg_weights={reverse_kl: [0.5, 2]}", "sweep.seeds=[0]", "sweep.ks=[4]"])
        names = [spec.name for spec in plan_runs(grid)]
        assert names == ["none-l0-s0", "reverse_kl-l0.5-s0-k4", "reverse_kl-l2-s0-k4"]
    assert "reverse_kl" not in method_names()  # unregistered on leaving the block
    with pytest.raises(ValueError, match=r"train.method: 'reverse_kl' not in"):
        load_config(None, ["train.method=reverse_kl"])


def test_every_registered_method_says_what_it_reads_scales_and_logs():
    table = {m: (get_method(m).teacher, get_method(m).weight_scales, get_method(m).log_key) for m in method_names()}
    assert table == {"tail": ("cache", "per_token", "kl"), "topk": ("cache", "per_token", "kl"),
                     "full_kl": ("cache", "per_token", "kl"), "none": ("none", "nothing", "kl"),
                     "live": ("live", "per_token", "kl"), "l2": ("none", "penalty", "penalty"),
                     "lalora": ("none", "penalty", "penalty"), "sampled_tail": ("cache", "per_token", "kl")}
    assert [m for m in method_names() if get_method(m).needs_draws] == ["sampled_tail"]
    assert [m for m in method_names() if not get_method(m).allows("pissa")] == ["live"]
    assert [m for m in method_names() if not get_method(m).supports_fused] == ["live"]


def _as_saved_before_the_registry(path):
    """Rewrite a run's config.yaml with the key names it had before the registry."""
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {{"method": "estimator", "reg_weight": "kl_weight"}.get(k, k): v for k, v in raw["train"].items()}
    raw["sweep"] = {{"reg_weights": "kl_weights", "method_reg_weights": "method_kl_weights"}.get(k, k): v
                    for k, v in raw["sweep"].items()}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def test_an_old_run_dir_loads_and_resumes_under_the_new_names(tiny_model_dir, tiny_cache, tmp_path):
    run = tmp_path / "run"
    config = make_config(tiny_model_dir, tiny_cache, run, method="full_kl", reg_weight=0.5, max_steps=2, save_steps=1)
    run_train(config)
    raw = _as_saved_before_the_registry(run / "config.yaml")
    assert raw["train"]["estimator"] == "full_kl" and "method" not in raw["train"]
    with pytest.raises(ValueError, match=r"'train.estimator' was renamed: use 'train.method'"):
        load_config(run / "config.yaml")  # read as a hand-written config: old names refused
    loaded = config_for_run(str(run), [])  # the artifact reader translates them
    assert (loaded.train.method, loaded.train.reg_weight) == ("full_kl", 0.5)
    longer = make_config(tiny_model_dir, tiny_cache, run, method="full_kl", reg_weight=0.5, max_steps=3, save_steps=1)
    metrics = run_train(longer, resume=True)  # no spurious "train.estimator: ... -> None" difference
    assert metrics["steps"] == 3 and metrics["resumed_from"].endswith("checkpoint-2")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["method"] == "full_kl"  # saved under the new names
    changed = make_config(tiny_model_dir, tiny_cache, run, method="full_kl", reg_weight=2.0, max_steps=4, save_steps=1)
    _as_saved_before_the_registry(run / "config.yaml")
    with pytest.raises(ValueError, match=r"train.reg_weight: 0.5 -> 2.0"):  # a real change is still named
        run_train(changed, resume=True)


def test_old_results_records_are_read_by_their_lambda():
    assert record_weight({"kl_weight": 0.3}) == record_weight({"reg_weight": 0.3}) == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names load silently
        load_config("configs/demo.yaml", ["train.method=tail", "train.reg_weight=1"])


class CountingRegistry(dict):
    """The registry's dict, counting every lookup by name: the count cannot be dodged by an alias of get_method."""

    def __init__(self, entries):
        super().__init__(entries)
        self.lookups = 0

    def __getitem__(self, name):
        self.lookups += 1
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.lookups += 1
        return super().get(name, default)

    def __contains__(self, name):
        self.lookups += 1
        return super().__contains__(name)


def test_a_run_looks_its_method_up_once(tiny_model_dir, tiny_cache, tmp_path, monkeypatch):
    """run_train resolves train.method once and passes the Method down (reader, trainer, loss of every
    micro-batch, penalty, summary). The config's own validation lookup happens before, at load."""
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=2, save_steps=2, grad_accum=2)
    registry = CountingRegistry(methods._METHODS)
    monkeypatch.setattr(methods, "_METHODS", registry)
    metrics = run_train(config)
    assert metrics["steps"] == 2 and metrics["final_kl"] is not None
    assert registry.lookups == 1


def test_the_settings_import_no_torch():
    """Loading a config stays light: the settings, the registry and the trainer_args checks import no torch."""
    code = "import sys; import stages.student.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
