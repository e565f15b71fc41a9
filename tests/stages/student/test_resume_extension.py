"""`train --resume` with a larger train.max_steps extends a run (issue 24): the earlier eval.json is
renamed eval.superseded.json (it described the old adapter); the learning rate, as docs/cli.md says:
one step at the rate the old schedule ended on, then that of a run planned for the new max_steps
from the start (transformers rebuilds the schedule for the new total and restores its step)."""
import csv
import json

import pytest

from pipeline.config import load_config
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    out = tmp_path_factory.mktemp("extend") / "cache"
    run_cache_teacher(load_config(None, [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={out}",
                                         "cache.engine=hf", "cache.k=8", "data.max_length=48"]))
    return out


def config(tiny_model_dir, tiny_jsonl, cache, out, steps):
    return load_config(None, [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={cache}", "data.max_length=48",
                              f"train.output_dir={out}", f"train.max_steps={steps}", "train.save_steps=4", "train.logging_steps=1",
                              "train.batch_size=4", "train.warmup_ratio=0.25"])


def learning_rates(run_dir) -> dict[int, float]:
    with open(run_dir / "log.csv") as fh:
        return {int(row["step"]): float(row["learning_rate"]) for row in csv.DictReader(fh) if row["learning_rate"]}


def test_extending_a_run_supersedes_its_eval_and_follows_the_new_schedule(tiny_model_dir, tiny_jsonl, cache, tmp_path, capsys):
    extended, planned = tmp_path / "extended", tmp_path / "planned"
    run_train(config(tiny_model_dir, tiny_jsonl, cache, extended, 4))
    (extended / "eval.json").write_text(json.dumps({"adapted": "of the 4-step adapter"}))
    run_train(config(tiny_model_dir, tiny_jsonl, cache, extended, 8), resume=True)
    assert "renamed eval.superseded.json" in capsys.readouterr().out
    assert not (extended / "eval.json").exists()
    assert json.loads((extended / "eval.superseded.json").read_text()) == {"adapted": "of the 4-step adapter"}
    run_train(config(tiny_model_dir, tiny_jsonl, cache, planned, 8))
    got, want = learning_rates(extended), learning_rates(planned)
    assert sorted(got) == list(range(1, 9))
    assert sorted(got) == sorted(want) == list(range(1, 9))
    # one step at the rate the 4-step schedule ended on (its restored last value: 0 for cosine decay),
    # then the 8-step schedule exactly
    assert got[5] == 0.0 and want[5] > 0
    assert [got[s] for s in range(6, 9)] == pytest.approx([want[s] for s in range(6, 9)], rel=1e-9)
