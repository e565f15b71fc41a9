"""Eval says what it scores and refuses to score the wrong thing (issue 24): the embedded demo's sets
are the default only for the embedded model; a dataset folder with several splits is read by the
split named in eval.split, never silently by its train split; eval.json names each set."""
import json

import datasets
import pytest

from pipeline.config import load_config
from stages.eval.evaluate import run_eval


def test_eval_of_another_model_with_the_demo_sets_is_refused(tiny_model_dir, tiny_jsonl):
    for unset in (["eval.target_path", "eval.source_path"], ["eval.source_path"]):
        given = [f"{key}={tiny_jsonl}" for key in ("eval.target_path", "eval.source_path") if key not in unset]
        with pytest.raises(ValueError, match=f"{' and '.join(unset)} not set: the default is the embedded demo's held-out "
                                             f"set, which says nothing about {tiny_model_dir}; set {unset[0]} "):
            run_eval(load_config(None, [f"model={tiny_model_dir}", *given]))


def test_a_folder_with_several_splits_needs_eval_split_and_eval_json_names_the_sets(tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    folder = tmp_path / "dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": f"train row {i}"} for i in range(6)]),
                          "test": datasets.Dataset.from_list([{"text": f"held-out row {i}"} for i in range(3)])}).save_to_disk(folder)
    settings = [f"model={tiny_model_dir}", f"eval.target_path={folder}", f"eval.source_path={tiny_jsonl}", "eval.max_examples=0"]
    with pytest.raises(ValueError, match=r"dataset holds several splits \(splits: \['train', 'test'\]\); name the one to read "
                                         r"\(data.split for training data, eval.split for an eval set\)"):
        run_eval(load_config(None, settings))
    results = run_eval(load_config(None, [*settings, "eval.split=test"]))
    target = results["sets"]["target"]
    assert (target["path"], target["split"], target["format"], target["examples"]) == (str(folder), "test", "text", 3)
    assert results["sets"]["source"]["examples"] == len(tiny_jsonl.read_text().splitlines())
    assert f"target (learning: held-out data of the trained task): {folder} [split test, text] 3 examples" in capsys.readouterr().out
    assert target["scored_tokens"] == results["base"]["target"]["tokens"]
    with pytest.raises(ValueError, match=r"has no split 'validation' \(splits: \['train', 'test'\]\)"):
        run_eval(load_config(None, [*settings, "eval.split=validation"]))
    # a folder whose only split is not "train", beside one with several: each set names its split
    only = tmp_path / "only-validation"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": f"kept row {i}"} for i in range(2)])}).save_to_disk(only)
    both = run_eval(load_config(None, [*settings[:-2], f"eval.source_path={only}", "eval.max_examples=0", "eval.target_split=test"]))
    assert [both["sets"][n]["split"] for n in ("target", "source")] == ["test", "validation"]
    assert json.dumps(results)  # eval.json holds it as written


def test_a_heldout_slice_of_the_training_data_is_the_default_target(tiny_model_dir, tiny_jsonl, tmp_path):
    """data.heldout_fraction: stage one keeps those ids out of the cache (listed in the manifest) and
    eval, with no eval.target_path, scores exactly them."""
    import pyarrow.parquet as pq

    from stages.data.inputs import heldout_ids
    from stages.teacher.runner import run_cache_teacher
    from storage_schemas import Manifest

    config_args = [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={tmp_path / 'cache'}", "cache.engine=hf",
                   "cache.k=8", "data.max_length=48", "data.heldout_fraction=0.25", f"eval.source_path={tiny_jsonl}",
                   "eval.max_examples=0"]
    config = load_config(None, config_args)
    summary = run_cache_teacher(config).render()
    manifest = Manifest.load(tmp_path / "cache")
    held_line = "held out of the cache (data.heldout_fraction=0.25, eval's default target set): "
    assert f"{held_line}{len(manifest.dataset.heldout_examples)} examples" in summary
    held = manifest.dataset.heldout_examples
    rows = len(tiny_jsonl.read_text().splitlines())
    assert held == heldout_ids(range(rows), 0.25) and 0 < len(held) < rows  # the rule, pure: sha256 of each id
    cached = [r["example_id"] for s in manifest.shards for r in pq.read_table(tmp_path / "cache" / s.file).to_pylist()]
    assert sorted(cached + held) == list(range(rows)) and manifest.complete
    results = run_eval(config)
    assert results["sets"]["target"]["examples"] == len(held)
    assert results["sets"]["target"]["heldout_fraction"] == 0.25 and results["sets"]["target"]["path"] == str(tiny_jsonl)
    with pytest.raises(ValueError, match=r"data.heldout_fraction=0.5, but the cache .* was made with data.heldout_fraction=0.25"):
        run_eval(load_config(None, [*[a for a in config_args if a != "data.heldout_fraction=0.25"], "data.heldout_fraction=0.5"]))
