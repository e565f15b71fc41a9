"""Run: python -m pipeline build-default

The embedded default: a tiny base model and two corpora built from nothing but this Python's
standard library, so the project runs end to end with no download.

- source corpus: English prose (stdlib docstrings); the base model is pretrained on it.
- target corpus: Python code (stdlib functions, docstrings removed); the fine-tuning task.
- base model: a 4-layer Llama with a byte-level BPE tokenizer trained on both domains.

`build_default(out_dir)` builds once and reuses the build while `DefaultRecipe` is unchanged.
"""
from pipeline.embedded.build import BUILD_INFO_NAME, RECIPE_NAME, build_default, main_build_default
from pipeline.embedded.corpora import SPLIT_FILES, CorpusCaps, build_corpora, read_jsonl, write_corpora
from pipeline.embedded.recipe import DefaultRecipe, recipe_hash
from pipeline.embedded.tokenizer import CHAT_TEMPLATE, train_tokenizer

__all__ = [
    "build_default", "main_build_default", "DefaultRecipe", "recipe_hash", "CorpusCaps",
    "SPLIT_FILES", "build_corpora", "write_corpora", "read_jsonl", "train_tokenizer",
    "CHAT_TEMPLATE", "BUILD_INFO_NAME", "RECIPE_NAME",
]
