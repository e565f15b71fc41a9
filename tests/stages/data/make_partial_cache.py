"""Run once from the repo root: .venv/bin/python tests/stages/data/make_partial_cache.py

Made tests/stages/data/partial-cache: a stage-one cache killed after 2 of 3 shards, written by the
single-process stage one of commit a4fa375 (before stage one was rebuilt from public pieces)."""
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, "."); sys.path.append("tests")
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from tiny_models import build_tokenizer, SAMPLE_TEXTS
from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest

out = Path("tests/stages/data/partial-cache")
shutil.rmtree(out, ignore_errors=True)
model = out / "model"
tok = build_tokenizer(model, vocab_size=300)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=128, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
data = out / "data.jsonl"
data.write_text("".join(json.dumps({"text": f"{i}: {t}"}) + "\n" for i, t in enumerate(SAMPLE_TEXTS[:12])))
config = load_config(None, [f"model={model}", f"data.path={data}", f"cache.dir={out / 'cache'}", "cache.engine=hf",
                            "cache.k=8", "cache.rows_per_shard=4", "data.max_length=32"])
run_cache_teacher(config)
manifest = Manifest.load(out / "cache")
last = manifest.shards.pop()            # the state a kill after the second shard leaves: 2 of 3 shards
(out / "cache" / last.file).unlink()
manifest.complete, manifest.token_ids_sha256 = False, ""
manifest.save(out / "cache")
print(sorted(p.name for p in (out / "cache").iterdir()), sum(p.stat().st_size for p in out.rglob("*") if p.is_file()))
