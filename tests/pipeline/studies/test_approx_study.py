"""The approximation study: exact at k = |V|-1, tail a lower bound below it, tail vs live arithmetic."""
import copy
import json
import math

import pytest
from file_states import files_state
from transformers import AutoTokenizer

from pipeline.config import load_config
from pipeline.studies.approx_study import frontier_gaps, run_approx_study, tail_vs_live
from pipeline.studies.sweep import run_sweep
from storage_schemas import Manifest


def _record(method, weight, seed, target, forgetting):
    return {"method": method, "reg_weight": weight, "seed": seed, "k": 0, "variant": "",
            "target_loss": target, "source_loss_increase": forgetting}


def test_tail_vs_live_compares_seed_means_against_two_standard_errors():
    records = [_record("tail", 1.0, 0, 5.0, 0.10), _record("tail", 1.0, 1, 5.2, 0.14),
               _record("live", 1.0, 0, 5.1, 0.20), _record("live", 1.0, 1, 5.3, 0.22),
               _record("tail", 3.0, 0, 5.5, 0.05), _record("none", 0.0, 0, 4.8, 0.5)]
    (row,) = tail_vs_live(records)  # lambda 3 has no live run: not compared
    assert row["reg_weight"] == 1.0 and row["seeds"] == 2
    t = row["target_loss"]  # both std = 0.1414: 2 SE = 2 * sqrt((0.02 + 0.02) / 2) = 0.2828
    assert t["diff"] == pytest.approx(-0.1) and t["two_se"] == pytest.approx(2 * math.sqrt(0.02)) and t["within_noise"]
    f = row["source_loss_increase"]  # stds 0.02828, 0.01414: 2 SE = 2 * sqrt((0.0008 + 0.0002) / 2) = 0.04472
    assert f["diff"] == pytest.approx(-0.09) and f["two_se"] == pytest.approx(2 * math.sqrt(0.0005)) and not f["within_noise"]
    assert f["paired_mean"] == pytest.approx(-0.09) and f["paired_std"] == pytest.approx(math.sqrt(0.0002))  # diffs -0.10, -0.08


def test_frontier_gap_interpolates_the_tail_curve_at_the_same_target_loss():
    records = [_record("tail", 1.0, s, 5.0, 0.2) for s in (0, 1)] + [_record("tail", 3.0, s, 5.4, 0.0) for s in (0, 1)]
    records += [_record("live", 1.0, 0, 5.15, 0.06), _record("live", 1.0, 1, 5.25, 0.04),  # mean (5.2, 0.05)
                _record("none", 0.0, 0, 4.8, 0.5), _record("none", 0.0, 1, 4.8, 0.5)]
    rows = {r["method"]: r for r in frontier_gaps(records)}
    live = rows["live"]  # tail frontier at 5.2 is 0.1; its std is 0 there, live's is 0.01414
    assert live["gap"] == pytest.approx(-0.05) and live["two_se"] == pytest.approx(2 * math.sqrt(0.0002 / 2))
    assert rows["none"]["gap"] is None  # target loss 4.8 is outside tail's range: not extrapolated
    near = records[:4] + [_record("full_kl", 3.0, 0, 5.41, 0.0), _record("full_kl", 3.0, 1, 5.41, -0.02)]
    near[2]["target_loss"], near[3]["target_loss"] = 5.38, 5.42  # tail's end: x 5.40 ± 0.028
    (row,) = frontier_gaps(near)  # 0.01 past the end, even within its x std: never extended
    assert row["gap"] is None


def test_study_is_exact_at_full_k_and_tail_is_a_lower_bound(tiny_model_dir, tiny_jsonl, tmp_path):
    config = load_config(None, [
        f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "data.max_length=48", f"cache.dir={tmp_path / 'cache'}",
        "cache.engine=hf", "cache.k=8", "train.max_steps=4", "train.save_steps=4", "train.batch_size=4",
        "train.learning_rate=0.02", "train.warmup_ratio=0",
        f"eval.source_path={tiny_jsonl}", f"eval.target_path={tiny_jsonl}", "eval.max_examples=4", "eval.max_length=32",
        f"sweep.output_dir={tmp_path / 'sweep'}", "sweep.methods=[none, tail, live]", "sweep.reg_weights=[1]", "sweep.seeds=[0, 1]",
        f"approx.output_dir={tmp_path / 'approx'}", "approx.runs=[none-l0-s0, tail-l1-s0]", "approx.examples=6",
        "approx.ks=[1, 4, 16]",
    ])
    partial = copy.deepcopy(config)
    partial.sweep.methods = ["tail", "live"]
    run_sweep(partial)
    result = run_approx_study(config)  # none-l0-s0 is in the grid but was not run: the study trains it
    assert (tmp_path / "sweep" / "none-l0-s0" / "adapter").is_dir()
    assert json.loads((tmp_path / "approx" / "approx_study.json").read_text()) == json.loads(json.dumps(result))
    vocab = result["vocab_size"]
    assert result["ks"] == [1, 4, 8, 16, vocab - 1]  # cache.k = 8 is always measured
    # the first approx.examples = 6 texts at eval.max_length = 32, every position but the last trained:
    # counted from the tokenizer alone, not from the study's cache
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [min(len(tok(json.loads(line)["text"])["input_ids"]), 32) for line in tiny_jsonl.read_text().splitlines()[:6]]
    assert result["examples"] == 6 and Manifest.load(tmp_path / "approx" / "cache-full").num_rows == 6
    assert result["positions"] == sum(n - 1 for n in lengths)
    for student in result["students"].values():
        assert student["mean_exact_d"] > 1e-4  # the students moved: the gaps below are not 0/0
        rows = {(r["k"], r["estimator"]): r for r in student["table"]}
        for estimator in ("tail", "topk"):
            assert abs(rows[vocab - 1, estimator]["mean_abs_gap_vs_masked_d"]) < 1e-4
        assert abs(rows[vocab - 1, "full_kl"]["mean_abs_gap_vs_own_limit"]) < 1e-4
        tails = [rows[k, "tail"] for k in result["ks"]]
        assert all(r["bound_violations"] == 0 for r in tails)
        gaps = [r["rel_gap_vs_masked_d"] for r in tails]
        assert all(g <= 1e-6 for g in gaps) and gaps == sorted(gaps)  # below D, closing as k grows
        assert gaps[0] < -1e-3
        # sampled_tail: exact at k = |V|-1 (no tail left); below it unbiased, so its mean gap is within a few of its
        # own per-position spreads / sqrt(N) of 0, and the tail bucket's mean gap (a lower bound) is not
        n = result["positions"]
        assert abs(rows[vocab - 1, "sampled_tail"]["mean_gap_vs_masked_d"]) < 1e-4
        for k in result["ks"][:-1]:
            sampled = rows[k, "sampled_tail"]
            assert sampled["rmse_vs_masked_d"] > 0 and abs(sampled["mean_gap_vs_masked_d"]) <= 4 * sampled["rmse_vs_masked_d"] / n ** 0.5
    reused = [*(tmp_path / "approx").glob("measured-*.json"), *(tmp_path / "approx" / "cache-full").glob("shard-*")]
    stamps = files_state(reused)  # inode, size, mtime, sha256: a rewrite keeping the mtime shows too
    assert len([p for p in stamps if "measured-" in p]) == 2 and run_approx_study(config) == result  # reused, not redone
    assert stamps == files_state(reused)
    (row,) = result["tail_vs_live"]
    assert row["reg_weight"] == 1.0 and row["seeds"] == 2
    assert "### Cached `tail` vs `live`" in (tmp_path / "approx" / "approx_study.md").read_text()
