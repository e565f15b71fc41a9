"""A grid of stage-two runs over one cache: method x lambda x seed (x k, x LoRA variant), then a
learning/forgetting table and plot.

    python -m pipeline sweep --config configs/sweep_demo.yaml       (or: make sweep)

Stage one runs once (or is skipped: a complete cache is reused). Each run trains into
`sweep.output_dir/<method>-l<lambda>-s<seed>[-k<k>][-<variant>]/` and is evaluated there; a run whose
eval.json exists is skipped, so a killed sweep continues where it stopped. At the end: results.json
(one record per run), results.md (mean ± std over seeds per method, k, variant and lambda) and
frontier.png (x: held-out target loss, y: increase of the retention loss over the base model; one
curve per method (and k, variant) across lambda, error bars over seeds). With `train.report_to:
tensorboard`, `tensorboard --logdir <sweep.output_dir>` shows every run's training curves (<run>/tensorboard)
and eval figures, and <sweep.output_dir>/tensorboard holds the HPARAMS table (one run per grid point) and the
frontier figure.

Grid (config `sweep`): lambdas (`train.reg_weight`) are `reg_weights`, or `method_reg_weights[method]`
where given (the weight penalties l2/lalora live on another scale than the KL); a method whose weight
scales nothing (`none`) runs once per seed. `ks` (optional) multiplies the methods that read the cache
(tail/topk/full_kl) by `train.k`: such a run reads the first k columns of the same cache (the
teacher's top k), so a k study never re-runs stage one; methods that read no teacher arrays get one
run per seed whatever `ks` says. `lora_variants` (optional) multiplies every method; a variant a
method refuses (`live` with pissa/olora) is an error before any run. What a method reads, scales and
allows comes from its entry in stages/student/methods.py.
"""
from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.config import Config
from stages.common.tensorboard_log import reports_to_tensorboard, tensorboard_dir
from stages.eval.evaluate import run_eval
from stages.student.methods import get_method, method_names
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher

__all__ = ["RunSpec", "plan_runs", "run_config", "run_sweep", "summarize", "plot_frontier", "log_sweep", "curve_label",
           "record_weight"]


@dataclass(frozen=True)
class RunSpec:
    method: str
    reg_weight: float
    seed: int
    k: int = 0          # train.k; 0 = all the cache's columns (name unchanged)
    variant: str = ""   # train.lora.variant; "" = as configured (name unchanged)

    @property
    def name(self) -> str:
        suffix = (f"-k{self.k}" if self.k else "") + (f"-{self.variant}" if self.variant else "")
        return f"{self.method}-l{self.reg_weight:g}-s{self.seed}{suffix}"


def _weights(config: Config, method: str) -> list[float]:
    if get_method(method, "sweep.methods").weight_scales == "nothing":  # lambda means nothing: one run per seed
        return [0.0]
    return config.sweep.method_reg_weights.get(method, config.sweep.reg_weights)


def _check_axes(config: Config) -> None:
    sweep = config.sweep
    too_big = [k for k in sweep.ks if k > config.cache.k]
    if too_big:
        raise ValueError(f"sweep.ks: {too_big} > cache.k={config.cache.k}: a run reads only the first k of the "
                         f"cache's {config.cache.k} columns; raise cache.k (one new stage one) or drop them")
    for method in map(get_method, sweep.methods):
        clash = [v for v in sweep.lora_variants if not method.allows(v)]
        if clash:
            raise ValueError(f"sweep: method {method.name!r} cannot run with sweep.lora_variants {clash} "
                             f"({method.refusal}); sweep them in a separate config without {method.name!r}")


def plan_runs(config: Config) -> list[RunSpec]:
    """Every run of the grid, in order: method, variant, k, lambda, seed."""
    _check_axes(config)
    sweep = config.sweep
    return [RunSpec(m, w, s, k, v)
            for m in sweep.methods for v in (sweep.lora_variants or [""])
            for k in (sweep.ks if get_method(m).reads_cache and sweep.ks else [0])
            for w in _weights(config, m) for s in sweep.seeds]


def run_config(config: Config, spec: RunSpec, out: Path) -> Config:
    """The config of one run of the grid: `config` with the spec's method, lambda, seed, k and variant."""
    run = copy.deepcopy(config)
    run.train.method, run.train.reg_weight, run.train.seed = spec.method, spec.reg_weight, spec.seed
    run.train.k = spec.k or config.train.k
    if spec.variant:
        run.train.lora.variant = spec.variant
    run.train.output_dir = str(out / spec.name)
    return run


def _record(spec: RunSpec, result: dict) -> dict:
    adapted, forgetting = result["adapted"], result["forgetting"]
    return {"name": spec.name, "method": spec.method, "reg_weight": spec.reg_weight, "seed": spec.seed,
            "k": spec.k, "variant": spec.variant,
            "target_loss": adapted["target"]["loss"], "target_accuracy": adapted["target"]["accuracy"],
            "source_loss": adapted["source"]["loss"], "source_loss_increase": forgetting["source_loss_increase"],
            "drift_kl": adapted["source"]["drift_kl"]}


def run_sweep(config: Config) -> list[dict]:
    out = Path(config.sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(run_cache_teacher(config).render())
    base_path = out / "base_eval.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(run_eval(config)["base"], indent=2))
    base = json.loads(base_path.read_text())
    records = []
    for spec in tqdm(plan_runs(config), desc="sweep", unit="run"):
        run_dir = out / spec.name
        if not (run_dir / "eval.json").exists():  # finished runs are skipped
            one = run_config(config, spec, out)
            run_train(one, resume=True)
            run_eval(one, str(run_dir), base_results=base)
        records.append(_record(spec, json.loads((run_dir / "eval.json").read_text())))
    (out / "results.json").write_text(json.dumps({"base": base, "runs": records}, indent=2))
    (out / "results.md").write_text(summarize(records, base))
    plot_frontier(records, out / "frontier.png")
    if reports_to_tensorboard(config.train.report_to):
        log_sweep(records, tensorboard_dir(out))
    print(summarize(records, base))
    return records


# --- reporting ----------------------------------------------------------------------------------
def record_weight(record: dict) -> float:
    """A result record's lambda: `reg_weight`, or `kl_weight` in a results.json written before the rename."""
    return record["reg_weight"] if "reg_weight" in record else record["kl_weight"]


def curve_label(record: dict) -> str:
    """One curve / table block per method, k and LoRA variant: e.g. `tail`, `tail k=4`, `tail dora`."""
    k, variant = record.get("k", 0), record.get("variant", "")
    return record["method"] + (f" k={k}" if k else "") + (f" {variant}" if variant else "")


def _groups(records: list[dict]) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((curve_label(r), record_weight(r)), []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict], base: dict) -> str:
    lines = [f"Base model: target loss {base['target']['loss']:.4f}, source loss {base['source']['loss']:.4f} (nats/token).", "",
             "| method | lambda | seeds | target loss (learning) | source loss increase (forgetting) | drift KL |",
             "|---|---|---|---|---|---|"]
    for (method, weight), runs in sorted(_groups(records).items()):
        cells = [_mean_std([r[key] for r in runs]) for key in ("target_loss", "source_loss_increase", "drift_kl")]
        lines.append(f"| {method} | {weight:g} | {len(runs)} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells) + " |")
    return "\n".join(lines) + "\n"


def _weighted(method: str) -> bool:
    """Whether lambda means anything for `method` (one no longer registered, from an old results.json: yes)."""
    return method not in method_names() or get_method(method).weight_scales != "nothing"


HPARAMS = ("method", "reg_weight", "seed", "k", "variant")
SWEEP_METRICS = ("target_loss", "target_accuracy", "source_loss", "source_loss_increase", "drift_kl")


def log_sweep(records: list[dict], log_dir: Path) -> None:
    """TensorBoard's HPARAMS view of the sweep: one run per record in <log_dir>/<run name> (hparams =
    HPARAMS, metrics = SWEEP_METRICS under sweep/), written once per run (a resumed sweep adds only the new
    ones); and the frontier figure in <log_dir> at step = the number of runs so far."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for r in records:
            if not (log_dir / r["name"]).exists():
                writer.add_hparams({key: r.get(key, "") for key in HPARAMS},
                                   {f"sweep/{key}": r[key] for key in SWEEP_METRICS}, run_name=r["name"])
        writer.add_figure("sweep/frontier", _frontier_figure(records), global_step=len(records))


def plot_frontier(records: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = _frontier_figure(records)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _frontier_figure(records: list[dict]):
    """The learning/forgetting frontier as a matplotlib Figure (the caller saves or logs and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_method: dict[str, list] = {}
    for (method, weight), runs in sorted(_groups(records).items()):
        x, y = _mean_std([r["target_loss"] for r in runs]), _mean_std([r["source_loss_increase"] for r in runs])
        by_method.setdefault(method, []).append((weight, x, y))
    offsets = [(4, 4), (4, -10), (-34, 4), (-34, -10)]  # curves that coincide keep readable labels
    for i, (method, points) in enumerate(by_method.items()):
        points.sort()
        bars = ax.errorbar([p[1][0] for p in points], [p[2][0] for p in points], xerr=[p[1][1] for p in points],
                           yerr=[p[2][1] for p in points], marker="o", capsize=3, label=method)
        for weight, x, y in points:
            if _weighted(method.split()[0]):
                ax.annotate(f"λ={weight:g}", (x[0], y[0]), textcoords="offset points", xytext=offsets[i % len(offsets)],
                            fontsize=7, color=bars[0].get_color())
    ax.set_xlabel("held-out target loss, nats/token (lower = learned more)")
    ax.set_ylabel("retention loss increase over base, nats/token (lower = forgot less)")
    ax.set_title("Learning vs forgetting (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
