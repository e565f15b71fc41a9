"""Sweep axes: per-method lambdas, k read from the first columns of one cache, LoRA variants."""
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import load_config
from pipeline.studies.sweep import plan_runs, run_config, run_sweep
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher


def _grid(*overrides):
    return load_config(None, ["sweep.seeds=[0, 1, 2]", *overrides])


def test_plan_multiplies_lambdas_per_method_k_and_variant():
    config = _grid("sweep.methods=[none, tail, live, l2]", "sweep.reg_weights=[1]", "sweep.method_reg_weights={l2: [0.01, 0.1]}",
                   "cache.k=32", "sweep.ks=[4, 32]", "sweep.lora_variants=[lora, dora]")
    names = [r.name for r in plan_runs(config)]
    assert len(names) == len(set(names)) == 2 * 3 * (1 + 2 + 1 + 2)  # variants x seeds x (none, tail k, live, l2 lambdas)
    assert {"none-l0-s0-lora", "tail-l1-s2-k4-dora", "tail-l1-s0-k32-lora", "live-l1-s1-dora", "l2-l0.01-s0-lora"} <= set(names)
    assert not any("-k" in n for n in names if not n.startswith("tail"))  # k only multiplies cache readers
    assert {r.reg_weight for r in plan_runs(config) if r.method == "l2"} == {0.01, 0.1}


def test_lalora_axes_multiply_lalora_only_with_a_lambda_grid_per_curvature():
    config = _grid("sweep.methods=[none, l2, lalora]", "sweep.reg_weights=[1]", "sweep.lalora_curvatures=[diag, kfac, tri_kfac]",
                   "sweep.curvature_reg_weights={diag: [1e4, 1e5], kfac: [10]}", "sweep.fisher_batches=[1, 8]",
                   "train.fisher_data=x.jsonl")
    specs = plan_runs(config)
    names = [r.name for r in specs]
    # seeds x (none + l2 + lalora: diag 2 lambdas, kfac 1, tri_kfac the plain grid's 1) x 2 proxy sizes
    assert len(names) == len(set(names)) == 3 * (1 + 1 + (2 + 1 + 1) * 2)
    assert {"none-l0-s0", "l2-l1-s1", "lalora-l10000-s0-diag-fb1", "lalora-l100000-s2-diag-fb8", "lalora-l10-s1-kfac-fb8",
            "lalora-l1-s0-tri_kfac-fb1"} <= set(names)
    run = run_config(config, next(r for r in specs if r.name == "lalora-l10-s1-kfac-fb8"), Path("out"))
    assert (run.train.lalora_curvature, run.train.fisher_batches, run.train.reg_weight, run.train.seed) == ("kfac", 8, 10.0, 1)


def test_default_axes_keep_the_old_run_names():
    """Without ks / lora_variants a run is named as before, so finished sweeps are still skipped."""
    names = [r.name for r in plan_runs(_grid("sweep.methods=[none, tail]", "sweep.reg_weights=[0.3]"))]
    assert names == ["none-l0-s0", "none-l0-s1", "none-l0-s2", "tail-l0.3-s0", "tail-l0.3-s1", "tail-l0.3-s2"]


@pytest.mark.parametrize("overrides, message", [
    (["cache.k=8", "sweep.ks=[4, 16]"], r"sweep.ks: \[16\] > cache.k=8"),
    (["sweep.methods=[tail, live]", "sweep.lora_variants=[lora, pissa]"], r"'live' cannot run with sweep.lora_variants \['pissa'\]"),
    (["sweep.methods=[lalora]", "train.fisher_data=x.jsonl", "sweep.lora_variants=[lora, sinelora]",
      "sweep.lalora_curvatures=[diag, tri_kfac]"], r"curvature \['tri_kfac'\] cannot run with train.lora.variant=sinelora \(its update"),
])
def test_impossible_axes_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        plan_runs(_grid(*overrides))


@pytest.mark.parametrize("override, message", [
    ("sweep.method_reg_weights={l3: [1]}", r"\['l3'\] not in"),
    ("sweep.method_reg_weights={l2: []}", r"sweep.method_reg_weights.l2: expected a non-empty list"),
    ("sweep.ks=[0]", r"sweep.ks: every k must be >= 1"),
    ("sweep.lora_variants=[qlora]", r"sweep.lora_variants: \['qlora'\]"),
    ("sweep.lalora_curvatures=[kron]", r"sweep.lalora_curvatures / sweep.curvature_reg_weights: \['kron'\] not in"),
    ("sweep.curvature_reg_weights={kfac: []}", r"sweep.curvature_reg_weights.kfac: expected a non-empty list"),
    ("sweep.fisher_batches=[1, 1]", r"a value listed twice"),
    ("sweep.fisher_batches=[-2]", r"sweep.fisher_batches: every value must be an integer >= 0"),
])
def test_bad_sweep_keys_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def _cache_state(cache_dir):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(cache_dir.glob("shard-*"))}


def test_k_axis_reads_the_same_cache_and_equals_a_cache_built_with_that_k(tiny_model_dir, tiny_jsonl, tmp_path):
    """Runs at k=2 and k=8 share one k=8 cache (its shards untouched, manifest unchanged); the k=2 run
    trains the same adapter as a run on a separate stage one built with cache.k=2."""
    common = [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "data.max_length=48", "cache.engine=hf",
              "cache.encoding=topk_f32",  # exact values: quantized codes would tie near-equal log-probs
              "train.max_steps=4", "train.save_steps=4", "train.batch_size=4", "train.learning_rate=0.01", "train.warmup_ratio=0",
              f"eval.source_path={tiny_jsonl}", f"eval.target_path={tiny_jsonl}", "eval.max_examples=4", "eval.max_length=32"]
    config = load_config(None, [*common, f"cache.dir={tmp_path / 'cache8'}", "cache.k=8", f"sweep.output_dir={tmp_path / 'sweep'}",
                                "sweep.methods=[none, tail]", "sweep.reg_weights=[1]", "sweep.seeds=[0]", "sweep.ks=[2, 8]"])
    run_cache_teacher(config)
    cache_before = _cache_state(tmp_path / "cache8")
    manifest_before = (tmp_path / "cache8" / "manifest.json").read_text()
    records = run_sweep(config)
    assert sorted(r["name"] for r in records) == ["none-l0-s0", "tail-l1-s0-k2", "tail-l1-s0-k8"]
    assert _cache_state(tmp_path / "cache8") == cache_before
    assert (tmp_path / "cache8" / "manifest.json").read_text() == manifest_before
    assert "| tail k=2 | 1 | 1 |" in (tmp_path / "sweep" / "results.md").read_text()
    assert load_config(tmp_path / "sweep" / "tail-l1-s0-k2" / "config.yaml").train.k == 2

    reference = load_config(None, [*common, f"cache.dir={tmp_path / 'cache2'}", "cache.k=2",
                                   f"train.output_dir={tmp_path / 'ref'}", "train.method=tail", "train.reg_weight=1"])
    run_cache_teacher(reference)
    run_train(reference)
    sliced = load_file(tmp_path / "sweep" / "tail-l1-s0-k2" / "adapter" / "adapter_model.safetensors")
    direct = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    full = load_file(tmp_path / "sweep" / "tail-l1-s0-k8" / "adapter" / "adapter_model.safetensors")
    assert sliced.keys() == direct.keys()
    for name in direct:
        torch.testing.assert_close(sliced[name], direct[name], atol=1e-6, rtol=1e-5)
    assert any((full[n] - direct[n]).abs().max() > 1e-6 for n in direct)  # k matters: the test can tell them apart
