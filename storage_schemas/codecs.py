"""Encode and decode the teacher columns, vectorized over every position of a shard or batch.

    ids, values, target, mass = encode_teacher(enc, topk_ids, topk_logprobs, target_logprob)  # [n,k],[n,k],[n],[n]|None
    topk_ids, topk_logprobs, target_logprob = decode_teacher(enc, ids, values, target, k, mass)

`encode_teacher` takes float32 log-probs in descending-probability order (what the engines give) and
returns the arrays a shard stores (`mass` is None unless the encoding has a `topk_mass` column);
`decode_teacher` takes the flat stored arrays (any integer or float width: `datasets` widens them)
and returns ids int64 [n, k] in descending-probability order, log-probs float32 [n, k] and target
log-probs float32 [n]. The codecs an encoding names are classes in `storage_schemas.codec_registry`
(each with encode and decode); this module applies them to the columns (id order, the mass's scale).
The round-trip tests hold every codec to its promise in docs/design.md §8 (tests/codec_promises.py).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from storage_schemas.cache_schema import Encoding
from storage_schemas.codec_registry import teacher_codecs

__all__ = ["StoredTeacher", "encode_teacher", "decode_teacher", "encode_draws", "decode_draws"]


class StoredTeacher(NamedTuple):
    """The teacher arrays as a shard stores them (flattening to the list columns is the writer's)."""

    ids: np.ndarray            # [n, k] int32
    values: np.ndarray         # [n, k] floats or int32 codes
    target: np.ndarray         # [n]
    mass: np.ndarray | None    # [n] int32 codes, only for encodings with a mass codec


# --- the three columns --------------------------------------------------------------------------
def encode_teacher(enc: Encoding, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                   target_logprob: np.ndarray) -> StoredTeacher:
    """[n, k] ids, [n, k] log-probs, [n] targets -> the arrays stored (same shapes; mass [n] or None)."""
    codecs = teacher_codecs(enc)
    ids = np.asarray(topk_ids).astype(np.int64, copy=False)
    values = np.asarray(topk_logprobs, np.float32)
    mass = codecs.mass.encode(values, target_logprob) if codecs.mass is not None else None
    if enc.id_order == "id_delta" and ids.size:
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1)
        values = np.take_along_axis(values, order, 1)
        ids = np.diff(ids, axis=1, prepend=0)
    return StoredTeacher(ids.astype(np.int32), codecs.values.encode(values), codecs.target.encode(target_logprob), mass)


def decode_teacher(enc: Encoding, ids: np.ndarray, values: np.ndarray, target: np.ndarray,
                   k: int, mass: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat stored arrays (n*k, n*k, n[, n]) -> ids int64 [n, k], log-probs float32 [n, k], target
    float32 [n], each position's entries in descending teacher probability. `mass` is the
    `topk_mass` column, required by (and only by) encodings with a mass codec."""
    codecs = teacher_codecs(enc)
    ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1, k)
    if (codecs.mass is not None) != (mass is not None):
        raise ValueError(f"encoding {enc.name!r}: " + ("needs its topk_mass column to decode" if enc.has_mass
                                                        else "has no topk_mass column, but one was given"))
    target = codecs.target.decode(target, f"encoding {enc.name!r} target_logprob")
    logprobs = codecs.values.decode(np.asarray(values).reshape(-1, k), f"encoding {enc.name!r} topk_logprobs")
    if codecs.mass is not None:  # relative values: the mass column holds their scale
        logprobs = codecs.mass.rescale(logprobs, target, mass)
    if enc.id_order == "id_delta" and ids.size:
        ids = np.cumsum(ids, axis=1)
        order = np.argsort(-logprobs, axis=1, kind="stable")  # back to descending probability
        ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
    return ids, np.ascontiguousarray(logprobs, np.float32), target


# --- the tail draws (encodings with tail_draws > 0) ----------------------------------------------
def encode_draws(enc: Encoding, draw_ids: np.ndarray, tail_entropy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Draw ids [n, m] (any order) and tail entropies [n] (nats) -> the stored arrays: each position's ids
    sorted ascending and delta-coded (first = the id itself; a repeated draw is a 0), int32 [n, m], and
    the entropies as float16 [n] (relative error <= 2^-11; they enter only the estimator's value)."""
    ids = np.sort(np.asarray(draw_ids).astype(np.int64, copy=False).reshape(-1, enc.tail_draws), axis=1)
    return np.diff(ids, axis=1, prepend=0).astype(np.int32), np.asarray(tail_entropy, np.float32).astype(np.float16)


def decode_draws(enc: Encoding, ids: np.ndarray, tail_entropy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat stored arrays (n*m, n) -> draw ids int64 [n, m] (ascending) and tail entropies float32 [n]."""
    if not enc.has_draws:
        raise ValueError(f"encoding {enc.name!r} has no tail draws (its selection is {enc.selection!r})")
    ids = np.cumsum(np.asarray(ids).astype(np.int64, copy=False).reshape(-1, enc.tail_draws), axis=1)
    return ids, np.asarray(tail_entropy).astype(np.float32)
