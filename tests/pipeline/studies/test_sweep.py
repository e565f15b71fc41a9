"""The sweep: one cache, a grid of runs, finished runs skipped, table and plot written."""
import json

from file_states import files_state

from pipeline.config import load_config
from pipeline.studies.sweep import plan_runs, run_sweep


def sweep_config(model_dir, data, tmp_path):
    return load_config(None, [
        f"model={model_dir}", f"data.path={data}", "data.max_length=48", f"cache.dir={tmp_path / 'cache'}",
        "cache.engine=hf", "cache.k=8", "train.max_steps=2", "train.save_steps=2", "train.batch_size=4", "train.logging_steps=1",
        f"eval.source_path={data}", f"eval.target_path={data}", "eval.max_examples=8", "eval.max_length=32",
        f"sweep.output_dir={tmp_path / 'sweep'}", "sweep.methods=[none, tail]", "sweep.reg_weights=[1]", "sweep.seeds=[0, 1]",
    ])


def test_plan_gives_one_none_run_per_seed():
    config = load_config(None, ["sweep.methods=[none, tail]", "sweep.reg_weights=[0.5, 2]", "sweep.seeds=[0, 1, 2]"])
    names = [r.name for r in plan_runs(config)]
    assert len(names) == 3 + 6 and len(set(names)) == 9 and "none-l0-s2" in names and "tail-l2-s1" in names


def test_sweep_runs_the_grid_once_and_skips_finished_runs(tiny_model_dir, tiny_jsonl, tmp_path):
    config = sweep_config(tiny_model_dir, tiny_jsonl, tmp_path)
    records = run_sweep(config)
    out = tmp_path / "sweep"
    assert sorted(r["name"] for r in records) == ["none-l0-s0", "none-l0-s1", "tail-l1-s0", "tail-l1-s1"]
    assert {"results.json", "results.md", "frontier.png", "base_eval.json"} <= {p.name for p in out.iterdir()}
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tail | 1 | 2 |" in (out / "results.md").read_text()
    # the binary term's share of the full KL in the last window (step 2: the student has moved off the teacher)
    assert all((0 < r["binary_share"] < 1) if r["method"] == "tail" else r["binary_share"] is None for r in records)
    finished = [*out.glob("*/eval.json"), *out.glob("*/adapter/*"), *out.glob("*/metrics.json"), out / "base_eval.json"]
    stamps = files_state(finished)  # inode, size, mtime, sha256: a rewrite keeping the mtime shows too
    assert len(stamps) == 4 * 5 + 1
    again = run_sweep(config)
    assert again == records and stamps == files_state(finished)
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4
