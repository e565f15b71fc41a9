"""Run: python -m pipeline build-default

The embedded default: a tiny base model and two corpora built from nothing but this Python's
standard library, so the project runs end to end with no download.

- source corpus: English prose (stdlib docstrings); the base model is pretrained on it.
- target corpus: Python code (stdlib functions, docstrings removed); the fine-tuning task.
- base model: a 4-layer Llama with a byte-level BPE tokenizer trained on both domains.

`pipeline.embedded.build.build_default(out_dir)` builds once and reuses the build while `DefaultRecipe` is unchanged.
"""
