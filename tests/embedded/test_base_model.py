"""Run: pytest tests/embedded/test_base_model.py

The tiny variant of the embedded default: reproducible weights, loadable with the Auto classes,
the exact files written, and the build cache (skip when unchanged, rebuild when changed)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.embedded import build as build_module
from pipeline.embedded.build import BUILD_INFO_NAME, RECIPE_NAME, build_default
from pipeline.embedded.corpora import SPLIT_FILES, read_jsonl
from pipeline.embedded.scenarios import STUBS_FILES

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", BUILD_INFO_NAME}


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def test_build_writes_exactly_these_files(tiny_build):
    out = Path(tiny_build["out_dir"])
    expected = {RECIPE_NAME} | {f"data/{f}" for f in [*SPLIT_FILES.values(), *STUBS_FILES.values()]} | {
        f"base-model/{f}" for f in MODEL_FILES} | {f"lm_eval_tasks/mtcache_source_heldout.{ext}" for ext in ("yaml", "jsonl")}
    assert _files(out) == expected
    assert not list(out.parent.glob(".default.*")), "temp directories left behind"


def test_same_recipe_gives_bit_identical_weights(tiny_build, tiny_recipe, tmp_path):
    again = build_default(tmp_path / "again", recipe=tiny_recipe, progress=False)
    first = load_file(Path(tiny_build["base_model"]) / "model.safetensors")
    second = load_file(Path(again["base_model"]) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in SPLIT_FILES.values():
        assert (Path(tiny_build["out_dir"]) / "data" / name).read_bytes() == \
               (tmp_path / "again" / "data" / name).read_bytes()
    assert again["final_train_loss"] == tiny_build["final_train_loss"]


def test_loads_with_auto_classes(tiny_build, tiny_recipe):
    model = AutoModelForCausalLM.from_pretrained(tiny_build["base_model"])
    tok = AutoTokenizer.from_pretrained(tiny_build["base_model"])
    config = model.config
    assert config.model_type == "llama" and model.dtype == torch.float32
    assert config.vocab_size == len(tok) == tiny_recipe.vocab_size
    assert config.hidden_size // config.num_attention_heads == 64
    assert not config.tie_word_embeddings
    text = read_jsonl(tiny_build["data"]["source_heldout"])[0]
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert math.isfinite(loss)


def test_a_qwen2_backbone_builds_on_the_same_corpora_and_tokenizer(tiny_build, tiny_recipe, tmp_path):
    """The second backbone's family: Qwen2 with tied embeddings and grouped KV heads, the same data and tokenizer."""
    recipe = dataclasses.replace(tiny_recipe, family="qwen2", kv_heads=1, tie_embeddings=True)
    built = build_default(tmp_path / "qwen2", recipe=recipe, progress=False)
    model = AutoModelForCausalLM.from_pretrained(built["base_model"])
    config = model.config
    assert config.model_type == "qwen2" and config.tie_word_embeddings and config.num_key_value_heads == 1
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert config.hidden_size // config.num_attention_heads == 64
    assert built["recipe_hash"] != tiny_build["recipe_hash"]
    for name in SPLIT_FILES.values():  # the corpora do not depend on the backbone
        assert (tmp_path / "qwen2" / "data" / name).read_bytes() == (Path(tiny_build["out_dir"]) / "data" / name).read_bytes()
    # the same trained vocabulary and merges; each family's own tokenizer class around them, as AutoTokenizer
    # loads it (qwen2: Qwen2Tokenizer, digits split off), and the model pretrained on exactly that tokenization
    qwen2_tok, llama_tok = AutoTokenizer.from_pretrained(built["base_model"]), AutoTokenizer.from_pretrained(tiny_build["base_model"])
    assert qwen2_tok.get_vocab() == llama_tok.get_vocab() and type(qwen2_tok).__name__ == "Qwen2Tokenizer"
    assert qwen2_tok.tokenize("n = 6") == ["n", "Ġ=", "Ġ", "6"]  # the digit split off its space
    from pipeline.embedded.base_model import eval_loss, pack

    heldout = pack(qwen2_tok, read_jsonl(built["data"]["source_heldout"]), recipe.seq_len)  # as the build scored it
    assert eval_loss(model.eval(), heldout) == pytest.approx(built["source_heldout_loss"], rel=1e-6)
    assert math.isfinite(built["source_heldout_loss"]) and built["final_train_loss"] < built["chance_loss"]


def test_build_info_and_summary(tiny_build, tiny_recipe):
    assert tiny_build["skipped"] is False
    assert tiny_build["steps"] == tiny_recipe.steps
    assert len(tiny_build["train_loss_every_25_steps"]) == 1
    assert tiny_build["chance_loss"] == pytest.approx(math.log(tiny_recipe.vocab_size))
    # Even 20 steps move the model off uniform on the domain it trains on.
    assert tiny_build["final_train_loss"] < tiny_build["chance_loss"]
    for name in ("source_heldout_loss", "target_heldout_loss"):
        assert math.isfinite(tiny_build[name])
    counts = tiny_build["corpus_counts"]
    for name, path in tiny_build["data"].items():
        assert counts[name]["examples"] == len(read_jsonl(path))
    # the sha256 of every file the build wrote into data/ and of the weights, by an independent hashing
    out = Path(tiny_build["out_dir"])
    hashed = {f"data/{f}" for f in SPLIT_FILES.values()} | {"base-model/model.safetensors"}
    assert set(tiny_build["sha256"]) == hashed
    assert all(tiny_build["sha256"][f] == hashlib.sha256((out / f).read_bytes()).hexdigest() for f in hashed)


def test_skips_when_unchanged_and_rebuilds_when_changed(tiny_build, tiny_recipe, tmp_path):
    out = tmp_path / "default"
    shutil.copytree(tiny_build["out_dir"], out)
    weights = out / "base-model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_default(out, recipe=tiny_recipe, progress=False)["skipped"] is True
    assert weights.stat().st_mtime_ns == stamp
    changed = dataclasses.replace(tiny_recipe, steps=tiny_recipe.steps + 1)
    summary = build_default(out, recipe=changed, progress=False)
    assert summary["skipped"] is False and summary["steps"] == changed.steps
    recorded = json.loads((out / RECIPE_NAME).read_text())
    assert recorded["recipe"]["steps"] == changed.steps
    assert not list(tmp_path.glob(".default.*")), "temp or old directories left behind"


def test_failed_rebuild_keeps_the_old_build(tiny_build, tiny_recipe, tmp_path, monkeypatch):
    """A build killed midway (here: forced, then failing) leaves the previous build untouched."""
    out = tmp_path / "default"
    shutil.copytree(tiny_build["out_dir"], out)
    before = {name: (out / name).read_bytes() for name in _files(out)}

    def fail(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_module, "build_base_model", fail)
    with pytest.raises(RuntimeError):
        build_default(out, recipe=tiny_recipe, force=True, progress=False)
    assert {name: (out / name).read_bytes() for name in _files(out)} == before
    assert [p.name for p in tmp_path.iterdir()] == ["default"]


def test_refuses_to_replace_a_directory_that_is_not_a_build(tiny_recipe, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_default(tmp_path, recipe=tiny_recipe, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_recipe_validation():
    from pipeline.embedded.recipe import DefaultRecipe

    with pytest.raises(ValueError, match="64"):
        DefaultRecipe(hidden=128, heads=8)
    with pytest.raises(ValueError, match="seq_len"):
        DefaultRecipe(seq_len=1024)
    with pytest.raises(ValueError, match="family 'gpt2'"):
        DefaultRecipe(family="gpt2")
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        DefaultRecipe(hidden=192, heads=3, kv_heads=2)


def test_named_backbones_and_the_cli_choices():
    from pipeline.commands import COMMANDS, command_parser
    from pipeline.embedded.recipe import BACKBONES, DefaultRecipe, backbone_recipe

    assert backbone_recipe("llama") == DefaultRecipe()
    qwen2 = backbone_recipe("qwen2")
    assert qwen2.family == "qwen2" and qwen2.tie_embeddings and qwen2.hidden // qwen2.heads == 64
    with pytest.raises(ValueError, match="backbone 'gpt2': expected one of \\['llama', 'qwen2'\\]"):
        backbone_recipe("gpt2")
    parser = command_parser(COMMANDS["build-default"])
    assert parser.parse_args(["--backbone", "qwen2"]).backbone == "qwen2" and set(BACKBONES) == {"llama", "qwen2"}
