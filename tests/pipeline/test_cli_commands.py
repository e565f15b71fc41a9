"""Every `python -m pipeline` command run once for real on the tiny model (hf engine), its outputs
checked against numbers known without it: token counts from the tokenizer, losses from a plain
forward of the reloaded adapter, the exactness of the cached estimators at k = |V|-1.

Run in this process (`pipeline.cli.main`, as the tests of verify and merge-manifest do), in file
order on one module-wide cache. Commands run by other tests: cache-teacher and verify
(tests/stages/teacher/test_runner.py, also here, cheaply), merge-manifest (tests/stages/teacher/scale_out),
inspect (tests/pipeline/test_inspect_cache.py), bench and the measurement of bench-step
(`pipeline.bench.step.compare`, tests/pipeline/test_bench.py, vLLM); every command's --help
(tests/pipeline/test_commands.py).
"""
import csv
import json
from pathlib import Path

import pytest
import torch
from cli_run import run
from file_states import files_state
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from storage_schemas import Manifest

REPO = Path(__file__).resolve().parents[2]


def token_lengths(model_dir: Path, jsonl: Path, max_length: int, count: int | None = None) -> list[int]:
    """Tokens per text row as stage one keeps them (the tokenizer's ids, no EOS, cut at max_length)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()][:count]
    return [min(len(tok(t)["input_ids"]), max_length) for t in texts]


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    """One config for every command (`--config ""` + overrides), and the root its outputs go under."""
    root = tmp_path_factory.mktemp("cli")
    overrides = [
        f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "data.max_length=48", f"cache.dir={root / 'cache'}",
        "cache.engine=hf", "cache.k=8", "cache.rows_per_shard=8", "cache.encoding=topk_f32",
        f"train.output_dir={root / 'run'}", "train.method=tail", "train.max_steps=2", "train.save_steps=2", "train.batch_size=4",
        "train.learning_rate=0.01", "train.warmup_ratio=0",
        f"eval.source_path={tiny_jsonl}", f"eval.target_path={tiny_jsonl}", "eval.max_examples=4", "eval.max_length=32",
        f"sweep.output_dir={root / 'sweep'}", "sweep.methods=[none]", "sweep.reg_weights=[1]", "sweep.seeds=[0]",
        f"approx.output_dir={root / 'approx'}", "approx.runs=[none-l0-s0]", "approx.examples=3", "approx.ks=[2]",
    ]
    return root, ["--config", "", *overrides]


@pytest.fixture(scope="module")
def cached(grid):
    root, config = grid
    return root / "cache", run("cache-teacher", *config)


@pytest.fixture(scope="module")
def trained(grid, cached):
    root, config = grid
    run("train", *config)
    return root / "run"


# --- stage one, stage two, eval ------------------------------------------------------------------
def test_cache_teacher_and_verify_report_the_token_counts(cached, grid, tiny_model_dir, tiny_jsonl):
    cache, summary = cached
    lengths = token_lengths(tiny_model_dir, tiny_jsonl, 48)
    manifest = Manifest.load(cache)
    assert manifest.complete and manifest.num_rows == len(lengths) == 30 and len(manifest.shards) == 4
    assert manifest.num_tokens == sum(lengths)
    assert f"examples {len(lengths)}" in summary and f"trained positions {sum(n - 1 for n in lengths):,}" in summary
    assert run("verify", str(cache)).strip() == (f"OK   {cache}: 4 shards, 30 examples, {sum(lengths):,} tokens, "
                                                 "checksums verified")


def test_train_writes_the_run_of_its_config(trained, grid):
    _, config = grid
    assert {p.name for p in trained.iterdir()} >= {"adapter", "config.yaml", "metrics.json", "log.csv", "cache_fingerprint.json"}
    assert load_config(trained / "config.yaml") == load_config(None, config[2:])
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["method"] == "tail" and metrics["final_kl"] > 0
    with open(trained / "log.csv", newline="") as fh:
        log = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in log] == [1, 2] and metrics["final_ce"] == pytest.approx(float(log[-1]["ce"]))


def test_eval_of_the_run_equals_a_plain_forward_of_the_reloaded_adapter(trained, grid, tiny_model_dir, tiny_jsonl):
    _, config = grid
    out = run("eval", "--run", str(trained), *config[2:])
    result = json.loads((trained / "eval.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(line)["text"] for line in tiny_jsonl.read_text().splitlines()][:4]  # eval.max_examples
    losses = {}
    with torch.no_grad():
        for name in ("base", "adapted"):
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
            if name == "adapted":  # stock peft reload of the run's adapter
                model = PeftModel.from_pretrained(model, trained / "adapter").eval()
            nll, count = 0.0, 0
            for text in texts:
                ids = torch.tensor(tok(text)["input_ids"][:32])  # eval.max_length
                nll += torch.nn.functional.cross_entropy(model(input_ids=ids[None]).logits[0, :-1].double(), ids[1:],
                                                         reduction="sum").item()
                count += len(ids) - 1
            losses[name] = nll / count
    for name in ("base", "adapted"):
        assert result[name]["target"]["tokens"] == count
        assert result[name]["target"]["loss"] == pytest.approx(losses[name], rel=1e-5), name
    assert abs(losses["adapted"] - losses["base"]) > 1e-4  # the adapter changed the model: the two are told apart
    assert f"{result['adapted']['target']['loss']:.4f}" in out


# --- studies --------------------------------------------------------------------------------------
def test_sweep_then_approx_study(grid, cached, tiny_model_dir, tiny_jsonl):
    root, config = grid
    table = run("sweep", *config)
    (record,) = json.loads((root / "sweep" / "results.json").read_text())["runs"]
    evaluated = json.loads((root / "sweep" / "none-l0-s0" / "eval.json").read_text())
    assert record["name"] == "none-l0-s0" and record["target_loss"] == evaluated["adapted"]["target"]["loss"]
    row = f"| none | 0 | 1 | {record['target_loss']:.4f} | {record['source_loss_increase']:.4f} |"  # one seed: no ±
    assert row in table and row in (root / "sweep" / "results.md").read_text()
    assert (root / "sweep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run("approx-study", *config)
    result = json.loads((root / "approx" / "approx_study.json").read_text())
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert result["ks"] == [2, 8, vocab - 1]  # approx.ks + cache.k + |V|-1
    assert result["positions"] == sum(n - 1 for n in token_lengths(tiny_model_dir, tiny_jsonl, 32, count=3))
    table = {(r["k"], r["estimator"]): r for r in result["students"]["none-l0-s0"]["table"]}
    assert abs(table[vocab - 1, "tail"]["mean_abs_gap_vs_masked_d"]) < 1e-4  # exact with every token cached
    assert f"Held-out target data: {result['positions']:,} positions of 3 sequences" in (root / "approx" / "approx_study.md").read_text()


# --- measurement tools ----------------------------------------------------------------------------
def test_rank_rows_on_one_process_lists_every_row_once(grid, cached):
    root, config = grid
    out = run("rank-rows", *config)
    ids = json.loads((root / "run" / "rank_rows" / "rank-0.json").read_text())
    assert sorted(ids) == list(range(30)) and ids != list(range(30))  # one shuffled epoch, every row once
    assert out.strip() == f"rank 0: 30 rows -> {root / 'run' / 'rank_rows' / 'rank-0.json'}"


def test_bench_scaling_counts_the_tokens_of_the_data(grid, tiny_model_dir, tiny_jsonl):
    _, config = grid
    out = run("bench-scaling", "--workers", "1", *config)
    (row,) = [line for line in out.splitlines() if line.startswith("| 1 |")]
    tokens = int(row.split("|")[2].replace(",", ""))
    assert tokens == sum(token_lengths(tiny_model_dir, tiny_jsonl, 48))


def test_trace_stage_one_walks_the_command_table_into_the_stages(grid, tmp_path):
    _, config = grid
    overrides = [o for o in config[2:] if not o.startswith("cache.dir=")]  # the trace writes to a temporary cache
    out = run("trace-stage-one", "--config", "", *overrides, "--json", str(tmp_path / "trace.json"))
    summary = json.loads((tmp_path / "trace.json").read_text())
    assert summary["files"][0] == "pipeline/commands.py" and "stages/teacher/runner.py" in summary["files"]
    assert f"{len(summary['files'])} project files" in out and "pipeline/bench/file_trace.py" not in summary["files"]
    assert "stages/teacher/scale_out/workers.py" in summary["files"]  # one process is worker 0 of 1
    # stage one's modules are layered: none calls back into a module that called it (docs/design.md §10)
    assert summary["pairs_calling_each_other_outside_storage_schemas"] == []
    assert summary["call_stack_cycles_outside_storage_schemas"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_bench_refuses_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="gpu_bench needs a CUDA device"):
        cli_main(["gpu-bench", "--out", str(tmp_path / "gpu")])
    assert not (tmp_path / "gpu").exists()


# --- the embedded default -------------------------------------------------------------------------
def test_build_default_refuses_a_directory_that_is_not_a_build(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = files_state((tmp_path / "mine").rglob("*"))
    assert cli_main(["build-default", "--out", str(tmp_path / "mine")]) == 2
    assert "holds no recipe.json" in capsys.readouterr().err and files_state((tmp_path / "mine").rglob("*")) == before
