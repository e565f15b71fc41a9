"""The study's two teachers and its fixed student: float32 teacher rows at k = K_MAX, student logits,
and the per-position D_k of any (decoded) teacher arrays against those logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.models import build_random_llama
from pipeline.studies.encoding.settings import K_MAX, StudyConfig
from stages.student.loss import CachedTeacher, cached_kl
from stages.teacher.hf_engine import HFEngine
from storage_schemas.shard_io import ShardRow

__all__ = ["demo_sequences", "random_model", "teacher_rows", "student_logits", "per_position_dk"]


def demo_sequences(cfg: StudyConfig) -> list[np.ndarray]:
    """The first `cfg.examples` demo training texts, tokenized, at most 256 tokens each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    texts = [json.loads(line)["text"] for line in Path(cfg.data).read_text().splitlines()[: cfg.examples]]
    encoded = [tok(t)["input_ids"][:256] for t in texts]
    return [np.asarray(ids, np.int32) for ids in encoded if len(ids) >= 2]


def random_model(out: Path, seed: int) -> Path:
    """A random-weight Llama with a 32000-token vocabulary, saved once (no tokenizer: ids only)."""
    path = out / "random32k-model"
    if not (path / "config.json").exists():
        build_random_llama(path, vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, max_position_embeddings=512, lm_head_scale=1.0, seed=seed)
    return path


def teacher_rows(model_dir: str, sequences: list[np.ndarray], vocab: int) -> list[ShardRow]:
    """k = K_MAX float32 teacher rows from the hf engine, every position trained."""
    engine = HFEngine(str(model_dir), K_MAX, "float32", max_length=512, batch_tokens=8192, vocab_size=vocab)
    scores = engine.score(sequences)
    engine.close()
    return [ShardRow(i, seq, np.ones(len(seq) - 1, bool), s.target_logprob, s.topk_ids, s.topk_logprobs)
            for i, (seq, s) in enumerate(zip(sequences, scores))]


@torch.no_grad()
def student_logits(model_dir: str, sequences: list[np.ndarray], std: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def per_position_dk(logits: torch.Tensor, targets: torch.Tensor, ids, logprobs, target,
                    estimator: str = "tail") -> np.ndarray:
    """Per-position D_k (`estimator`, tail by default), in chunks so [chunk, V] temporaries stay small."""
    out, step = [], max(1, 2 ** 22 // logits.shape[1])
    for i in range(0, len(targets), step):
        teacher = CachedTeacher(torch.from_numpy(ids[i:i + step]), torch.from_numpy(logprobs[i:i + step]),
                                torch.from_numpy(target[i:i + step]))
        out.append(cached_kl(logits[i:i + step], targets[i:i + step], teacher, estimator).double().numpy())
    return np.concatenate(out)
