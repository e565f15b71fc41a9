"""Top-(k+1) logits and the log-sum-exp of every row in ONE read of the logits (a Triton kernel).

    from stages.teacher.topk_kernel import topk_logsumexp
    values, ids, lse = topk_logsumexp(logits, k + 1)     # logits [N, V], any float dtype
    logprobs = values - lse[:, None]                      # what stage one stores

Why a kernel: stage one on a GPU wants the teacher's top k+1 log-probs per position at the cost of
a plain forward. `torch.topk` over a 150k-wide row is the bottleneck (issue 7: log_softmax + topk
measured 1.4-1.9x a plain forward), and `log_softmax` reads and writes the whole float32
[N, V] tensor once more. This kernel reads the (bf16) logits once, tile by tile along the vocabulary,
and keeps per row:
  - an online log-sum-exp (running max m and sum of exp(x - m), rescaled when m grows), and
  - a running top-(k+1) set in registers with its minimum `tau`: a tile is only searched when its
    max exceeds `tau`, and then only its elements above `tau` are inserted, largest first.
For logits in random order along the vocabulary, the expected number of insertions after the first
tile is about (k+1) ln(V / tile) (the j-th tile beats the running set ~(k+1)/j times), so the
per-element work is one load, one max and one exp; the top-k bookkeeping is a small cost per row.
The worst case (logits increasing with the id) inserts at every element: correct, slower.

Ties: among equal values the smallest id wins both inside a tile and against the running set (an
element equal to `tau` is not inserted). `torch.topk` breaks ties in an unspecified order, so
tests compare ids only where values are distinct.

On CPU tensors (or without Triton) `topk_logsumexp` uses the plain torch reference, which is also
what the tests compare the kernel with; with TRITON_INTERPRET=1 the kernel itself runs on CPU.
"""
from __future__ import annotations

import os

import torch

__all__ = ["topk_logsumexp", "topk_logsumexp_reference", "kernel_available"]

try:  # Triton is optional: CPU machines without it use the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def kernel_available(device: torch.device | str) -> bool:
    """The kernel runs on CUDA devices, and on CPU only under Triton's interpreter (tests)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def topk_logsumexp_reference(logits: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [N, k1] float32 descending, ids [N, k1] int64, lse [N] float32) with plain torch ops."""
    x = logits.float()
    values, ids = x.topk(k1, dim=-1, sorted=True)
    return values, ids, x.logsumexp(-1)


def topk_logsumexp(logits: torch.Tensor, k1: int, block: int | None = None,
                   num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k1 largest logits per row (float32, descending), their ids (int64) and each row's
    log-sum-exp (float32) for logits [N, V]. Log-probs are `values - lse[:, None]`.

    Uses the Triton kernel where `kernel_available`, else `topk_logsumexp_reference`.
    `block` (vocabulary tile, a power of two) and `num_warps` default to the fastest of a few
    configurations, timed once per (device, vocab, k1, dtype) on CUDA (`tuned_launch`).
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits [N, V], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    if not 1 <= k1 <= vocab:
        raise ValueError(f"k1={k1} must be in [1, vocab={vocab}]")
    if not kernel_available(logits.device):
        return topk_logsumexp_reference(logits, k1)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    k1_padded = max(16, triton.next_power_of_2(k1))
    values = torch.empty(n, k1_padded, dtype=torch.float32, device=logits.device)
    ids = torch.empty(n, k1_padded, dtype=torch.int32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        if block is None or num_warps is None:
            tuned_block, tuned_warps = tuned_launch(logits, k1)
            block, num_warps = block or tuned_block, num_warps or tuned_warps
        _launch(logits, k1, values, ids, lse, block, num_warps)
    # The running set is unordered, and padding slots hold +inf: sort, then keep the first k1.
    values, order = values.masked_fill(values == float("inf"), float("-inf")).sort(dim=-1, descending=True)
    ids = ids.gather(-1, order)
    return values[:, :k1].contiguous(), ids[:, :k1].long(), lse


# Launch configurations tried by `tuned_launch`; (1024, 4) is the default where nothing is timed.
LAUNCH_CONFIGS = [(block, warps) for block in (512, 1024, 2048) for warps in (1, 2, 4, 8) if warps * 32 <= block]
_DEFAULT_LAUNCH = (1024, 4)
_tuned: dict[tuple, tuple[int, int]] = {}


def _launch(logits, k1, values, ids, lse, block, num_warps):
    _topk_lse_kernel[(logits.shape[0],)](logits, logits.stride(0), logits.shape[1], values, ids, lse,
                                         K1=k1, K1P=values.shape[1], BLOCK=block, num_warps=num_warps)


def tuned_launch(logits: torch.Tensor, k1: int) -> tuple[int, int]:
    """(block, num_warps) for this shape: on CUDA, each of LAUNCH_CONFIGS is timed once on these
    logits (a few ms, first call only) and the fastest kept; elsewhere the default."""
    if logits.device.type != "cuda":
        return _DEFAULT_LAUNCH
    key = (logits.device.index, logits.shape[1], k1, logits.dtype)
    if key not in _tuned:
        rows = logits[: 2048]
        outputs = (torch.empty(rows.shape[0], max(16, triton.next_power_of_2(k1)), device=logits.device),
                   torch.empty(rows.shape[0], max(16, triton.next_power_of_2(k1)), dtype=torch.int32, device=logits.device),
                   torch.empty(rows.shape[0], device=logits.device))
        timings = {}
        for config in LAUNCH_CONFIGS:
            _launch(rows, k1, *outputs, *config)  # compile + warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                _launch(rows, k1, *outputs, *config)
            end.record()
            end.synchronize()
            timings[config] = start.elapsed_time(end)
        _tuned[key] = min(timings, key=timings.get)
    return _tuned[key]


if triton is not None:

    @triton.jit
    def _topk_lse_kernel(logits_ptr, row_stride, vocab, values_ptr, ids_ptr, lse_ptr,
                         K1: tl.constexpr, K1P: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        slots = tl.arange(0, K1P)
        cols = tl.arange(0, BLOCK)
        # Slots >= K1 hold +inf so they are never the minimum and never replaced.
        run_v = tl.where(slots < K1, float("-inf"), float("inf")).to(tl.float32)
        run_i = tl.full([K1P], -1, tl.int32)
        tau = tl.full([], float("-inf"), tl.float32)       # the smallest kept value (k1-th largest so far)
        m = tl.full([], float("-inf"), tl.float32)         # running max
        s = tl.zeros([], tl.float32)                       # running sum of exp(x - m)
        for start in range(0, vocab, BLOCK):
            idx = start + cols
            x = tl.load(row_ptr + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            tile_max = tl.max(x, 0)
            new_m = tl.maximum(m, tile_max)
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)  # an all -inf prefix has sum 0
            s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), 0)
            m = new_m
            best = tile_max
            cand = x
            while best > tau:  # insert the tile's elements above tau, largest first
                best_id = tl.min(tl.where(cand == best, idx, vocab), 0)
                slot = tl.min(tl.where(run_v == tau, slots, K1P), 0)
                run_v = tl.where(slots == slot, best, run_v)
                run_i = tl.where(slots == slot, best_id, run_i)
                tau = tl.min(run_v, 0)
                cand = tl.where((idx == best_id) | (cand <= tau), float("-inf"), cand)
                best = tl.max(cand, 0)
        safe_m = tl.where(m == float("-inf"), 0.0, m)
        tl.store(lse_ptr + row, safe_m + tl.log(s))
        out = row.to(tl.int64) * K1P + slots
        tl.store(values_ptr + out, run_v)
        tl.store(ids_ptr + out, run_i)
