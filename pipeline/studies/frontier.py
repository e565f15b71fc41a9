"""Methods compared where it counts: each curve's points against a reference curve's frontier at the
same target loss (the learning/forgetting trade-off), with the seed noise.

    python -m pipeline frontier runs/lalora/sweep/results.json --reference tail
    python -m pipeline frontier runs/lalora/sweep/results.json runs/lalora/proxy/results.json --reference "lalora kfac"

A curve is one method at one setting of the sweep's other axes (`sweep.curve_label`: `tail`,
`tail k=4`, `lalora kfac`, `lalora kfac fb=8`), its points the lambdas, each the mean over seeds.
For a point at mean target loss x with mean forgetting y:

    gap    = y - f(x),   f = the reference's forgetting, piecewise linear between its lambda points
    two_se = 2 sqrt(s_y^2 / n + s_f(x)^2 / n_ref),   s = standard deviation over seeds (s_f interpolated)

gap < 0: the point forgets less than the reference at the same learning. A point whose x lies outside
the reference's range is not compared (no extrapolation), except within the end point's own seed std
of x (indistinguishable from it). |gap| <= two_se reads "same"; with one seed on either side there is
no spread, so no two_se and no reading.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline.studies.sweep import curve_label, forgetting_value, record_weight

__all__ = ["curves", "frontier_gaps", "render_gaps", "frontier_report"]


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curves(records: list[dict], forgetting: str = "source_loss_increase") -> dict[str, list[tuple[float, dict]]]:
    """{curve label: [(lambda, {"target_loss" | "source_loss_increase": (mean, std, n)}), ...] by lambda}; the
    forgetting entry holds `forgetting` (sweep.forgetting_value: the source loss increase or a harness metric's change)."""
    grouped: dict[str, dict[float, list[dict]]] = {}
    for r in records:
        grouped.setdefault(curve_label(r), {}).setdefault(record_weight(r), []).append(r)
    return {label: [(w, {"target_loss": (*_stats([r["target_loss"] for r in runs]), len(runs)),
                         "source_loss_increase": (*_stats([forgetting_value(r, forgetting) for r in runs]), len(runs))})
                    for w, runs in sorted(by_weight.items())] for label, by_weight in grouped.items()}


def _interpolate(points: list[tuple[float, float, float, float]], x: float) -> tuple[float, float] | None:
    """Piecewise-linear (y, y_std) at x on points (x, y, y_std, x_std) sorted by x. Beyond an end, the
    end segment is extended only as far as that end's x seed std (indistinguishable in x); else None."""
    if len(points) < 2:
        return None
    if x < points[0][0]:
        segment, inside = points[:2], points[0][0] - x <= points[0][3]
    elif x > points[-1][0]:
        segment, inside = points[-2:], x - points[-1][0] <= points[-1][3]
    else:
        segment = next([a, b] for a, b in zip(points, points[1:]) if a[0] <= x <= b[0])
        inside = True
    (x0, y0, s0, _), (x1, y1, s1, _) = segment
    if not inside:
        return None
    t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
    return y0 + t * (y1 - y0), max(s0 + t * (s1 - s0), 0.0)


def frontier_gaps(records: list[dict], reference: str = "tail", forgetting: str = "source_loss_increase") -> list[dict]:
    """Every other curve's points against `reference`'s frontier (rows: method = curve label, reg_weight,
    seeds, target_loss, forgetting, gap, two_se; gap/two_se None where not comparable). ValueError if
    the reference curve has no record."""
    by_label = curves(records, forgetting)
    if reference not in by_label:
        raise ValueError(f"frontier: no curve {reference!r} in the results; curves: {sorted(by_label)}")
    ref_curve = [c for _, c in by_label[reference]]
    ref = sorted((c["target_loss"][0], c["source_loss_increase"][0], c["source_loss_increase"][1], c["target_loss"][1])
                 for c in ref_curve)
    n_ref = min(c["target_loss"][2] for c in ref_curve)
    out = []
    for label in sorted(set(by_label) - {reference}):
        for weight, c in by_label[label]:
            (x, _, n), (y, sy, _) = c["target_loss"], c["source_loss_increase"]
            at = _interpolate(ref, x)
            row = {"method": label, "reg_weight": weight, "seeds": n, "target_loss": x, "forgetting": y, "gap": None, "two_se": None}
            if at is not None:  # one seed on either side: no spread to judge the gap by
                row.update(gap=y - at[0], two_se=2 * math.sqrt(sy ** 2 / n + at[1] ** 2 / n_ref) if min(n, n_ref) > 1 else None)
            out.append(row)
    return out


def reading(row: dict) -> str:
    if row["gap"] is None or row["two_se"] is None:
        return ""
    return "same" if abs(row["gap"]) <= row["two_se"] else ("better" if row["gap"] < 0 else "worse")


def render_gaps(rows: list[dict], reference: str) -> str:
    """The markdown table of `frontier_gaps` rows."""
    lines = [f"| curve | λ | seeds | target loss | forgetting | gap vs `{reference}` (2 SE) | reading |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = ("outside its range" if r["gap"] is None else
               f"{r['gap']:+.4f} (one seed: no SE)" if r["two_se"] is None else f"{r['gap']:+.4f} ({r['two_se']:.4f})")
        lines.append(f"| {r['method']} | {r['reg_weight']:g} | {r['seeds']} | {r['target_loss']:.4f} | {r['forgetting']:+.4f} | "
                     f"{gap} | {reading(r)} |")
    return "\n".join(lines) + "\n"


def frontier_report(results: list[str | Path] | str | Path, reference: str = "tail", out: str | Path | None = None,
                    forgetting: str = "source_loss_increase") -> str:
    """`python -m pipeline frontier`: the gap table of one or more sweeps' results.json (their runs pooled,
    e.g. a grid and a later axis over the same cache) against `reference`; printed, and written to `out`."""
    paths = [Path(p) for p in ([results] if isinstance(results, (str, Path)) else results)]
    records = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results.json (a sweep writes one into sweep.output_dir)")
        stored = json.loads(path.read_text())
        records += stored["runs"] if isinstance(stored, dict) else stored  # {"base", "runs", "pending"}; a bare list before
    names = ", ".join(map(str, paths))
    text = (f"Against the `{reference}` frontier ({forgetting}), from {names}:\n\n"
            + render_gaps(frontier_gaps(records, reference, forgetting), reference))
    if out:
        Path(out).write_text(text)
    print(text)
    return text
