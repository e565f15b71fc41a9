"""Step cost of lalora's weight penalty per curvature form: `none` vs `lalora diag|kfac|tri_kfac`, same batch.

    python -m pipeline bench-penalty                         # both shapes (demo, large), CPU
    python -m pipeline bench-penalty --shape large --steps 7 --warmup 2

One optimizer step = forward + CE + reg_weight * R(theta) + backward + AdamW on the LoRA weights (R
added once per step, as `CacheLossMixin.compute_loss` does; `none`: CE only, no R). The rows run on
one model, one batch and one optimizer, interleaved round by round (the order rotating each round),
`steps` rounds after `warmup`: median and min-max step time, ratios of medians to `lalora diag` and
to `none`. Second figure: "penalty alone", R forward + backward without the model (the curvature
quadratic: stages/student/weight_penalties.py, stages/student/curvature.py), timed in the same rounds.

The curvatures are estimated once before timing (`estimate_curvature`, floored as `lalora_penalty`
does, `fisher_floor` 0.1) from FISHER_SEQUENCES random sequences at the student's weights after
lora_B is set to small random values (N(0, LORA_B_STD), seeded): with peft's B = 0 init every lora_A
block of the Fisher would be exactly zero. The anchor of every penalty is that point. Shapes:
pipeline/bench/settings.py PENALTY_SHAPES (demo: the tiny Llama of `bench-step`; large: hidden 1024).
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from pipeline.bench.interleave import rotated
from pipeline.bench.models import build_random_llama
from pipeline.bench.settings import PENALTY_SHAPES, PenaltyShape
from stages.student.adapters import make_student
from stages.student.curvature import estimate_curvature
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.student.settings import LoraSettings
from stages.student.weight_penalties import CurvaturePenalty, WeightPenalty, penalty_from_curvature

__all__ = ["ROWS", "measure_shape", "measure_penalty", "bench_penalty"]

ROWS = ("none", "lalora diag", "lalora kfac", "lalora tri_kfac")
FISHER_SEQUENCES = 4      # random sequences (shape.seq tokens, every position trained) the curvatures are estimated on
FISHER_FLOOR = 0.1        # train.fisher_floor's default
LORA_B_STD = 1e-2
REG_WEIGHT = 1e3          # lalora's reg_weight (its useful range: 1e2 .. 1e5); it does not change the cost


@dataclass
class _Example:
    """What `estimate_curvature` reads of `stages.data.inputs.Example`."""
    input_ids: list[int]
    loss_mask: list[bool]


# --- setup -----------------------------------------------------------------------------------------
def _student(model_dir: Path, shape: PenaltyShape, device: torch.device):
    """The all-linear LoRA student of `shape` (float32), lora_B set to small seeded random values."""
    build_random_llama(model_dir, vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                       num_hidden_layers=shape.num_hidden_layers, intermediate_size=shape.intermediate_size,
                       max_position_embeddings=max(512, shape.seq))
    torch.manual_seed(0)
    model = make_student(model_dir, LoraSettings(rank=shape.rank), torch.float32).to(device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * LORA_B_STD)
    return model


def _batch(vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    labels = ids.clone()
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _penalties(model, shape: PenaltyShape) -> dict[str, WeightPenalty | CurvaturePenalty | None]:
    """{row: penalty}, each curvature estimated once at the current weights, floored as `lalora_penalty` does."""
    ids = torch.randint(0, shape.vocab_size, (FISHER_SEQUENCES, shape.seq), generator=torch.Generator().manual_seed(2))
    examples = [_Example(row.tolist(), [True] * (shape.seq - 1)) for row in ids]
    out: dict[str, WeightPenalty | CurvaturePenalty | None] = {"none": None}
    for row in ROWS[1:]:
        curvature = estimate_curvature(model, examples, row.removeprefix("lalora "))
        out[row] = penalty_from_curvature(model, curvature, FISHER_FLOOR)
    return out


# --- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(model, inputs, optim, penalty, device: torch.device) -> float:
    """One optimizer step: CE (+ REG_WEIGHT * R), backward, AdamW; its wall time in seconds."""
    start = time.perf_counter()
    loss = batch_loss(model, inputs, get_method("none" if penalty is None else "lalora"), reg_weight=REG_WEIGHT).loss
    if penalty is not None:
        loss = loss + REG_WEIGHT * penalty()
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _penalty_alone(penalty, device: torch.device) -> float:
    """R forward + backward (gradients to the LoRA weights, .grad untouched), no model."""
    start = time.perf_counter()
    torch.autograd.grad(penalty(), [p for _, p in penalty.params])
    _sync(device)
    return time.perf_counter() - start


def _summary(step: list[float], alone: list[float]) -> dict:
    return {"step_s": statistics.median(step), "step_min_s": min(step), "step_max_s": max(step),
            "penalty_s": statistics.median(alone) if alone else None}


def measure_shape(shape: PenaltyShape, steps: int = 7, warmup: int = 2) -> dict:
    """{shape, device, rows: {row: {step_s, step_min_s, step_max_s, penalty_s, ratio_to_diag, ratio_to_none,
    min_ratio_to_diag}}} for the ROWS on `shape`, interleaved round by round."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench-penalty: steps must be >= 1 and warmup >= 0, got {steps}, {warmup}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="mtcache-penalty-") as tmp:
        model = _student(Path(tmp), shape, device)
    penalties = _penalties(model, shape)
    inputs = _batch(shape.vocab_size, shape.batch, shape.seq, device)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    step: dict[str, list[float]] = {r: [] for r in ROWS}
    alone: dict[str, list[float]] = {r: [] for r in ROWS}
    for round_ in range(warmup + steps):
        order = rotated(ROWS, round_)
        times = {r: _step(model, inputs, optim, penalties[r], device) for r in order}
        times_alone = {r: _penalty_alone(penalties[r], device) for r in order if penalties[r] is not None}
        if round_ >= warmup:
            for r in ROWS:
                step[r].append(times[r])
                if r in times_alone:
                    alone[r].append(times_alone[r])
    rows = {r: {"row": r, **_summary(step[r], alone[r])} for r in ROWS}
    diag, none = rows["lalora diag"], rows["none"]
    for r in rows.values():
        r.update(ratio_to_diag=r["step_s"] / diag["step_s"], ratio_to_none=r["step_s"] / none["step_s"],
                 min_ratio_to_diag=r["step_min_s"] / diag["step_min_s"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"shape": asdict(shape), "device": device.type, "trainable_params": trainable, "steps": steps, "warmup": warmup,
            "rows": rows}


def measure_penalty(shapes: Sequence[PenaltyShape], steps: int = 7, warmup: int = 2) -> dict:
    """{shape name: measure_shape(shape)} (bench section (f))."""
    return {shape.name: measure_shape(shape, steps, warmup) for shape in shapes}


def _line(name: str, r: dict) -> str:
    alone = "" if r["penalty_s"] is None else f"   penalty alone {r['penalty_s'] * 1e3:7.2f} ms"
    return (f"{name:>5} {r['row']:>16}: step median {r['step_s'] * 1e3:8.1f} ms "
            f"[{r['step_min_s'] * 1e3:.1f}-{r['step_max_s'] * 1e3:.1f}]   {r['ratio_to_diag']:.3f}x diag "
            f"(min {r['min_ratio_to_diag']:.3f}x)   {r['ratio_to_none']:.3f}x none{alone}")


def bench_penalty(shape: str = "both", steps: int = 7, warmup: int = 2, batch: int = 0, seq: int = 0) -> dict:
    """`python -m pipeline bench-penalty`: `measure_penalty` on `shape` (demo | large | both), its batch and
    sequence length replaced by `batch` / `seq` when > 0 (the penalty is a fixed cost per step, the rest grows
    with tokens); prints one line per row and the JSON."""
    from dataclasses import replace

    names = list(PENALTY_SHAPES) if shape == "both" else [shape]
    if any(n not in PENALTY_SHAPES for n in names):
        raise ValueError(f"bench-penalty: --shape {shape!r} not in demo | large | both")
    shapes = [replace(PENALTY_SHAPES[n], batch=batch or PENALTY_SHAPES[n].batch, seq=seq or PENALTY_SHAPES[n].seq) for n in names]
    results = measure_penalty(shapes, steps, warmup)
    for name, result in results.items():
        s = result["shape"]
        print(f"{name}: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocab {s['vocab_size']}, rank {s['rank']}, "
              f"batch {s['batch']} x {s['seq']}, {result['trainable_params']:,} LoRA weights, {result['device']}, "
              f"{steps} rounds after {warmup}")
        for r in result["rows"].values():
            print(_line(name, r))
    print(json.dumps(results))
    return results
