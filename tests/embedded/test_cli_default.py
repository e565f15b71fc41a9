"""`build-default` and `demo` through the CLI, on the tiny recipe's build (the real default takes
minutes to build): `build_default` is the real function with the tiny recipe as its default, so the
CLI's reuse check, summary and the demo's stages all run for real."""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
from cli_run import run
from file_states import files_state

import pipeline.embedded.build as embedded_build
from storage_schemas import Manifest


@pytest.fixture
def tiny_default(tiny_build, tiny_recipe, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny build, and the CLI's builder told that the tiny recipe is the default backbone's."""
    monkeypatch.setattr(embedded_build, "backbone_recipe", lambda name: tiny_recipe)
    monkeypatch.setattr(embedded_build, "build_default", functools.partial(embedded_build.build_default, progress=False))
    copy = tmp_path / "default"
    shutil.copytree(tiny_build["out_dir"], copy)
    return copy


def test_build_default_reuses_a_current_build_and_writes_nothing(tiny_default):
    before = files_state(p for p in tiny_default.rglob("*") if p.is_file())
    out = run("build-default", "--out", str(tiny_default))
    info = json.loads((tiny_default / "base-model" / "build_info.json").read_text())
    assert "up to date, reused" in out and f"{info['parameters']:,} parameters, {info['steps']} steps" in out
    assert files_state(p for p in tiny_default.rglob("*") if p.is_file()) == before


def test_demo_reuses_the_default_then_caches_trains_and_evaluates(tiny_default, tmp_path, tiny_model_dir, tiny_jsonl):
    config = ["--config", "", f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "data.max_length=48",
              f"cache.dir={tmp_path / 'cache'}", "cache.engine=hf", "cache.k=4", f"train.output_dir={tmp_path / 'run'}",
              "train.max_steps=2", "train.save_steps=2", "train.batch_size=4", f"eval.source_path={tiny_jsonl}",
              f"eval.target_path={tiny_jsonl}", "eval.max_examples=4", "eval.max_length=32"]
    out = run("demo", "--out", str(tiny_default), *config)
    assert "up to date, reused" in out
    assert Manifest.load(tmp_path / "cache").num_rows == 30
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2
    assert set(json.loads((tmp_path / "run" / "eval.json").read_text())) == {"sets", "base", "adapted", "forgetting"}
    again = run("demo", "--out", str(tiny_default), *config)  # a finished demo re-reports: nothing is retrained
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2 and "up to date, reused" in again
