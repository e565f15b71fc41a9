"""A sweep reuses only what it would compute now (issue 24): runs and the base evaluation are keyed by
what they compute; a changed setting re-runs exactly the runs it changes (old results moved aside,
the summary naming both); finished runs go to sweep.records_dir as they finish, so a fresh clone
with no output_dir resumes from the records; two processes split one grid with --shard."""
import json
import shutil
import subprocess
import sys

from test_end_to_end import REPO

from pipeline.config import load_config
from pipeline.studies.sweep import run_sweep
from stages.teacher.runner import run_cache_teacher


def overrides(model_dir, data, tmp_path, *extra):
    return [f"model={model_dir}", f"data.path={data}", "data.max_length=48", f"cache.dir={tmp_path / 'cache'}",
            "cache.engine=hf", "cache.k=8", "train.max_steps=2", "train.save_steps=2", "train.batch_size=4",
            f"eval.source_path={data}", f"eval.target_path={data}", "eval.max_examples=8", "eval.max_length=32",
            f"sweep.output_dir={tmp_path / 'sweep'}", "sweep.methods=[none, tail]", "sweep.reg_weights=[1]",
            "sweep.seeds=[0]", *extra]


def test_a_changed_setting_reruns_exactly_the_runs_it_changes(tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    out = tmp_path / "sweep"
    first = run_sweep(load_config(None, overrides(tiny_model_dir, tiny_jsonl, tmp_path)))
    said_first = capsys.readouterr().out

    # train.k changes what tail reads and nothing of none: tail re-runs, none is reused
    second = run_sweep(load_config(None, overrides(tiny_model_dir, tiny_jsonl, tmp_path, "train.k=4")))
    said = capsys.readouterr().out
    assert second[0] == first[0] and second[1] != first[1]  # none's record reused as it was; tail's new (k=4)
    assert "sweep: ran 2" in said_first and "sweep: reused 1; re-run, settings changed 1" in said
    assert f"re-run, settings changed: tail-l1-s0 (old run moved to {out / 'stale' / 'tail-l1-s0.0'})" in said
    keys = {name: json.loads((out / "stale" / f"{name}.0" / "run_key.json").read_text())["key"] for name in ("tail-l1-s0",)}
    assert json.loads((out / "tail-l1-s0" / "run_key.json").read_text())["key"] != keys["tail-l1-s0"]
    none_key = json.loads((out / "none-l0-s0" / "run_key.json").read_text())["key"]

    # eval settings change the base evaluation and every run's: all recomputed, the old base moved aside
    third = run_sweep(load_config(None, overrides(tiny_model_dir, tiny_jsonl, tmp_path, "train.k=4", "eval.max_examples=6")))
    said = capsys.readouterr().out
    assert json.loads((out / "none-l0-s0" / "run_key.json").read_text())["key"] != none_key
    assert third[0]["eval_sets"] == third[1]["eval_sets"]
    assert "re-run, settings changed 2" in said and f"moved to {out / 'stale' / 'base_eval.json.0'}" in said
    results = json.loads((out / "results.json").read_text())
    assert {r["name"] for r in results["runs"]} == {"none-l0-s0", "tail-l1-s0"} and results["pending"] == []
    # one seed per row: no spread column to print; the figure says so
    table = (out / "results.md").read_text()
    assert "±" not in table and "| tail | 1 | 1 |" in table

    # records_dir added to a finished sweep: the reused runs' records are written too
    records = tmp_path / "records"
    run_sweep(load_config(None, overrides(tiny_model_dir, tiny_jsonl, tmp_path, "train.k=4", "eval.max_examples=6",
                                          f"sweep.records_dir={records}")))
    assert "sweep: reused 2" in capsys.readouterr().out
    assert sorted(p.name for p in records.iterdir()) == ["base_eval.json", "none-l0-s0.json", "tail-l1-s0.json"]


def sweep_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "--config", "", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_two_shards_then_a_fresh_clone_resumes_from_the_records(tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    records = tmp_path / "docs" / "results" / "mine"
    args = overrides(tiny_model_dir, tiny_jsonl, tmp_path, f"sweep.records_dir={records}")
    run_cache_teacher(load_config(None, args))  # shards need a complete cache: stage one is not raced
    shards = [sweep_cli(*args, "--shard", f"{i}/2") for i in range(2)]  # two processes, one grid
    outputs = [p.communicate() for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    assert "sweep: ran 1" in outputs[0][0] and "sweep: ran 1" in outputs[1][0]
    table = (tmp_path / "sweep" / "results.md").read_text()  # the last shard to finish saw both results
    assert sorted(p.name for p in records.iterdir()) == ["base_eval.json", "none-l0-s0.json", "tail-l1-s0.json"]

    shutil.rmtree(tmp_path / "sweep")  # a fresh clone: the tracked records, no output_dir
    again = run_sweep(load_config(None, args))
    assert "sweep: from records 2" in capsys.readouterr().out
    assert not any((tmp_path / "sweep" / name).exists() for name in ("none-l0-s0", "tail-l1-s0"))  # nothing trained
    assert (tmp_path / "sweep" / "results.md").read_text() == table and len(again) == 2
