"""`python -m pipeline encoding-study`: bytes/token vs the error each cache encoding adds to D_k.

    python -m pipeline encoding-study --out runs/encoding-study            (make encoding-study)

Two teachers, both scored at k = 128 in float32 by the hf engine (smaller k = the first k entries):
- `demo`: the embedded base model (trained, realistic distributions) on the demo training text;
- `random32k`: a random Llama (4 layers, hidden 256, vocab 32000) on random token ids.
A fixed student (the same model with a seeded, perturbed LoRA, so D_k is not ~0) gives logits once.
Every candidate encoding is then written as a real zstd Parquet shard: bytes/token = file size /
tokens; its decoded values give D_k (`cached_kl`, estimator tail) against the float32 cache: the
relative error of the mean D_k (what the training loss sees) and per position (mean and max of
|dD_t| / D_t). Also: a k curve for the default, the target log-prob codecs near p_y = 1, and two short
training runs (float32 cache vs the default encoding, transcoded from the same values).
Writes `study.json` and `study.md` into --out. Times are wall seconds on whatever machine runs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.config import CacheConfig
from storage_schemas import DEFAULT_ENCODING, SCHEMA_VERSION, Encoding, Manifest, get_encoding
from storage_schemas.codecs import decode_teacher, encode_teacher
from storage_schemas.shard_io import ShardRow, decode_table, read_shard, rows_to_table, write_shard

__all__ = ["StudyConfig", "run_study", "candidates", "transcode_cache", "main"]

K_MAX = 128
DEFAULT_LEVEL = CacheConfig().zstd_level  # the DEFAULT row, k curve and column split use the default level
_OTHER_ESTIMATORS = ("topk", "full_kl")  # also scored: the relative error of their mean
K_CURVE = (8, 16, 32, 64, 128)
_BSS = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs")
_BSS_MASS = (*_BSS, "topk_mass")


@dataclass
class StudyConfig:
    out: str = "runs/encoding-study"               # study.json, study.md, models and caches
    model: str = "build/default/base-model"        # the trained demo base model
    data: str = "build/default/data/target_train.jsonl"
    examples: int = 300                            # demo sequences scored (max 256 tokens each)
    random_sequences: int = 32                     # random32k sequences of `random_length` tokens
    random_length: int = 128
    k: int = 32                                    # k of the candidate table
    lora_std: float = 0.04                         # std of the student's perturbed LoRA B (demo)
    random_lora_std: float = 0.4                   # same for random32k (its weights are small: init 0.02)
    train_cache: str = "runs/demo/cache"           # a k=32 float32 cache for the training comparison
    train_steps: int = 50                          # 0 skips the training comparison
    speed_only: bool = False                       # only time encode+write / read+decode (demo rows)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("examples", "random_sequences", "random_length", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoding-study: --{name.replace('_', '-')} must be >= 1")
        if self.k > K_MAX:
            raise ValueError(f"encoding-study: --k must be <= {K_MAX}")


# --- candidates ---------------------------------------------------------------------------------
def _enc(name: str, **kw) -> Encoding:
    return Encoding(name, "topk_nontarget", "", **kw)


def candidates() -> list[tuple[Encoding, int]]:
    """(encoding, zstd level) pairs compared at one k; names say what varies."""
    q = dict(value_max_code=65535)
    rows = [
        (_enc("int32 ids / f32 (topk_f32, exact)"), 3),
        (_enc("int32 ids / f16 (topk_f16)", value_codec="f16"), 3),
        (_enc("f32 + BSS", byte_stream_split=_BSS), 3),
        (_enc("f16 + BSS", value_codec="f16", byte_stream_split=_BSS), 3),
        (_enc("bf16 + BSS", value_codec="bf16", byte_stream_split=_BSS), 3),
        (_enc("id-delta ids / f16 + BSS", id_order="id_delta", value_codec="f16", byte_stream_split=_BSS), 3),
        (_enc("f16 + dictionary", value_codec="f16", dictionary=("input_ids", "topk_ids")), 3),
    ]
    for e in (5, 6, 7, 8, 9):
        rows.append((_enc(f"log_q 2^-{e}, rank-delta (prob order) + BSS", value_codec="log_q", value_step=2.0 ** -e,
                          value_delta=True, byte_stream_split=_BSS, **q), 3))
    rows.append((_enc("log_q uint8: step 1/16, range [-16, 0], prob order + BSS", value_codec="log_q",
                      value_step=1 / 16, value_max_code=255, byte_stream_split=_BSS), 3))
    rows.append((_enc("log_q uint4: step 1/2, range [-7.5, 0], prob order + BSS", value_codec="log_q",
                      value_step=0.5, value_max_code=15, byte_stream_split=_BSS), 3))
    rows.append((dataclasses.replace(get_encoding("topk_idd_logq7"), name="topk_idd_logq7 (the first study's default)"), 3))
    for e in (8, 9, 10, 11, 12):
        rows.append((_enc(f"sqrtp_q 2^-{e}, id-delta ids + BSS", id_order="id_delta", value_codec="sqrtp_q",
                          value_step=2.0 ** -e, value_max_code=2 ** e, byte_stream_split=_BSS), 3))
    rows.append((_enc("sqrtp_q 2^-10, rank-delta (prob order) + BSS", value_codec="sqrtp_q", value_step=2.0 ** -10,
                      value_max_code=1024, value_delta=True, byte_stream_split=_BSS), 3))
    # relpow_q: values relative to the top-1 on a (p / p_1)^power grid, the cached mass in topk_mass
    rel = dict(value_codec="relpow_q", mass_codec="logit_q", target_codec="f16", byte_stream_split=_BSS_MASS,
               data_page_bytes=64 << 20)  # the default's target codec and layout: compare the grids alone
    for power, levels, mass_e in ((0.5, 128, 8), (0.25, 64, 8), (0.25, 96, 8), (0.25, 104, 8), (0.25, 128, 8),
                                  (0.25, 256, 8), (0.125, 128, 8), (0.25, 112, 10), (0.25, 112, 12)):
        rows.append((_enc(f"relpow_q (p/p_1)^{power:g} 1/{levels}, mass 2^-{mass_e}, id-delta ids + BSS",
                          id_order="id_delta", value_power=power, value_step=1 / levels, value_max_code=levels,
                          mass_step=2.0 ** -mass_e, **rel), 3))
    rows.append((_enc("relpow_q (p/p_1)^0.25 1/112, mass 2^-8, rank-delta (prob order) + BSS", value_power=0.25,
                      value_step=1 / 112, value_max_code=112, value_delta=True, mass_step=2.0 ** -8, **rel), 3))
    default = get_encoding(DEFAULT_ENCODING)
    for target in ("f16", "bf16"):
        rows.append((dataclasses.replace(default, name=f"default, target {target}", target_codec=target), DEFAULT_LEVEL))
    rows.append((dataclasses.replace(default, name="default without BSS", byte_stream_split=()), DEFAULT_LEVEL))
    rows.append((dataclasses.replace(default, name="default + dictionary ids", dictionary=("topk_ids",),
                                     byte_stream_split=tuple(c for c in default.byte_stream_split if c != "topk_ids")),
                 DEFAULT_LEVEL))
    for level in (1, 3, 9, 12, 19):
        rows.append((dataclasses.replace(default, name=f"default, zstd {level}"), level))
    rows.append((dataclasses.replace(default, name="default, 1 MiB pages (pyarrow's default)", data_page_bytes=None),
                 DEFAULT_LEVEL))
    for group in (16, 64):
        rows.append((dataclasses.replace(default, name=f"default, row groups of {group} rows", row_group_rows=group),
                     DEFAULT_LEVEL))
    rows.insert(0, (dataclasses.replace(default, name=f"DEFAULT {DEFAULT_ENCODING}"), DEFAULT_LEVEL))
    return rows


# --- teachers and the student ------------------------------------------------------------------
def _demo_sequences(cfg: StudyConfig) -> list[np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    texts = [json.loads(line)["text"] for line in Path(cfg.data).read_text().splitlines()[: cfg.examples]]
    encoded = [tok(t)["input_ids"][:256] for t in texts]
    return [np.asarray(ids, np.int32) for ids in encoded if len(ids) >= 2]


def _random_model(out: Path, seed: int) -> Path:
    """A random-weight Llama with a 32000-token vocabulary, saved once (no tokenizer: ids only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = out / "random32k-model"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def _teacher_rows(model_dir: str, sequences: list[np.ndarray], vocab: int) -> list[ShardRow]:
    """k = K_MAX float32 teacher rows from the hf engine, every position trained."""
    from stages.teacher.hf_engine import HFEngine

    engine = HFEngine(str(model_dir), K_MAX, "float32", max_length=512, batch_tokens=8192, vocab_size=vocab)
    scores = engine.score(sequences)
    engine.close()
    return [ShardRow(i, seq, np.ones(len(seq) - 1, bool), s.target_logprob, s.topk_ids, s.topk_logprobs)
            for i, (seq, s) in enumerate(zip(sequences, scores))]


@torch.no_grad()
def _student_logits(model_dir: str, sequences: list[np.ndarray], std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V] and targets [N] of the base model with a seeded random LoRA (B ~ N(0, std))."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj",
                                                                                  "up_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=std)
    model.eval()
    logits, targets = [], []
    for seq in sequences:
        x = torch.from_numpy(seq.astype(np.int64))[None]
        logits.append(model(input_ids=x).logits[0, :-1].float())
        targets.append(x[0, 1:])
    return torch.cat(logits), torch.cat(targets)


def _dk(logits: torch.Tensor, targets: torch.Tensor, ids, logprobs, target, estimator: str = "tail") -> np.ndarray:
    """Per-position D_k (`estimator`, tail by default), in chunks so [chunk, V] temporaries stay small."""
    from stages.student.loss import CachedTeacher, cached_kl

    out, step = [], max(1, 2 ** 22 // logits.shape[1])
    for i in range(0, len(targets), step):
        teacher = CachedTeacher(torch.from_numpy(ids[i:i + step]), torch.from_numpy(logprobs[i:i + step]),
                                torch.from_numpy(target[i:i + step]))
        out.append(cached_kl(logits[i:i + step], targets[i:i + step], teacher, estimator).double().numpy())
    return np.concatenate(out)


# --- measuring one encoding --------------------------------------------------------------------
def _slice_k(rows: list[ShardRow], k: int) -> list[ShardRow]:
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


def _measure_set(name: str, rows, logits, targets, cfg: StudyConfig, workdir: Path) -> dict:
    rows_k = _slice_k(rows, cfg.k)
    ref = np.concatenate([r.topk_ids for r in rows_k]).astype(np.int64)
    ref_lp = np.concatenate([r.topk_logprobs for r in rows_k])
    ref_t = np.concatenate([r.target_logprob for r in rows_k])
    d_ref = _dk(logits, targets, ref, ref_lp, ref_t)
    others = {est: _dk(logits, targets, ref, ref_lp, ref_t, est) for est in _OTHER_ESTIMATORS}
    table = []
    for enc, level in tqdm(candidates(), desc=f"{name}: encodings", unit="enc"):
        result = _write_read(rows_k, enc, cfg.k, level, workdir)
        ids, lp, tg = result.pop("decoded")
        same_sets = np.array_equal(np.sort(ids, 1), np.sort(ref, 1))
        table.append({"encoding": enc.name, "spec": json.loads(enc.spec_json()), "zstd": level,
                      "bytes_per_token": result["bytes"] / result["tokens"], "ids_lossless": bool(same_sets),
                      "write_s": result["write_s"], "read_s": result["read_s"],
                      **_errors(_dk(logits, targets, ids, lp, tg), d_ref),
                      **{f"rel_err_mean_{est}": abs(_dk(logits, targets, ids, lp, tg, est).mean() / ref_d.mean() - 1)
                         for est, ref_d in others.items()}})
    curve = []
    for k in K_CURVE:
        for enc_name, level in (("topk_f32", 3), (DEFAULT_ENCODING, DEFAULT_LEVEL)):
            result = _write_read(_slice_k(rows, k), get_encoding(enc_name), k, level, workdir)
            curve.append({"k": k, "encoding": enc_name, "bytes_per_token": result["bytes"] / result["tokens"]})
    tokens = sum(len(r.input_ids) for r in rows)
    return {"tokens": tokens, "positions": int(len(targets)), "mean_dk_f32": float(d_ref.mean()),
            "vocab": int(logits.shape[1]), "candidates": table, "k_curve": curve, "ids_columns": _ids_columns(rows_k),
            "default_columns": _column_bytes(rows_k, cfg.k, workdir), "floors": _floors(rows_k, int(logits.shape[1]))}


def _column_bytes(rows: list[ShardRow], k: int, workdir: Path) -> dict:
    """Where the default encoding's bytes go: each column's compressed size / tokens."""
    record = write_shard(workdir, 1, 0, rows_to_table(rows, DEFAULT_ENCODING, k), zstd_level=DEFAULT_LEVEL, truncated=0)
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


def _floors(rows: list[ShardRow], vocab: int) -> dict:
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
    enc = get_encoding(DEFAULT_ENCODING)
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


def _target_near_one() -> list[dict]:
    """Shift in log(1 - p_y) (= in every cached log p~ of that position) per target codec."""
    out = []
    for p in (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999):
        a = np.array([math.log(p)], np.float32)
        row = {"p_y": p}
        for codec in ("f16", "bf16"):
            enc = Encoding("t", "topk_nontarget", "", target_codec=codec)
            stored = encode_teacher(enc, np.zeros((1, 1)), np.zeros((1, 1)), a)
            _, _, decoded = decode_teacher(enc, stored.ids, stored.values, stored.target, 1, stored.mass)
            row[codec] = abs(math.log(-math.expm1(float(decoded[0]))) - math.log(-math.expm1(float(a[0])))) \
                if decoded[0] < 0 else math.inf
        out.append(row)
    return out


# --- the training comparison -------------------------------------------------------------------
def transcode_cache(src: Path, dst: Path, encoding: str, zstd_level: int | None = None) -> Manifest:
    """Re-encode a complete cache into `encoding` (same rows, same teacher values) with its own
    manifest, at `zstd_level` (None: the source cache's level)."""
    manifest = Manifest.load(src)
    level = manifest.settings.zstd_level if zstd_level is None else zstd_level
    dst.mkdir(parents=True, exist_ok=True)
    k, records = manifest.settings.k, []
    for record in tqdm(manifest.shards, desc=f"transcode -> {encoding}", unit="shard"):
        table = read_shard(src / record.file, manifest.settings.encoding)
        ids, logprobs, target = decode_table(table, manifest.settings.encoding, k)
        rows, start = [], 0
        for row in table.select(["example_id", "input_ids", "loss_mask"]).to_pylist():
            n = int(np.sum(row["loss_mask"]))
            rows.append(ShardRow(row["example_id"], np.asarray(row["input_ids"], np.int32),
                                 np.asarray(row["loss_mask"], bool), target[start:start + n],
                                 ids[start:start + n].astype(np.int32), logprobs[start:start + n]))
            start += n
        records.append(write_shard(dst, record.index, record.first_example, rows_to_table(rows, encoding, k),
                                   level, record.truncated))
    settings = dataclasses.replace(manifest.settings, encoding=encoding, zstd_level=level)
    out = dataclasses.replace(manifest, settings=settings, shards=records, schema_version=SCHEMA_VERSION)
    out.save(dst)
    return out


def _train(cfg: StudyConfig, cache_dir: Path, run_dir: Path) -> dict:
    from pipeline.config import load_config
    from stages.train import run_train

    config = load_config("configs/demo.yaml", [f"cache.dir={cache_dir}", f"train.output_dir={run_dir}",
                                               f"train.max_steps={cfg.train_steps}", f"train.save_steps={cfg.train_steps}",
                                               "train.logging_steps=1", f"model={cfg.model}", f"train.seed={cfg.seed}"])
    metrics = run_train(config)
    log = (run_dir / "log.csv").read_text().splitlines()
    return {"final_loss": metrics["final_loss"], "final_ce": metrics["final_ce"], "final_kl": metrics["final_kl"],
            "cache_bytes_per_token": Manifest.load(cache_dir).num_bytes / Manifest.load(cache_dir).num_tokens,
            "log": log}


def _training(cfg: StudyConfig, out: Path) -> dict:
    f32_cache = Path(cfg.train_cache)
    if not (f32_cache / "manifest.json").exists():
        from pipeline.config import load_config
        from stages.cache_teacher import run_cache_teacher

        f32_cache = out / "train-cache-f32"
        run_cache_teacher(load_config("configs/demo.yaml", [f"cache.dir={f32_cache}", "cache.engine=hf",
                                                            "cache.encoding=topk_f32", f"model={cfg.model}"]))
    default_cache = out / f"train-cache-{DEFAULT_ENCODING}"
    if not (default_cache / "manifest.json").exists():
        transcode_cache(f32_cache, default_cache, DEFAULT_ENCODING, DEFAULT_LEVEL)
    return {"f32_cache": str(f32_cache), "steps": cfg.train_steps,
            "topk_f32": _train(cfg, f32_cache, out / "train-f32"),
            DEFAULT_ENCODING: _train(cfg, default_cache, out / f"train-{DEFAULT_ENCODING}")}


def _log_column(training: dict, enc: str, column: str) -> dict[int, float]:
    import csv

    return {int(r["step"]): float(r[column]) for r in csv.DictReader(training[enc]["log"])}


def _max_step_difference(training: dict, column: str) -> float:
    """Largest |difference| of a logged column between the two runs, over the steps both logged."""
    a, b = _log_column(training, "topk_f32", column), _log_column(training, DEFAULT_ENCODING, column)
    return max(abs(a[step] - b[step]) for step in a.keys() & b.keys())


def plot_training(training: dict, path: Path) -> None:
    """Loss and KL per step, float32 cache vs the default encoding, on shared axes: the issue asks
    for "no visible change in the training curve", which is a thing to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for enc, style in (("topk_f32", dict(lw=3, alpha=0.4)), (DEFAULT_ENCODING, dict(lw=1, ls="--"))):
        label = f"{enc} ({training[enc]['cache_bytes_per_token']:.1f} B/token)"
        for ax, column in zip(axes, ("loss", "kl")):
            points = sorted(_log_column(training, enc, column).items())
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
    for ax, title in zip(axes, ("training loss (CE + lambda KL)", "cached KL term (tail)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{training['steps']} steps on the demo cache: float32 cache vs {DEFAULT_ENCODING}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- report ------------------------------------------------------------------------------------
def _markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Cache encoding study (k = {cfg['k']})", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", ""]
    for name, s in result["sets"].items():
        lines += [f"## {name}: vocab {s['vocab']}, {s['tokens']:,} tokens, {s['positions']:,} positions, "
                  f"mean D_k (float32 cache) = {s['mean_dk_f32']:.4f}", "",
                  "| encoding | zstd | bytes/token | rel. err of mean D_k | per-position rel. err mean / max | "
                  "topk / full_kl rel. err of mean | write s | read+decode s |", "|---|---|---|---|---|---|---|---|"]
        for c in s["candidates"]:
            lines.append(f"| {c['encoding']} | {c['zstd']} | {c['bytes_per_token']:.1f} | {c['rel_err_mean_dk']:.1e} | "
                         f"{c['rel_err_pos_mean']:.1e} / {c['rel_err_pos_max']:.1e} | "
                         f"{c['rel_err_mean_topk']:.1e} / {c['rel_err_mean_full_kl']:.1e} | "
                         f"{c['write_s']:.3f} | {c['read_s']:.3f} |")
        lines += ["", "topk_ids column alone (bytes/token, zstd 3):", "", "| ids | plain | BSS | dictionary |",
                  "|---|---|---|---|"]
        for row in s["ids_columns"]:
            lines.append(f"| {row['ids']} | {row['plain']:.1f} | {row.get('byte_stream_split', float('nan')):.1f} | "
                         f"{row.get('dictionary', float('nan')):.1f} |")
        lines += ["", f"Where the default's bytes go ({DEFAULT_ENCODING}, bytes/token): "
                  + ", ".join(f"{name} {value:.2f}" for name, value in s["default_columns"].items()), "",
                  "Order-0 floors (bytes/token; see `_floors`): "
                  + ", ".join(f"{name} {value:.1f}" for name, value in s["floors"].items())]
        lines += ["", f"Cost curve (bytes/token; topk_f32 at zstd 3, {DEFAULT_ENCODING} at zstd {DEFAULT_LEVEL}):", "", "| k | " + " | ".join(str(k) for k in K_CURVE) + " |",
                  "|---|" + "---|" * len(K_CURVE)]
        for enc in ("topk_f32", DEFAULT_ENCODING):
            lines.append(f"| {enc} | " + " | ".join(f"{c['bytes_per_token']:.1f}" for c in s["k_curve"]
                                                   if c["encoding"] == enc) + " |")
        lines.append("")
    lines += ["## Target log-prob codecs near p_y = 1: |shift of log(1 - p_y)| (nats)", "",
              "| p_y | f16 | bf16 |", "|---|---|---|"]
    lines += [f"| {r['p_y']} | {r['f16']:.2e} | {r['bf16']:.2e} |" for r in result["target_near_one"]]
    if result.get("training"):
        t = result["training"]
        lines += ["", f"## Training, {t['steps']} steps on the demo cache (configs/demo.yaml, tail, lambda 1)", "",
                  "| cache | bytes/token | final loss | final CE | final KL |", "|---|---|---|---|---|"]
        for enc in ("topk_f32", DEFAULT_ENCODING):
            r = t[enc]
            lines.append(f"| {enc} | {r['cache_bytes_per_token']:.1f} | {r['final_loss']:.5f} | {r['final_ce']:.5f} | "
                         f"{r['final_kl']:.5f} |")
        lines += ["", f"Largest per-step difference over the {t['steps']} steps: loss "
                  f"{_max_step_difference(t, 'loss'):.2e}, KL {_max_step_difference(t, 'kl'):.2e} "
                  "(per-step curves: `training_curves.png`)."]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, " \
           f"pyarrow {pa.__version__}"


def _speed(rows: list[ShardRow], k: int, workdir: Path, repeats: int = 5) -> list[dict]:
    """Best-of-`repeats` seconds of rows_to_table + write_shard (sha256 included) and of read +
    decode, per (encoding, zstd level), on the same rows: the stage-one and reader cost of each."""
    out = []
    pairs = dict.fromkeys([("topk_f32", 3), ("topk_idd_logq7", 3), (DEFAULT_ENCODING, 3), (DEFAULT_ENCODING, DEFAULT_LEVEL)])
    for name, level in pairs:
        runs = [_write_read(_slice_k(rows, k), get_encoding(name), k, level, workdir) for _ in range(repeats)]
        tokens = runs[0]["tokens"]
        write, read = min(r["write_s"] for r in runs), min(r["read_s"] for r in runs)
        out.append({"encoding": f"{name}, zstd {level}", "tokens": tokens, "write_s": write, "read_s": read,
                    "write_tok_per_s": tokens / write, "read_tok_per_s": tokens / read})
    return out


def _speed_markdown(rows: list[dict]) -> str:
    lines = ["| encoding | encode + write (tok/s) | read + decode (tok/s) |", "|---|---|---|"]
    lines += [f"| {r['encoding']} | {r['write_tok_per_s']:,.0f} | {r['read_tok_per_s']:,.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, command: str = "python -m pipeline encoding-study") -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.speed_only:
        rows = _teacher_rows(cfg.model, _demo_sequences(cfg), 2048)
        with tempfile.TemporaryDirectory(dir=out) as workdir:
            speed = _speed(rows, cfg.k, Path(workdir))
        (out / "speed.json").write_text(json.dumps({"command": command, "machine": _machine(), "speed": speed}, indent=1))
        (out / "speed.md").write_text(_speed_markdown(speed))
        return {"speed": speed}
    result = {"config": dataclasses.asdict(cfg), "command": command, "machine": _machine(),
              "default": DEFAULT_ENCODING, "sets": {}}
    rng = np.random.default_rng(cfg.seed)
    random_dir = _random_model(out, cfg.seed)
    sets = {"demo": (cfg.model, _demo_sequences(cfg), cfg.lora_std),
            "random32k": (str(random_dir), [rng.integers(0, 32000, cfg.random_length).astype(np.int32)
                                            for _ in range(cfg.random_sequences)], cfg.random_lora_std)}
    for name, (model_dir, sequences, lora_std) in sets.items():
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        rows = _teacher_rows(model_dir, sequences, vocab)
        logits, targets = _student_logits(model_dir, sequences, lora_std, cfg.seed)
        with tempfile.TemporaryDirectory(dir=out) as workdir:
            result["sets"][name] = _measure_set(name, rows, logits, targets, cfg, Path(workdir))
        del logits
    result["target_near_one"] = _target_near_one()
    if cfg.train_steps > 0:
        for run in ("train-f32", f"train-{DEFAULT_ENCODING}"):
            shutil.rmtree(out / run, ignore_errors=True)  # a re-run trains afresh
        result["training"] = _training(cfg, out)
        plot_training(result["training"], out / "training_curves.png")
    (out / "study.json").write_text(json.dumps(result, indent=1))
    (out / "study.md").write_text(_markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline encoding-study", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(StudyConfig):
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help="(flag)")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f"(default: {f.default})")
    args = parser.parse_args(argv)
    cfg = StudyConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyConfig)})
    result = run_study(cfg, "python -m pipeline encoding-study " + " ".join(argv or []))
    print(_speed_markdown(result["speed"]) if cfg.speed_only else _markdown(result))
    return 0
