"""Encode and decode the teacher columns, vectorized over every position of a shard or batch.

    ids, values, target, mass = encode_teacher(enc, topk_ids, topk_logprobs, target_logprob)  # [n,k],[n,k],[n],[n]|None
    topk_ids, topk_logprobs, target_logprob = decode_teacher(enc, ids, values, target, k, mass)

`encode_teacher` takes float32 log-probs in descending-probability order (what the engines give) and
returns the arrays a shard stores (`mass` is None unless the encoding has a `topk_mass` column);
`decode_teacher` takes the flat stored arrays (any integer or float width: `datasets` widens them)
and returns ids int64 [n, k] in descending-probability order, log-probs float32 [n, k] and target
log-probs float32 [n]. Each codec's error bound is stated in `storage_schemas.cache_schema` and
returned by `value_error_bound`; the round-trip tests hold every codec to it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from storage_schemas.cache_schema import MASS_LOGIT_RANGE, Encoding

__all__ = ["StoredTeacher", "encode_teacher", "decode_teacher", "value_error_bound"]

# Stand-in for log(1 - p_y) when p_y rounds to 1 in float32 (a_y == 0, so 1 - p_y < 2^-25): the
# masked estimators renormalize by max(log(1 - p_y), logsumexp(a_S)) and so never see the scale.
_LOG_NONTARGET_FLOOR = -25 * np.log(2.0)


class StoredTeacher(NamedTuple):
    """The teacher arrays as a shard stores them (flattening to the list columns is the writer's)."""

    ids: np.ndarray            # [n, k] int32
    values: np.ndarray         # [n, k] floats or int32 codes
    target: np.ndarray         # [n]
    mass: np.ndarray | None    # [n] int32 codes, only for encodings with a mass codec


# --- floats -------------------------------------------------------------------------------------
def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits after round-to-nearest-even (what torch's bfloat16 cast does)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def _from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def _encode_float(codec: str, x: np.ndarray) -> np.ndarray:
    if codec == "f32":
        return np.asarray(x, np.float32)
    if codec == "f16":
        return np.asarray(x, np.float32).astype(np.float16)
    return _to_bf16_bits(x)


def _decode_float(codec: str, x: np.ndarray, where: str) -> np.ndarray:
    x = np.asarray(x)
    if codec == "bf16":
        if x.dtype.kind not in "iu":
            raise ValueError(f"{where}: bf16 expects integer bit patterns, got {x.dtype}")
        return _from_bf16_bits(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{where}: {codec} expects floats, got {x.dtype} (integer codes mean another encoding: "
                         "decode with the cache's manifest.settings.encoding)")
    return x.astype(np.float32, copy=False)


# --- quantized values ---------------------------------------------------------------------------
def _quantize(enc: Encoding, a: np.ndarray) -> np.ndarray:
    """log-probs [n, k] -> integer codes in [0, max_code] (int64)."""
    a = np.asarray(a, np.float64)
    if enc.value_codec == "log_q":
        codes = np.rint(-a / enc.value_step)
    elif enc.value_codec == "relpow_q":
        codes = np.rint(-np.expm1(enc.value_power * (a - a.max(axis=1, keepdims=True))) / enc.value_step)
    else:  # sqrtp_q
        codes = np.rint(np.exp(0.5 * a) / enc.value_step)
    return np.clip(np.nan_to_num(codes, nan=enc.value_max_code, posinf=enc.value_max_code), 0,
                   enc.value_max_code).astype(np.int64)


def _dequantize(enc: Encoding, codes: np.ndarray) -> np.ndarray:
    """Codes -> log-probs float32; for relpow_q, log(p / p_1) in float64 (the mass sets the scale)."""
    codes = codes.astype(np.float64)
    if enc.value_codec == "log_q":
        return (-codes * enc.value_step).astype(np.float32)
    if enc.value_codec == "relpow_q":
        root = np.maximum(1.0 - codes * enc.value_step, enc.value_step / 4)  # bottom code: r^power = step/4
        return np.log(root) / enc.value_power
    with np.errstate(divide="ignore"):  # code 0 -> -inf on purpose (p below the grid)
        return (2.0 * np.log(codes * enc.value_step)).astype(np.float32)


# --- the cached mass (relpow_q) -----------------------------------------------------------------
def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 in float64, accurate at both ends; -inf at 0."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _log_nontarget(target: np.ndarray) -> np.ndarray:
    """log(1 - p_y) from the (decoded) target log-probs, float64."""
    a_y = np.asarray(target, np.float64)
    return np.where(a_y < 0, _log1mexp(a_y), _LOG_NONTARGET_FLOOR)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(a - top).sum(axis=1))


def _encode_mass(enc: Encoding, a: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Cached share S = sum_S p / (1 - p_y) of each position -> int32 code of its logit."""
    log_share = np.minimum(_logsumexp_rows(np.asarray(a, np.float64)) - _log_nontarget(target), 0.0)
    with np.errstate(divide="ignore"):
        logit = log_share - _log1mexp(log_share)  # +inf when S rounds to 1 (k = V - 1): clamped
    codes = np.rint((np.clip(logit, -MASS_LOGIT_RANGE, MASS_LOGIT_RANGE) + MASS_LOGIT_RANGE) / enc.mass_step)
    return np.clip(codes, 0, enc.mass_max_code).astype(np.int32)


def _decode_relative(enc: Encoding, codes: np.ndarray, target: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """relpow_q codes [n, k] + mass codes [n] -> log-probs [n, k] holding exactly the coded mass."""
    log_rel = _dequantize(enc, codes)
    logit = np.asarray(mass, np.float64) * enc.mass_step - MASS_LOGIT_RANGE
    log_share = -np.logaddexp(0.0, -logit)  # log sigmoid
    scale = _log_nontarget(target) + log_share - _logsumexp_rows(log_rel)
    return (log_rel + scale[:, None]).astype(np.float32)


def value_error_bound(enc: Encoding, a: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """Largest |decoded - a| (in log-prob) the codec allows for each true log-prob in `a`.

    Floats: relative half-ulp (f16 2^-11, bf16 2^-8; f16 subnormals: half their absolute step).
    log_q: step/2 inside the range, else the distance to the range's floor. sqrtp_q: from
    |sqrt p error| <= step/2, i.e. |log error| <= 2 log(1 + step / (2 sqrt p)) (inf below the grid).
    relpow_q (`a` holds whole positions [n, k]): the entry's own grid error e_i = -log(1 - step /
    (2 u_i)) / power with u_i = (p_i / p_1)^power (inf when u_i <= step / 2: the bottom code), plus
    the position's renormalization, at most max_j e_j over the entries on the grid plus k
    (step/2)^(1/power) for those below it, plus mass_step / 2 for the mass. That bounds the values
    relative to log(1 - p_y), which is all the masked estimators read; with the true `target` [n]
    given, the shift of log(1 - p_y) by the target codec's rounding is added (absolute values).
    """
    a = np.asarray(a, np.float64)
    if enc.value_codec == "f32":
        return np.zeros_like(a)
    if enc.value_codec == "f16":
        return np.maximum(np.abs(a) * 2.0 ** -11, 2.0 ** -25)
    if enc.value_codec == "bf16":
        return np.abs(a) * 2.0 ** -8
    if enc.value_codec == "log_q":
        floor = -enc.value_max_code * enc.value_step
        return np.where(a >= floor, enc.value_step / 2, floor - a + enc.value_step / 2)
    if enc.value_codec == "relpow_q":
        u = np.exp(enc.value_power * (a - a.max(axis=1, keepdims=True)))
        on_grid = u > enc.value_step / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            own = np.where(on_grid, -np.log1p(-enc.value_step / (2 * u)) / enc.value_power, np.inf)
        below = a.shape[1] * (enc.value_step / 2) ** (1 / enc.value_power)
        shared = np.where(on_grid, own, 0.0).max(axis=1, keepdims=True) + below + enc.mass_step / 2
        if target is not None:
            target = np.asarray(target, np.float32)
            rounded = _decode_float(enc.target_codec, _encode_float(enc.target_codec, target), "target")
            shared = shared + np.abs(_log_nontarget(rounded) - _log_nontarget(target))[:, None]
        return own + shared
    root = np.exp(0.5 * a)
    with np.errstate(divide="ignore"):
        bound = 2.0 * np.log1p(enc.value_step / 2 / np.maximum(root - enc.value_step / 2, 0.0))
    return np.where(root > enc.value_step / 2, bound, np.inf)


# --- the three columns --------------------------------------------------------------------------
def encode_teacher(enc: Encoding, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                   target_logprob: np.ndarray) -> StoredTeacher:
    """[n, k] ids, [n, k] log-probs, [n] targets -> the arrays stored (same shapes; mass [n] or None)."""
    ids = np.asarray(topk_ids).astype(np.int64, copy=False)
    values = np.asarray(topk_logprobs, np.float32)
    mass = _encode_mass(enc, values, target_logprob) if enc.has_mass else None
    if enc.id_order == "id_delta" and ids.size:
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, 1)
        values = np.take_along_axis(values, order, 1)
        ids = np.diff(ids, axis=1, prepend=0)
    if enc.quantized:
        stored = _quantize(enc, values)
        if enc.value_delta:
            stored = np.diff(stored, axis=1, prepend=0)
        stored = stored.astype(np.int32)
    else:
        stored = _encode_float(enc.value_codec, values)
    return StoredTeacher(ids.astype(np.int32), stored, _encode_float(enc.target_codec, target_logprob), mass)


def decode_teacher(enc: Encoding, ids: np.ndarray, values: np.ndarray, target: np.ndarray,
                   k: int, mass: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat stored arrays (n*k, n*k, n[, n]) -> ids int64 [n, k], log-probs float32 [n, k], target
    float32 [n], each position's entries in descending teacher probability. `mass` is the
    `topk_mass` column, required by (and only by) encodings with a mass codec."""
    ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1, k)
    values = np.asarray(values)
    if enc.has_mass != (mass is not None):
        raise ValueError(f"encoding {enc.name!r}: " + ("needs its topk_mass column to decode" if enc.has_mass
                                                        else "has no topk_mass column, but one was given"))
    target = _decode_float(enc.target_codec, target, f"encoding {enc.name!r} target_logprob")
    if enc.quantized:
        if values.dtype.kind not in "iu":
            raise ValueError(f"encoding {enc.name!r}: topk_logprobs should hold integer codes, got {values.dtype}")
        codes = values.astype(np.int64, copy=False).reshape(-1, k)
        codes = np.cumsum(codes, axis=1) if enc.value_delta else codes
        logprobs = _decode_relative(enc, codes, target, mass) if enc.value_codec == "relpow_q" \
            else _dequantize(enc, codes)
    else:
        logprobs = _decode_float(enc.value_codec, values, f"encoding {enc.name!r} topk_logprobs").reshape(-1, k)
    if enc.id_order == "id_delta" and ids.size:
        ids = np.cumsum(ids, axis=1)
        order = np.argsort(-logprobs, axis=1, kind="stable")  # back to descending probability
        ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
    return ids, np.ascontiguousarray(logprobs, np.float32), target
