"""The approximation study: the cached estimators' D_k against the exact masked KL D, and tail vs live.

    python -m pipeline approx-study --config configs/sweep_demo.yaml     (or: make approx-study)

1. Fixed students: the adapters of `approx.runs` (run directories, or run names under
   `sweep.output_dir`; a sweep run that is missing is trained first, nothing else is).
2. Held-out data: the first `approx.examples` sequences of `eval.target_path` (at `eval.max_length`),
   cached by stage one with the hf engine at k = |V|-1 into `approx.output_dir/cache-full` (built
   once, reused). A smaller k reads the first k columns of that cache, as `train.k` does.
3. Per labelled position and k in `approx.ks` + [cache.k, |V|-1]: every registered method that reads the
   cache and estimates D or the unmasked KL (`Method.estimates`; tail, topk, full_kl), its regularizer
   from the cache and the student's logits; the exact masked D (`live_masked_kl`, teacher = the same
   PeftModel with its adapter disabled) and the exact unmasked KL(p||q).
4. From the sweep's results.json: `tail` vs `live` at each shared lambda, and every method's points
   against the `tail` frontier at the same target loss (does `tail` reach `live`'s frontier?).

Writes approx_study.json and approx_study.md into `approx.output_dir`, and prints the markdown.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.config import Config
from pipeline.studies.frontier import frontier_gaps, render_gaps
from pipeline.studies.sweep import plan_runs, record_weight, run_config
from stages.student.collator import CacheCollator, pad_token_id
from stages.student.loss import CachedTeacher, live_masked_kl
from stages.student.methods import Method, get_method, methods
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher
from stages.teacher.settings import CacheConfig
from stages.teacher.tail_draws import tail_draws
from storage_schemas import Manifest
from storage_schemas.fingerprints import files_sha256, model_vocab_size

__all__ = ["run_approx_study", "gap_table", "estimator_sums", "tail_vs_live", "frontier_gaps", "render_markdown",
           "studied_methods"]

BOUND_TOL = 1e-5  # float32 slack of the lower-bound check, relative to (1 + D)


# --- inputs -----------------------------------------------------------------------------------
def full_cache_config(config: Config) -> Config:
    """Stage one over the held-out target data with every non-target token kept (k = |V|-1)."""
    study = copy.deepcopy(config)
    study.data = dataclasses.replace(config.data, path=config.eval.target_path, format="auto", on_bad_example="refuse",
                                     max_length=config.eval.max_length, max_examples=config.approx.examples)
    study.cache = CacheConfig(dir=str(Path(config.approx.output_dir) / "cache-full"), engine="hf",
                              k=model_vocab_size(config.model) - 1, encoding="topk_f32", dtype="float32",
                              rows_per_shard=64, batch_tokens=8192)
    return study


def student_dirs(config: Config) -> dict[str, Path]:
    """{name: run dir} of the fixed students; trains a missing sweep run (and only that)."""
    out, planned = Path(config.sweep.output_dir), {spec.name: spec for spec in plan_runs(config)}
    dirs = {}
    for name in config.approx.runs:
        path = Path(name) if Path(name).is_dir() else out / name
        if not (path / "adapter").is_dir():
            if name not in planned:
                raise FileNotFoundError(f"approx.runs: {name!r} is neither a trained run dir nor a run of this sweep "
                                        f"({config.sweep.output_dir}); train it or change approx.runs")
            run_train(run_config(config, planned[name], out), resume=True)
        dirs[name] = path
    return dirs


# --- the measurement --------------------------------------------------------------------------
def studied_methods() -> list[Method]:
    """The registered methods the study measures: those computed from the cache whose regularizer equals
    D or the unmasked KL at k = |V|-1 (the two exact references it computes)."""
    return [m for m in methods() if m.reads_cache and m.estimates in ("masked_kl", "full_kl")]


def estimator_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                   cached, ks: list[int], draws: int = 16, key: int = 0) -> dict:
    """Sums over the N positions of one batch: the exact D and full KL, and per k and estimator
    sum D_k, sum |D_k - D|, sum (D_k - D)^2, and the tail's lower-bound violations (count, largest excess).

    student_logits, teacher_logits [N, V]; targets [N]; cached: a CachedTeacher with k = |V|-1. An estimator
    that reads tail draws gets `draws` per position from the teacher's distribution outside each k
    (stages/teacher/tail_draws.py, keyed by `key` and the position's index in the batch).
    """
    exact = live_masked_kl(student_logits, teacher_logits, targets).double()
    lp, lq = F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)
    full = (lp.exp() * (lp - lq)).sum(-1).double()
    out = {"n": targets.numel(), "exact": exact.sum().item(), "exact_full_kl": full.sum().item(), "k": {}}
    for k in ks:
        part = CachedTeacher(cached.topk_ids[:, :k], cached.topk_logprobs[:, :k], cached.target_logprob)
        if any(m.needs_draws for m in studied_methods()):
            part.draw_ids, part.tail_entropy = tail_draws(lp, targets, part.topk_ids, torch.full_like(targets, key),
                                                          torch.arange(len(targets)), draws, 0)
        row = {}
        for method in studied_methods():
            estimator = method.name
            d_k = method.regularizer(student_logits, targets, part).double()
            reference = full if method.estimates == "full_kl" else exact
            row[estimator] = {"sum": d_k.sum().item(), "abs_gap_sum": (d_k - exact).abs().sum().item(),
                              "sq_gap_sum": (d_k - exact).square().sum().item(),
                              "own_abs_gap_sum": (d_k - reference).abs().sum().item()}
            if estimator == "tail":
                excess = d_k - exact
                row[estimator]["violations"] = int((excess > BOUND_TOL * (1 + exact)).sum())
                row[estimator]["max_excess"] = excess.max().item()
        out["k"][k] = row
    return out


def _merge(total: dict | None, part: dict) -> dict:
    if total is None:
        return part
    for key in ("n", "exact", "exact_full_kl"):
        total[key] += part[key]
    for k, row in part["k"].items():
        for estimator, values in row.items():
            into = total["k"][k][estimator]
            for name, value in values.items():
                into[name] = max(into[name], value) if name == "max_excess" else into[name] + value
    return total


@torch.no_grad()
def measure_student(config: Config, cache_dir: Path, adapter_dir: Path, ks: list[int]) -> dict:
    """Summed estimator statistics of one fixed student over the whole held-out cache."""
    from transformers import AutoModelForCausalLM

    from stages.student.adapters import load_adapter

    manifest = open_cache(cache_dir, config.model)
    dataset = load_cache_dataset(cache_dir, manifest)
    collate = CacheCollator(pad_token_id(config.model), manifest.settings.k, encoding=manifest.settings.encoding)
    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    model = load_adapter(base, adapter_dir).eval()
    total, size = None, config.approx.batch_size
    for start in tqdm(range(0, len(dataset), size), desc=f"approx {adapter_dir.parent.name}", unit="batch", leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
        mask = batch["labels"][:, 1:] != -100
        args = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        student = model(**args).logits[:, :-1][mask]
        with model.disable_adapter():
            teacher = model(**args).logits[:, :-1][mask]
        cached = CachedTeacher(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_target_logprob"])
        _check_cache_matches(teacher, batch["labels"][:, 1:][mask], cached)
        total = _merge(total, estimator_sums(student, teacher, batch["labels"][:, 1:][mask], cached, ks,
                                             config.approx.tail_draws, key=start))
    return total


def _measured(config: Config, cache_dir: Path, adapter_dir: Path, ks: list[int], out: Path) -> dict:
    """`measure_student`, reused from out/measured-<run>.json when adapter, cache and ks are unchanged
    (re-running the study after more sweep runs only redoes the cheap frontier part)."""
    key = {"adapter_sha256": files_sha256([adapter_dir / "adapter_model.safetensors"], with_names=False),
           "cache_token_ids_sha256": Manifest.load(cache_dir).token_ids_sha256, "ks": ks,
           "methods": [m.name for m in studied_methods()], "tail_draws": config.approx.tail_draws}
    path = out / f"measured-{adapter_dir.parent.name}.json"
    if path.exists() and (saved := json.loads(path.read_text())).get("key") == key:
        return {**saved["total"], "k": {int(k): v for k, v in saved["total"]["k"].items()}}
    total = measure_student(config, cache_dir, adapter_dir, ks)
    path.write_text(json.dumps({"key": key, "total": total}))
    return total


def _check_cache_matches(teacher_logits: torch.Tensor, targets: torch.Tensor, cached) -> None:
    """The cached target log-probs are the live teacher's (same model, float32): else the study is void."""
    live = F.log_softmax(teacher_logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    worst = (live - cached.target_logprob).abs().max().item()
    if worst > 1e-3:
        raise ValueError(f"the study cache disagrees with the live teacher (max |a_y| diff {worst:.2e}): rebuild it")


def gap_table(total: dict) -> list[dict]:
    """Per k and estimator: mean D_k, D_k/D - 1 (relative gap of the mean), mean |D_k - D| / mean D."""
    n, exact, full = total["n"], total["exact"], total["exact_full_kl"]
    rows = []
    for k, row in sorted(total["k"].items()):
        for estimator, v in row.items():
            reference = full if get_method(estimator).estimates == "full_kl" else exact
            rows.append({"k": k, "estimator": estimator, "limit": get_method(estimator).estimates, "mean_d_k": v["sum"] / n,
                         "rel_gap_vs_masked_d": v["sum"] / exact - 1, "mean_abs_gap_vs_masked_d": v["abs_gap_sum"] / exact,
                         "mean_gap_vs_masked_d": (v["sum"] - exact) / n, "rmse_vs_masked_d": math.sqrt(v["sq_gap_sum"] / n),
                         "rel_gap_vs_own_limit": v["sum"] / reference - 1, "mean_abs_gap_vs_own_limit": v["own_abs_gap_sum"] / reference,
                         **({"bound_violations": v["violations"], "max_excess": v["max_excess"]} if estimator == "tail" else {})})
    return rows


# --- tail vs live on the sweep's frontier ----------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def tail_vs_live(records: list[dict]) -> list[dict]:
    """Per lambda run by both (default k and variant): tail - live on each axis, against the seed noise.

    `within_noise` = |difference of the seed means| <= 2 standard errors of that difference
    (sqrt(s_tail^2/n_tail + s_live^2/n_live)); `paired` = the mean ± std of the per-seed differences
    (same seed: same init and batch order, so only the regularizer differs)."""
    def runs(method):
        return {(record_weight(r), r["seed"]): r for r in records if r["method"] == method and not r.get("k") and not r.get("variant")}

    tail, live = runs("tail"), runs("live")
    out = []
    for weight in sorted({w for w, _ in tail} & {w for w, _ in live}):
        seeds = sorted({s for w, s in tail if w == weight} & {s for w, s in live if w == weight})
        row = {"reg_weight": weight, "seeds": len(seeds)}
        for key in ("target_loss", "source_loss_increase"):
            (mt, st), (ml, sl) = _stats([tail[weight, s][key] for s in seeds]), _stats([live[weight, s][key] for s in seeds])
            se = math.sqrt((st ** 2 + sl ** 2) / max(len(seeds), 1))
            paired = _stats([tail[weight, s][key] - live[weight, s][key] for s in seeds])
            row[key] = {"tail": mt, "live": ml, "diff": mt - ml, "two_se": 2 * se, "within_noise": abs(mt - ml) <= 2 * se,
                        "paired_mean": paired[0], "paired_std": paired[1]}
        out.append(row)
    return out


# --- report -------------------------------------------------------------------------------------
def render_markdown(result: dict) -> str:
    lines = [f"Held-out target data: {result['positions']:,} positions of {result['examples']} sequences; "
             f"exact reference = live masked KL over all {result['vocab_size']} tokens (teacher = adapter disabled).", ""]
    for name, student in result["students"].items():
        lines += [f"### Student `{name}`: exact masked D = {student['mean_exact_d']:.4f}, "
                  f"unmasked KL = {student['mean_exact_full_kl']:.4f} nats/position", "",
                  "| k | estimator | mean D_k | D_k/D - 1 | mean D_k - D (nats) | RMSE of D_k - D (nats) | mean abs(D_k - D) / D "
                  "| vs own limit | tail bound violations |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in student["table"]:
            bound = f"{r['bound_violations']} (max excess {r['max_excess']:.1e})" if "bound_violations" in r else ""
            own = f"{r['rel_gap_vs_own_limit']:+.4f}" if r.get("limit") == "full_kl" else ""
            k = f"{r['k']} (= abs(V)-1)" if r["k"] == result["vocab_size"] - 1 else r["k"]
            lines.append(f"| {k} | {r['estimator']} | {r['mean_d_k']:.4f} | {r['rel_gap_vs_masked_d']:+.4f} | "
                         f"{r['mean_gap_vs_masked_d']:+.4f} | {r['rmse_vs_masked_d']:.4f} | "
                         f"{r['mean_abs_gap_vs_masked_d']:.4f} | {own} | {bound} |")
        lines.append("")
    lines += ["### Cached `tail` vs `live` on the sweep (seed means; within noise = abs(diff) <= 2 SE)", "",
              "| λ | seeds | target loss tail / live (diff, 2 SE) | forgetting tail / live (diff, 2 SE) | within noise |",
              "|---|---|---|---|---|"]
    for r in result["tail_vs_live"]:
        t, f = r["target_loss"], r["source_loss_increase"]
        lines.append(f"| {r['reg_weight']:g} | {r['seeds']} | {t['tail']:.4f} / {t['live']:.4f} ({t['diff']:+.4f}, {t['two_se']:.4f}) | "
                     f"{f['tail']:.4f} / {f['live']:.4f} ({f['diff']:+.4f}, {f['two_se']:.4f}) | "
                     f"{'yes' if t['within_noise'] and f['within_noise'] else 'no'} |")
    if not result["tail_vs_live"]:
        lines.append("| – | 0 | the sweep has no lambda run by both tail and live | | |")
    lines += ["", "### Every curve against the `tail` frontier (forgetting minus tail's, at the same target loss)", "",
              render_gaps(result["frontier_vs_tail"], "tail") if result["frontier_vs_tail"] else "(no other curve on a `tail` frontier)\n"]
    return "\n".join(lines)


def _against_tail(records: list[dict]) -> list[dict]:
    """frontier_gaps against tail, or [] when the sweep has no tail curve (nothing to place the points on)."""
    try:
        return frontier_gaps(records, "tail")
    except ValueError:
        return []


def run_approx_study(config: Config) -> dict:
    out = Path(config.approx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = full_cache_config(config)
    print(run_cache_teacher(study).render())
    vocab_minus_one = study.cache.k
    # the sweep's cache k (the default the runs train with) is always measured, and |V|-1 (exact)
    ks = sorted({k for k in [*config.approx.ks, config.cache.k] if k < vocab_minus_one} | {vocab_minus_one})
    students = {}
    for name, run_dir in student_dirs(config).items():
        total = _measured(config, Path(study.cache.dir), run_dir / "adapter", ks, out)
        students[name] = {"run_dir": str(run_dir), "mean_exact_d": total["exact"] / total["n"],
                          "mean_exact_full_kl": total["exact_full_kl"] / total["n"], "table": gap_table(total)}
    results_path = Path(config.sweep.output_dir) / "results.json"
    records = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    result = {"examples": config.approx.examples, "positions": total["n"], "vocab_size": vocab_minus_one + 1,
              "ks": ks, "students": students, "tail_vs_live": tail_vs_live(records),
              "frontier_vs_tail": _against_tail(records), "sweep_results": str(results_path)}
    (out / "approx_study.json").write_text(json.dumps(result, indent=2))
    (out / "approx_study.md").write_text(render_markdown(result))
    print(render_markdown(result))
    return result
