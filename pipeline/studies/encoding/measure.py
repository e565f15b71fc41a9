"""Measuring encodings on fixed teacher rows: bytes/token of a real zstd Parquet shard, the error its
decoded values add to D_k, where the bytes go, lower bounds, and encode/decode speed."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.studies.encoding.candidates import candidates
from pipeline.studies.encoding.settings import DEFAULT_LEVEL, K_CURVE, StudyConfig
from pipeline.studies.encoding.teachers import per_position_dk
from storage_schemas import DEFAULT_VALUE_ENCODING, Encoding, get_encoding
from storage_schemas.codec_registry import TARGET_CODECS
from storage_schemas.codecs import encode_teacher
from storage_schemas.shard_io import ShardRow, decode_table, rows_to_table, write_shard

__all__ = ["slice_k", "measure_set", "floors", "target_near_one", "speed"]

_OTHER_ESTIMATORS = ("topk", "full_kl")  # also scored: the relative error of their mean


def slice_k(rows: list[ShardRow], k: int) -> list[ShardRow]:
    """The rows with only their first k cached tokens per position."""
    return [dataclasses.replace(r, topk_ids=r.topk_ids[:, :k], topk_logprobs=r.topk_logprobs[:, :k]) for r in rows]


def _write_read(rows: list[ShardRow], enc: Encoding, k: int, level: int, workdir: Path) -> dict:
    """Write one shard, read and decode it: bytes, seconds, decoded arrays."""
    t0 = time.perf_counter()
    record = write_shard(workdir, 0, 0, rows_to_table(rows, enc, k), zstd_level=level, truncated=0)
    t1 = time.perf_counter()
    ids, logprobs, target = decode_table(pq.read_table(workdir / record.file), enc, k)
    t2 = time.perf_counter()
    return {"bytes": record.bytes, "tokens": record.tokens, "write_s": t1 - t0, "read_s": t2 - t1,
            "decoded": (ids, logprobs, target)}


def _errors(d: np.ndarray, d_ref: np.ndarray) -> dict:
    rel = np.abs(d - d_ref) / np.maximum(d_ref, 1e-12)
    return {"mean_dk": float(d.mean()), "rel_err_mean_dk": float(abs(d.mean() - d_ref.mean()) / d_ref.mean()),
            "rel_err_pos_mean": float(rel.mean()), "rel_err_pos_max": float(rel.max())}


# --- one teacher set ----------------------------------------------------------------------------
def _candidate_table(name: str, rows_k: list[ShardRow], logits: torch.Tensor, targets: torch.Tensor, k: int,
                     workdir: Path) -> tuple[list[dict], float]:
    """One row per candidate: bytes/token, speed, and the D_k errors its decoded values add."""
    ref = np.concatenate([r.topk_ids for r in rows_k]).astype(np.int64)
    ref_lp = np.concatenate([r.topk_logprobs for r in rows_k])
    ref_t = np.concatenate([r.target_logprob for r in rows_k])
    d_ref = per_position_dk(logits, targets, ref, ref_lp, ref_t)
    others = {est: per_position_dk(logits, targets, ref, ref_lp, ref_t, est) for est in _OTHER_ESTIMATORS}
    table = []
    for enc, level in tqdm(candidates(), desc=f"{name}: encodings", unit="enc"):
        result = _write_read(rows_k, enc, k, level, workdir)
        ids, lp, tg = result.pop("decoded")
        same_sets = np.array_equal(np.sort(ids, 1), np.sort(ref, 1))
        table.append({"encoding": enc.name, "spec": json.loads(enc.spec_json()), "zstd": level,
                      "bytes_per_token": result["bytes"] / result["tokens"], "ids_lossless": bool(same_sets),
                      "write_s": result["write_s"], "read_s": result["read_s"],
                      **_errors(per_position_dk(logits, targets, ids, lp, tg), d_ref),
                      **{f"rel_err_mean_{est}": abs(per_position_dk(logits, targets, ids, lp, tg, est).mean()
                                                    / ref_d.mean() - 1)
                         for est, ref_d in others.items()}})
    return table, float(d_ref.mean())


def measure_set(name: str, rows: list[ShardRow], logits: torch.Tensor, targets: torch.Tensor, cfg: StudyConfig,
                workdir: Path) -> dict:
    """Everything the report shows for one teacher set (rows at k = K_MAX, the student's logits)."""
    rows_k = slice_k(rows, cfg.k)
    table, mean_dk = _candidate_table(name, rows_k, logits, targets, cfg.k, workdir)
    curve = []
    for k in K_CURVE:
        for enc_name, level in (("topk_f32", 3), (DEFAULT_VALUE_ENCODING, DEFAULT_LEVEL)):
            result = _write_read(slice_k(rows, k), get_encoding(enc_name), k, level, workdir)
            curve.append({"k": k, "encoding": enc_name, "bytes_per_token": result["bytes"] / result["tokens"]})
    tokens = sum(len(r.input_ids) for r in rows)
    return {"tokens": tokens, "positions": int(len(targets)), "mean_dk_f32": mean_dk,
            "vocab": int(logits.shape[1]), "candidates": table, "k_curve": curve, "ids_columns": _ids_columns(rows_k),
            "default_columns": _column_bytes(rows_k, cfg.k, workdir), "floors": floors(rows_k, int(logits.shape[1]))}


# --- where the bytes go, and what they could be -------------------------------------------------
def _column_bytes(rows: list[ShardRow], k: int, workdir: Path) -> dict:
    """Where the default encoding's bytes go: each column's compressed size / tokens."""
    record = write_shard(workdir, 1, 0, rows_to_table(rows, DEFAULT_VALUE_ENCODING, k), zstd_level=DEFAULT_LEVEL, truncated=0)
    meta = pq.ParquetFile(workdir / record.file).metadata
    out = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            column = meta.row_group(g).column(c)
            name = column.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0.0) + column.total_compressed_size / record.tokens
    out["file (footer and page headers included)"] = record.bytes / record.tokens
    return out


def _entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 (empirical) entropy of an integer array, bits per symbol."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def floors(rows: list[ShardRow], vocab: int) -> dict:
    """Lower bounds (bytes/token) on what any coder of one position at a time can reach on these rows.

    ids: the k-subset under a per-id membership model with the frequencies of these very rows (an
    optimistic order-0 bound: the model itself is not paid for), and under a uniform model
    (log2 C(V, k): the bound on random ids). values: the order-0 entropy of the default's codes in
    id order (what zstd can reach on them), and the same codes sorted per position with their
    rank-delta (prob order) plus the permutation that puts them back in id order.
    """
    ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int64)
    tokens = sum(len(r.input_ids) for r in rows)
    n, k = ids.shape
    counts = np.bincount(ids.reshape(-1), minlength=vocab)
    q = np.clip(counts / n, 1e-12, 1 - 1e-12)
    set_bits = float(-(counts * np.log2(q) + (n - counts) * np.log2(1 - q)).sum())
    uniform_bits = n * (math.lgamma(vocab + 1) - math.lgamma(k + 1) - math.lgamma(vocab - k + 1)) / math.log(2)
    enc = get_encoding(DEFAULT_VALUE_ENCODING)
    stored = encode_teacher(enc, ids, np.concatenate([r.topk_logprobs for r in rows]),
                            np.concatenate([r.target_logprob for r in rows]))
    codes = stored.values.astype(np.int64)
    sorted_codes = np.sort(codes, axis=1)
    rank_delta = np.diff(sorted_codes, axis=1, prepend=0)
    perm_bits = n * math.lgamma(k + 1) / math.log(2)  # at most: ties make it smaller
    per_rank = sum(_entropy_bits(rank_delta[:, j]) for j in range(k)) * n
    to_bytes = lambda bits: bits / 8 / tokens  # noqa: E731
    return {"ids_set_order0": to_bytes(set_bits), "ids_uniform": to_bytes(uniform_bits),
            "values_id_order_order0": to_bytes(_entropy_bits(codes) * codes.size),
            "values_prob_order_per_rank": to_bytes(per_rank), "permutation_at_most": to_bytes(perm_bits)}


def _ids_columns(rows: list[ShardRow]) -> list[dict]:
    """The topk_ids column alone: int32 vs minimal width (uint16, bit-packed) vs id-delta, plain/BSS."""
    ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int64)
    tokens = sum(len(r.input_ids) for r in rows)
    bits = max(1, int(ids.max()).bit_length())
    sorted_delta = np.diff(np.sort(ids, 1), axis=1, prepend=0)
    packed = np.packbits(((ids.reshape(-1, 1) >> np.arange(bits)) & 1).astype(np.uint8), axis=None)
    def size(array: pa.Array, **kw) -> float:
        buffer = io.BytesIO()
        pq.write_table(pa.table({"x": array}), buffer, compression="zstd", compression_level=3, **kw)
        return buffer.tell() / tokens
    out = []
    for label, arr in (("int32, prob order", pa.array(ids.reshape(-1), pa.int32())),
                       ("uint16, prob order", pa.array(ids.reshape(-1), pa.uint16()) if bits <= 16 else None),
                       ("int32, id-sorted delta", pa.array(sorted_delta.reshape(-1), pa.int32()))):
        if arr is not None:
            out.append({"ids": label, "plain": size(arr, use_dictionary=False),
                        "byte_stream_split": size(arr, use_dictionary=False, use_byte_stream_split=True),
                        "dictionary": size(arr)})
    out.append({"ids": f"bit-packed {bits} bits, prob order", "plain": size(pa.array([packed.tobytes()]),
                                                                            use_dictionary=False)})
    return out


def target_near_one() -> list[dict]:
    """Shift in log(1 - p_y) (= in every cached log p~ of that position) per target codec."""
    out = []
    for p in (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999):
        a = np.array([math.log(p)], np.float32)
        row = {"p_y": p}
        for name in ("f16", "bf16"):
            codec = TARGET_CODECS[name]()
            decoded = codec.decode(codec.encode(a), "target")
            row[name] = abs(math.log(-math.expm1(float(decoded[0]))) - math.log(-math.expm1(float(a[0])))) \
                if decoded[0] < 0 else math.inf
        out.append(row)
    return out


# --- speed --------------------------------------------------------------------------------------
def speed(rows: list[ShardRow], k: int, workdir: Path, repeats: int = 5) -> list[dict]:
    """Best-of-`repeats` seconds of rows_to_table + write_shard (sha256 included) and of read +
    decode, per (encoding, zstd level), on the same rows: the stage-one and reader cost of each."""
    out = []
    pairs = dict.fromkeys([("topk_f32", 3), ("topk_idd_logq7", 3), (DEFAULT_VALUE_ENCODING, 3), (DEFAULT_VALUE_ENCODING, DEFAULT_LEVEL)])
    for name, level in pairs:
        runs = [_write_read(slice_k(rows, k), get_encoding(name), k, level, workdir) for _ in range(repeats)]
        tokens = runs[0]["tokens"]
        write, read = min(r["write_s"] for r in runs), min(r["read_s"] for r in runs)
        out.append({"encoding": f"{name}, zstd {level}", "tokens": tokens, "write_s": write, "read_s": read,
                    "write_tok_per_s": tokens / write, "read_tok_per_s": tokens / read})
    return out
