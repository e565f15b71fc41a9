"""`python -m pipeline frontier`: curves per axis setting, gaps at equal target loss, no extrapolation."""
import json
import math

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
