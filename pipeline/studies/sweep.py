"""A grid of stage-two runs over one cache: method x lambda x seed (x k, x LoRA variant), then a
learning/forgetting table and plot.

    python -m pipeline sweep --config configs/sweep_demo.yaml       (or: make sweep)

Stage one runs once (or is skipped: a complete cache is reused). Each run trains into
`sweep.output_dir/<method>-l<lambda>-s<seed>[-k<k>][-<variant>]/` and is evaluated there. Every run
is keyed by what it computes (`run_key`: its resolved config and the cache's identity, in
<run>/run_key.json): a finished run with the same key is reused, so a killed sweep continues where
it stopped; a run directory with another key (a changed setting) is moved to
`sweep.output_dir/stale/` and re-run, and the summary names both. The base model's evaluation
(base_eval.json) is keyed the same way by `base_key`. `sweep.records_dir` receives each finished
run's record as it finishes (a tracked folder: a matching record counts as done, so a sweep resumes
on a fresh clone); `sweep.shard: i/N` (`sweep --shard i/N`) runs one N-th of the grid. At the end:
results.json (one record per run), results.md (mean ± std over seeds per method, k, variant and lambda) and
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
method refuses (`live` with pissa/olora) is an error before any run. For `lalora` only,
`lalora_curvatures` (train.lalora_curvature) and `fisher_batches` (train.fisher_batches, its proxy
data) are two more axes, with a lambda grid per curvature in `curvature_reg_weights`; the runs of one
curvature and proxy size share one stored curvature (stages/student/curvature_store.py). Run names
carry every axis given: `lalora-l100-s0-kfac-fb2`. What a method reads, scales and
allows comes from its entry in stages/student/methods.py.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.config import Config
from stages.common.stage_config import to_dict
from stages.common.tensorboard_log import reports_to_tensorboard, tensorboard_dir
from stages.data.inputs import source_files
from stages.eval.evaluate import run_eval
from stages.eval.settings import EvalConfig
from stages.student.methods import get_method, method_names
from stages.student.runner import run_train
from stages.student.variants import NO_KFAC
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest
from storage_schemas.fingerprints import files_sha256

__all__ = ["RunSpec", "plan_runs", "quick_config", "run_config", "run_key", "base_key", "run_sweep", "summarize", "plot_frontier",
           "log_sweep", "curve_label", "record_weight"]

KEY_FILE = "run_key.json"  # in each run directory: the key it was computed under and its resolved config


@dataclass(frozen=True)
class RunSpec:
    method: str
    reg_weight: float
    seed: int
    k: int = 0          # train.k; 0 = all the cache's columns (name unchanged)
    variant: str = ""   # train.lora.variant; "" = as configured (name unchanged)
    curvature: str = ""  # lalora: train.lalora_curvature; "" = as configured (name unchanged)
    fisher_batches: int | None = None  # lalora: train.fisher_batches; None = as configured (name unchanged)

    @property
    def name(self) -> str:
        suffix = (f"-k{self.k}" if self.k else "") + (f"-{self.variant}" if self.variant else "")
        suffix += f"-{self.curvature}" if self.curvature else ""
        suffix += f"-fb{self.fisher_batches}" if self.fisher_batches is not None else ""
        return f"{self.method}-l{self.reg_weight:g}-s{self.seed}{suffix}"


def _weights(config: Config, method: str, curvature: str = "") -> list[float]:
    if get_method(method, "sweep.methods").weight_scales == "nothing":  # lambda means nothing: one run per seed
        return [0.0]
    if method == "lalora" and (curvature or config.train.lalora_curvature) in config.sweep.curvature_reg_weights:
        return config.sweep.curvature_reg_weights[curvature or config.train.lalora_curvature]
    return config.sweep.method_reg_weights.get(method, config.sweep.reg_weights)


def _lalora_axes(config: Config, method: str) -> list[tuple[str, int | None]]:
    """(curvature, fisher_batches) pairs of `method`: the lalora axes' product, one empty pair for other methods."""
    if method != "lalora":
        return [("", None)]
    return [(c, b) for c in (config.sweep.lalora_curvatures or [""]) for b in (config.sweep.fisher_batches or [None])]


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
    if "lalora" in sweep.methods:
        for variant in sweep.lora_variants or [config.train.lora.variant]:
            kfac = [c for c in sweep.lalora_curvatures or [config.train.lalora_curvature] if c != "diag"]
            if kfac and variant in NO_KFAC:
                raise ValueError(f"sweep: lalora with curvature {kfac} cannot run with train.lora.variant={variant} "
                                 f"({NO_KFAC[variant]}); sweep that variant with lalora_curvatures=[diag] in a separate config")


QUICK_STEPS, QUICK_EXAMPLES = 10, 16


def _ends(weights: list[float]) -> list[float]:
    return sorted({min(weights), max(weights)}) if weights else weights


def quick_config(config: Config) -> Config:
    """`sweep --quick`: the same grid in miniature, to check that every axis runs (figures mean nothing):
    the first two seeds, the two ends of every lambda grid, at most QUICK_STEPS steps and QUICK_EXAMPLES eval
    examples per set, into `<output_dir>-quick` and never into the records."""
    sweep = dataclasses.replace(
        config.sweep, seeds=config.sweep.seeds[:2], reg_weights=_ends(config.sweep.reg_weights),
        method_reg_weights={m: _ends(w) for m, w in config.sweep.method_reg_weights.items()},
        curvature_reg_weights={c: _ends(w) for c, w in config.sweep.curvature_reg_weights.items()},
        output_dir=config.sweep.output_dir.rstrip("/") + "-quick", records_dir="")
    steps = min(config.train.max_steps, QUICK_STEPS) if config.train.max_steps > 0 else QUICK_STEPS
    train = dataclasses.replace(config.train, max_steps=steps, save_steps=steps, logging_steps=min(config.train.logging_steps, steps))
    examples = min(config.eval.max_examples, QUICK_EXAMPLES) if config.eval.max_examples else QUICK_EXAMPLES
    return dataclasses.replace(config, sweep=sweep, train=train, eval=dataclasses.replace(config.eval, max_examples=examples))


def plan_runs(config: Config) -> list[RunSpec]:
    """Every run of the grid, in order: method, variant, k, lambda, seed."""
    _check_axes(config)
    sweep = config.sweep
    return [RunSpec(m, w, s, k, v, c, b)
            for m in sweep.methods for v in (sweep.lora_variants or [""])
            for k in (sweep.ks if get_method(m).reads_cache and sweep.ks else [0])
            for c, b in _lalora_axes(config, m)
            for w in _weights(config, m, c) for s in sweep.seeds]


def run_config(config: Config, spec: RunSpec, out: Path) -> Config:
    """The config of one run of the grid: `config` with the spec's method, lambda, seed, k and variant."""
    run = copy.deepcopy(config)
    run.train.method, run.train.reg_weight, run.train.seed = spec.method, spec.reg_weight, spec.seed
    # train.k means nothing to a method that reads no teacher arrays: 0 there, so its key ignores it
    run.train.k = (spec.k or config.train.k) if get_method(spec.method).reads_cache else 0
    if spec.variant:
        run.train.lora.variant = spec.variant
    if spec.curvature:
        run.train.lalora_curvature = spec.curvature
    if spec.fisher_batches is not None:
        run.train.fisher_batches = spec.fisher_batches
    run.train.output_dir = str(out / spec.name)
    if config.sweep.lm_eval_metric:  # the opt-in harness metric: its task in every run's eval
        run.eval.lm_eval.tasks = [config.sweep.lm_eval_metric.split(":")[0]]
    run.train.__post_init__()  # the grid point's own combination is checked (e.g. kfac with sinelora)
    return run


def _record(spec: RunSpec, result: dict, metrics: dict | None = None) -> dict:
    """One results.json row from the run's eval.json (`result`) and training metrics.json (`metrics`, for the
    binary term's share of the full KL in the last logging window: None for a method without a KL)."""
    adapted, forgetting = result["adapted"], result["forgetting"]
    sets = result.get("sets", {})
    return {"name": spec.name, "method": spec.method, "reg_weight": spec.reg_weight, "seed": spec.seed,
            "k": spec.k, "variant": spec.variant, "curvature": spec.curvature,
            "fisher_batches": spec.fisher_batches,
            "target_loss": adapted["target"]["loss"], "target_accuracy": adapted["target"]["accuracy"],
            "source_loss": adapted["source"]["loss"], "source_loss_increase": forgetting["source_loss_increase"],
            "drift_kl": adapted["source"]["drift_kl"], "binary_share": (metrics or {}).get("final_binary_share"),
            "eval_sets": {name: sets[name]["sha256"] for name in sets}, **_lm_eval_fields(result)}


def _lm_eval_fields(result: dict) -> dict:
    """The harness metric of the run's eval (sweep.lm_eval_metric) as record fields, {} without one."""
    rows = result.get("lm_eval", {}).get("rows", [])
    return {f"lm_eval:{r['task']}:{r['metric']}": {"change": r["change"], "adapted": r["adapted"], "base": r["base"],
                                                  "change_se": r["change_se"]} for r in rows}


# --- keys: what a result was computed from ----------------------------------------------------------
def _sha(tree) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()


def _eval_set_hashes(config: Config) -> dict[str, str]:
    heldout = config.data.heldout_fraction and config.eval.target_path == EvalConfig().target_path  # the data's slice
    return {name: _files_sha(tuple(source_files(path))) for name, path in
            (("target", config.data.path if heldout else config.eval.target_path), ("source", config.eval.source_path))}


def _files_sha(files: tuple[Path, ...]) -> str:
    """files_sha256, read once per sweep: every run of a grid keys on the same eval sets (a file changed
    since, by size or mtime, is read again)."""
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if stamp not in _FILE_SHAS:
        _FILE_SHAS[stamp] = files_sha256(list(files))
    return _FILE_SHAS[stamp]


_FILE_SHAS: dict[tuple, str] = {}


def run_key(config: Config, manifest: Manifest) -> str:
    """sha256 of what one run computes: its resolved config (every section but the sweep's and the
    approx study's; train.output_dir aside), the eval sets' bytes and the cache's identity."""
    tree = {k: v for k, v in to_dict(config).items() if k not in ("sweep", "approx")}
    tree["train"] = {k: v for k, v in tree["train"].items() if k != "output_dir"}
    return _sha({"config": tree, "eval_sets": _eval_set_hashes(config), "cache": manifest.identity()})


def base_key(config: Config, manifest: Manifest) -> str:
    """sha256 of what the base model's evaluation computes: the model's weights, the data and eval
    settings (how each set is read) and the eval sets' bytes."""
    return _sha({"teacher": manifest.identity()["teacher"], "data": to_dict(config.data), "eval": to_dict(config.eval),
                 "eval_sets": _eval_set_hashes(config)})


def _write_json(path: Path, value) -> None:
    """Atomic: a reader (another shard) sees the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _move_aside(path: Path, out: Path) -> Path:
    """`path` moved under out/stale/ (numbered, never overwriting an earlier stale copy)."""
    stale = out / "stale"
    stale.mkdir(exist_ok=True)
    n = 0
    while (target := stale / f"{path.name}.{n}").exists():
        n += 1
    path.rename(target)
    return target


def _base_eval(config: Config, manifest: Manifest, out: Path, records: Path | None, notes: list[str]) -> dict:
    """The base model's eval results under `base_key`: from base_eval.json or the records if their
    key matches, else computed (an old base_eval.json with another key moved aside, and said)."""
    key, path = base_key(config, manifest), out / "base_eval.json"
    for stored in (_read_json(path), _read_json(records / "base_eval.json") if records else None):
        if stored and stored.get("key") == key:
            if records and _read_json(records / "base_eval.json") != stored:
                _write_json(records / "base_eval.json", stored)
            return stored["base"]
    if path.exists():
        notes.append(f"base_eval.json was computed under other eval settings or data: moved to {_move_aside(path, out)}")
    stored = {"key": key, "base": run_eval(config)["base"]}
    _write_json(path, stored)
    if records:
        _write_json(records / "base_eval.json", stored)
    return stored["base"]


def _shard_of(specs: list[RunSpec], shard: str) -> list[RunSpec]:
    if not shard:
        return specs
    i, n = map(int, shard.split("/"))
    return specs[i::n]


def _one_run(config: Config, spec: RunSpec, manifest: Manifest, base: dict, out: Path, records: Path | None,
             notes: dict[str, list[str]]) -> None:
    """Make sure spec's result exists under its key: reused, read from the records, or computed
    (a run directory under another key moved aside first). `notes` gathers what happened."""
    one, run_dir = run_config(config, spec, out), out / spec.name
    key = run_key(one, manifest)
    stored = _read_json(run_dir / KEY_FILE)
    record = _read_json(records / f"{spec.name}.json") if records else None
    if stored and stored["key"] == key and (run_dir / "eval.json").exists():
        notes["reused"].append(spec.name)
        if records and not (record and record["key"] == key):  # records_dir added to a finished sweep
            _save_record(records, spec.name, key, one, run_dir)
        return
    if record and record["key"] == key:
        notes["from records"].append(spec.name)
        return
    if run_dir.exists() and not (stored and stored["key"] == key):  # another key (or none: an older sweep)
        notes["re-run, settings changed"].append(f"{spec.name} (old run moved to {_move_aside(run_dir, out)})")
    else:
        notes["ran"].append(spec.name)
    _write_json(run_dir / KEY_FILE, {"key": key, "config": to_dict(one)})  # before training: a killed run resumes under it
    run_train(one, resume=True)
    result = run_eval(one, str(run_dir), base_results=base)
    _check_lm_eval_metric(config, result)  # a metric name the task does not have: said after the first run, not the last
    if records:
        _save_record(records, spec.name, key, one, run_dir)


def _check_lm_eval_metric(config: Config, result: dict) -> None:
    if not config.sweep.lm_eval_metric:
        return
    task, metric = config.sweep.lm_eval_metric.split(":")
    have = sorted(r["metric"] for r in result.get("lm_eval", {}).get("rows", []) if r["task"] == task)
    if metric not in have:
        raise ValueError(f"sweep.lm_eval_metric={config.sweep.lm_eval_metric}: the task {task} reports {have}, not {metric!r}; "
                         f"pick one of them (finished runs are kept and reused)")


def _save_record(records: Path, name: str, key: str, config: Config, run_dir: Path) -> None:
    _write_json(records / f"{name}.json", {"key": key, "config": to_dict(config), "eval": _read_json(run_dir / "eval.json"),
                                           "metrics": _read_json(run_dir / "metrics.json")})


def _result(config: Config, spec: RunSpec, manifest: Manifest, out: Path, records: Path | None) -> tuple[dict, dict] | None:
    """spec's (eval.json, metrics.json) contents under its current key (run directory or record), or None."""
    key = run_key(run_config(config, spec, out), manifest)
    stored = _read_json(out / spec.name / KEY_FILE)
    if stored and stored["key"] == key and (out / spec.name / "eval.json").exists():
        return _read_json(out / spec.name / "eval.json"), _read_json(out / spec.name / "metrics.json") or {}
    record = _read_json(records / f"{spec.name}.json") if records else None
    return (record["eval"], record.get("metrics") or {}) if record and record["key"] == key else None


def run_sweep(config: Config) -> list[dict]:
    """Run the grid (or this process's shard of it) and write the table of every run with a result
    (module doc). Returns the result records, in grid order."""
    out = Path(config.sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = Path(config.sweep.records_dir) if config.sweep.records_dir else None
    if config.sweep.shard:  # N processes must not run stage one into one cache at once
        manifest = Manifest.load(config.cache.dir) if (Path(config.cache.dir) / "manifest.json").exists() else None
        if manifest is None or not manifest.complete:
            raise ValueError(f"sweep.shard={config.sweep.shard}: the cache {config.cache.dir} is not complete; run stage "
                             "one first (python -m pipeline cache-teacher --config ... with the same settings)")
    else:
        print(run_cache_teacher(config).render())
    manifest = Manifest.load(config.cache.dir)
    specs, notes = plan_runs(config), {"reused": [], "from records": [], "ran": [], "re-run, settings changed": []}
    base_notes: list[str] = []
    base = _base_eval(config, manifest, out, records, base_notes)
    # Each run's Trainer ends in a full gc.collect() (accelerate's free_memory), which walks every object the
    # imports made: ~0.5-0.9 s a run here. Frozen, they are skipped; the runs' own garbage is still collected.
    gc.freeze()
    try:
        for spec in tqdm(_shard_of(specs, config.sweep.shard), desc="sweep", unit="run"):
            _one_run(config, spec, manifest, base, out, records, notes)
    finally:
        gc.unfreeze()
    results = {spec.name: _result(config, spec, manifest, out, records) for spec in specs}
    done = [_record(spec, *results[spec.name]) for spec in specs if results[spec.name] is not None]
    pending = [name for name, result in results.items() if result is None]
    report = _run_report(notes, base_notes, pending)
    _write_json(out / "results.json", {"base": base, "runs": done, "pending": pending})
    (out / "results.md").write_text(summarize(done, base, config.sweep.lm_eval_metric))
    plot_frontier(done, out / "frontier.png")
    if config.sweep.lm_eval_metric:
        plot_frontier(done, out / "frontier_lm_eval.png", forgetting=f"lm_eval:{config.sweep.lm_eval_metric}")
    if reports_to_tensorboard(config.train.report_to):
        log_sweep(done, tensorboard_dir(out))
    print(report + "\n" + summarize(done, base, config.sweep.lm_eval_metric))
    return done


def _run_report(notes: dict[str, list[str]], base_notes: list[str], pending: list[str]) -> str:
    """What this sweep invocation did, run by run: reused, read from the records, ran, re-ran."""
    lines = ["sweep: " + ("; ".join(f"{what} {len(names)}" for what, names in notes.items() if names) or "no run in this shard")]
    lines += [f"  {what}: {', '.join(names)}" for what, names in notes.items() if names and what != "reused"]
    lines += [f"  {note}" for note in base_notes]
    if pending:
        lines.append(f"  no result yet (another shard's, or not run): {', '.join(pending)}")
    return "\n".join(lines)


# --- reporting ----------------------------------------------------------------------------------
def record_weight(record: dict) -> float:
    """A result record's lambda: `reg_weight`, or `kl_weight` in a results.json written before the rename."""
    return record["reg_weight"] if "reg_weight" in record else record["kl_weight"]


def curve_label(record: dict) -> str:
    """One curve / table block per method, k and LoRA variant: e.g. `tail`, `tail k=4`, `tail dora`."""
    k, variant = record.get("k", 0), record.get("variant", "")
    curvature, batches = record.get("curvature", ""), record.get("fisher_batches")
    return (record["method"] + (f" k={k}" if k else "") + (f" {variant}" if variant else "") + (f" {curvature}" if curvature else "")
            + (f" fb={batches}" if batches is not None else ""))


def _groups(records: list[dict]) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((curve_label(r), record_weight(r)), []).append(r)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _check_one_eval_set(records: list[dict]) -> None:
    """The seeds averaged into one row must have been scored on the same eval sets."""
    for (label, weight), runs in _groups(records).items():
        sets = {json.dumps(r.get("eval_sets", {}), sort_keys=True) for r in runs}
        if len(sets) > 1:
            raise ValueError(f"sweep: the runs of {label} lambda={weight:g} ({[r['name'] for r in runs]}) were scored on "
                             "different eval sets; re-run them under one eval config")


def summarize(records: list[dict], base: dict, lm_eval_metric: str = "") -> str:
    """The markdown table: mean ± std over seeds per method (k, variant) and lambda; a row of one
    seed shows its value alone (no spread to state). `lm_eval_metric` (TASK:METRIC): one more column, the
    harness metric's change over the base. The last column: the binary term's share of the full KL in the
    last training window (KL methods; `-` for the others and for runs from before it was logged)."""
    _check_one_eval_set(records)
    extra = f"lm_eval:{lm_eval_metric}" if lm_eval_metric else ""
    lines = [f"Base model: target loss {base['target']['loss']:.4f}, source loss {base['source']['loss']:.4f} (nats/token).", "",
             "| method | lambda | seeds | target loss (learning) | source loss increase (forgetting) | drift KL |"
             + (f" {lm_eval_metric} change |" if extra else "") + " binary share of full KL |",
             "|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|"]
    for (method, weight), runs in sorted(_groups(records).items()):
        cells = [_mean_std([r[key] for r in runs]) for key in ("target_loss", "source_loss_increase", "drift_kl")]
        if extra:
            cells.append(_mean_std([forgetting_value(r, extra) for r in runs]))
        shown = [f"{m:.4f} ± {s:.4f}" if len(runs) > 1 else f"{m:.4f}" for m, s in cells]
        shares = [r["binary_share"] for r in runs if r.get("binary_share") is not None]
        shown.append(f"{statistics.fmean(shares):.3f}" if len(shares) == len(runs) else "-")
        lines.append(f"| {method} | {weight:g} | {len(runs)} | " + " | ".join(shown) + " |")
    if any(len(runs) > 1 for runs in _groups(records).values()):
        lines += ["", "± is one standard deviation over the seeds of a row; the binary share is the mean over them."]
    return "\n".join(lines) + "\n"


def _weighted(method: str) -> bool:
    """Whether lambda means anything for `method` (one no longer registered, from an old results.json: yes)."""
    return method not in method_names() or get_method(method).weight_scales != "nothing"


HPARAMS = ("method", "reg_weight", "seed", "k", "variant", "curvature", "fisher_batches")
SWEEP_METRICS = ("target_loss", "target_accuracy", "source_loss", "source_loss_increase", "drift_kl")


def log_sweep(records: list[dict], log_dir: Path) -> None:
    """TensorBoard's HPARAMS view of the sweep: one run per record in <log_dir>/<run name> (hparams =
    HPARAMS, metrics = SWEEP_METRICS under sweep/), written once per run (a resumed sweep adds only the new
    ones); and the frontier figure in <log_dir> at step = the number of runs so far."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for r in records:
            if not (log_dir / r["name"]).exists():
                writer.add_hparams({key: "" if r.get(key) is None else r[key] for key in HPARAMS},
                                   {f"sweep/{key}": r[key] for key in SWEEP_METRICS}, run_name=r["name"])
        writer.add_figure("sweep/frontier", _frontier_figure(records), global_step=len(records))


def forgetting_value(record: dict, forgetting: str = "source_loss_increase") -> float:
    """A record's forgetting: `source_loss_increase`, or `lm_eval:TASK:METRIC` (the harness metric's change)."""
    if forgetting.startswith("lm_eval:"):
        if forgetting not in record:
            have = sorted(k for k in record if k.startswith("lm_eval:"))
            raise ValueError(f"run {record.get('name')} has no {forgetting}; its harness metrics: {have or 'none'} "
                             "(a sweep records them with sweep.lm_eval_metric=TASK:METRIC)")
        return record[forgetting]["change"]
    if forgetting != "source_loss_increase":
        raise ValueError(f"forgetting axis {forgetting!r}: expected source_loss_increase or lm_eval:TASK:METRIC")
    return record[forgetting]


def plot_frontier(records: list[dict], path: Path, forgetting: str = "source_loss_increase") -> None:
    import matplotlib.pyplot as plt

    fig = _frontier_figure(records, forgetting)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _frontier_figure(records: list[dict], forgetting: str = "source_loss_increase"):
    """The learning/forgetting frontier as a matplotlib Figure (the caller saves or logs and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    by_method: dict[str, list] = {}
    for (method, weight), runs in sorted(_groups(records).items()):
        x, y = _mean_std([r["target_loss"] for r in runs]), _mean_std([forgetting_value(r, forgetting) for r in runs])
        by_method.setdefault(method, []).append((weight, x, y))
    offsets = [(4, 4), (4, -10), (-34, 4), (-34, -10)]  # curves that coincide keep readable labels
    if len(by_method) > 10:  # the default cycle repeats after 10: two curves would share a colour
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for i, (method, points) in enumerate(by_method.items()):
        points.sort()
        bars = ax.errorbar([p[1][0] for p in points], [p[2][0] for p in points], xerr=[p[1][1] for p in points],
                           yerr=[p[2][1] for p in points], marker="o", capsize=3, label=method)
        own = [r for r in records if curve_label(r) == method]
        if any(len(runs) > 1 for (label, _), runs in _groups(records).items() if label == method):  # each seed's own point
            ax.scatter([r["target_loss"] for r in own], [forgetting_value(r, forgetting) for r in own], s=9, alpha=0.35,
                       color=bars[0].get_color(), linewidths=0)
        for weight, x, y in points:
            if _weighted(method.split()[0]):
                ax.annotate(f"λ={weight:g}", (x[0], y[0]), textcoords="offset points", xytext=offsets[i % len(offsets)],
                            fontsize=7, color=bars[0].get_color())
    ax.set_xlabel("held-out target loss, nats/token (lower = learned more)")
    ax.set_ylabel("retention loss increase over base, nats/token (lower = forgot less)" if forgetting == "source_loss_increase"
                  else f"{forgetting.removeprefix('lm_eval:')}: adapted - base (lm-evaluation-harness)")
    seeds = sorted({len(runs) for runs in _groups(records).values()})
    ax.set_title("Learning vs forgetting: " + ("one seed per point (no error bars)" if seeds == [1] else
                                               f"mean over {'/'.join(map(str, seeds))} seeds, bars ±1 std, dots the seeds"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
