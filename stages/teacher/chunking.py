"""The output layer in chunks sized by bytes: how many positions both teacher engines send through
lm_head + log-softmax + top-k at once, and the vLLM pooler's chunk loop.

    from stages.teacher.chunking import chunk_rows, element_bytes
    rows = chunk_rows(vocab_size=151936, device="cpu")            # 55: 64 MiB // (151,936 x 8 bytes)
    rows = chunk_rows(151936, "cuda", element_bytes=element_bytes(torch.bfloat16))   # 706

A chunk of `rows` positions holds, at once, buffers of shape [rows, V] (V = the output layer's rows,
the vocabulary): the logits in the model's dtype, a float32 copy of them when that dtype is not
float32, and the float32 log-softmax. `element_bytes` is their bytes per [row, column] (8 for a
float32 model, 10 for bfloat16; the Triton kernel path of the hf engine keeps only the logits).
Everything else a chunk allocates is [rows, k] or [rows] and is not counted. The row count is
`budget_bytes // (V * element_bytes)`, at least 1.

Default budgets (`budget_bytes=None`):
- CPU, 64 MiB (`CPU_BUDGET_BYTES`): each chunk re-reads the whole [V, H] output weight (39 MB at
  V=151,936, H=64: more than a 32 MiB L3), so chunks of a few rows lose to that; chunks much larger
  than the caches lose to memory traffic and to page faults (glibc mmaps every buffer over 32 MiB
  afresh). Measured on 2 CPU cores, H=64, 32 x 256 tokens, k=32 (stage-one tok/s, best of 3,
  both engines in one process): at V=151,936, 27 / 55 / 110 / 256 rows (32 / 64 / 128 / 297 MiB)
  gave vLLM 2,280 / 2,512 / 2,304 / 1,937 and hf 1,455 / 1,920 / 1,929 / 1,251. At V=2,048 the
  chunk loop alone prefers 4-8 MiB (75k positions/s against 54k at 64 MiB), but stage one on the
  demo model did not move with the budget (16 / 32 / 64 MiB: vLLM 13.2k / 13.4k / 13.6k tok/s):
  the model body dominates there.
- CUDA (or any other accelerator), 1 GiB (`GPU_BUDGET_BYTES`): large chunks keep every
  multiprocessor busy (the Triton kernel runs one program per row); at V=128k in bfloat16 with the
  kernel that is 4,185 rows, about what the hf engine used before budgets were in bytes.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["CPU_BUDGET_BYTES", "GPU_BUDGET_BYTES", "chunk_rows", "element_bytes", "budget_bytes_for",
           "pooled_topk_rows"]

CPU_BUDGET_BYTES = 64 * 2**20
GPU_BUDGET_BYTES = 2**30


def budget_bytes_for(device: torch.device | str) -> int:
    """The default budget (bytes) of the [rows, V] buffers of one chunk on `device`."""
    return CPU_BUDGET_BYTES if torch.device(device).type == "cpu" else GPU_BUDGET_BYTES


def element_bytes(logits_dtype: torch.dtype, log_softmax: bool = True) -> int:
    """Bytes per [row, column] of one chunk's [rows, V] buffers: the logits (`logits_dtype`), and with
    `log_softmax` a float32 copy of non-float32 logits plus the float32 log-softmax."""
    size = torch.empty((), dtype=logits_dtype).element_size()
    if log_softmax:
        size += (0 if logits_dtype == torch.float32 else 4) + 4
    return size


def chunk_rows(vocab_size: int, device: torch.device | str, budget_bytes: int | None = None,
               element_bytes: int = 8) -> int:
    """Positions per output-layer chunk: `budget_bytes // (vocab_size * element_bytes)`, at least 1.

    vocab_size: V, columns of the [rows, V] buffers (the output layer's rows). device: where the chunk
    runs; it picks the default budget (`budget_bytes=None`: 64 MiB on CPU, 1 GiB elsewhere).
    budget_bytes: bytes allowed for one chunk's [rows, V] buffers together. element_bytes: their bytes
    per [row, column] (see `element_bytes()`: 8 = float32 logits + float32 log-softmax)."""
    if vocab_size < 1 or element_bytes < 1:
        raise ValueError(f"chunk_rows: need vocab_size >= 1 and element_bytes >= 1, got {vocab_size}, {element_bytes}")
    budget = budget_bytes_for(device) if budget_bytes is None else int(budget_bytes)
    if budget < 1:
        raise ValueError(f"chunk_rows: budget_bytes must be >= 1, got {budget}")
    return max(1, budget // (vocab_size * element_bytes))


def pooled_topk_rows(hidden: torch.Tensor, targets: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                     num_top: int, rows: int, draws: int = 0, draw_seed: int = 0, keys: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
    """The vLLM top-k pooler's chunk loop (stages/teacher/vllm_topk_model.py).

    hidden [N, H]: final hidden states, one per scored position; targets [N] (integer): the token each
    position predicts; compute_logits: [n, H] -> [n, V] logits; rows: positions per chunk. Returns [N,
    2*num_top+1] float32 on hidden's device: per position the top `num_top` ids (int32 bits), their
    float32 log-softmax values (descending), and the target's log-softmax value. With `draws` m > 0, m + 1
    more columns: the ids drawn from the tail outside the num_top - 1 largest non-target tokens (int32
    bits) and the tail's entropy (stages/teacher/tail_draws.py; keys, positions [N]: each position's draw
    key and index in its sequence)."""
    from stages.teacher.tail_draws import topk_and_tail_draws

    parts = []
    for start in range(0, hidden.shape[0], rows):
        stop = min(start + rows, hidden.shape[0])
        logits = compute_logits(hidden[start:stop])
        chunk_targets = targets[start:stop].long()
        extra = []
        if draws:
            values, ids, target, draw_ids, entropy = topk_and_tail_draws(
                logits, chunk_targets, num_top, keys[start:stop], positions[start:stop], draws, draw_seed)
            extra = [draw_ids.view(torch.float32), entropy[:, None]]
        else:
            logprobs = logits.log_softmax(-1, dtype=torch.float32)
            values, ids = logprobs.topk(num_top, dim=-1)
            target = logprobs.gather(-1, chunk_targets[:, None])[:, 0]
        parts.append(torch.cat([ids.to(torch.int32).view(torch.float32), values, target[:, None], *extra], dim=1))
    if not parts:
        return hidden.new_zeros((0, 2 * num_top + 1 + (draws + 1 if draws else 0)), dtype=torch.float32)
    return torch.cat(parts)
