"""`python -m pipeline inspect CACHE --example N --position P`: what one cached position holds.

Shows the target token and its teacher probability, the top cached non-target tokens with their
probabilities (raw and renormalized over the non-target vocabulary), the tail mass R_T, and in a cache with
tail draws (sampled_tail) the drawn ids and the tail's entropy.
"""
from __future__ import annotations

import math

import numpy as np

from storage_schemas import (
    DRAW_IDS_COLUMN,
    EXAMPLE_ID_COLUMN,
    INPUT_IDS_COLUMN,
    LOSS_MASK_COLUMN,
    TAIL_ENTROPY_COLUMN,
    TARGET_LOGPROB_COLUMN,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    Manifest,
    get_encoding,
)
from storage_schemas.shard_io import decode_draw_columns, decode_table, read_shard

__all__ = ["describe_position"]


def _find_row(cache_dir: str, manifest: Manifest, example: int) -> dict:
    if example in manifest.dataset.skipped_examples:
        raise ValueError(f"example {example} was skipped by stage one (data.on_bad_example=skip): not in {cache_dir}")
    # shards hold increasing ids, contiguous except where examples were skipped: the last shard that
    # starts at or before the id holds it, if any does; the row is found by its id
    starts = [r for r in manifest.shards if r.first_example <= example]
    if starts:
        record = max(starts, key=lambda r: r.first_example)
        table = read_shard(f"{cache_dir}/{record.file}", manifest.settings.encoding)
        where = np.flatnonzero(table.column(EXAMPLE_ID_COLUMN).to_numpy() == example)
        if where.size:
            row = table.slice(int(where[0]), 1)
            ids, logprobs, target = decode_table(row, manifest.settings.encoding, manifest.settings.k)
            plain = row.select([INPUT_IDS_COLUMN, LOSS_MASK_COLUMN]).to_pylist()[0]
            draws = {}
            if get_encoding(manifest.settings.encoding).has_draws:
                draw_ids, entropy = decode_draw_columns(row, manifest.settings.encoding)
                draws = {DRAW_IDS_COLUMN: draw_ids, TAIL_ENTROPY_COLUMN: entropy}
            return {**plain, TOPK_IDS_COLUMN: ids.reshape(-1).tolist(), TOPK_LOGPROBS_COLUMN: logprobs.reshape(-1),
                    TARGET_LOGPROB_COLUMN: target, **draws}
    raise ValueError(f"example {example} is not in {cache_dir} ({manifest.num_rows} examples cached)")


def _spans(positions: np.ndarray) -> str:
    """`3-7, 12-15`: runs of consecutive positions."""
    breaks = np.flatnonzero(np.diff(positions) > 1)
    starts, ends = np.r_[positions[0], positions[breaks + 1]], np.r_[positions[breaks], positions[-1]]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts.tolist(), ends.tolist()))


def describe_position(cache_dir: str, example: int, position: int, model_dir: str | None = None, top: int = 10) -> str:
    from transformers import AutoTokenizer

    manifest = Manifest.load(cache_dir)
    row = _find_row(cache_dir, manifest, example)
    mask = np.asarray(row[LOSS_MASK_COLUMN], bool)
    if not 0 <= position < len(mask):
        raise ValueError(f"example {example}: position must be in 0..{len(mask) - 1} (position i predicts token i+1)")
    if not mask[position]:
        trained = np.flatnonzero(mask)
        spans = _spans(trained) if trained.size else "none"
        return (f"example {example}, position {position}: not a trained position (loss_mask 0: its next token is not "
                f"trained, e.g. a prompt, a template token or padding); nothing cached. Trained positions: {spans}")
    k, slot = manifest.settings.k, int(mask[:position].sum())
    ids = row[TOPK_IDS_COLUMN][slot * k:(slot + 1) * k]
    logprobs = np.asarray(row[TOPK_LOGPROBS_COLUMN][slot * k:(slot + 1) * k], np.float64)
    a_y = float(row[TARGET_LOGPROB_COLUMN][slot])
    tok = AutoTokenizer.from_pretrained(model_dir or manifest.teacher.model_path)
    context = tok.decode(row[INPUT_IDS_COLUMN][max(0, position - 12): position + 1])
    target = row[INPUT_IDS_COLUMN][position + 1]
    nontarget = -math.expm1(a_y)
    tail = max(0.0, nontarget - float(np.exp(logprobs).sum()))
    lines = [
        f"example {example}, position {position} (k={k}, encoding {manifest.settings.encoding})",
        f"  context : ...{context!r}",
        f"  target  : {tok.decode([target])!r} (id {target})  p = {math.exp(a_y):.4f}",
        f"  {'rank':>4}  {'id':>6}  {'p':>8}  {'p~ (masked)':>11}  token",
    ]
    for rank, (tid, lp) in enumerate(zip(ids[:top], logprobs[:top]), start=1):
        p = math.exp(lp)
        lines.append(f"  {rank:>4}  {tid:>6}  {p:8.4f}  {p / nontarget if nontarget > 0 else float('nan'):11.4f}  {tok.decode([tid])!r}")
    lines.append(f"  non-target mass 1 - p_y = {nontarget:.4f}; mass outside the cached {k} = {tail:.4g} "
                 f"(R_T = {tail / nontarget if nontarget > 0 else 0.0:.4g} of the non-target mass)")
    if DRAW_IDS_COLUMN in row:  # encodings with tail draws (sampled_tail)
        drawn = [int(t) for t in row[DRAW_IDS_COLUMN][slot]]
        lines.append(f"  {len(drawn)} draws from the tail (entropy H_T = {float(row[TAIL_ENTROPY_COLUMN][slot]):.4f} nats): "
                     + ", ".join(f"{t} {tok.decode([t])!r}" for t in drawn))
    return "\n".join(lines)
