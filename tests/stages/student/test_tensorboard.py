"""train.report_to: the TensorBoard event file of a tiny run holds exactly log.csv's figures (read back
with tensorboard's own EventAccumulator), eval adds eval.json's, plot-run draws from it; none and a
missing integration."""
import csv
import importlib.util
import json
import shutil

import numpy as np
import pytest
from run_configs import make_config

from pipeline.config import config_for_run
from pipeline.plot_run import mismatches_with_log_csv, plot_and_check
from stages.common.tensorboard_log import read_scalars
from stages.eval.evaluate import run_eval
from stages.student.runner import run_train
from stages.student.trainer import training_arguments

CSV_FIGURES = ("epoch", "loss", "ce", "kl", "penalty", "learning_rate", "grad_norm", "tokens_per_s")


@pytest.fixture(scope="module")
def logged_run(tiny_model_dir, tiny_cache, tiny_jsonl, tmp_path_factory):
    """A 7-step tail run logging every 2 steps (first and last step too), evaluated afterwards."""
    run = tmp_path_factory.mktemp("tb") / "run"
    config = make_config(tiny_model_dir, tiny_cache, run, max_steps=7, logging_steps=2, reg_weight=0.5)
    config.eval.source_path = config.eval.target_path = str(tiny_jsonl)
    config.eval.max_examples, config.eval.max_length = 6, 32
    run_train(config)
    results = run_eval(config_for_run(str(run), []), str(run))
    return run, results


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_log_csv_figure_is_the_same_scalar_in_the_event_file(logged_run):
    run, _ = logged_run
    rows, scalars = csv_rows(run / "log.csv"), read_scalars(run / "tensorboard")
    assert [int(r["step"]) for r in rows] == [1, 2, 4, 6, 7]
    compared = set()
    for name in CSV_FIGURES:
        logged = {int(r["step"]): float(r[name]) for r in rows if r[name] != ""}
        if not logged:
            continue
        tag = f"train/{name}"
        in_tb = dict(scalars[tag])
        assert set(logged) <= set(in_tb), (tag, sorted(logged), sorted(in_tb))
        for step, value in logged.items():  # the event file stores float32: exactly log.csv's value rounded to it
            assert in_tb[step] == float(np.float32(value)), (tag, step, in_tb[step], value)
        compared.add(name)
    assert compared == {"epoch", "loss", "ce", "kl", "learning_rate", "grad_norm", "tokens_per_s"}
    assert rows[-1]["kl"] != "" and float(rows[-1]["kl"]) > 0


def test_eval_figures_go_to_the_runs_event_file_at_its_last_step(logged_run):
    run, results = logged_run
    scalars = read_scalars(run / "tensorboard")
    steps = json.loads((run / "metrics.json").read_text())["steps"]
    expected = {"eval/adapted/source_drift_kl": results["adapted"]["source"]["drift_kl"],
                "eval/base/target_loss": results["base"]["target"]["loss"],
                "eval/forgetting/source_loss_increase": results["forgetting"]["source_loss_increase"]}
    for tag, value in expected.items():
        assert scalars[tag] == [(steps, float(np.float32(value)))], tag
    assert len([t for t in scalars if t.startswith("eval/")]) == 2 * (4 + 4) + 1 + 3  # base/adapted x 2 sets + drift + forgetting


def test_plot_run_draws_the_curves_from_the_event_file(logged_run, tmp_path):
    run, _ = logged_run
    out = tmp_path / "curves.png"
    assert plot_and_check(run, out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        plot_and_check(tmp_path, tmp_path / "x.png")


def test_plot_run_check_compares_the_event_file_with_log_csv(logged_run, tmp_path):
    run, _ = logged_run
    assert plot_and_check(run, tmp_path / "a.png", check=True) == 0
    copy = tmp_path / "copy"  # the same event file beside a log.csv with one CE changed in its 4th digit
    shutil.copytree(run / "tensorboard", copy / "tensorboard")
    rows = csv_rows(run / "log.csv")
    rows[2]["ce"] = str(float(rows[2]["ce"]) + 1e-3)
    with open(copy / "log.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert mismatches_with_log_csv(copy) == [f"step 4 ce: log.csv {rows[2]['ce']}, event file "
                                             f"{dict(read_scalars(run / 'tensorboard')['train/ce'])[4]}"]
    assert plot_and_check(copy, tmp_path / "b.png", check=True) == 1


def test_report_to_is_resolved_saved_and_none_writes_no_event_file(logged_run, tiny_model_dir, tiny_cache, tmp_path):
    run, _ = logged_run
    assert "report_to: tensorboard" in (run / "config.yaml").read_text()
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "quiet", max_steps=2, report_to="none")
    assert training_arguments(config.train, tmp_path, 30).report_to == []
    run_train(config)
    assert (tmp_path / "quiet" / "log.csv").exists() and not (tmp_path / "quiet" / "tensorboard").exists()
    assert make_config(tiny_model_dir, tiny_cache, tmp_path, report_to=["tensorboard", "tensorboard"]).train.report_to == "tensorboard"


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_an_integration_not_installed_is_named(name, tiny_model_dir, tiny_cache, tmp_path):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed here: the refusal cannot be shown")
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", report_to=["tensorboard", name])
    with pytest.raises(ValueError, match=f"the package '{name}' is not installed .pip install {name}"):
        training_arguments(config.train, tmp_path, 30)
    with pytest.raises(ValueError, match=r"\['nope'\] not in"):
        make_config(tiny_model_dir, tiny_cache, tmp_path, report_to="nope")
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        make_config(tiny_model_dir, tiny_cache, tmp_path, report_to=["none", name])


def test_a_sweep_logs_one_hparams_run_per_grid_point_once(tmp_path):
    from pipeline.studies.sweep import log_sweep

    records = [{"name": f"tail-l{w:g}-s0", "method": "tail", "reg_weight": w, "seed": 0, "k": 0, "variant": "",
                "target_loss": 5.0 + w, "target_accuracy": 0.3, "source_loss": 2.5, "source_loss_increase": 0.1 * w,
                "drift_kl": 0.01 * w} for w in (1.0, 3.0)]
    log_sweep(records, tmp_path / "tb")
    log_sweep(records, tmp_path / "tb")  # a resumed sweep: nothing new per run, the figure again
    for r in records:
        scalars = read_scalars(tmp_path / "tb" / r["name"])
        assert scalars["sweep/target_loss"] == [(0, float(np.float32(r["target_loss"])))]
        assert scalars["sweep/source_loss_increase"] == [(0, float(np.float32(r["source_loss_increase"])))]
    assert sorted(p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()) == ["tail-l1-s0", "tail-l3-s0"]
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={IMAGES: 0})
    events.Reload()
    assert [e.step for e in events.Images("sweep/frontier")] == [2, 2]


def test_a_resumed_run_has_each_step_once_in_the_event_file(tiny_model_dir, tiny_cache, tmp_path):
    """Killed after logging steps 4-6 but before saving them (simulated: checkpoint-6, adapter and metrics
    removed), resumed from checkpoint-3: steps 4-6 are logged again; TensorBoard keeps one point per step."""
    run = tmp_path / "run"
    config = make_config(tiny_model_dir, tiny_cache, run, max_steps=6, save_steps=3)
    run_train(config)
    for path in (run / "checkpoints" / "checkpoint-6", run / "adapter"):
        shutil.rmtree(path)
    (run / "metrics.json").unlink()
    run_train(config, resume=True)
    rows, scalars = csv_rows(run / "log.csv"), read_scalars(run / "tensorboard")
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session
    assert [s for s, _ in scalars["train/ce"]] == [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["train/ce"]] == [float(np.float32(float(r["ce"]))) for r in rows]


def test_plot_run_errors_are_one_line_through_the_cli(tmp_path, capsys):
    from pipeline.cli import main as cli_main

    assert cli_main(["plot-run", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing'}: no such run directory"
    assert cli_main(["plot-run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no TensorBoard event file" in err and "Traceback" not in err
