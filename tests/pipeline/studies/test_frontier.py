"""`python -m pipeline frontier`: curves per axis setting, gaps at equal target loss, no extrapolation."""
import json
import math
import statistics

import pytest

from pipeline.cli import main
from pipeline.studies.frontier import frontier_gaps


def _lalora(curvature, weight, seed, target, forgetting, batches=None):
    return {"method": "lalora", "reg_weight": weight, "seed": seed, "k": 0, "variant": "", "curvature": curvature,
            "fisher_batches": batches, "target_loss": target, "source_loss_increase": forgetting}


RECORDS = ([_lalora("diag", 1e4, s, 5.0, 0.20) for s in (0, 1)] + [_lalora("diag", 1e5, s, 5.6, 0.02) for s in (0, 1)]
           + [_lalora("kfac", 1e4, 0, 5.28, 0.09), _lalora("kfac", 1e4, 1, 5.32, 0.11)]   # mean (5.30, 0.10), std 0.01414
           + [_lalora("kfac", 1e4, 0, 5.3, 0.05, batches=1)]                                # one seed
           + [_lalora("kfac", 1e3, s, 4.7, 0.4) for s in (0, 1)])                          # left of diag's range


def test_each_axis_setting_is_its_own_curve_against_the_reference_at_equal_target_loss():
    rows = {(r["method"], r["reg_weight"]): r for r in frontier_gaps(RECORDS, "lalora diag")}
    assert set(rows) == {("lalora kfac", 1e4), ("lalora kfac", 1e3), ("lalora kfac fb=1", 1e4)}
    kfac = rows["lalora kfac", 1e4]  # diag's line at 5.30: 0.20 + 0.5 * (0.02 - 0.20) = 0.11; its std there 0
    assert kfac["gap"] == pytest.approx(-0.01) and kfac["two_se"] == pytest.approx(2 * math.sqrt(0.0002 / 2))
    assert rows["lalora kfac", 1e3]["gap"] is None  # 4.7 < 5.0: never extrapolated
    one = rows["lalora kfac fb=1", 1e4]
    assert one["gap"] == pytest.approx(0.05 - 0.11) and one["two_se"] is None  # one seed: no spread to judge by


def test_cli_prints_and_writes_the_table_and_names_a_missing_curve(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"base": {}, "runs": RECORDS, "pending": []}))
    assert main(["frontier", str(results), "--reference", "lalora diag", "--out", str(tmp_path / "gaps.md")]) == 0
    table = (tmp_path / "gaps.md").read_text()
    assert "| lalora kfac | 10000 | 2 | 5.3000 | +0.1000 | -0.0100 (0.0200) | same |" in table
    assert "| lalora kfac fb=1 | 10000 | 1 | 5.3000 | +0.0500 | -0.0600 (one seed: no SE) |  |" in table
    assert "outside its range" in capsys.readouterr().out
    assert main(["frontier", str(results)]) != 0
    assert "no curve 'tail' in the results; curves: ['lalora diag', 'lalora kfac', 'lalora kfac fb=1']" in capsys.readouterr().err


# Curve against curve. tail, seed s: (1.0, 0.6 + e_s) -> (3.0, 0.2 + e_s), slope -0.2; full_kl: (1.5, 0.7 + g_s) ->
# (3.5, 0.5 + g_s), slope -0.1. Overlap [1.5, 3.0], x* = 2.25: tail 0.35 + e_s, full_kl 0.625 + g_s.
E, G = (0.0, 0.01, 0.02), (0.03, 0.0, 0.0)


def _run(method, weight, seed, target, forgetting):
    return {"method": method, "reg_weight": weight, "seed": seed, "target_loss": target, "source_loss_increase": forgetting}


def _study(none_forgetting=0.8, full_kl_seeds=(0, 1, 2)):
    runs = [_run("none", 0.0, s, 0.5, none_forgetting) for s in range(3)]
    runs += [r for s, e in enumerate(E) for r in (_run("tail", 1.0, s, 1.0, 0.6 + e), _run("tail", 3.0, s, 3.0, 0.2 + e))]
    runs += [r for s in full_kl_seeds for r in (_run("full_kl", 1.0, s, 1.5, 0.7 + G[s]), _run("full_kl", 3.0, s, 3.5, 0.5 + G[s]))]
    return runs


def test_curve_gap_at_the_midpoint_and_its_largest_gap_at_a_knot_paired_by_seed():
    from pipeline.studies.frontier import curve_gaps

    (row,) = curve_gaps(_study(), "tail")
    per_seed = [0.275 + g - e for e, g in zip(E, G)]  # 0.305, 0.265, 0.255
    sd = math.sqrt(sum((v - 0.275) ** 2 for v in per_seed) / 2)
    assert row["method"] == "full_kl" and row["paired"] and row["overlap"] == pytest.approx((1.5, 3.0))
    assert row["x_mid"] == pytest.approx(2.25) and row["gap_mid"] == pytest.approx(0.275)
    assert row["two_se_mid"] == pytest.approx(2 * sd / math.sqrt(3))
    # full_kl - tail grows with x (0.2 at 1.5, 0.35 at 3.0): the largest gap is at the overlap's right end
    assert row["x_max"] == pytest.approx(3.0) and row["gap_max"] == pytest.approx(0.35)
    assert row["in_regime"] is True  # tail reaches 0.51 (mean at 1.5) >= 0.4 = half of none's 0.8
    ppl = [100 * (math.exp(0.625 + g) - 1) for g in G]
    ppl_ref = [100 * (math.exp(0.35 + e) - 1) for e in E]
    assert row["ppl_mid"] == pytest.approx(sum(ppl) / 3) and row["ppl_ref_mid"] == pytest.approx(sum(ppl_ref) / 3)
    assert row["gap_ppl_mid"] == pytest.approx(sum(a - b for a, b in zip(ppl, ppl_ref)) / 3)


def test_curve_gap_out_of_regime_unpaired_and_not_comparable():
    from pipeline.studies.frontier import curve_gaps, render_curve_gaps

    assert curve_gaps(_study(none_forgetting=1.2), "tail")[0]["in_regime"] is False  # 0.51 < 0.6
    (unpaired,) = curve_gaps(_study(full_kl_seeds=(0, 1)), "tail")
    assert not unpaired["paired"] and unpaired["gap_mid"] == pytest.approx(0.625 + 0.015 - (0.35 + 0.01))
    se = math.sqrt(statistics.variance([0.03, 0.0]) / 2 + statistics.variance(E) / 3)
    assert unpaired["two_se_mid"] == pytest.approx(2 * se)
    far = [r if r["method"] != "full_kl" else {**r, "target_loss": r["target_loss"] + 5} for r in _study()]
    assert curve_gaps(far, "tail")[0] == {"method": "full_kl", "seeds": 3, "reason": "target-loss ranges do not overlap"}
    one = [r for r in _study() if not (r["method"] == "full_kl" and r["seed"] == 2 and r["reg_weight"] == 3.0)]
    assert curve_gaps(one, "tail")[0]["reason"] == "a seed with one point (no curve)"
    table = render_curve_gaps(curve_gaps(_study(), "tail"), "tail")
    assert "| full_kl | 3 | 1.5000-3.0000 | +0.2750 (± " in table and "at 2.2500 | +0.3500 (± " in table and "| yes |" in table


def test_a_point_just_outside_the_reference_range_is_not_compared():
    just_left = [_lalora("kfac", 1e2, s, 4.999, 0.3) for s in (0, 1)]  # diag's range starts at 5.0
    rows = {r["reg_weight"]: r for r in frontier_gaps(RECORDS + just_left, "lalora diag") if r["method"] == "lalora kfac"}
    assert rows[1e2]["gap"] is None


def test_pooled_results_are_checked_before_any_gap(tmp_path):
    from pipeline.studies.frontier import curve_gaps, load_records

    runs = [{**r, "name": f"{r['method']}-{r['reg_weight']}-{r['seed']}", "eval_sets": {"target": "aaa", "source": "bbb"}}
            for r in _study()]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"runs": runs}))
    assert len(load_records([a, a])) == len(runs)  # one sweep passed twice: each run counts once
    b.write_text(json.dumps({"runs": [{**runs[0], "target_loss": 9.0}]}))
    with pytest.raises(ValueError, match="is also in .*a.json with other values"):
        load_records([a, b])
    b.write_text(json.dumps({"runs": [{**runs[0], "name": "other", "eval_sets": {"target": "ccc", "source": "bbb"}}]}))
    with pytest.raises(ValueError, match="b.json: run other was scored on other eval sets than the runs of .*a.json"):
        load_records([a, b])
    base = {"target": {"loss": 7.35}, "source": {"loss": 4.14}}
    a.write_text(json.dumps({"base": base, "runs": runs}))
    b.write_text(json.dumps({"base": {**base, "target": {"loss": 7.27}}, "runs": [{**runs[0], "name": "other"}]}))
    with pytest.raises(ValueError, match="b.json: its base model scores .* another base model"):
        load_records([a, b])  # the same eval sets, another backbone
    for broken, message in [({k: v for k, v in runs[0].items() if k != "seed"}, "has no seed"),
                            ({**runs[0], "source_loss_increase": float("nan")}, "is not a finite number")]:
        b.write_text(json.dumps({"runs": [broken]}))
        with pytest.raises(ValueError, match=f"b.json: run {runs[0]['name']} {message}|b.json: run {runs[0]['name']}: .*{message}"):
            load_records([b])
    with pytest.raises(ValueError, match="the reference 'none' has one point per seed .* \\['full_kl', 'tail'\\]"):
        curve_gaps(_study(), "none")


def test_gaps_at_the_reference_curves_own_points():
    from pipeline.studies.frontier import reference_point_gaps

    rows = reference_point_gaps(_study(), "full_kl")
    # full_kl's points: x = 1.5 and 3.5; tail spans [1, 3]: 0.6 + e at 1 down to 0.2 + e at 3, so 0.5 + e at 1.5
    assert [(r["method"], r["reg_weight"], r["x"]) for r in rows] == [("tail", 1.0, 1.5), ("tail", 3.0, 3.5)]
    per_seed = [(0.5 + e) - (0.7 + g) for e, g in zip(E, G)]
    assert rows[0]["gap"] == pytest.approx(statistics.fmean(per_seed))
    assert rows[0]["two_se"] == pytest.approx(2 * statistics.stdev(per_seed) / math.sqrt(3))
    assert rows[1]["gap"] is None and rows[1]["two_se"] is None  # 3.5 is beyond tail's range: not extrapolated


def test_the_goal_holds_for_a_curve_within_the_bound_everywhere_and_fails_elsewhere():
    from pipeline.studies.frontier import goal_rows

    def curve(method, shift, seeds=(0, 1, 2)):  # points at x = 1, 2, 3 (+ a seed offset), forgetting falling
        return [_run(method, w, s, x + 0.01 * s, y + shift + E[s]) for s in seeds
                for w, x, y in ((0.3, 1.0, 0.6), (1.0, 2.0, 0.4), (3.0, 3.0, 0.2))]

    runs = [_run("none", 0.0, s, 0.5, 0.8) for s in range(3)] + curve("live", 0.0)
    runs += curve("close", 0.003) + curve("far", 0.02)
    rows = {r["method"]: r for r in goal_rows(runs, "live", [1.0, 3.0], 0.005, 0.010)}
    assert rows["close"]["meets"] and not rows["far"]["meets"]
    for what, gap, two_se, ok in rows["close"]["checks"]:
        assert gap == pytest.approx(0.003) and two_se == pytest.approx(0.0, abs=1e-12) and ok
    assert [c[0].split(" (")[0] for c in rows["far"]["checks"]] == ["at live λ = 1", "at live λ = 3",
                                                                     "largest over the overlap, in regime"]
    assert all(not ok and gap == pytest.approx(0.02) for _, gap, _, ok in rows["far"]["checks"])
