"""Stage-two step cost: CE-only (`none`) vs cached `tail` vs `live` teacher, on the same batch.

    python -m pipeline bench-step                        # tiny random Llama, CPU
    python -m pipeline bench-step --vocab 32000 --batch 8 --seq 256
    python -m pipeline bench-step --model DIR --batch 8 --seq 1024 --k 32 --dtype bfloat16
    python -m pipeline bench-step --fused                # + rows none+fused, tail+fused

One optimizer step = forward (+ teacher forward for `live`) + loss + backward + AdamW on the LoRA
weights. Times: the estimators interleaved step by step in one process, `--steps` rounds after
`--warmup` (median, and min: on a shared CPU the min is the steadier figure). Memory: each estimator
in a fresh process, so it does not inherit another estimator's allocator state:
- CUDA: peak allocated over all steps (`torch.cuda.max_memory_allocated`);
- CPU: peak RSS over all steps (VmHWM, reset via /proc/self/clear_refs after setup);
and "step extra", the peak's excess over what is held before the first step (model, batch,
AdamW state): the activations, logits and loss temporaries the estimator adds.
The cached teacher arrays are computed once from a base-model forward before timing (stage one's
work, offline). Ratios are relative to `none` (the plain LoRA step the cache competes with).
A row named `<estimator>+fused` runs the same estimator with the fused chunked loss
(stages/student/fused_loss.py; `--chunk` rows per chunk, 0 = auto), as `train.fused_loss=true` does.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from pipeline.bench.models import build_random_llama
from stages.student.adapters import make_student
from stages.student.loss import CachedTeacher
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.student.settings import LoraSettings
from stages.teacher.tail_draws import tail_draws

__all__ = ["tiny_llama", "synthetic_batch", "measure_time", "measure_memory", "compare", "bench_step"]

ESTIMATORS = ("none", "tail", "live")
FUSED_ROWS = ("none+fused", "tail+fused")


def tiny_llama(out_dir: Path, vocab: int, layers: int = 2, hidden: int = 128) -> Path:
    """A random-weight Llama (head_dim 64, float32) saved to `out_dir`, like the test fixture."""
    return build_random_llama(out_dir, vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                              max_position_embeddings=4096)


@torch.no_grad()
def synthetic_batch(model, batch: int, seq: int, k: int, seed: int = 0, draws: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, every position trained, and the base model's own top-k cache for them; with `draws`
    > 0 also that many tail draws per position and the tail entropies (stages/teacher/tail_draws.py, key 0,
    the position's flat index)."""
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, 0] = -100
    with model.disable_adapter():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).flatten(0, 1)  # [N, V]
    targets = ids[:, 1:].reshape(-1)
    vals, top = logp.scatter(-1, targets[:, None], float("-inf")).topk(k, -1)
    cache = CachedTeacher(top, vals, logp.gather(-1, targets[:, None])[:, 0])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
              "teacher_topk_ids": cache.topk_ids, "teacher_topk_logprobs": cache.topk_logprobs,
              "teacher_target_logprob": cache.target_logprob}
    if draws:
        positions = torch.arange(len(targets), device=device)
        draw_ids, entropy = tail_draws(logp, targets, top, torch.zeros_like(targets), positions, draws, 0)
        inputs.update(teacher_draw_ids=draw_ids.long(), teacher_tail_entropy=entropy)
    return inputs


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _memory_start(device: torch.device) -> int:
    """Reset the peak counter; the bytes held now (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _rss_kib("VmRSS") * 1024


def _memory_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024


def _setup(model_dir: str, batch: int, seq: int, k: int, dtype: str):
    """(model, batch, optimizer, autocast): the student, its synthetic cached batch, AdamW on LoRA."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = make_student(model_dir, LoraSettings(rank=8), getattr(torch, dtype)).to(device)
    inputs = synthetic_batch(model, batch, seq, k)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, inputs, optim, torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def _step(model, inputs, optim, autocast, estimator: str, chunk: int = 0) -> float:
    """One optimizer step of `estimator` (or `<estimator>+fused`); its wall time in seconds."""
    method, fused = get_method(estimator.removesuffix("+fused")), estimator.endswith("+fused")
    start = time.perf_counter()
    with autocast:
        loss = batch_loss(model, inputs, method, reg_weight=1.0, fused=fused, chunk_size=chunk).loss
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    if inputs["input_ids"].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_memory(model_dir: str, estimator: str, batch: int, seq: int, k: int, dtype: str = "float32",
                   steps: int = 3, chunk: int = 0) -> dict:
    """Peak memory of `steps` steps of one estimator; call in a fresh process."""
    model, inputs, optim, autocast = _setup(model_dir, batch, seq, k, dtype)
    device = inputs["input_ids"].device
    adam_state = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    # Baseline before the first step (a CPU allocator keeps freed pages, so RSS after one step already
    # holds the step's peak); AdamW's two state tensors, created at the first step, count as baseline.
    baseline = _memory_start(device) + adam_state
    for _ in range(steps):
        _step(model, inputs, optim, autocast, estimator, chunk)
    peak = _memory_peak(device)
    return {"peak_mib": peak / 2**20, "step_extra_mib": (peak - baseline) / 2**20}


def measure_time(model_dir: str, estimators: Sequence[str], batch: int, seq: int, k: int, steps: int, warmup: int,
                 dtype: str = "float32", chunk: int = 0) -> dict:
    """Median and min step time per estimator, the estimators interleaved round by round so that
    load drifting on a shared machine hits them all alike."""
    model, inputs, optim, autocast = _setup(model_dir, batch, seq, k, dtype)
    times: dict[str, list[float]] = {e: [] for e in estimators}
    for round_ in range(warmup + steps):
        for estimator in estimators:
            seconds = _step(model, inputs, optim, autocast, estimator, chunk)
            if round_ >= warmup:
                times[estimator].append(seconds)
    return {e: {"step_s": statistics.median(t), "step_min_s": min(t)} for e, t in times.items()}


def _child(queue, name: str, kwargs: dict) -> None:
    queue.put(globals()[name](**kwargs))


def _in_fresh_process(name: str, **kwargs):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, name, kwargs))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def compare(model_dir: str, batch: int = 8, seq: int = 256, k: int = 32, steps: int = 10, warmup: int = 3,
            dtype: str = "float32", estimators: Sequence[str] = ESTIMATORS, chunk: int = 0) -> dict:
    """Times (one process, interleaved) and memory (one fresh process per estimator); ratios to the first."""
    shape = dict(model_dir=model_dir, batch=batch, seq=seq, k=k, dtype=dtype, chunk=chunk)
    times = _in_fresh_process("measure_time", estimators=list(estimators), steps=steps, warmup=warmup, **shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {e: {"estimator": e, "device": device, **times[e], **_in_fresh_process("measure_memory", estimator=e, **shape)}
               for e in estimators}
    base = results[estimators[0]]
    for r in results.values():
        r.update(time_ratio=r["step_s"] / base["step_s"], min_time_ratio=r["step_min_s"] / base["step_min_s"],
                 peak_ratio=r["peak_mib"] / base["peak_mib"],
                 extra_ratio=r["step_extra_mib"] / max(base["step_extra_mib"], 1e-9))
    return results


def bench_step(model: str | None = None, vocab: int = 392, batch: int = 8, seq: int = 256, k: int = 32,
               steps: int = 10, warmup: int = 3, dtype: str = "float32", estimators: Sequence[str] | None = None,
               fused: bool = False, chunk: int = 0) -> dict:
    """`python -m pipeline bench-step`: `compare` on `model` (default: a tiny random Llama of `vocab` tokens),
    the rows `estimators` (default ESTIMATORS) plus FUSED_ROWS with `fused`; prints one line per row and the JSON."""
    estimators = list(estimators or ESTIMATORS)
    estimators += [r for r in FUSED_ROWS if fused and r not in estimators]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model or str(tiny_llama(Path(tmp), vocab))
        results = compare(model_dir, batch, seq, k, steps, warmup, dtype, estimators, chunk)
    for r in results.values():
        print(f"{r['estimator']:>10}: step median {r['step_s'] * 1e3:8.1f} ms ({r['time_ratio']:.2f}x), "
              f"min {r['step_min_s'] * 1e3:8.1f} ms ({r['min_time_ratio']:.2f}x)   "
              f"peak {r['peak_mib']:8.0f} MiB ({r['peak_ratio']:.2f}x)   "
              f"step extra {r['step_extra_mib']:7.0f} MiB ({r['extra_ratio']:.2f}x)   [{r['device']}]")
    print(json.dumps(results))
    return results
