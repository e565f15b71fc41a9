"""Learning vs forgetting of one adapter (or the base model alone) on held-out text.

    python -m pipeline eval --run runs/demo/train        (or: make eval RUN=runs/demo/train)
    python -m pipeline eval --config configs/demo.yaml   (the base model alone)

Learning = loss / perplexity / next-token accuracy on held-out target data (`eval.target_path`).
Each set is read as stage one reads data: a chat set is scored on the assistant bodies only (the
positions stage one would train), a text set on every token.
Forgetting = the same on retention data (`eval.source_path`) relative to the base model, plus
output drift = mean KL(base || adapted) over the full vocabulary at every retention position.
Writes `eval.json` into the run directory and prints a table.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.inputs import DataConfig, load_rows, tokenize_rows
from stages.settings import StageConfig

__all__ = ["run_eval", "score_texts", "eval_data_config"]


def eval_data_config(path: str, config: StageConfig) -> DataConfig:
    """How an eval set is read: chat (assistant bodies scored) when its rows hold the chat field
    (data.messages_field, else "messages"), otherwise text (every token scored) from data.text_field
    (or the deprecated eval.text_field). The same tokenization and masks as stage one."""
    cfg = config.eval
    text = DataConfig(path=path, text_field=cfg.text_field or config.data.text_field, max_length=cfg.max_length,
                      max_examples=cfg.max_examples)
    chat_field = config.data.messages_field or "messages"
    columns = load_rows(text, check_field=False).column_names
    if chat_field in columns:
        return dataclasses.replace(text, messages_field=chat_field)
    if text.text_field not in columns:
        raise ValueError(f"eval set {path}: neither a chat column {chat_field!r} nor a text column "
                         f"{text.text_field!r} (columns: {columns})")
    return text


def _batches(path: str, tokenizer, config: StageConfig) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input_ids [B, T], attention_mask [B, T], scored [B, T-1] bool) batches of the eval set,
    right-padded; `scored` marks the positions stage one would train (all of a text row)."""
    data = eval_data_config(path, config)
    examples = tokenize_rows(load_rows(data), tokenizer, data)
    out, size = [], config.eval.batch_size
    for start in range(0, len(examples), size):
        group = examples[start:start + size]
        ids = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(e.input_ids).long() for e in group],
                                              batch_first=True, padding_value=0)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(e.input_ids), dtype=torch.long) for e in group],
                                               batch_first=True)
        scored = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(e.loss_mask) for e in group], batch_first=True)
        out.append((ids, mask, scored))
    return out


@torch.no_grad()
def score_texts(model, batches, with_drift: bool = False) -> dict[str, float]:
    """Mean NLL, perplexity and accuracy over the scored positions (`tokens` counts them); with a
    PeftModel and `with_drift`, also the mean KL(base || adapted) per scored position (base = the
    same model with its adapter disabled)."""
    nll = correct = count = drift = 0.0
    for ids, mask, scored in tqdm(batches, desc="eval", leave=False, unit="batch"):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        keep = scored.bool()
        logp, targets = F.log_softmax(logits[keep], -1), ids[:, 1:][keep]
        nll -= logp.gather(-1, targets[:, None]).sum().item()
        correct += (logp.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if with_drift:
            with model.disable_adapter():
                base = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[keep], -1)
            drift += (base.exp() * (base - logp)).sum().item()
    loss = nll / max(count, 1)
    metrics = {"loss": loss, "ppl": math.exp(loss), "accuracy": correct / max(count, 1), "tokens": int(count)}
    if with_drift:
        metrics["drift_kl"] = drift / max(count, 1)
    return metrics


def _load(config: StageConfig, adapter_dir: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval() if adapter_dir else model


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


def run_eval(config: StageConfig, run_dir: str | None = None, base_results: dict | None = None) -> dict:
    """Evaluate the base model (unless `base_results` already holds it, e.g. across a sweep) and,
    with `run_dir`, its adapter; writes run_dir/eval.json."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    sets = {name: _batches(path, tokenizer, config)
            for name, path in (("target", config.eval.target_path), ("source", config.eval.source_path))}
    if base_results is None:
        base = _load(config, None)
        base_results = {name: score_texts(base, b) for name, b in sets.items()}
    results = {"base": base_results}
    if run_dir:
        adapted = _load(config, Path(run_dir) / "adapter")
        results["adapted"] = {"target": score_texts(adapted, sets["target"]),
                              "source": score_texts(adapted, sets["source"], with_drift=True)}
        b, a = results["base"], results["adapted"]
        results["forgetting"] = {
            "source_loss_increase": a["source"]["loss"] - b["source"]["loss"],
            "source_ppl_ratio": a["source"]["ppl"] / b["source"]["ppl"],
            "target_loss_change": a["target"]["loss"] - b["target"]["loss"],
        }
        (Path(run_dir) / "eval.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    return results
