"""Is a target scenario in the learned regime, and how local is it? The figures the evidence study reports.

    python -m pipeline scenario-check --config configs/stubs.yaml --run runs/stubs/sweep/none-l0-s0

Reads the training data (`data.path`) and the held-out target set (`eval.target_path`), tokenized and
scored exactly as `eval` scores them (stages/eval/evaluate.py `eval_batches`), and reports:

- base_loss / adapted_loss: mean NLL (nats/token) of the base model and of the run's adapted model
  on the held-out scored positions (the run is optional);
- confident_share: the share of held-out scored positions where the adapted model's q_y > 0.9 while
  the base's p_y < 0.1, the positions where masking the target changes the regularizer most;
- trigram_loss: a token trigram model fitted on the training rows (interpolated Witten-Bell smoothing
  down to an add-one unigram; Chen & Goodman 1998, section 2.4) scoring the held-out scored
  positions: how far the target is predictable from the last two tokens alone;
- overlap_16gram: the share of held-out token 16-grams (within a row, BOS included) that occur in
  the training rows: how much of the held-out set is verbatim training text;
- the same losses per group, a group being the first word of a row (a template or generator).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path

import torch

from pipeline.config import Config

__all__ = ["TrigramModel", "ngram_overlap", "scenario_figures", "run_scenario_check", "render_scenario"]

CONFIDENT_Q, UNSURE_P = 0.9, 0.1


class TrigramModel:
    """Interpolated Witten-Bell trigram over token ids, fitted on whole sequences (each starting with BOS).

    p(w | u, v) = lam_uv c(u,v,w)/c(u,v) + (1 - lam_uv) p(w | v),  lam_uv = c(u,v) / (c(u,v) + T(u,v)),
    T = the number of distinct words seen after the context; likewise p(w | v) from the unigram
    p(w) = (c(w) + 1) / (N + V). Defined for every id below vocab_size.
    """

    def __init__(self, sequences: list[list[int]], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.uni: collections.Counter = collections.Counter()
        self.bi: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        self.tri: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
        for seq in sequences:
            for i in range(1, len(seq)):
                self.uni[seq[i]] += 1
                self.bi[seq[i - 1]][seq[i]] += 1
                if i >= 2:
                    self.tri[(seq[i - 2], seq[i - 1])][seq[i]] += 1
        self.total = sum(self.uni.values())

    @staticmethod
    def _mix(counts: collections.Counter | None, word: int, lower: float) -> float:
        if not counts:
            return lower
        n = sum(counts.values())
        lam = n / (n + len(counts))
        return lam * counts[word] / n + (1 - lam) * lower

    def logprob(self, context: list[int], word: int) -> float:
        """log p(word | the last two ids of context) in nats (context holds at least one id)."""
        p = (self.uni[word] + 1) / (self.total + self.vocab_size)
        p = self._mix(self.bi.get(context[-1]), word, p)
        if len(context) >= 2:
            p = self._mix(self.tri.get((context[-2], context[-1])), word, p)
        return math.log(p)


def ngram_overlap(train: list[list[int]], heldout: list[list[int]], n: int = 16) -> tuple[float, int]:
    """(share of the held-out n-grams found in the training sequences, number of held-out n-grams)."""
    seen = {tuple(seq[i:i + n]) for seq in train for i in range(len(seq) - n + 1)}
    grams = [tuple(seq[i:i + n]) for seq in heldout for i in range(len(seq) - n + 1)]
    return (sum(g in seen for g in grams) / len(grams) if grams else 0.0), len(grams)


def _rows(batches) -> list[tuple[list[int], list[int]]]:
    """(token ids, scored target positions) per example of eval batches (ids [B, T], mask, scored [B, T-1])."""
    out = []
    for ids, mask, scored in batches:
        for row_ids, row_mask, row_scored in zip(ids, mask, scored):
            length = int(row_mask.sum())
            out.append((row_ids[:length].tolist(), [t + 1 for t in row_scored[:length - 1].nonzero().flatten().tolist()]))
    return out


@torch.no_grad()
def _target_logprobs(model, batches) -> list[list[float]]:
    """Per example, the model's log-prob of each scored target (the order `_rows` lists them)."""
    out = []
    for ids, mask, scored in batches:
        logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        out += [row[keep.bool()].tolist() for row, keep in zip(picked, scored)]
    return out


def _group(tokenizer, ids: list[int]) -> str:
    """A row's first whitespace-separated word (its template or generator in a synthetic scenario)."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return text.split()[0] if text else ""


def scenario_figures(train_rows, heldout_rows, tokenizer, base_lp: list[list[float]],
                     adapted_lp: list[list[float]] | None) -> dict:
    """The figures of the module docstring from `_rows` of the training and held-out sets and the
    per-position log-probs of the base (and adapted) model on the held-out set."""
    trigram = TrigramModel([ids for ids, _ in train_rows], len(tokenizer))
    overlap, n_grams = ngram_overlap([ids for ids, _ in train_rows], [ids for ids, _ in heldout_rows])
    sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for k, (ids, targets) in enumerate(heldout_rows):
        group = _group(tokenizer, ids)
        for j, t in enumerate(targets):
            cells = {"positions": 1, "trigram": -trigram.logprob(ids[:t], ids[t]), "base": -base_lp[k][j]}
            if adapted_lp is not None:
                cells["adapted"] = -adapted_lp[k][j]
                cells["confident"] = float(math.exp(adapted_lp[k][j]) > CONFIDENT_Q and math.exp(base_lp[k][j]) < UNSURE_P)
            for key in (group, "all"):
                sums[key].update(cells)
    names = {"trigram": "trigram_loss", "base": "base_loss", "adapted": "adapted_loss", "confident": "confident_share"}
    table = {group: {names[key]: value / cells["positions"] for key, value in cells.items() if key in names}
             | {"positions": int(cells["positions"])} for group, cells in sums.items()}
    return {**table.pop("all"), "overlap_16gram": overlap, "heldout_16grams": n_grams, "uniform_loss": math.log(len(tokenizer)),
            "train_rows": len(train_rows), "heldout_rows": len(heldout_rows), "groups": table}


def run_scenario_check(config: Config, run: str | None = None, out: str | None = None) -> dict:
    """`python -m pipeline scenario-check`: the figures for config's training data and held-out target set
    (the base model, and with `run` the run's adapter); printed as a table, written as JSON to `out`."""
    from transformers import AutoTokenizer

    from stages.eval.evaluate import eval_batches, load_eval_model

    if not config.eval.target_path:
        raise ValueError("scenario-check: set eval.target_path, the held-out rows of the scenario")
    if not Path(config.eval.target_path).exists():
        raise FileNotFoundError(f"scenario-check: eval.target_path {config.eval.target_path!r} does not exist "
                                "(the held-out rows of the scenario; build-default writes the stubs scenario's)")
    if run and not (Path(run) / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"scenario-check: --run {run!r} holds no finished run (no adapter/adapter_config.json); "
                                "pass a run directory that `train` finished, or leave --run out for the base alone")
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    settings = config.eval
    train_batches, _ = eval_batches(config.data.path, tokenizer, config.data, _all_rows(settings))
    heldout_batches, about = eval_batches(settings.target_path, tokenizer, config.data, settings)
    base_lp = _target_logprobs(load_eval_model(config.model, None), heldout_batches)
    adapted_lp = _target_logprobs(load_eval_model(config.model, Path(run) / "adapter"), heldout_batches) if run else None
    figures = scenario_figures(_rows(train_batches), _rows(heldout_batches), tokenizer, base_lp, adapted_lp)
    figures.update(train=config.data.path, heldout=settings.target_path, model=config.model, run=run,
                   heldout_sha256=about["sha256"])
    if out:
        Path(out).write_text(json.dumps(figures, indent=2) + "\n")
    print(render_scenario(figures))
    return figures


def _all_rows(settings):
    return dataclasses.replace(settings, max_examples=0)  # the trigram and the 16-grams see all of train


def render_scenario(figures: dict) -> str:
    """A readable table of `scenario_figures` (overall first, then per group)."""
    adapted = "adapted_loss" in figures
    head = "| rows | positions | base loss | trigram loss |" + (" adapted loss | q_y>0.9 & p_y<0.1 |" if adapted else "")
    lines = [f"held-out {figures['heldout']} ({figures['heldout_rows']} rows) vs train {figures['train']} "
             f"({figures['train_rows']} rows); model {figures['model']}" + (f", run {figures['run']}" if figures.get("run") else ""),
             "", head, "|---|---|---|---|" + ("---|---|" if adapted else "")]
    for name, cells in [("all", figures), *sorted(figures["groups"].items())]:
        line = f"| {name} | {cells['positions']:,} | {cells['base_loss']:.3f} | {cells['trigram_loss']:.3f} |"
        if adapted:
            line += f" {cells['adapted_loss']:.3f} | {cells['confident_share']:.1%} |"
        lines.append(line)
    lines += ["", f"held-out 16-grams also in train: {figures['overlap_16gram']:.1%} of {figures['heldout_16grams']:,}"
                  f" (losses in nats/token; a uniform guess over the vocabulary: {figures['uniform_loss']:.3f}, which the"
                  " smoothed trigram can exceed on text unlike its training rows; groups: a row's first word)"]
    return "\n".join(lines)
