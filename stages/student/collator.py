"""Cache rows -> a padded training batch whose teacher arrays line up with the labelled positions.

    collate = CacheCollator(pad_id=pad_token_id(model_dir), k=manifest.settings.k,
                            encoding=manifest.settings.encoding)
    batch = collate([dataset[0], dataset[1]])

Alignment contract (what the trainer relies on): with `mask = labels[:, 1:] != -100`,
`logits[:, :-1][mask]` (row-major: sequence by sequence, position by position) is row i of
`teacher_topk_ids`, `teacher_topk_logprobs` and `teacher_target_logprob` for every i. That is the
order stage one stores them in (each row's trained positions, ascending), so the batch arrays are a
plain concatenation of the rows' arrays: no per-token Python work anywhere. The stored teacher
columns are decoded here, once per batch (`storage_schemas.codecs.decode_teacher`: a reshape, a
cumsum and an argsort for the delta/quantized encodings), as the cache's encoding says.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from storage_schemas import (
    DRAW_IDS_COLUMN,
    EXAMPLE_ID_COLUMN,
    INPUT_IDS_COLUMN,
    LOSS_MASK_COLUMN,
    MASS_COLUMN,
    TAIL_ENTROPY_COLUMN,
    TARGET_LOGPROB_COLUMN,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    Encoding,
    get_encoding,
)
from storage_schemas.codecs import decode_draws, decode_teacher
from storage_schemas.fingerprints import model_vocab_size

__all__ = ["CacheCollator", "pad_token_id", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the HF / torch cross-entropy convention for "no label here"


def pad_token_id(model_dir: str | os.PathLike) -> int:
    """The pad id: the first of the tokenizer's pad id, the model config's pad id and its eos id that has an
    embedding row (is below the config's vocab_size), else 0.

    Its value only matters for the embedding lookup of padded slots; they carry no label and are masked out
    of attention, so any id with a row does. A tokenizer may name a pad token beyond the rows (an added
    `<|endoftext|>`, say, when AutoTokenizer picks another class than the one saved): looking it up would
    fail inside the model's embedding, so it is passed over.
    """
    from transformers import AutoConfig, AutoTokenizer

    rows = model_vocab_size(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    candidates = [AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id,
                  getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)]
    for candidate in candidates:
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None and 0 <= int(candidate) < rows:
            return int(candidate)
    return 0


def _pad_rows(parts: Sequence[np.ndarray], width: int, fill: Any, dtype: Any) -> np.ndarray:
    """Right-pad 1-D arrays into [B, width] with one boolean-mask assignment (row-major fill)."""
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    out = np.full((len(parts), width), fill, dtype=dtype)
    if lengths.sum():
        out[np.arange(width)[None, :] < lengths[:, None]] = np.concatenate(parts).astype(dtype, copy=False)
    return out


def _concat(rows: Sequence[dict], name: str, dtype: Any) -> np.ndarray:
    """The rows' arrays end to end; `dtype=None` keeps the stored type (codes stay integers)."""
    flat = np.concatenate([np.asarray(r[name]).reshape(-1) for r in rows])
    return flat if dtype is None else flat.astype(dtype, copy=False)


def _check_finite(rows: Sequence[dict], logprobs: np.ndarray, target: np.ndarray, enc: Encoding) -> None:
    """ValueError naming the examples (and their first bad position) whose decoded teacher values are
    NaN or inf: the loss would train on them. A top-k value of -inf is p = 0, which some codecs (sqrtp_q)
    decode below their grid on purpose; every other encoding decodes only finite values from a sound cache."""
    bad = ~np.isfinite(target)
    wrong = np.isnan(logprobs) | np.isposinf(logprobs) if enc.decodes_zero_probability else ~np.isfinite(logprobs)
    bad |= wrong.any(axis=1)
    if not bad.any():
        return
    # Only on failure: the batch row and the sequence position of every labelled position.
    masks = [np.asarray(r[LOSS_MASK_COLUMN], bool) for r in rows]
    row_of = np.repeat(np.arange(len(rows)), [int(m.sum()) for m in masks])
    position_of = np.concatenate([np.flatnonzero(m) for m in masks])
    named = []
    for r in dict.fromkeys(row_of[bad].tolist()):
        first = int(position_of[bad & (row_of == r)][0])
        named.append(f"example {int(np.asarray(rows[r].get(EXAMPLE_ID_COLUMN, -1)))} (first at position {first})")
    raise ValueError(f"the cache holds non-finite teacher values (encoding {enc.name!r}) for {int(bad.sum())} trained "
                     f"position(s): {', '.join(named)}. Stage two would train on them; the cache was made before "
                     "stage one refused such values: re-create it with `cache-teacher --overwrite` "
                     "(an fp16 teacher overflowed? use cache.dtype=bfloat16 or float32)")


class CacheCollator:
    """Collate cache rows (dicts of numpy arrays, as `load_cache_dataset` yields them).

    Returns a dict of tensors, B sequences, T = longest sequence, N labelled positions:
        input_ids               [B, T]    long   right-padded with `pad_id`
        attention_mask          [B, T]    long   1 on real tokens
        labels                  [B, T]    long   input_ids where trained (loss_mask[t-1]), else -100
        teacher_topk_ids        [N, k]    long   (only when `with_teacher`)
        teacher_topk_logprobs   [N, k]    float32
        teacher_target_logprob  [N]       float32
        teacher_draw_ids        [N, m]    long   (encodings with tail draws only)
        teacher_tail_entropy    [N]       float32 (ditto)
    `with_teacher=False` (estimators `none` and `live`) skips the cached arrays entirely.
    `encoding` must be the cache's (`manifest.settings.encoding`); the float default decodes only
    `topk_f32`/`topk_f16` caches and refuses integer codes with a message saying so.
    `use_k` in 1..k keeps only the first `use_k` decoded tokens per position (teacher arrays
    [N, use_k]): decoding restores descending teacher probability, so they are the cache's top-`use_k`
    (ties: any order), and a smaller k is studied from the same cache without re-running stage one.
    0 = all k.
    """

    def __init__(self, pad_id: int, k: int, with_teacher: bool = True, *, encoding: str | Encoding,
                 use_k: int = 0) -> None:
        # `encoding` has no default: a collator that guessed would train on raw integer codes or
        # refuse late; callers pass the cache's own `manifest.settings.encoding`.
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not 0 <= use_k <= k:
            raise ValueError(f"train.k={use_k}: the cache holds k={k} tokens per position; use 1..{k} (0 = all)")
        self.pad_id, self.k, self.with_teacher, self.use_k = int(pad_id), int(k), with_teacher, int(use_k or k)
        self.encoding = get_encoding(encoding) if isinstance(encoding, str) else encoding

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids_parts = [np.asarray(r[INPUT_IDS_COLUMN]) for r in rows]
        width = max(len(p) for p in ids_parts)
        input_ids = _pad_rows(ids_parts, width, self.pad_id, np.int64)
        lengths = np.array([len(p) for p in ids_parts])
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        trained = _pad_rows([np.asarray(r[LOSS_MASK_COLUMN], bool) for r in rows], width - 1, False, bool)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[:, 1:] = np.where(trained, input_ids[:, 1:], IGNORE_INDEX)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if self.with_teacher:
            batch.update(self._teacher_arrays(rows, int(trained.sum())))
        return {name: torch.from_numpy(array) for name, array in batch.items()}

    def _teacher_arrays(self, rows: Sequence[dict], n: int) -> dict[str, np.ndarray]:
        """The rows' cached arrays concatenated in row order, checked against the N labels."""
        target = _concat(rows, TARGET_LOGPROB_COLUMN, None)
        topk_ids = _concat(rows, TOPK_IDS_COLUMN, np.int64)
        topk_logprobs = _concat(rows, TOPK_LOGPROBS_COLUMN, None)  # floats or integer codes: decode says
        mass = _concat(rows, MASS_COLUMN, None) if self.encoding.has_mass else None
        if target.shape[0] != n or topk_ids.shape[0] != n * self.k or topk_logprobs.shape[0] != n * self.k \
                or (mass is not None and mass.shape[0] != n):
            examples = [int(np.asarray(r.get(EXAMPLE_ID_COLUMN, -1))) for r in rows]
            masses = "" if mass is None else f", {mass.shape[0]} {MASS_COLUMN} entries"
            raise ValueError(
                f"cached arrays do not match the loss mask of examples {examples}: {n} trained positions, "
                f"{target.shape[0]} target log-probs, {topk_ids.shape[0]} top-k ids{masses} (want {n} x k={self.k})"
            )
        ids, logprobs, target = decode_teacher(self.encoding, topk_ids, topk_logprobs, target, self.k, mass)
        _check_finite(rows, logprobs, target, self.encoding)
        arrays = {"teacher_topk_ids": ids[:, :self.use_k], "teacher_topk_logprobs": logprobs[:, :self.use_k],
                  "teacher_target_logprob": target}
        if self.encoding.has_draws:
            draw_ids, entropy = decode_draws(self.encoding, _concat(rows, DRAW_IDS_COLUMN, np.int64),
                                             _concat(rows, TAIL_ENTROPY_COLUMN, None))
            if draw_ids.shape[0] != n or entropy.shape[0] != n:
                raise ValueError(f"cached tail draws do not match the loss mask: {n} trained positions, {draw_ids.shape[0]} "
                                 f"x {self.encoding.tail_draws} draws and {entropy.shape[0]} tail entropies")
            arrays.update(teacher_draw_ids=draw_ids, teacher_tail_entropy=entropy)
        return arrays
