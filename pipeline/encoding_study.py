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

from storage_schemas import DEFAULT_ENCODING, Encoding, Manifest, get_encoding
from storage_schemas.codecs import decode_teacher, encode_teacher
from storage_schemas.shard_io import ShardRow, decode_table, read_shard, rows_to_table, write_shard

__all__ = ["StudyConfig", "run_study", "candidates", "transcode_cache", "main"]

K_MAX = 128
K_CURVE = (8, 16, 32, 64, 128)
_BSS = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs")


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
    train_steps: int = 20                          # 0 skips the training comparison
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
        (_enc("int32 ids / f32 (topk_f32, today)"), 3),
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
    rows.append((_enc("log_q 2^-7, id-delta ids + BSS", id_order="id_delta", value_codec="log_q",
                      value_step=2.0 ** -7, byte_stream_split=_BSS, **q), 3))
    for e in (8, 9, 10, 11, 12):
        rows.append((_enc(f"sqrtp_q 2^-{e}, id-delta ids + BSS", id_order="id_delta", value_codec="sqrtp_q",
                          value_step=2.0 ** -e, value_max_code=2 ** e, byte_stream_split=_BSS), 3))
    rows.append((_enc("sqrtp_q 2^-10, rank-delta (prob order) + BSS", value_codec="sqrtp_q", value_step=2.0 ** -10,
                      value_max_code=1024, value_delta=True, byte_stream_split=_BSS), 3))
    default = get_encoding(DEFAULT_ENCODING)
    for target in ("f16", "bf16"):
        rows.append((dataclasses.replace(default, name=f"default, target {target}", target_codec=target), 3))
    rows.append((dataclasses.replace(default, name="default without BSS", byte_stream_split=()), 3))
    rows.append((dataclasses.replace(default, name="default + dictionary ids", dictionary=("topk_ids",),
                                     byte_stream_split=tuple(c for c in _BSS if c != "topk_ids")), 3))
    for level in (1, 9, 19):
        rows.append((dataclasses.replace(default, name=f"default, zstd {level}"), level))
    for group in (16, 64):
        rows.append((dataclasses.replace(default, name=f"default, row groups of {group} rows", row_group_rows=group), 3))
    rows.insert(0, (dataclasses.replace(default, name=f"DEFAULT {DEFAULT_ENCODING}"), 3))
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


def _dk(logits: torch.Tensor, targets: torch.Tensor, ids, logprobs, target) -> np.ndarray:
    """Per-position D_k (tail estimator), in chunks so [chunk, V] temporaries stay small."""
    from stages.student.loss import CachedTeacher, cached_kl

    out, step = [], max(1, 2 ** 22 // logits.shape[1])
    for i in range(0, len(targets), step):
        teacher = CachedTeacher(torch.from_numpy(ids[i:i + step]), torch.from_numpy(logprobs[i:i + step]),
                                torch.from_numpy(target[i:i + step]))
        out.append(cached_kl(logits[i:i + step], targets[i:i + step], teacher).double().numpy())
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
    table = []
    for enc, level in tqdm(candidates(), desc=f"{name}: encodings", unit="enc"):
        result = _write_read(rows_k, enc, cfg.k, level, workdir)
        ids, lp, tg = result.pop("decoded")
        same_sets = np.array_equal(np.sort(ids, 1), np.sort(ref, 1))
        table.append({"encoding": enc.name, "spec": json.loads(enc.spec_json()), "zstd": level,
                      "bytes_per_token": result["bytes"] / result["tokens"], "ids_lossless": bool(same_sets),
                      "write_s": result["write_s"], "read_s": result["read_s"],
                      **_errors(_dk(logits, targets, ids, lp, tg), d_ref)})
    curve = []
    for k in K_CURVE:
        for enc_name in ("topk_f32", DEFAULT_ENCODING):
            result = _write_read(_slice_k(rows, k), get_encoding(enc_name), k, 3, workdir)
            curve.append({"k": k, "encoding": enc_name, "bytes_per_token": result["bytes"] / result["tokens"]})
    tokens = sum(len(r.input_ids) for r in rows)
    return {"tokens": tokens, "positions": int(len(targets)), "mean_dk_f32": float(d_ref.mean()),
            "vocab": int(logits.shape[1]), "candidates": table, "k_curve": curve, "ids_columns": _ids_columns(rows_k)}


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
            _, _, decoded = decode_teacher(enc, *encode_teacher(enc, np.zeros((1, 1)), np.zeros((1, 1)), a), 1)
            row[codec] = abs(math.log(-math.expm1(float(decoded[0]))) - math.log(-math.expm1(float(a[0])))) \
                if decoded[0] < 0 else math.inf
        out.append(row)
    return out


# --- the training comparison -------------------------------------------------------------------
def transcode_cache(src: Path, dst: Path, encoding: str) -> Manifest:
    """Re-encode a complete cache into `encoding` (same rows, same teacher values) with its own manifest."""
    manifest = Manifest.load(src)
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
                                   manifest.settings.zstd_level, record.truncated))
    settings = dataclasses.replace(manifest.settings, encoding=encoding)
    out = dataclasses.replace(manifest, settings=settings, shards=records, schema_version=2)
    out.save(dst)
    return out


def _train(cfg: StudyConfig, cache_dir: Path, run_dir: Path) -> dict:
    from pipeline.config import load_config
    from stages.train import run_train

    config = load_config("configs/demo.yaml", [f"cache.dir={cache_dir}", f"train.output_dir={run_dir}",
                                               f"train.max_steps={cfg.train_steps}", f"train.save_steps={cfg.train_steps}",
                                               f"model={cfg.model}", f"train.seed={cfg.seed}"])
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
        transcode_cache(f32_cache, default_cache, DEFAULT_ENCODING)
    return {"f32_cache": str(f32_cache), "steps": cfg.train_steps,
            "topk_f32": _train(cfg, f32_cache, out / "train-f32"),
            DEFAULT_ENCODING: _train(cfg, default_cache, out / f"train-{DEFAULT_ENCODING}")}


# --- report ------------------------------------------------------------------------------------
def _markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Cache encoding study (k = {cfg['k']})", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", ""]
    for name, s in result["sets"].items():
        lines += [f"## {name}: vocab {s['vocab']}, {s['tokens']:,} tokens, {s['positions']:,} positions, "
                  f"mean D_k (float32 cache) = {s['mean_dk_f32']:.4f}", "",
                  "| encoding | zstd | bytes/token | rel. err of mean D_k | per-position rel. err mean / max | "
                  "write s | read+decode s |", "|---|---|---|---|---|---|---|"]
        for c in s["candidates"]:
            lines.append(f"| {c['encoding']} | {c['zstd']} | {c['bytes_per_token']:.1f} | {c['rel_err_mean_dk']:.1e} | "
                         f"{c['rel_err_pos_mean']:.1e} / {c['rel_err_pos_max']:.1e} | {c['write_s']:.3f} | {c['read_s']:.3f} |")
        lines += ["", "topk_ids column alone (bytes/token, zstd 3):", "", "| ids | plain | BSS | dictionary |",
                  "|---|---|---|---|"]
        for row in s["ids_columns"]:
            lines.append(f"| {row['ids']} | {row['plain']:.1f} | {row.get('byte_stream_split', float('nan')):.1f} | "
                         f"{row.get('dictionary', float('nan')):.1f} |")
        lines += ["", "Cost curve (bytes/token, zstd 3):", "", "| k | " + " | ".join(str(k) for k in K_CURVE) + " |",
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
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, " \
           f"pyarrow {pa.__version__}"


def _speed(rows: list[ShardRow], k: int, workdir: Path, repeats: int = 5) -> list[dict]:
    """Best-of-`repeats` seconds of rows_to_table + write_shard (zstd 3, sha256 included) and of
    read + decode, per encoding, on the same rows: the stage-one and reader cost of the encoding."""
    out = []
    for name in ("topk_f32", DEFAULT_ENCODING):
        runs = [_write_read(_slice_k(rows, k), get_encoding(name), k, 3, workdir) for _ in range(repeats)]
        tokens = runs[0]["tokens"]
        write, read = min(r["write_s"] for r in runs), min(r["read_s"] for r in runs)
        out.append({"encoding": name, "tokens": tokens, "write_s": write, "read_s": read,
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
