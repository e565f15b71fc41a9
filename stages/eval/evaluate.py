"""Learning vs forgetting of one adapter (or the base model alone) on held-out text.

    python -m pipeline eval --run runs/demo/train        (or: make eval RUN=runs/demo/train)
    python -m pipeline eval --config configs/demo.yaml   (the base model alone)

Learning = loss / perplexity / next-token accuracy on held-out target data (`eval.target_path`).
Each set is read as stage one reads data: a chat set is scored on the assistant bodies only (the
positions stage one would train), a text set on every token.
Forgetting = the same on retention data (`eval.source_path`) relative to the base model, plus
output drift = mean KL(base || adapted) over the full vocabulary at every retention position.
Writes `eval.json` into the run directory and prints a table; with `train.report_to: tensorboard` (the
run's config) the same figures go to <run>/tensorboard as eval/<base|adapted|forgetting>/... scalars.

Memory (`eval.chunked: true`, the default): the model is called with no logits projected
(`stages.student.lm_head.final_hidden_state`, the fused loss's machinery) and the output head is
applied to the scored rows in chunks, so no [B, T, V] tensor exists: all [rows, V] float32 buffers
alive at once (adapted log-probs, base logits, base log-probs) stay within EVAL_CHUNK_BYTES
(256 MiB), whatever B x T. A head with a transform after hidden @ W.T (softcap, logit scale) or a
LoRA-wrapped lm_head cannot be split that way: eval then scores from full logits, saying so once.
`eval.chunked: false` forces the full-logits path (kept to measure against, `make bench`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.common.stage_config import StageConfig
from stages.common.tensorboard_log import log_scalars, reports_to_tensorboard, tensorboard_dir
from stages.data.inputs import (
    DataConfig,
    InputReport,
    heldout_ids,
    is_saved_dataset,
    load_rows,
    resolved_split,
    source_files,
    tokenize_rows,
)
from stages.eval.settings import EvalConfig
from stages.student.lm_head import final_hidden_state, output_head
from storage_schemas.fingerprints import files_sha256

__all__ = ["run_eval", "score_texts", "eval_scalars", "log_eval_scalars", "eval_data_config", "eval_chunk_rows", "EVAL_CHUNK_BYTES",
           "eval_batches", "load_eval_model"]

EVAL_CHUNK_BYTES = 256 * 2**20  # all [rows, V] float32 buffers of one chunk together
_CHUNK_BUFFERS = 3              # alive at once at the peak: adapted log-probs, base logits, base log-probs
_said: set[str] = set()


def eval_data_config(path: str, data: DataConfig, settings: EvalConfig, split: str = "") -> DataConfig:
    """How an eval set is read: as stage one reads data (the same column names, chat settings,
    tokenization and masks), its format picked from its own columns (`data.format` is the training
    set's: a retention set of text beside chat training data is text). `settings` gives the
    length and example caps; `split` the split of a dataset folder ("" = its only one). ValueError
    naming the set when no format fits."""
    split = split if is_saved_dataset(path) else ""  # a data file has one split; eval.*split names a folder's
    config = dataclasses.replace(data, path=path, format="auto", split=split, max_length=settings.max_length,
                                 max_examples=settings.max_examples, on_bad_example="refuse")
    load_rows(config)  # the format check, naming the set
    return config


def eval_batches(path: str, tokenizer, data: DataConfig, settings: EvalConfig,
             only: list[int] | None = None, split: str = "") -> tuple[list[tuple[torch.Tensor, ...]], dict]:
    """(input_ids [B, T], attention_mask [B, T], scored [B, T-1] bool) batches of the eval set,
    right-padded (`scored` marks the positions stage one would train: all of a text row), and what
    the set is: {path, split, format, examples, scored_tokens, sha256} (eval.json "sets"). `only`:
    the example ids to read (the training data's held-out slice, read as stage one reads it)."""
    if only is None:
        data = eval_data_config(path, data, settings, split)
        rows = load_rows(data)
    else:
        data = dataclasses.replace(data, max_length=settings.max_length, on_bad_example="refuse")
        rows = load_rows(data)
        rows = rows.select(only[:settings.max_examples] if settings.max_examples else only)
    report = InputReport()
    examples = tokenize_rows(rows, tokenizer, data, report=report)
    if not examples:
        raise ValueError(f"eval set {path}: no example to score")
    about = {"path": path, "heldout_fraction": data.heldout_fraction if only is not None else 0.0,
             "split": resolved_split(data), "format": report.format.kind,
             "examples": len(examples), "scored_tokens": int(sum(e.loss_mask.sum() for e in examples)),
             "sha256": files_sha256(source_files(data.path))}
    out, size = [], settings.batch_size
    for start in range(0, len(examples), size):
        group = examples[start:start + size]
        ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(e.input_ids).long() for e in group],
                                              batch_first=True, padding_value=0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in group],
                                               batch_first=True)
        scored = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(e.loss_mask) for e in group], batch_first=True)
        out.append((ids, mask, scored))
    return out, about


def eval_chunk_rows(vocab_size: int, budget_bytes: int = EVAL_CHUNK_BYTES) -> int:
    """Scored rows per chunk: the chunk's float32 [rows, V] buffers alive at once (three, with drift)
    fit in `budget_bytes` (256 MiB: 147 rows at V = 151,936, 10,922 at V = 2,048; at least 1)."""
    return max(1, budget_bytes // (_CHUNK_BUFFERS * 4 * max(vocab_size, 1)))


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, flush=True)


def _unchunked_reason(err: ValueError) -> str:
    return re.sub(r"^train\.fused_loss: |; set train\.fused_loss=false$", "", str(err))


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The plain linear output head (weight, bias) eval can apply to row chunks, or None (said once)."""
    try:
        return output_head(model)
    except ValueError as err:
        _say_once(f"eval: scoring from full [B, T, V] logits (unchunked): {_unchunked_reason(err)}")
        return None


def _full_sums(model, ids, mask, keep, targets, with_drift: bool) -> tuple[float, float, float]:
    """(summed NLL, correct argmaxes, summed KL(base || adapted)) from the full logits: the reference path."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = F.log_softmax(logits[keep], -1)
    nll = -logp.gather(-1, targets[:, None]).sum().item()
    correct = (logp.argmax(-1) == targets).sum().item()
    drift = 0.0
    if with_drift:
        with model.disable_adapter():
            base = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[keep], -1)
        drift = (base.exp() * (base - logp)).sum().item()
    return nll, correct, drift


def _chunked_sums(model, head, ids, mask, keep, targets, with_drift: bool, rows: int) -> tuple[float, float, float] | None:
    """The same sums from the last hidden state, the head applied to `rows` scored rows at a time (in
    the head's dtype, as the lm_head would, then float32); None when the model ignored logits_to_keep."""
    weight, bias = head
    try:
        hidden = final_hidden_state(model, model, ids, mask)[0][:, :-1][keep]
        base = None
        if with_drift:
            with model.disable_adapter():
                base = final_hidden_state(model, model, ids, mask)[0][:, :-1][keep]
    except ValueError as err:
        _say_once(f"eval: scoring from full [B, T, V] logits (unchunked): {_unchunked_reason(err)}")
        return None
    nll = correct = drift = 0.0
    for start in range(0, len(targets), rows):
        part, y = slice(start, start + rows), targets[start:start + rows]
        logp = F.log_softmax(F.linear(hidden[part], weight, bias).float(), -1)
        nll -= logp.gather(-1, y[:, None]).sum().item()
        correct += (logp.argmax(-1) == y).sum().item()
        if base is not None:
            base_logp = F.log_softmax(F.linear(base[part], weight, bias).float(), -1)
            diff = logp.neg_().add_(base_logp)  # base - adapted, in place of the adapted log-probs
            drift += base_logp.exp_().mul_(diff).sum().item()
            del base_logp, diff
        del logp  # before the next chunk's buffers: at most _CHUNK_BUFFERS alive at once
    return nll, correct, drift


@torch.no_grad()
def score_texts(model, batches, with_drift: bool = False, chunked: bool = True,
                chunk_bytes: int = EVAL_CHUNK_BYTES) -> dict[str, float]:
    """Mean NLL, perplexity and accuracy over the scored positions (`tokens` counts them); with a
    PeftModel and `with_drift`, also the mean KL(base || adapted) per scored position (base = the
    same model with its adapter disabled). `chunked` (eval.chunked): from the last hidden state in
    row chunks of `chunk_bytes` (module docstring), else (or where the head cannot be split) from
    full [B, T, V] logits; the same numbers within float32 rounding."""
    nll = correct = count = drift = 0.0
    head = _head(model) if chunked else None
    rows = eval_chunk_rows(head[0].shape[0], chunk_bytes) if head is not None else 0
    for ids, mask, scored in tqdm(batches, desc="eval", leave=False, unit="batch"):
        keep = scored.bool()
        targets = ids[:, 1:][keep]
        sums = _chunked_sums(model, head, ids, mask, keep, targets, with_drift, rows) if head is not None else None
        if sums is None:
            head = None
            sums = _full_sums(model, ids, mask, keep, targets, with_drift)
        nll += sums[0]
        correct += sums[1]
        drift += sums[2]
        count += targets.numel()
    loss = nll / max(count, 1)
    metrics = {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / max(count, 1), "tokens": int(count)}
    if with_drift:
        metrics["drift_kl"] = drift / max(count, 1)
    return metrics


def load_eval_model(model_dir: str, adapter_dir: Path | None = None):
    """The base model in float32, eval mode; with `adapter_dir`, the run's adapter loaded on it."""
    from transformers import AutoModelForCausalLM

    from stages.student.adapters import load_adapter  # stock peft, or SineLoRA's layer registered first

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return load_adapter(model, adapter_dir).eval() if adapter_dir else model


_ROLE = {"target": "learning: held-out data of the trained task", "source": "forgetting: the retention set"}


def _set_line(name: str, about: dict) -> str:
    held = f" (held out of the cache: data.heldout_fraction={about['heldout_fraction']:g})" if about.get("heldout_fraction") else ""
    return (f"{name} ({_ROLE[name]}): {about['path']}{held} [split {about['split']}, {about['format']}] "
            f"{about['examples']:,} examples, {about['scored_tokens']:,} scored tokens")


def _heldout_target(config: StageConfig) -> list[int] | None:
    """The example ids of the training data stage one kept out (data.heldout_fraction) when they are
    the target set: eval.target_path not set. From the cache's manifest when there is one (exact,
    skipped ids excepted), else chosen again by the same rule."""
    if config.eval.target_path != EvalConfig().target_path or not config.data.heldout_fraction:
        return None
    manifest = Path(config.cache.dir) / "manifest.json"
    if manifest.exists():
        from storage_schemas import Manifest

        dataset = Manifest.load(config.cache.dir).dataset
        if dataset.heldout_fraction != config.data.heldout_fraction or not dataset.heldout_examples:
            raise ValueError(f"data.heldout_fraction={config.data.heldout_fraction:g}, but the cache {config.cache.dir} was made "
                             f"with data.heldout_fraction={dataset.heldout_fraction:g} ({len(dataset.heldout_examples)} examples "
                             "held out): set eval.target_path, or re-run stage one with this data.heldout_fraction")
        return dataset.heldout_examples
    return heldout_ids(range(len(load_rows(config.data))), config.data.heldout_fraction)


def check_eval_sets(config: StageConfig) -> None:
    """ValueError when an eval path is left at its default, the embedded demo's held-out sets, for a
    model other than the embedded one: those sets would score the wrong data without a word (a
    target set of the training data's held-out slice, data.heldout_fraction, is not a default)."""
    defaults, embedded = EvalConfig(), next(f.default for f in dataclasses.fields(StageConfig) if f.name == "model")
    keys = ("source_path",) if config.data.heldout_fraction else ("target_path", "source_path")
    unset = [key for key in keys if Path(getattr(config.eval, key)).resolve() == Path(getattr(defaults, key)).resolve()]
    if unset and Path(config.model).resolve() != Path(embedded).resolve():
        what = {"target_path": "eval.target_path (held-out data of the task you train: learning; or data.heldout_fraction, "
                               "keeping a slice of the training data out of the cache)",
                "source_path": "eval.source_path (data the model must not forget: forgetting)"}
        raise ValueError(f"{' and '.join(f'eval.{key}' for key in unset)} not set: the default is the embedded demo's held-out "
                         f"set, which says nothing about {config.model}; set " + " and ".join(what[key] for key in unset))


def _table(results: dict) -> str:
    lines = [f"{'':10s} {'target loss':>12s} {'target ppl':>11s} {'target acc':>11s} "
             f"{'source loss':>12s} {'source ppl':>11s} {'drift KL':>9s}"]
    for name, r in results.items():
        if name in ("base", "adapted"):
            drift = f"{r['source']['drift_kl']:9.4f}" if "drift_kl" in r["source"] else f"{'-':>9s}"
            lines.append(f"{name:10s} {r['target']['loss']:12.4f} {r['target']['ppl']:11.2f} {r['target']['accuracy']:11.4f} "
                         f"{r['source']['loss']:12.4f} {r['source']['ppl']:11.2f} {drift}")
    base = results["base"]
    lines.append(f"scored positions: target {base['target']['tokens']:,}, source {base['source']['tokens']:,} "
                 "(a chat set: its assistant bodies; a text set: every token)")
    if "forgetting" in results:
        f = results["forgetting"]
        lines.append(f"forgetting: source loss {f['source_loss_increase']:+.4f} nats (ppl x{f['source_ppl_ratio']:.3f}); "
                     f"learning: target loss {f['target_loss_change']:+.4f} nats")
    return "\n".join(lines)


def eval_scalars(results: dict) -> dict[str, float]:
    """eval.json's figures as TensorBoard tags: eval/<model>/<set>_<figure> and eval/forgetting/<figure>."""
    out = {f"eval/{name}/{part}_{key}": value for name in ("base", "adapted") if name in results
           for part, figures in results[name].items() for key, value in figures.items()}
    out.update({f"eval/forgetting/{key}": value for key, value in results.get("forgetting", {}).items()})
    for r in results.get("lm_eval", {}).get("rows", []):  # eval/lm_eval/<task>/<metric>_<base|adapted|change>
        out.update({f"eval/lm_eval/{r['task']}/{r['metric']}_{part}": r[part] for part in ("base", "adapted", "change")})
    return out


def log_eval_scalars(results: dict, run_dir: str | Path) -> None:
    """Write `eval_scalars(results)` into <run_dir>/tensorboard at the run's last training step (metrics.json)."""
    metrics = Path(run_dir) / "metrics.json"
    step = json.loads(metrics.read_text()).get("steps", 0) if metrics.exists() else 0
    log_scalars(tensorboard_dir(run_dir), eval_scalars(results), step)


def run_eval(config: StageConfig, run_dir: str | None = None, base_results: dict | None = None) -> dict:
    """Evaluate the base model (unless `base_results` already holds it, e.g. across a sweep) and,
    with `run_dir`, its adapter; writes run_dir/eval.json, and its figures into run_dir/tensorboard
    under eval/ when the run's train.report_to includes tensorboard."""
    from transformers import AutoTokenizer

    check_eval_sets(config)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    heldout = _heldout_target(config)
    read = {"target": eval_batches(config.data.path, tokenizer, config.data, config.eval, only=heldout) if heldout is not None
            else eval_batches(config.eval.target_path, tokenizer, config.data, config.eval,
                          split=config.eval.target_split or config.eval.split),
            "source": eval_batches(config.eval.source_path, tokenizer, config.data, config.eval,
                               split=config.eval.source_split or config.eval.split)}
    sets, about = {name: b for name, (b, _) in read.items()}, {name: a for name, (_, a) in read.items()}
    print("\n".join(_set_line(name, a) for name, a in about.items()))
    if base_results is None:
        base = load_eval_model(config.model, None)
        base_results = {name: score_texts(base, b, chunked=config.eval.chunked) for name, b in sets.items()}
    results = {"sets": about, "base": base_results}
    if run_dir:
        adapted = load_eval_model(config.model, Path(run_dir) / "adapter")
        results["adapted"] = {"target": score_texts(adapted, sets["target"], chunked=config.eval.chunked),
                              "source": score_texts(adapted, sets["source"], with_drift=True, chunked=config.eval.chunked)}
        b, a = results["base"], results["adapted"]
        results["forgetting"] = {
            "source_loss_increase": a["source"]["loss"] - b["source"]["loss"],
            "source_ppl_ratio": a["source"]["ppl"] / b["source"]["ppl"],
            "target_loss_change": a["target"]["loss"] - b["target"]["loss"],
        }
    print(_table(results))
    if config.eval.lm_eval.tasks:
        from stages.eval.harness import harness_eval

        results["lm_eval"] = harness_eval(config, run_dir)
    if run_dir:
        (Path(run_dir) / "eval.json").write_text(json.dumps(results, indent=2))
        if reports_to_tensorboard(config.train.report_to):
            log_eval_scalars(results, run_dir)
    return results
