"""Forgetting the way practitioners measure it: EleutherAI's lm-evaluation-harness on the base model and
on the adapted one, side by side.

    python -m pipeline eval --run runs/demo/train --lm-eval mtcache_source_heldout
    python -m pipeline eval --run RUN --lm-eval wikitext,lambada_openai eval.lm_eval.limit=100

Both models run through the harness's `HFLM` with the same settings (`eval.lm_eval`, `HarnessConfig`):
the base as loaded, the adapted one as the base with the run's adapter merged in float32
(`stages.student.adapters.load_adapter` + `merge_and_unload`), so every adapter family the project
trains is measured the same way. Per task and metric the table gives base, adapted, the change, the
change in % and the change's paired standard error from per-document differences (the harness's
`log_samples`):

    a metric that is a mean of per-document values (acc, acc_norm, ...):  SE = std(d_i) / sqrt(n)
    a perplexity-like ratio, exp(-sum ll_i / sum w_i):                     SE ~= adapted * sqrt(n) std(d_i) / sum w_i
    bits_per_byte, -sum ll_i / (sum w_i ln 2):                             SE  = sqrt(n) std(d_i) / (sum w_i ln 2)

with d_i the per-document difference (adapted - base) of the value or of the log-likelihood ll_i
(w_i = words or bytes; the delta method for the exp). The base's results are computed once per key
(model weights, tasks and their files, harness version, settings) and kept in `eval.lm_eval.cache_dir`.

Offline: a task is either one of this project's local tasks (`LOCAL_TASKS_DIR` of the model's build,
e.g. `mtcache_source_heldout`, written by `build-default` from the held-out source prose; passed to the
harness as its config with a TaskManager of `include_defaults=False`, so the harness's own task folder
is not indexed) or a harness task whose data
must already be in the local `datasets` cache; a missing one is an error naming it and the command that
fetches it. Needs the extra `eval` (`pip install -e '.[eval]'`, which `make setup` installs).
"""
from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stages.eval.settings import HarnessConfig

__all__ = ["HarnessConfig", "LOCAL_TASK", "LOCAL_TASKS_DIR", "write_local_task", "harness_version", "run_harness",
           "compare_harness", "render_harness", "harness_eval", "total_nll",
           "first_token_context_matches", "check_harness"]

LOCAL_TASK = "mtcache_source_heldout"
LOCAL_TASKS_DIR = "lm_eval_tasks"   # beside the model: <build>/lm_eval_tasks/<task>.yaml + .jsonl


def _require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError("eval --lm-eval needs EleutherAI's lm-evaluation-harness: pip install -e '.[eval]' "
                          "(the extra `eval`; make setup installs it)") from err


def harness_version() -> str:
    _require_harness()
    import lm_eval

    return lm_eval.__version__


# --- the local task ---------------------------------------------------------------------------------
def write_local_task(task_dir: str | Path, texts_path: str | Path, tokenizer_dir: str | Path, max_length: int,
                     name: str = LOCAL_TASK) -> Path:
    """Write a perplexity task `name` (loglikelihood_rolling over a "text" column) into `task_dir`: the texts
    of the JSON Lines file `texts_path` whose tokens (with the tokenizer's special tokens, as `eval` reads
    them) fit `max_length`, so the harness scores each in one window exactly as `eval` does. Idempotent:
    files are rewritten only when their content would change. Returns the YAML's path."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [json.loads(line)["text"] for line in Path(texts_path).read_text().splitlines() if line.strip()]
    kept = [t for t in texts if t.strip() and len(tokenizer(t)["input_ids"]) <= max_length]
    if not kept:
        raise ValueError(f"{texts_path}: no text fits {max_length} tokens; nothing to write for the harness task {name}")
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    yaml_text = (f"# Written by stages/eval/harness.py write_local_task from {Path(texts_path).name}: {len(kept)} of {len(texts)} texts\n"
                 f"# (those of at most {max_length} tokens). Loaded with include_defaults=False.\n"
                 f"# data_files is relative to this file (run_harness resolves it): the build can move.\n"
                 f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.name}\n"
                 "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                 "metric_list:\n"
                 "  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
                 "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
                 "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
                 "metadata:\n  version: 1.0\n")
    _write_if_changed(data, "".join(json.dumps({"text": t}) + "\n" for t in kept))
    yaml_path = task_dir / f"{name}.yaml"
    _write_if_changed(yaml_path, yaml_text)
    return yaml_path


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# --- running the harness ------------------------------------------------------------------------------
def _local_tasks(model_dir: str | Path) -> dict[str, Path]:
    """{task name (its YAML's `task:`): YAML path} of the local tasks beside the model. ValueError naming a YAML
    that is not a mapping with a `task:` name, or two YAMLs of one name."""
    import yaml

    folder = Path(model_dir).parent / LOCAL_TASKS_DIR
    found: dict[str, Path] = {}
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix or remove it") from err
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise ValueError(f"{path}: a local lm-eval task needs a `task: NAME` line (the name --lm-eval uses)")
        if config["task"] in found:
            raise ValueError(f"{path} and {found[config['task']]}: both name the task {config['task']!r}; rename one")
        found[config["task"]] = path
    return found


def _resolve_data_files(files, folder: Path):
    """dataset_kwargs.data_files in any of datasets' forms (a path, a list, {split: path or list}), each relative
    path taken beside the task's YAML."""
    if isinstance(files, dict):
        return {split: _resolve_data_files(value, folder) for split, value in files.items()}
    if isinstance(files, list):
        return [_resolve_data_files(value, folder) for value in files]
    return str(folder / files) if isinstance(files, str) and not Path(files).is_absolute() else files


def _tasks_and_manager(tasks: list[str], model_dir: str | Path) -> tuple[list, Any]:
    """(the tasks as simple_evaluate takes them, the harness's TaskManager). A local task is passed as its
    config (the YAML beside the model, its data file resolved next to it); the harness's own folder,
    thousands of YAML files, is indexed only when a task is not local. ValueError naming an unknown task."""
    import yaml
    from lm_eval.tasks import TaskManager

    local = _local_tasks(model_dir)
    resolved: list = []
    for t in tasks:
        if t in local:
            config = yaml.safe_load(local[t].read_text())
            kwargs = config.get("dataset_kwargs") or {}
            if "data_files" in kwargs:
                kwargs["data_files"] = _resolve_data_files(kwargs["data_files"], local[t].parent)
            resolved.append(config)
        else:
            resolved.append(t)
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in resolved))
    unknown = [t for t in resolved if isinstance(t, str) and t not in manager.all_tasks]
    if unknown:
        hint = f"; local tasks beside the model: {sorted(local)}" if local else ""
        raise ValueError(f"eval.lm_eval.tasks: {unknown} unknown to lm-evaluation-harness {harness_version()}{hint} "
                         "(`lm-eval ls tasks` lists the harness's)")
    return resolved, manager


def _task_files_sha(tasks: list[str], model_dir: str | Path) -> dict[str, str]:
    """sha256 of each local task's YAML and data (what a cached base result was computed on)."""
    local = _local_tasks(model_dir)
    out = {}
    for t in tasks:
        if t in local:
            digest = hashlib.sha256(local[t].read_bytes())
            data = local[t].with_suffix(".jsonl")
            if data.exists():
                digest.update(data.read_bytes())
            out[t] = digest.hexdigest()
    return out


def run_harness(model, tokenizer, settings: HarnessConfig, model_dir: str | Path, max_length: int) -> dict[str, Any]:
    """The harness on `model` (a transformers PreTrainedModel): {"results": {task: {metric: value}},
    "samples": {task: {doc_id: {metric: per-document value}}}, "versions": {task: version}, "n": {task: docs}}.
    A task whose dataset is not in the local cache: ValueError naming it and how to fetch it."""
    _require_harness()
    import logging

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # "pretrained is not a str" and the like: expected here
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device=device, dtype=getattr(torch, settings.dtype)).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, max_length=settings.max_length or max_length,
              add_bos_token=settings.add_bos_token)
    tasks, manager = _tasks_and_manager(settings.tasks, model_dir)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=None if settings.num_fewshot < 0 else settings.num_fewshot,
                              limit=settings.limit or None, log_samples=True, bootstrap_iters=0, task_manager=manager,
                              apply_chat_template=settings.apply_chat_template, verbosity="ERROR")
    except (ConnectionError, OSError) as err:  # datasets offline: "Couldn't reach ..." / "not found in cache"
        raise ValueError(f"eval.lm_eval.tasks {settings.tasks}: a task's dataset is not in the local datasets cache and this "
                         f"machine is offline ({type(err).__name__}: {str(err).splitlines()[0]}); fetch it once where there is a "
                         f"network: python -c \"from lm_eval.tasks import TaskManager, get_task_dict; "
                         f"get_task_dict({settings.tasks!r}, TaskManager())\"") from err
    results = {t: {k.split(",")[0]: v for k, v in r.items() if "," in k and not k.split(",")[0].endswith("_stderr")}
               for t, r in out["results"].items() if t in settings.tasks}
    # doc ids as strings: a base result read back from its JSON file pairs with a fresh adapted one
    samples = {t: {str(s["doc_id"]): {m: _plain(s[m]) for m in results[t] if m in s} for s in out["samples"][t]}
               for t in settings.tasks}
    return {"results": results, "samples": samples, "versions": {t: out["versions"].get(t) for t in settings.tasks},
            "n": {t: len(samples[t]) for t in settings.tasks}}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def base_key(settings: HarnessConfig, model_dir: str | Path, max_length: int) -> str:
    from storage_schemas.fingerprints import teacher_fingerprint

    teacher = teacher_fingerprint(model_dir)
    parts = {"weights": teacher.weights_sha256, "config": teacher.config_sha256, "tasks": sorted(settings.tasks),
             "task_files": _task_files_sha(settings.tasks, model_dir), "harness": harness_version(),
             "settings": {k: v for k, v in asdict(settings).items() if k not in ("tasks", "cache_dir", "batch_size", "device")},
             "max_length": settings.max_length or max_length}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --- comparing base and adapted -------------------------------------------------------------------------
def _paired_se(metric: str, base: dict, adapted: dict, adapted_value: float) -> float | None:
    """The change's paired standard error from per-document values (module docstring); None below 2 docs."""
    ids = sorted(set(base) & set(adapted))
    if len(ids) < 2:
        return None
    first = adapted[ids[0]][metric]
    if isinstance(first, list):  # (log-likelihood, words or bytes)
        d = [adapted[i][metric][0] - base[i][metric][0] for i in ids]
        weight = sum(adapted[i][metric][1] for i in ids)
        spread = math.sqrt(len(ids)) * statistics.stdev(d) / weight
        return adapted_value * spread if metric.endswith("perplexity") else spread / math.log(2)
    d = [float(adapted[i][metric]) - float(base[i][metric]) for i in ids]
    return statistics.stdev(d) / math.sqrt(len(ids))


def compare_harness(base: dict, adapted: dict) -> list[dict]:
    """One row per task and metric: base, adapted, change, change_pct, change_se (paired), docs."""
    rows = []
    for task, metrics in adapted["results"].items():
        for metric, value in metrics.items():
            b = base["results"][task][metric]
            se = _paired_se(metric, base["samples"][task], adapted["samples"][task], value) if metric in next(
                iter(adapted["samples"][task].values()), {}) else None
            rows.append({"task": task, "metric": metric, "base": b, "adapted": value, "change": value - b,
                         "change_pct": 100 * (value - b) / b if b else None, "change_se": se, "docs": adapted["n"][task]})
    return rows


def total_nll(harness: dict, task: str) -> float:
    """-sum of the per-document log-likelihoods of a perplexity task (nats)."""
    return -sum(s[next(m for m in s if isinstance(s[m], list))][0] for s in harness["samples"][task].values())


def _num(value: float, sign: str = "") -> str:
    """10 characters: fixed point, or scientific where fixed would not fit (perplexities of random models)."""
    return f"{value:{sign}10.4f}" if abs(value) < 1e5 else f"{value:{sign}10.3e}"


def render_harness(rows: list[dict], version: str) -> str:
    lines = [f"lm-evaluation-harness {version}: base vs adapted (change ± paired SE over documents)",
             f"{'task':28s} {'metric':18s} {'base':>10s} {'adapted':>10s} {'change':>10s} {'change %':>9s} {'± SE':>9s} {'docs':>6s}"]
    for r in rows:
        pct = f"{r['change_pct']:+8.2f}%" if r["change_pct"] is not None else f"{'-':>9s}"
        se = f"{r['change_se']:9.4f}" if r["change_se"] is not None else f"{'-':>9s}"
        lines.append(f"{r['task']:28s} {r['metric']:18s} {_num(r['base'])} {_num(r['adapted'])} {_num(r['change'], '+')} {pct} {se} "
                     f"{r['docs']:6d}")
    return "\n".join(lines)


def harness_eval(config, run_dir: str | Path | None) -> dict[str, Any]:
    """eval's harness part (`config.eval.lm_eval`, a StageConfig's): the base model's results (from the
    store when this key was computed before) and, with `run_dir`, the adapted model's and the comparison;
    prints the table. Returns eval.json's "lm_eval" entry."""
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, max_length = config.eval.lm_eval, config.eval.max_length
    version = harness_version()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    key = base_key(settings, config.model, max_length)
    anchor = Path(run_dir) if run_dir else Path(config.train.output_dir)
    store = Path(settings.cache_dir) if settings.cache_dir else anchor.resolve().parent / "lm_eval_base"
    path = store / f"{key[:24]}.json"
    stored = json.loads(path.read_text()) if path.is_file() else None
    reused = bool(stored and stored.get("key") == key)
    if reused:
        base = stored["base"]
    else:
        base = run_harness(AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32), tokenizer, settings,
                           config.model, max_length)
        store.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "harness": version, "base": base}))
        tmp.replace(path)
    same_context = first_token_context_matches(tokenizer) and not settings.add_bos_token
    if not same_context and any(_is_rolling(base, t) for t in settings.tasks):
        print("lm-eval: `eval` and the harness score a text's first token after different contexts (this tokenizer adds no "
              "BOS, or eval.lm_eval.add_bos_token is set): their totals do not cover the same tokens")
    out = {"harness_version": version, "task_versions": base["versions"], "settings": asdict(settings), "base": base["results"],
           "base_from": str(path), "base_reused": reused, "same_first_token_context": same_context,
           "base_total_nll": {t: total_nll(base, t) for t in settings.tasks if _is_rolling(base, t)}}
    if run_dir is None:
        print(f"lm-evaluation-harness {version}, base model: " + json.dumps(base["results"]))
        return out
    from stages.student.adapters import load_adapter

    merged = load_adapter(AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32),
                          Path(run_dir) / "adapter").merge_and_unload()
    adapted = run_harness(merged, tokenizer, settings, config.model, max_length)
    rows = compare_harness(base, adapted)
    out.update(adapted=adapted["results"], rows=rows,
               adapted_total_nll={t: total_nll(adapted, t) for t in settings.tasks if _is_rolling(adapted, t)})
    print(render_harness(rows, version) + ("   (base: reused " + str(path) + ")" if reused else ""))
    return out


def first_token_context_matches(tokenizer) -> bool:
    """Whether eval and the harness score a text's tokens after the same context: eval reads a text as the
    tokenizer encodes it (its special tokens included) and scores every token after the first; the harness
    encodes the text without special tokens and scores every token after its prefix token (the BOS, else the
    EOS; HFLM.prefix_token_id). The same when the tokenizer's encoding starts with exactly that token."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    with_special = tokenizer("a b")["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    return with_special == [prefix, *without]


def check_harness(config) -> None:
    """Before any model is evaluated: the extra installed, every task known, and a chat template when
    eval.lm_eval.apply_chat_template asks for one. ImportError / ValueError naming the key."""
    from transformers import AutoTokenizer

    settings = config.eval.lm_eval
    harness_version()
    _tasks_and_manager(settings.tasks, config.model)
    if settings.apply_chat_template and not AutoTokenizer.from_pretrained(config.model).chat_template:
        raise ValueError(f"eval.lm_eval.apply_chat_template: {config.model}'s tokenizer has no chat template; "
                         "set eval.lm_eval.apply_chat_template=false")


def _is_rolling(harness: dict, task: str) -> bool:
    first = next(iter(harness["samples"][task].values()), {})
    return any(isinstance(v, list) for v in first.values())

