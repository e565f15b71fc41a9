"""Encode and decode the three teacher columns, vectorized over every position of a shard or batch.

    ids, values, target = encode_teacher(enc, topk_ids, topk_logprobs, target_logprob)   # [n,k],[n,k],[n]
    topk_ids, topk_logprobs, target_logprob = decode_teacher(enc, ids, values, target, k)

`encode_teacher` takes float32 log-probs in descending-probability order (what the engines give) and
returns the flat arrays a shard stores; `decode_teacher` takes the flat stored arrays (any integer or
float width: `datasets` widens them) and returns ids int64 [n, k] in descending-probability order,
log-probs float32 [n, k] and target log-probs float32 [n]. Each codec's error bound is stated in
`storage_schemas.cache_schema` and returned by `value_error_bound`; the round-trip tests hold every
codec to it.
"""
from __future__ import annotations

import numpy as np

from storage_schemas.cache_schema import Encoding

__all__ = ["encode_teacher", "decode_teacher", "value_error_bound"]


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
    else:  # sqrtp_q
        codes = np.rint(np.exp(0.5 * a) / enc.value_step)
    return np.clip(np.nan_to_num(codes, nan=enc.value_max_code, posinf=enc.value_max_code), 0,
                   enc.value_max_code).astype(np.int64)


def _dequantize(enc: Encoding, codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.float64)
    if enc.value_codec == "log_q":
        return (-codes * enc.value_step).astype(np.float32)
    with np.errstate(divide="ignore"):  # code 0 -> -inf on purpose (p below the grid)
        return (2.0 * np.log(codes * enc.value_step)).astype(np.float32)


def value_error_bound(enc: Encoding, a: np.ndarray) -> np.ndarray:
    """Largest |decoded - a| (in log-prob) the codec allows for each true log-prob in `a`.

    Floats: relative half-ulp (f16 2^-11, bf16 2^-8; f16 subnormals: half their absolute step).
    log_q: step/2 inside the range, else the distance to the range's floor. sqrtp_q: from
    |sqrt p error| <= step/2, i.e. |log error| <= 2 log(1 + step / (2 sqrt p)) (inf below the grid).
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
    root = np.exp(0.5 * a)
    with np.errstate(divide="ignore"):
        bound = 2.0 * np.log1p(enc.value_step / 2 / np.maximum(root - enc.value_step / 2, 0.0))
    return np.where(root > enc.value_step / 2, bound, np.inf)


# --- the three columns --------------------------------------------------------------------------
def encode_teacher(enc: Encoding, topk_ids: np.ndarray, topk_logprobs: np.ndarray,
                   target_logprob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, k] ids, [n, k] log-probs, [n] targets -> the arrays stored (same shapes)."""
    ids = np.asarray(topk_ids).astype(np.int64, copy=False)
    values = np.asarray(topk_logprobs, np.float32)
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
    return ids.astype(np.int32), stored, _encode_float(enc.target_codec, target_logprob)


def decode_teacher(enc: Encoding, ids: np.ndarray, values: np.ndarray, target: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat stored arrays (n*k, n*k, n) -> ids int64 [n, k], log-probs float32 [n, k], target float32 [n],
    each position's entries in descending teacher probability."""
    ids = np.asarray(ids).astype(np.int64, copy=False).reshape(-1, k)
    values = np.asarray(values)
    if enc.quantized:
        if values.dtype.kind not in "iu":
            raise ValueError(f"encoding {enc.name!r}: topk_logprobs should hold integer codes, got {values.dtype}")
        codes = values.astype(np.int64, copy=False).reshape(-1, k)
        logprobs = _dequantize(enc, np.cumsum(codes, axis=1) if enc.value_delta else codes)
    else:
        logprobs = _decode_float(enc.value_codec, values, f"encoding {enc.name!r} topk_logprobs").reshape(-1, k)
    if enc.id_order == "id_delta" and ids.size:
        ids = np.cumsum(ids, axis=1)
        order = np.argsort(-logprobs, axis=1, kind="stable")  # back to descending probability
        ids, logprobs = np.take_along_axis(ids, order, 1), np.take_along_axis(logprobs, order, 1)
    target = _decode_float(enc.target_codec, target, f"encoding {enc.name!r} target_logprob")
    return ids, np.ascontiguousarray(logprobs, np.float32), target
