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
                                             f"set, which says nothing about {tiny_model_dir}; set eval.target_path"):
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
    assert json.dumps(results)  # eval.json holds it as written
