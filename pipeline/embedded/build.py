"""Run: python -m pipeline build-default [--out build/default] [--force] [--backbone llama|qwen2]

Build the embedded default (corpora, tokenizer, base model) once, and reuse it while its recipe
is unchanged. `--backbone qwen2` builds the second backbone (recipe.py BACKBONES) into build/qwen2.

Layout of out_dir:
    data/source_train.jsonl, source_heldout.jsonl, target_train.jsonl, target_heldout.jsonl
    data/stubs_train.jsonl, stubs_heldout.jsonl   the second scenario (scenarios.py), not part of the recipe
    base-model/     HF model (safetensors) + tokenizer + generation config + build_info.json (with the
                    sha256 of every data file and of the weights)
    lm_eval_tasks/  the lm-evaluation-harness task of the held-out source prose
    recipe.json     {"recipe_hash", "recipe"}; a build whose hash matches is skipped

The build happens in a sibling temp directory renamed into place at the end, so a killed build
never leaves a directory that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from pipeline.embedded.base_model import build_base_model, model_config
from pipeline.embedded.corpora import SPLIT_FILES, build_corpora, write_splits
from pipeline.embedded.recipe import DefaultRecipe, backbone_recipe, recipe_dict, recipe_hash
from pipeline.embedded.scenarios import write_stubs
from pipeline.embedded.tokenizer import train_tokenizer

__all__ = ["build_default", "main_build_default", "RECIPE_NAME", "BUILD_INFO_NAME"]

RECIPE_NAME = "recipe.json"
BUILD_INFO_NAME = "build_info.json"
DATA_DIR, MODEL_DIR = "data", "base-model"


def build_default(out_dir: str | Path = "build/default", force: bool = False,
                  recipe: DefaultRecipe = DefaultRecipe(), progress: bool = True) -> dict:
    """Build into out_dir unless it already holds this recipe's build; return the summary."""
    out_dir = Path(out_dir)
    digest = recipe_hash(recipe)
    if not force and _is_current(out_dir, digest):
        _write_harness_task(out_dir)  # builds from before the harness task get it now (idempotent)
        write_stubs(out_dir / DATA_DIR)  # likewise the stubs scenario
        return _summary(out_dir, skipped=True)
    _refuse_foreign(out_dir)
    # A fixed name: a build killed before its cleanup leaves one directory the next build reuses.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _build_into(tmp, recipe, digest, progress)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_harness_task(out_dir)
    write_stubs(out_dir / DATA_DIR)
    return _summary(out_dir, skipped=False)


def _write_harness_task(out_dir: Path) -> None:
    """The lm-evaluation-harness task `mtcache_source_heldout` beside the model (stages/eval/harness.py): the
    held-out source prose that fits eval.max_length tokens, scored by the harness as `eval` scores it."""
    from stages.eval.harness import LOCAL_TASKS_DIR, write_local_task
    from stages.eval.settings import EvalConfig

    write_local_task(out_dir / LOCAL_TASKS_DIR, out_dir / "data" / "source_heldout.jsonl", out_dir / "base-model",
                     EvalConfig().max_length)


def _refuse_foreign(out_dir: Path) -> None:
    """A rebuild replaces out_dir wholesale, so it must be empty or an earlier build."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / RECIPE_NAME).is_file():
        raise FileExistsError(f"{out_dir} is not empty and holds no {RECIPE_NAME}: "
                              "not an embedded-default build, refusing to replace it")


def _is_current(out_dir: Path, digest: str) -> bool:
    try:
        return json.loads((out_dir / RECIPE_NAME).read_text())["recipe_hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _build_into(tmp: Path, recipe: DefaultRecipe, digest: str, progress: bool) -> None:
    """Corpora -> tokenizer -> length filter -> JSONL -> base model -> build_info -> recipe."""
    start = time.perf_counter()
    root = Path(recipe.stdlib_dir) if recipe.stdlib_dir else None
    splits = build_corpora(recipe.corpus, root)
    model_dir = tmp / MODEL_DIR
    # One tokenizer for both domains, as a real base model's tokenizer would be.
    tokenizer = train_tokenizer(splits["source_train"] + splits["target_train"], model_dir,
                                recipe.vocab_size)
    # The corpora are the same for every backbone: the length filter counts the trained tokenizer's tokens.
    splits, dropped = _drop_long(splits, tokenizer, recipe.max_example_tokens)
    tokenizer = _as_loaded(tokenizer, recipe, model_dir)
    counts = write_splits(splits, tmp / DATA_DIR)
    info = build_base_model(recipe, tokenizer, splits, model_dir, progress)
    files = sorted((tmp / DATA_DIR).glob("*.jsonl")) + sorted(model_dir.glob("*.safetensors"))
    info = {"recipe_hash": digest, "steps": recipe.steps, **info, "corpus_counts": counts,
            "dropped_too_long": dropped, "wall_time_s": round(time.perf_counter() - start, 1),
            "sha256": {f.relative_to(tmp).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}}
    (model_dir / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    # Written last: its presence with the right hash is what marks a build complete.
    (tmp / RECIPE_NAME).write_text(json.dumps(
        {"recipe_hash": digest, "recipe": recipe_dict(recipe)}, indent=2) + "\n")


def _as_loaded(tokenizer, recipe: DefaultRecipe, model_dir: Path):
    """The trained tokenizer as every later stage will load it beside this model. transformers' AutoTokenizer
    picks the class by the model's type, not by tokenizer_config.json: a qwen2 model gets Qwen2Tokenizer, whose
    pre-tokenizer splits digits off (" 2" -> " ", "2"). Pretraining on the trained object instead would teach
    the model a tokenization it never sees again. For llama the class and the tokenization are unchanged."""
    from transformers import AutoTokenizer

    model_config(recipe, tokenizer).save_pretrained(str(model_dir))
    return AutoTokenizer.from_pretrained(str(model_dir))


def _drop_long(splits: dict[str, list[str]], tokenizer, max_tokens: int):
    """Drop texts longer than max_tokens with <s> and </s>, so each fits the context alone."""
    kept, dropped = {}, {}
    for name, texts in splits.items():
        lengths = [len(ids) + 1 for ids in tokenizer(texts, verbose=False)["input_ids"]]
        kept[name] = [t for t, n in zip(texts, lengths) if n <= max_tokens]
        dropped[name] = len(texts) - len(kept[name])
    return kept, dropped


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an old out_dir is moved aside first and deleted after."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _summary(out_dir: Path, skipped: bool) -> dict:
    info = json.loads((out_dir / MODEL_DIR / BUILD_INFO_NAME).read_text())
    return {
        "out_dir": str(out_dir),
        "skipped": skipped,
        "base_model": str(out_dir / MODEL_DIR),
        "data": {name: str(out_dir / DATA_DIR / file) for name, file in SPLIT_FILES.items()},
        **info,
    }


def main_build_default(out_dir: str | None = "build/default", force: bool = False, backbone: str = "llama") -> dict:
    """CLI entry: build (or reuse) the default, or another backbone (out_dir None: build/default for llama,
    build/<backbone> otherwise), and print a readable summary."""
    if out_dir is None:
        out_dir = "build/default" if backbone == "llama" else f"build/{backbone}"
    summary = build_default(out_dir, force, recipe=backbone_recipe(backbone))
    state = "up to date, reused" if summary["skipped"] else f"built in {summary['wall_time_s']} s"
    print(f"embedded default in {summary['out_dir']}: {state} (recipe {summary['recipe_hash'][:12]})")
    print(f"  base model: {summary['base_model']} ({summary['parameters']:,} parameters, "
          f"{summary['steps']} steps)")
    for name, count in summary["corpus_counts"].items():
        print(f"  {name:15s} {count['examples']:6d} examples {count['chars']:9,d} chars")
    print(f"  loss (nats/token): chance {summary['chance_loss']:.3f}, "
          f"final train {summary['final_train_loss']:.3f}, "
          f"held-out source {summary['source_heldout_loss']:.3f}, "
          f"held-out target {summary['target_heldout_loss']:.3f}")
    return summary
