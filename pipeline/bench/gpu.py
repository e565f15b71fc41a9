"""GPU benchmark of both stages against a plain forward / a CE-only LoRA step (issue 7, GPU part).

    python -m pipeline gpu-bench --out runs/bench/gpu            # on a CUDA machine
    python ../shared/anchors/gpu_anchor.py                       # the reference figures, same call

Models are random-weight, bf16, sdpa, with the two shapes the anchor script uses (a Qwen2.5-0.5B and a
Llama-3.2-1B shape); batch B=8 x T=1024, k=32, LoRA r=16 on all linear layers. Every figure is a
ratio to a baseline timed in the same process (median of CUDA-event timings after warm-up):

stage one   plain      `model(ids).logits` (the floor: what any stage one must at least run)
            engine     `HFEngine.score` end to end: body + chunked head + one-pass Triton top-k/LSE +
                       the non-target selection, results on the host (everything but shard writing)
            torch      the same engine with float32 log_softmax + topk instead of the kernel
            naive      the anchor's fp32 log_softmax + topk(k+1) + copy over the whole batch
            kernel     `topk_logsumexp` alone on [4096, V] bf16 logits, per launch configuration,
                       vs torch.topk(k+1) + logsumexp and vs one read of the logits (amax)
stage two   ce         one optimizer step with `batch_loss(method="none")` (CE only)
            tail       the same with the cached masked KL (`tail`), teacher arrays on the device
            fused_*    the same with the fused, chunked head + loss (train.fused_loss), if present
            live       the exact masked KL with the teacher computed in the step
Peak memory is torch.cuda.max_memory_allocated over the timed steps. Writes gpu_bench.json and
gpu_bench.md under --out and prints the table.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.teacher.hf_engine import HFEngine
from stages.teacher.select import select_nontarget_topk_torch
from stages.teacher.topk_kernel import LAUNCH_CONFIGS, topk_logsumexp, topk_logsumexp_reference, tuned_launch

B, T, K = 8, 1024, 32
SHAPES = {
    "qwen2.5-0.5b": dict(cls="Qwen2Config", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    "llama-3.2-1b": dict(cls="LlamaConfig", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
}


def cuda_time_ms(fn, reps: int = 10, warm: int = 3) -> float:
    """Median wall time of fn() in ms, synchronized around each call (CUDA events)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def peak_gib(fn, reps: int = 3) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def build_model(name: str, out_dir: Path):
    import transformers

    spec = dict(SHAPES[name])
    cfg = getattr(transformers, spec.pop("cls"))(max_position_embeddings=4096, tie_word_embeddings=True, **spec)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    return cfg


# --- stage one -----------------------------------------------------------------------------------
def bench_stage_one(name: str, model_dir: Path, vocab: int) -> dict:
    engine = HFEngine(str(model_dir), K, "bfloat16", max_length=T, batch_tokens=B * T, vocab_size=vocab, device="cuda")
    torch_engine = HFEngine(str(model_dir), K, "bfloat16", max_length=T, batch_tokens=B * T, vocab_size=vocab,
                            device="cuda", topk_kernel=False)
    torch_engine.model = engine.model  # same weights, one copy on the device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    sequences = [row.numpy() for row in ids]
    ids = ids.cuda()
    model = engine.model

    @torch.no_grad()
    def plain():
        model(input_ids=ids).logits

    @torch.no_grad()
    def naive():  # the anchor's prefill_topk
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
        v, i = lp.topk(K + 1, -1)
        tgt = lp[:, :-1].gather(-1, ids[:, 1:, None])
        return v.half().cpu(), i.int().cpu(), tgt.cpu()

    row = dict(model=name, vocab=vocab, B=B, T=T, k=K)
    row["plain_ms"] = cuda_time_ms(plain)
    row["engine_ms"] = cuda_time_ms(lambda: engine.score(sequences))
    row["torch_engine_ms"] = cuda_time_ms(lambda: torch_engine.score(sequences), reps=5)
    row["naive_ms"] = cuda_time_ms(naive, reps=5)
    for key in ("engine", "torch_engine", "naive"):
        row[f"{key}_over_plain"] = row[f"{key}_ms"] / row["plain_ms"]
    row["plain_tok_s"] = B * T / row["plain_ms"] * 1e3
    row["engine_tok_s"] = B * T / row["engine_ms"] * 1e3

    # Where the engine's extra time goes: the chunked head + kernel + selection + host copy vs the head alone.
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
        targets = ids[:, 1:].reshape(-1)
        row["head_ms"] = cuda_time_ms(lambda: model.get_output_embeddings()(hidden))
        row["head_topk_select_copy_ms"] = cuda_time_ms(lambda: engine._top_logprobs(hidden, targets))
    hidden = None  # freed before the kernel measurements (the lambdas above have run)
    # The kernel alone, on the model's own logits for 4096 positions.
    with torch.no_grad():
        logits = model(input_ids=ids[:4]).logits.reshape(-1, vocab).contiguous()
    values, top_ids, lse = topk_logsumexp(logits, K + 1)
    ref_values, ref_ids, ref_lse = topk_logsumexp_reference(logits, K + 1)
    row["kernel_max_abs_value_err"] = (values - ref_values).abs().max().item()
    row["kernel_max_abs_lse_err"] = (lse - ref_lse).abs().max().item()
    row["kernel_ids_point_at_values"] = bool((logits.float().gather(1, top_ids) == values).all())
    row["kernel_ms_by_launch"] = {f"block{b}_warps{w}": cuda_time_ms(lambda b=b, w=w: topk_logsumexp(logits, K + 1, b, w))
                                  for b, w in LAUNCH_CONFIGS}
    row["kernel_tuned_launch"] = list(tuned_launch(logits, K + 1))
    row["kernel_ms"] = cuda_time_ms(lambda: topk_logsumexp(logits, K + 1))
    row["torch_topk_lse_ms"] = cuda_time_ms(lambda: (logits.float().topk(K + 1, -1), logits.float().logsumexp(-1)))
    row["one_read_ms"] = cuda_time_ms(lambda: logits.amax(-1))
    row["logits_gib"] = logits.numel() * logits.element_size() / 2**30
    engine.close()
    return row  # the models and logits are freed with this frame; gpu_bench() empties the CUDA cache


# --- stage two -----------------------------------------------------------------------------------
def _cached_teacher(model, ids: torch.Tensor, vocab: int):
    """Stage one in-process: the k non-target ids and log-probs per position, and the target's."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].reshape(-1, vocab)
        targets = ids[:, 1:].reshape(-1)
        values, top_ids, lse = topk_logsumexp(logits, K + 1)
        target_lp = logits.gather(1, targets[:, None])[:, 0].float() - lse
    top_ids, top_lp = select_nontarget_topk_torch(top_ids, values - lse[:, None], targets, K)
    return top_ids.long(), top_lp, target_lp


def bench_stage_two(name: str, model_dir: Path, vocab: int, fused_available: bool) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=gen).cuda()
    top_ids, top_lp, target_lp = _cached_teacher(base, ids, vocab)
    student = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone(),
                  teacher_topk_ids=top_ids, teacher_topk_logprobs=top_lp, teacher_target_logprob=target_lp)

    def step(estimator: str, **kwargs):
        method = get_method(estimator)

        def run():
            parts = batch_loss(student, inputs, method, 0.1, peft_model=student, **kwargs)
            parts.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    row = dict(model=name, vocab=vocab, B=B, T=T, k=K, lora_r=16)
    if fused_available:  # bf16 agreement of the fused loss with the unfused one, same batch and weights
        params = [p for p in student.parameters() if p.requires_grad]

        def loss_and_grad(fused: bool):
            parts = batch_loss(student, inputs, get_method("tail"), 0.1, peft_model=student, fused=fused)
            parts.loss.backward()
            grad = torch.cat([p.grad.float().flatten() for p in params])
            opt.zero_grad(set_to_none=True)
            return parts.loss.item(), grad

        (loss_plain, grad_plain), (loss_fused, grad_fused) = loss_and_grad(False), loss_and_grad(True)
        row["fused_loss_rel_err"] = abs(loss_fused - loss_plain) / abs(loss_plain)
        row["fused_grad_rel_err"] = ((grad_fused - grad_plain).norm() / grad_plain.norm()).item()
    variants = {"ce": step("none"), "tail": step("tail"), "live": step("live")}
    if fused_available:
        variants["fused_ce"] = step("none", fused=True)
        variants["fused_tail"] = step("tail", fused=True)
    for key, fn in variants.items():
        row[f"{key}_ms"] = cuda_time_ms(fn, reps=5, warm=2)
        row[f"{key}_peak_gib"] = peak_gib(fn)
    for key in variants:
        row[f"{key}_over_ce"] = row[f"{key}_ms"] / row["ce_ms"]
        row[f"{key}_mem_over_ce"] = row[f"{key}_peak_gib"] / row["ce_peak_gib"]
    return row  # freed with this frame; gpu_bench() empties the CUDA cache


def fused_loss_available() -> bool:
    import inspect

    return "fused" in inspect.signature(batch_loss).parameters


def to_markdown(results: dict) -> str:
    lines = [f"GPU: {results['device']}, torch {results['torch']}", "",
             "| model | plain ms | engine ms (x plain) | torch path (x) | naive (x) | kernel ms / torch topk+lse ms / one read ms |",
             "|---|---|---|---|---|---|"]
    for r in results["stage_one"]:
        kernel = r["kernel_ms"]
        lines.append(f"| {r['model']} | {r['plain_ms']:.1f} | {r['engine_ms']:.1f} ({r['engine_over_plain']:.3f}x) | "
                     f"{r['torch_engine_over_plain']:.3f}x | {r['naive_over_plain']:.3f}x | "
                     f"{kernel:.2f} / {r['torch_topk_lse_ms']:.2f} / {r['one_read_ms']:.2f} |")
    lines += ["", "| model | step | ms | x CE | peak GiB | x CE mem |", "|---|---|---|---|---|---|"]
    for r in results["stage_two"]:
        for key in [k[:-3] for k in r if k.endswith("_ms")]:
            lines.append(f"| {r['model']} | {key} | {r[key + '_ms']:.1f} | {r[key + '_over_ce']:.3f} | "
                         f"{r[key + '_peak_gib']:.2f} | {r[key + '_mem_over_ce']:.3f} |")
    return "\n".join(lines) + "\n"


def gpu_bench(out: str | Path = "runs/bench/gpu", models: list[str] | None = None,
              stages: list[str] | None = None) -> dict:
    """`python -m pipeline gpu-bench`: the SHAPES `models` (default: all) through `stages` ("one", "two";
    default both); writes gpu_bench.json and gpu_bench.md under `out` and prints the table."""
    models, stages = list(models or SHAPES), list(stages or ("one", "two"))
    unknown = [m for m in models if m not in SHAPES] + [s for s in stages if s not in ("one", "two")]
    if unknown:
        raise ValueError(f"gpu-bench: unknown {unknown}; models are {list(SHAPES)}, stages one and two")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA device (the CPU figures come from `python -m pipeline bench`)")
    torch.backends.cuda.matmul.allow_tf32 = True
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, stage_one=[], stage_two=[],
                   started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    fused = fused_loss_available()
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model_dir = Path(tmp) / name
            cfg = build_model(name, model_dir)
            if "one" in stages:
                results["stage_one"].append(bench_stage_one(name, model_dir, cfg.vocab_size))
                torch.cuda.empty_cache()
                print(json.dumps(results["stage_one"][-1]), flush=True)
            if "two" in stages:
                results["stage_two"].append(bench_stage_two(name, model_dir, cfg.vocab_size, fused))
                torch.cuda.empty_cache()
                print(json.dumps(results["stage_two"][-1]), flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    table = to_markdown(results)
    (out / "gpu_bench.md").write_text(table)
    print(table)
    return results
