"""`python -m pipeline bench --quick` end to end on tiny shapes: both files, every section, every
number finite and positive. No timing thresholds: the bench reports speed, tests do not judge it."""
import dataclasses
import json
import math

import pytest

from pipeline.bench import run_bench
from pipeline.bench.settings import QUICK
from pipeline.cli import main as cli_main


def numbers(tree, path=""):
    """Every (path, number) in a JSON tree, bools excluded."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from numbers(value, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.mark.vllm
def test_quick_bench_writes_every_section(tiny_model_dir, tiny_jsonl, tmp_path):
    # The session's tiny model and data stand in for the demo's (no build/default needed).
    settings = dataclasses.replace(QUICK, model=str(tiny_model_dir), data=str(tiny_jsonl))
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    result, path = run_bench(quick=True, out_dir=tmp_path / "out", settings=settings)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name, path.with_suffix(".md").name]
    saved = json.loads(path.read_text())
    assert set(saved) == {"stage_one", "stage_two", "reader", "scaling", "real_vocab", "penalty", "estimators", "settings", "meta"}
    assert [r["method"] for r in saved["estimators"]] == ["tail", "sampled_tail", "tail"]
    assert all(r["tok_s"] > 0 and r["step_s"] > 0 and r["bytes_per_position"] > 0 for r in saved["estimators"])
    for model in ("demo", "large", "real"):
        main = saved["stage_one"][model]["main"]
        for variant in ("plain", "vllm_e2e", "vllm_score", "stock_e2e", "hf_e2e"):
            assert main[f"{variant}_tok_s"] > 0
    assert saved["stage_one"]["large"]["vocab_size"] == QUICK.large.vocab_size
    assert saved["stage_one"]["real"]["vocab_size"] == QUICK.real.vocab_size
    real = saved["real_vocab"]["real"]
    assert set(real["steps"]) == {"none+fused", "tail+fused", "tail"} and all(r["tok_s"] > 0 for r in real["steps"].values())
    assert real["eval"]["chunked_peak_mib"] > 0 and real["eval"]["unchunked_peak_mib"] > 0
    assert set(saved["stage_two"]) == {"none", "tail", "live"}
    assert saved["reader"]["decode_tok_s"] > 0 and saved["reader"]["decode_over_train"] > 0
    assert [r["k"] for r in saved["scaling"]["k"]] == list(QUICK.ks)
    assert [r["length"] for r in saved["scaling"]["length"]] == list(QUICK.lengths)
    assert [r["vocab"] for r in saved["scaling"]["vocab"]] == [vocab, QUICK.large.vocab_size]
    bad = [(p, v) for p, v in numbers({k: saved[k] for k in ("stage_one", "stage_two", "reader", "scaling")})
           if not (math.isfinite(v) and v > 0) and not p.endswith("step_extra_mib") and not p.endswith("extra_ratio")]
    assert not bad, bad
    markdown = path.with_suffix(".md").read_text()
    for title in ("(a) Stage one", "(b) Stage two", "(c) Cache reader", "(d) Cost vs k", "(d) Cost vs sequence length",
                  "(d) Cost vs vocabulary", "(e) By vocabulary", "Penalty step cost (lalora curvature forms)",
                  "(g) Estimator candidates"):
        assert title in markdown


def test_quick_penalty_bench_reports_every_row_with_consistent_ratios():
    """Section (f) on QUICK's demo shape: every row, positive times, ratios of the medians; no timing judged."""
    from pipeline.bench.penalty import ROWS, measure_penalty

    (name, result), = measure_penalty(QUICK.penalty, QUICK.penalty_steps, QUICK.penalty_warmup).items()
    assert name == "demo" and result["shape"]["hidden_size"] == 128 and result["trainable_params"] > 0
    rows = result["rows"]
    assert list(rows) == list(ROWS)
    diag, none = rows["lalora diag"], rows["none"]
    for r in rows.values():
        assert 0 < r["step_min_s"] <= r["step_s"] <= r["step_max_s"], r
        assert r["ratio_to_diag"] == pytest.approx(r["step_s"] / diag["step_s"])
        assert r["ratio_to_none"] == pytest.approx(r["step_s"] / none["step_s"])
    assert none["penalty_s"] is None and all(rows[r]["penalty_s"] > 0 for r in ROWS[1:])
    assert diag["ratio_to_diag"] == 1.0 and none["ratio_to_none"] == 1.0


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--help"])
    assert exit_info.value.code == 0 and "--quick" in capsys.readouterr().out


@pytest.mark.vllm
def test_encoding_write_bench_runs_every_variant(tiny_model_dir, tiny_jsonl):
    """The per-encoding stage-one comparison on tiny shapes: one row per variant, sizes that differ."""
    from pipeline.bench.encoding_write import VARIANTS, measure

    rows = measure(str(tiny_model_dir), str(tiny_jsonl), examples=4, length=32, rounds=1, k=4)
    assert [r["variant"] for r in rows] == ["plain prefill"] + [f"{e}, zstd {z}" for e, z in VARIANTS]
    assert all(r["tok_s"] > 0 and r["over_plain"] > 0 for r in rows)
    sizes = {r["variant"]: r["bytes_per_token"] for r in rows[1:]}
    assert sizes["topk_f32, zstd 3"] > sizes["topk_idd_rel4q112, zstd 9"] > 0
