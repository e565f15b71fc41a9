"""Quiet by default (pipeline/quiet.py): a run shows the project's lines and progress bars, not
third-party warnings; `--verbose` brings those back; a third-party error still reaches the user.
Each run is `python -m pipeline` in a subprocess without a terminal, as `make demo > log` is."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.quiet import QUIET_ENV, STARTUP_DIR, quiet_third_party

REPO = Path(__file__).resolve().parents[2]
# A third-party warning as printed: vLLM's and transformers' log format, a Python warning, c10's C++
# "[W... ] Warning:", vLLM's import-time Triton line.
NOISE = re.compile(r"WARNING|Warning|Disabling Triton")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI with the environment a user's shell has: none of quiet's settings inherited from this
    session (a test that calls `cli.main` in-process sets them here)."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENV}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(STARTUP_DIR)]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, stdin=subprocess.DEVNULL)


def lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def stage_one_args(model: Path, data: Path, cache: Path, engine: str) -> list[str]:
    return ["--config", "", f"model={model}", f"data.path={data}", "data.max_length=64", "cache.k=8",
            f"cache.engine={engine}", f"cache.dir={cache}"]


@pytest.mark.vllm
def test_vllm_stage_one_shows_no_third_party_warning(tiny_model_dir, tiny_jsonl, tmp_path):
    result = run_cli("cache-teacher", *stage_one_args(tiny_model_dir, tiny_jsonl, tmp_path / "cache", "vllm"))
    assert result.returncode == 0, result.stderr[-3000:]
    noise = [line for line in lines(result.stdout + result.stderr) if NOISE.search(line)]
    assert not noise, "third-party warnings printed:\n" + "\n".join(noise)
    assert f"cache: {tmp_path / 'cache'}" in result.stdout  # the project's summary
    assert "bytes/token" in result.stdout and "teacher pass" in result.stdout
    assert "teacher pass:" in result.stderr and "tok/s" in result.stderr  # and its progress bar


@pytest.mark.vllm
def test_vllm_error_reaches_the_user(tiny_model_dir, tiny_jsonl, tmp_path):
    """Weights vLLM cannot read (the project's own checks read config.json and the tokenizer, not
    the weights): the worker's error is an ERROR log, shown on stderr, and the run fails."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20_000])  # truncated: the header promises more
    result = run_cli("cache-teacher", *stage_one_args(model, tiny_jsonl, tmp_path / "cache", "vllm"))
    assert result.returncode != 0
    assert "SafetensorError" in result.stderr and "incomplete metadata" in result.stderr, result.stderr[-3000:]
    assert "Engine core initialization failed" in result.stderr  # and the exception in this process


def test_verbose_brings_third_party_logs_back(tiny_model_dir, tiny_jsonl, tmp_path):
    """transformers' tokenizer warns about a text longer than its model_max_length (the project
    truncates to data.max_length itself): held back by default, shown with --verbose."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer_config = model / "tokenizer_config.json"
    tokenizer_config.write_text(json.dumps({**json.loads(tokenizer_config.read_text()), "model_max_length": 4}))
    warning = "Token indices sequence length is longer than the specified maximum"
    quiet = run_cli("cache-teacher", *stage_one_args(model, tiny_jsonl, tmp_path / "quiet", "hf"))
    verbose = run_cli("cache-teacher", *stage_one_args(model, tiny_jsonl, tmp_path / "verbose", "hf"), "--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, quiet.stderr[-2000:] + verbose.stderr[-2000:]
    assert warning not in quiet.stdout + quiet.stderr
    assert warning in verbose.stderr
    assert "bytes/token" in quiet.stdout and "bytes/token" in verbose.stdout


@pytest.mark.parametrize("argv, quiet", [
    (["verify", "MISSING"], True),
    (["--verbose", "verify", "MISSING"], False),  # before the command
    (["verify", "MISSING", "--verbose"], False),  # or after it
])
def test_verbose_is_a_global_flag(argv, quiet, monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "quiet_third_party", lambda: calls.append(True))
    argv = [str(tmp_path / "missing") if a == "MISSING" else a for a in argv]
    assert cli.main(argv) == 2  # the command ran (and refused the missing cache), the flag was not its argument
    assert "missing" in capsys.readouterr().err
    assert calls == ([True] if quiet else [])


def test_quiet_keeps_the_trainers_progress_bar(monkeypatch, tmp_path):
    """TrainingArguments turns the Trainer's bar (stage two's progress) off when its logger is above
    WARNING; quiet sets transformers to `error` but keeps that logger at WARNING."""
    import transformers
    from transformers import TrainingArguments

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in QUIET_ENV})
    before = transformers.logging.get_verbosity()
    try:
        quiet_third_party()
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        transformers.logging.set_verbosity_error()  # what that variable does when transformers is imported
        assert TrainingArguments(output_dir=str(tmp_path), report_to="none").disable_tqdm is False
    finally:
        transformers.logging.set_verbosity(before)
