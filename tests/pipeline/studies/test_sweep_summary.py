"""Sweep aggregation against hand computation: results.md's mean ± std per (method, k, variant, lambda)
and the frontier plot's points and error bars.

Convention (stated in sweep.py's table: "mean ± std over seeds"): the sample standard deviation,
ddof = 1 (statistics.stdev); a row of a single seed shows its values alone (no spread to state). The
expected numbers below are worked out by hand in the comments; none is computed by the code under test.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from pipeline.studies.sweep import plot_frontier, summarize  # noqa: E402

BASE = {"target": {"loss": 4.9}, "source": {"loss": 2.1}}


def _run(method, weight, seed, target, forgetting, drift, k=0):
    # source_loss and target_accuracy carry values of their own, so a wrong column gives a wrong number
    return {"name": f"{method}-l{weight:g}-s{seed}", "method": method, "reg_weight": weight, "seed": seed, "k": k, "variant": "",
            "target_loss": target, "target_accuracy": 0.25 + seed, "source_loss": 2.1 + forgetting + 10.0,
            "source_loss_increase": forgetting, "drift_kl": drift}


RECORDS = [
    {**_run("tail", 1.0, 0, 5.0, 0.1, 0.01), "binary_share": 0.2}, {**_run("tail", 1.0, 1, 5.3, 0.2, 0.02), "binary_share": 0.3},
    {**_run("tail", 1.0, 2, 5.6, 0.6, 0.03), "binary_share": 0.7},
    {**_run("tail", 3.0, 0, 5.5, 0.05, 0.004), "binary_share": 0.1}, _run("tail", 3.0, 1, 5.7, 0.07, 0.004),
    _run("none", 0.0, 0, 4.8, 0.5, 0.05),
    _run("tail", 1.0, 0, 6.0, 0.9, 0.07, k=4),  # same method and lambda, other k: its own row and curve
]
# tail, lambda 1 (3 seeds):
#   target 5.0, 5.3, 5.6: mean 5.3; deviations -0.3, 0, 0.3, squares sum 0.18, / (3 - 1) = 0.09, std 0.3
#     (ddof = 0 would give sqrt(0.06) = 0.2449)
#   forgetting 0.1, 0.2, 0.6: mean 0.3; deviations -0.2, -0.1, 0.3, squares sum 0.14, / 2 = 0.07, std 0.264575
#   drift 0.01, 0.02, 0.03: mean 0.02, std 0.01
# tail, lambda 3 (2 seeds): target 5.5, 5.7: mean 5.6, std sqrt(2 * 0.1^2 / 1) = 0.141421
#   forgetting 0.05, 0.07: mean 0.06, std 0.014142; drift 0.004 twice: mean 0.004, std 0
# none (1 seed): the values themselves, no ±. tail k=4 (1 seed): likewise.
# binary share: tail lambda 1: (0.2 + 0.3 + 0.7) / 3 = 0.4; lambda 3: one seed has none (an older run): "-"; the rest: "-".
EXPECTED_TABLE = """\
Base model: target loss 4.9000, source loss 2.1000 (nats/token).

| method | lambda | seeds | target loss (learning) | source loss increase (forgetting) | drift KL | binary share of full KL |
|---|---|---|---|---|---|---|
| none | 0 | 1 | 4.8000 | 0.5000 | 0.0500 | - |
| tail | 1 | 3 | 5.3000 ± 0.3000 | 0.3000 ± 0.2646 | 0.0200 ± 0.0100 | 0.400 |
| tail | 3 | 2 | 5.6000 ± 0.1414 | 0.0600 ± 0.0141 | 0.0040 ± 0.0000 | - |
| tail k=4 | 1 | 1 | 6.0000 | 0.9000 | 0.0700 | - |

± is one standard deviation over the seeds of a row; the binary share is the mean over them.
"""


def test_summary_table_is_the_hand_computed_mean_and_sample_std():
    assert summarize(RECORDS, BASE) == EXPECTED_TABLE
    assert summarize(list(reversed(RECORDS)), BASE) == EXPECTED_TABLE  # grouping, not record order


def test_frontier_plot_points_and_error_bars_are_the_seed_means_and_stds(tmp_path, monkeypatch):
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig))[1])  # keep a handle, still close
    plot_frontier(RECORDS, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (ax,) = figures[0].axes
    curves = {}
    for container in ax.containers:  # one errorbar container per curve: (line, caps, (x bars, y bars))
        line, _, (xbars, ybars) = container
        x_half = [(seg[1][0] - seg[0][0]) / 2 for seg in xbars.get_segments()]
        y_half = [(seg[1][1] - seg[0][1]) / 2 for seg in ybars.get_segments()]
        curves[container.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), x_half, y_half)
    # points in increasing lambda: x = mean target loss ± std, y = mean forgetting ± std (values above)
    expected = {
        "none": ([4.8], [0.5], [0.0], [0.0]),
        "tail": ([5.3, 5.6], [0.3, 0.06], [0.3, 0.141421], [0.264575, 0.014142]),
        "tail k=4": ([6.0], [0.9], [0.0], [0.0]),
    }
    assert curves.keys() == expected.keys()
    for label, (xs, ys, xerr, yerr) in expected.items():
        got = curves[label]
        for got_values, want in zip(got, (xs, ys, xerr, yerr)):
            assert got_values == pytest.approx(want, abs=1e-6), label
    # and each seed of a curve with several seeds as its own dot: tail's five runs, not the one-seed curves
    dots = sorted(v for collection in ax.collections if not hasattr(collection, "get_segments")
                  for xy in collection.get_offsets() for v in [tuple(map(float, xy))])
    want = sorted((r["target_loss"], r["source_loss_increase"]) for r in RECORDS[:5])
    assert [x for xy in dots for x in xy] == pytest.approx([x for xy in want for x in xy])
