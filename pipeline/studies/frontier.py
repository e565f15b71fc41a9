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
the reference's range is not compared: no extrapolation, not even by a seed std. |gap| <= two_se reads
"same"; with one seed on either side there is no spread, so no two_se and no reading.

Curve against curve (`curve_gaps`, the study's verdict rows): both curves interpolated piecewise-linearly
between their own points, seed by seed, over the overlap of their target-loss ranges (every seed's range,
so no seed is extrapolated):

    gap(x) = mean_s [f_s(x) - r_s(x)]        (paired by seed when both curves ran the same seeds;
                                              else mean_s f_s(x) - mean_t r_t(x))
    two_se = 2 sd_s / sqrt(n)                 (paired; unpaired: 2 sqrt(sd_f^2/n_f + sd_r^2/n_r))

at x* = the midpoint of the overlap and at the knot of largest |gap| (a difference of piecewise-linear
curves peaks at a knot). The overlap is "in regime" when the reference's mean forgetting somewhere in it
reaches half of plain LoRA's (`none`'s mean forgetting): a comparison where nothing was forgotten decides
nothing. With forgetting = the source loss increase Δ (nats), the retention perplexity change is
exp(Δ) - 1, per seed, then mean and SE.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from pipeline.studies.sweep import curve_label, forgetting_value, record_weight

__all__ = ["load_records", "curves", "frontier_gaps", "render_gaps", "seed_curves", "curve_gap", "curve_gaps",
           "cell_gaps", "render_curve_gaps", "frontier_report", "reference_point_gaps", "render_reference_point_gaps",
           "goal_rows", "render_goal"]


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


def _interpolate(points: list[tuple[float, ...]], x: float) -> tuple[float, ...] | None:
    """Piecewise-linear values at x on points (x, v1, v2, ...) sorted by x; None outside [first x, last x]
    (never extrapolated) or with fewer than two points."""
    if len(points) < 2 or not points[0][0] <= x <= points[-1][0]:
        return None
    a, b = next((a, b) for a, b in zip(points, points[1:]) if a[0] <= x <= b[0])
    t = 0.0 if b[0] == a[0] else (x - a[0]) / (b[0] - a[0])
    return tuple(va + t * (vb - va) for va, vb in zip(a[1:], b[1:]))


def frontier_gaps(records: list[dict], reference: str = "tail", forgetting: str = "source_loss_increase") -> list[dict]:
    """Every other curve's points against `reference`'s frontier (rows: method = curve label, reg_weight,
    seeds, target_loss, forgetting, gap, two_se; gap/two_se None where not comparable). ValueError if
    the reference curve has no record."""
    by_label = curves(records, forgetting)
    if reference not in by_label:
        raise ValueError(f"frontier: no curve {reference!r} in the results; curves: {sorted(by_label)}")
    ref_curve = [c for _, c in by_label[reference]]
    ref = sorted((c["target_loss"][0], c["source_loss_increase"][0], c["source_loss_increase"][1]) for c in ref_curve)
    n_ref = min(c["target_loss"][2] for c in ref_curve)
    out = []
    for label in sorted(set(by_label) - {reference}):
        for weight, c in by_label[label]:
            (x, _, n), (y, sy, _) = c["target_loss"], c["source_loss_increase"]
            at = _interpolate(ref, x)
            row = {"method": label, "reg_weight": weight, "seeds": n, "target_loss": x, "forgetting": y, "gap": None, "two_se": None}
            if at is not None:  # one seed on either side: no spread to judge the gap by
                row.update(gap=y - at[0],
                           two_se=2 * math.sqrt(sy ** 2 / n + max(at[1], 0.0) ** 2 / n_ref) if min(n, n_ref) > 1 else None)
            out.append(row)
    return out


def seed_curves(records: list[dict], forgetting: str = "source_loss_increase") -> dict[str, dict[int, list[tuple[float, float]]]]:
    """{curve label: {seed: [(target loss, forgetting), ...] sorted by target loss}}: one curve per seed."""
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for r in records:
        out.setdefault(curve_label(r), {}).setdefault(r["seed"], []).append(
            (r["target_loss"], forgetting_value(r, forgetting)))
    return {label: {seed: sorted(points) for seed, points in by_seed.items()} for label, by_seed in out.items()}


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (None with one value: no spread to state)."""
    mean, std = _stats(values)
    return mean, std / math.sqrt(len(values)) if len(values) > 1 else None


def _difference(curve: dict[int, list], ref: dict[int, list], x: float, transform=lambda y: y) -> tuple[float, float | None]:
    """Mean over seeds of transform(curve_s(x)) - transform(ref_s(x)) and its SE, paired by seed when both
    ran the same seeds (the same LoRA init and batch order per seed), else unpaired."""
    at = lambda points: transform(_interpolate(points, x)[0])  # noqa: E731  (x lies in every seed's range)
    if set(curve) == set(ref):
        return _mean_se([at(curve[s]) - at(ref[s]) for s in sorted(curve)])
    (m1, se1), (m2, se2) = _mean_se([at(p) for p in curve.values()]), _mean_se([at(p) for p in ref.values()])
    return m1 - m2, None if se1 is None or se2 is None else math.sqrt(se1 ** 2 + se2 ** 2)


def curve_gap(curve: dict[int, list[tuple[float, float]]], ref: dict[int, list[tuple[float, float]]],
              none_forgetting: float | None = None, perplexity: bool = True) -> dict:
    """The gap of one curve's forgetting to a reference curve's at equal target loss (formulas: module docstring).

    curve, ref: {seed: [(target loss, forgetting), ...]} (`seed_curves`), each seed with >= 2 points.
    none_forgetting: plain LoRA's mean forgetting, for the regime check (None: not checked).
    perplexity: forgetting is a loss increase in nats, so also report exp(.) - 1 in %.
    Returns {"reason"} alone when not comparable (a seed with one point, or no overlap), else overlap (lo, hi),
    x_mid, gap_mid, two_se_mid, x_max, gap_max, two_se_max (two_se None with one seed), paired, in_regime
    (None without none_forgetting), and with perplexity ppl_mid / ppl_ref_mid (% change, means) and
    gap_ppl_mid / two_se_ppl_mid (percentage points).
    """
    if any(len(points) < 2 for points in [*curve.values(), *ref.values()]):
        return {"reason": "a seed with one point (no curve)"}
    lo = max(points[0][0] for points in [*curve.values(), *ref.values()])
    hi = min(points[-1][0] for points in [*curve.values(), *ref.values()])
    if lo >= hi:
        return {"reason": "target-loss ranges do not overlap"}
    two = lambda se: None if se is None else 2 * se  # noqa: E731
    x_mid = (lo + hi) / 2
    gap_mid, se_mid = _difference(curve, ref, x_mid)
    knots = sorted({lo, hi} | {x for points in [*curve.values(), *ref.values()] for x, _ in points if lo <= x <= hi})
    x_max, (gap_max, se_max) = max(((x, _difference(curve, ref, x)) for x in knots), key=lambda item: abs(item[1][0]))
    row = {"overlap": (lo, hi), "x_mid": x_mid, "gap_mid": gap_mid, "two_se_mid": two(se_mid), "x_max": x_max,
           "gap_max": gap_max, "two_se_max": two(se_max), "paired": set(curve) == set(ref), "in_regime": None}
    if none_forgetting is not None:
        ref_mean = lambda x: statistics.fmean(_interpolate(p, x)[0] for p in ref.values())  # noqa: E731
        row["in_regime"] = max(ref_mean(x) for x in knots) >= 0.5 * none_forgetting
    if perplexity:
        pct = lambda y: 100 * math.expm1(y)  # noqa: E731
        mean_pct = lambda c: statistics.fmean(pct(_interpolate(p, x_mid)[0]) for p in c.values())  # noqa: E731
        gap_ppl, se_ppl = _difference(curve, ref, x_mid, pct)
        row.update(ppl_mid=mean_pct(curve), ppl_ref_mid=mean_pct(ref), gap_ppl_mid=gap_ppl, two_se_ppl_mid=two(se_ppl))
    return row


def curve_gaps(records: list[dict], reference: str = "tail", forgetting: str = "source_loss_increase") -> list[dict]:
    """`curve_gap` of every curve with a lambda axis against `reference`, rows {"method", "seeds", ...}; none's
    mean forgetting (method `none`) sets the regime check. ValueError if the reference curve has no record."""
    by_label = seed_curves(records, forgetting)
    if reference not in by_label:
        raise ValueError(f"frontier: no curve {reference!r} in the results; curves: {sorted(by_label)}")
    if all(len(points) < 2 for points in by_label[reference].values()):
        curves_ = sorted(label for label, c in by_label.items() if any(len(points) > 1 for points in c.values()))
        raise ValueError(f"frontier: the reference {reference!r} has one point per seed (no lambda axis): nothing to "
                         f"interpolate; pick a curve with >= 2 lambdas: {curves_}")
    none = [forgetting_value(r, forgetting) for r in records if r["method"] == "none"]
    none_forgetting = statistics.fmean(none) if none else None
    no_axis = {curve_label(r) for r in records if r["method"] == "none"}  # plain LoRA: one point, no lambda
    return [{"method": label, "seeds": len(by_label[label]),
             **curve_gap(by_label[label], by_label[reference], none_forgetting, forgetting == "source_loss_increase")}
            for label in sorted(set(by_label) - {reference} - no_axis)]


def reference_point_gaps(records: list[dict], reference: str, forgetting: str = "source_loss_increase") -> list[dict]:
    """Each curve against `reference` at the reference's own points: for each reference lambda and seed s, the
    curve's seed-s forgetting interpolated at that point's target loss x_s, minus the point's forgetting; then
    the mean over seeds and its SE (paired: the curve's seeds must include the reference's). Rows {"method",
    "reg_weight", "x" (mean x_s), "gap", "two_se"}; gap None where some x_s lies outside the curve's seed-s range
    (no extrapolation) or a seed is missing."""
    by_label = seed_curves(records, forgetting)
    if reference not in by_label:
        raise ValueError(f"frontier: no curve {reference!r} in the results; curves: {sorted(by_label)}")
    points: dict[float, dict[int, tuple[float, float]]] = {}
    for r in records:
        if curve_label(r) == reference:
            points.setdefault(record_weight(r), {})[r["seed"]] = (r["target_loss"], forgetting_value(r, forgetting))
    no_axis = {curve_label(r) for r in records if r["method"] == "none"}
    rows = []
    for label in sorted(set(by_label) - {reference} - no_axis):
        curve = by_label[label]
        for weight, by_seed in sorted(points.items()):
            x = statistics.fmean(xy[0] for xy in by_seed.values())
            at = {s: _interpolate(curve[s], xy[0]) if s in curve else None for s, xy in by_seed.items()}
            if any(v is None for v in at.values()):
                rows.append({"method": label, "reg_weight": weight, "x": x, "gap": None, "two_se": None})
                continue
            gap, se = _mean_se([at[s][0] - xy[1] for s, xy in sorted(by_seed.items())])
            rows.append({"method": label, "reg_weight": weight, "x": x, "gap": gap, "two_se": None if se is None else 2 * se})
    return rows


def render_reference_point_gaps(rows: list[dict], reference: str) -> str:
    """The markdown table of `reference_point_gaps` rows."""
    lines = [f"| curve | at `{reference}` λ | its target loss | curve − `{reference}` in forgetting (2 SE) |", "|---|---|---|---|"]
    for r in rows:
        gap = "outside the curve's range" if r["gap"] is None else _gap_cell(r["gap"], r["two_se"])
        lines.append(f"| {r['method']} | {r['reg_weight']:g} | {r['x']:.4f} | {gap} |")
    return "\n".join(lines) + "\n"


def goal_rows(records: list[dict], reference: str, at: list[float], gap_max: float, bound_max: float,
              forgetting: str = "source_loss_increase") -> list[dict]:
    """Per curve, whether it is as good as `reference`: its gap at the reference's points of lambda in `at`
    (`reference_point_gaps`) and its largest gap over the overlap (`curve_gaps`), each needing gap <= gap_max and
    gap + 2 SE <= bound_max (a curve below the reference passes). Rows {"method", "checks": [(what, gap, two_se,
    ok)], "meets"}; a check that cannot be made (outside the range, no SE) fails."""
    at_points = [r for r in reference_point_gaps(records, reference, forgetting) if r["reg_weight"] in at]
    by_label = seed_curves(records, forgetting)
    none = [forgetting_value(r, forgetting) for r in records if r["method"] == "none"]
    floor = 0.5 * statistics.fmean(none) if none else 0.0
    no_axis = {curve_label(r) for r in records if r["method"] == "none"}
    ok = lambda gap, se: gap is not None and se is not None and gap <= gap_max and gap + se <= bound_max  # noqa: E731
    rows = []
    for label in sorted(set(by_label) - {reference} - no_axis):
        checks = [(f"at {reference} λ = {r['reg_weight']:g} (x = {r['x']:.4f})", r["gap"], r["two_se"], ok(r["gap"], r["two_se"]))
                  for r in at_points if r["method"] == label]
        worst = _worst_gap(by_label[label], by_label[reference], floor)
        if worst is None:
            checks.append((f"largest over the overlap (none in regime: {reference} never forgets >= {floor:.3f} there)",
                           None, None, False))
        else:
            x, gap, se = worst
            checks.append((f"largest over the overlap, in regime (at x = {x:.4f})", gap, se, ok(gap, se)))
        rows.append({"method": label, "checks": checks, "meets": all(c[3] for c in checks)})
    return rows


def _worst_gap(curve: dict[int, list], ref: dict[int, list], floor: float) -> tuple[float, float, float | None] | None:
    """(x, gap, 2 SE) at the knot of the overlap where curve - ref is largest (signed: the curve's worst place; a
    difference of piecewise-linear curves peaks at a knot); None without an overlap, or when the reference's mean
    forgetting never reaches `floor` (half of plain LoRA's) in it: out of regime."""
    if any(len(points) < 2 for points in [*curve.values(), *ref.values()]):
        return None
    lo = max(points[0][0] for points in [*curve.values(), *ref.values()])
    hi = min(points[-1][0] for points in [*curve.values(), *ref.values()])
    knots = sorted({lo, hi} | {x for points in [*curve.values(), *ref.values()] for x, _ in points if lo <= x <= hi})
    ref_mean = lambda x: statistics.fmean(_interpolate(p, x)[0] for p in ref.values())  # noqa: E731
    if lo >= hi or max(ref_mean(x) for x in knots) < floor:
        return None
    gaps = [(x, *_difference(curve, ref, x)) for x in knots]
    x, gap, se = max(gaps, key=lambda item: item[1])
    return x, gap, None if se is None else 2 * se


def render_goal(rows: list[dict], reference: str, gap_max: float, bound_max: float) -> str:
    """The markdown table of `goal_rows`."""
    lines = [f"| curve | check | gap vs `{reference}` (2 SE) | gap <= {gap_max:g} and gap + 2 SE <= {bound_max:g} |", "|---|---|---|---|"]
    for r in rows:
        for what, gap, two_se, ok in r["checks"]:
            cell = "not measurable" if gap is None else _gap_cell(gap, two_se)
            lines.append(f"| {r['method']} | {what} | {cell} | {'yes' if ok else 'no'} |")
        lines.append(f"| {r['method']} | **all** | | **{'meets' if r['meets'] else 'does not meet'}** |")
    return "\n".join(lines) + "\n"


def cell_gaps(records: list[dict], reference: str = "tail", forgetting: str = "source_loss_increase") -> list[dict]:
    """`curve_gaps` within each cell: the records of one setting of the other axes (LoRA family, k, curvature:
    the curve label less its method, e.g. `dora`), each curve against that cell's `reference` method; the `none`
    of the same cell sets its regime. Rows as `curve_gaps`' with "cell" added; a cell without the reference is
    skipped."""
    cells: dict[str, list[dict]] = {}
    for r in records:
        cells.setdefault(curve_label(r)[len(r["method"]):].strip(), []).append(r)
    rows = []
    for cell, runs in sorted(cells.items()):
        ref = f"{reference} {cell}".strip()
        if any(curve_label(r) == ref for r in runs):
            rows += [{**row, "cell": cell} for row in curve_gaps(runs, ref, forgetting)]
    return rows


def _gap_cell(gap: float, two_se: float | None, digits: int = 4) -> str:
    return f"{gap:+.{digits}f} " + ("(one seed: no SE)" if two_se is None else f"(± {two_se:.{digits}f})")


def render_curve_gaps(rows: list[dict], reference: str) -> str:
    """The markdown table of `curve_gaps` rows."""
    ppl = any("ppl_mid" in r for r in rows)
    lines = [f"| curve | seeds | overlap (target loss) | gap vs `{reference}` at x* = midpoint (2 SE) | largest \\|gap\\| (2 SE) at x | "
             "in regime |" + (" retention ppl change at x*: curve / ref | ppl gap (2 SE) |" if ppl else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if ppl else "")]
    for r in rows:
        if "reason" in r:
            lines.append(f"| {r['method']} | {r['seeds']} | {r['reason']} | | | |" + (" | |" if ppl else ""))
            continue
        regime = {None: "-", True: "yes", False: "no"}[r["in_regime"]]
        line = (f"| {r['method']} | {r['seeds']}{'' if r['paired'] else ' (unpaired)'} | {r['overlap'][0]:.4f}-{r['overlap'][1]:.4f} | "
                f"{_gap_cell(r['gap_mid'], r['two_se_mid'])} at {r['x_mid']:.4f} | {_gap_cell(r['gap_max'], r['two_se_max'])} at "
                f"{r['x_max']:.4f} | {regime} |")
        if ppl:
            line += (f" {r['ppl_mid']:+.2f}% / {r['ppl_ref_mid']:+.2f}% | "
                     f"{_gap_cell(r['gap_ppl_mid'], r['two_se_ppl_mid'], 2)} pp |")
        lines.append(line)
    return "\n".join(lines) + "\n"


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


def _base_losses(stored) -> dict | None:
    """The base model's eval losses of a results.json ({"base": {"target": {"loss"}, "source": {"loss"}}}), or None."""
    base = stored.get("base") if isinstance(stored, dict) else None
    if not base or not all(isinstance(base.get(k), dict) and "loss" in base[k] for k in ("target", "source")):
        return None
    return {k: base[k]["loss"] for k in ("target", "source")}


def load_records(paths: list[Path], forgetting: str = "source_loss_increase") -> list[dict]:
    """The runs of several results.json, checked before any gap is computed: every run names its method,
    lambda and seed and has finite losses; a run listed twice (same name) counts once, and twice with other
    values is refused; runs scored on other eval sets (another scenario), or files whose base model scores
    otherwise on them (another backbone), are refused, naming both files."""
    records: list[dict] = []
    seen: dict[str, tuple[Path, dict]] = {}
    first: dict[str, tuple[Path, str]] = {}  # "base" / "eval_sets": the first file's, as JSON
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results.json (a sweep writes one into sweep.output_dir)")
        stored = json.loads(path.read_text())
        base = _base_losses(stored)
        if base is not None:
            first_base = first.setdefault("base", (path, json.dumps(base)))
            if first_base[1] != json.dumps(base):
                raise ValueError(f"{path}: its base model scores {base} on the eval sets, the base of {first_base[0]} "
                                 f"{json.loads(first_base[1])}: another base model (backbone); compare each on its own")
        for i, r in enumerate(stored["runs"] if isinstance(stored, dict) else stored):  # a bare list before
            where = f"{path}: run {r.get('name', f'#{i}')}"
            missing = [key for key in ("method", "seed", "target_loss") if key not in r]
            missing += [] if "reg_weight" in r or "kl_weight" in r else ["reg_weight"]
            if missing:
                raise ValueError(f"{where} has no {', '.join(missing)} (a sweep's results.json records each run's "
                                 "method, reg_weight, seed and losses)")
            values = {"target_loss": r["target_loss"], forgetting: forgetting_value(r, forgetting)}
            bad = {k: v for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)}
            if bad:
                raise ValueError(f"{where}: {bad} is not a finite number; re-run it or drop it from the file")
            name = r.get("name")
            if name in seen:
                if seen[name][1] != r:
                    raise ValueError(f"{where} is also in {seen[name][0]} with other values; pass each sweep once")
                continue  # the same run listed twice counts once
            if name is not None:
                seen[name] = (path, r)
            if r.get("eval_sets"):
                scored = json.dumps(r["eval_sets"], sort_keys=True)
                first_sets = first.setdefault("eval_sets", (path, scored))
                if first_sets[1] != scored:
                    raise ValueError(f"{where} was scored on other eval sets than the runs of {first_sets[0]} ({r['eval_sets']} vs "
                                     f"{json.loads(first_sets[1])}): another scenario; compare each on its own")
            records.append(r)
    return records


def frontier_report(results: list[str | Path] | str | Path, reference: str = "tail", out: str | Path | None = None,
                    forgetting: str = "source_loss_increase", goal: str | None = None) -> str:
    """`python -m pipeline frontier`: the gap table of one or more sweeps' results.json (their runs pooled,
    e.g. a grid and a later axis over the same cache) against `reference`; printed, and written to `out`."""
    paths = [Path(p) for p in ([results] if isinstance(results, (str, Path)) else results)]
    records = load_records(paths, forgetting)
    names = ", ".join(map(str, paths))
    text = (f"Curves against the `{reference}` curve ({forgetting}), from {names}:\n\n"
            + render_curve_gaps(curve_gaps(records, reference, forgetting), reference))
    by_cell = [row for row in cell_gaps(records, reference, forgetting) if row["cell"]]
    if by_cell:  # several LoRA families (or k, curvatures): each against its own cell's reference
        text += (f"\nWithin each cell (LoRA family, k, curvature), against that cell's `{reference}`:\n\n"
                 + render_curve_gaps(by_cell, f"{reference} <cell>"))
    if goal:  # "LAMBDAS:GAP:BOUND", e.g. "1,3:0.005:0.010"
        lambdas, gap_max, bound_max = goal.split(":")
        text += (f"\nAs good as `{reference}`? (gap <= {gap_max}, gap + 2 SE <= {bound_max}):\n\n"
                 + render_goal(goal_rows(records, reference, [float(x) for x in lambdas.split(",")], float(gap_max),
                                         float(bound_max), forgetting), reference, float(gap_max), float(bound_max)))
    text += (f"\nEach curve at the `{reference}` curve's own points:\n\n"
             + render_reference_point_gaps(reference_point_gaps(records, reference, forgetting), reference))
    text += (f"\nEach point against the `{reference}` curve:\n\n"
             + render_gaps(frontier_gaps(records, reference, forgetting), reference))
    if out:
        Path(out).write_text(text)
    print(text)
    return text
