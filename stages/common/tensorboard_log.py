"""TensorBoard event files: where a run's go, writing a few scalars (eval, sweep) and reading them back.

    tensorboard --logdir runs/demo/train/tensorboard       (training curves; eval's figures under eval/)

Training writes through transformers' own `TensorBoardCallback` (tags `train/<log key>`: loss, ce,
kl or penalty, learning_rate, grad_norm, tokens_per_s, ...), pointed at `<run>/tensorboard` by
stages/student/trainer.py. Reading uses tensorboard's `EventAccumulator`, no format of our own.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["TENSORBOARD_DIR", "tensorboard_dir", "reports_to_tensorboard", "log_scalars", "read_scalars"]

TENSORBOARD_DIR = "tensorboard"  # inside a run directory (train.output_dir) and a sweep's output_dir


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


def reports_to_tensorboard(report_to: str | list[str]) -> bool:
    """Whether `train.report_to` (a name or a list) includes tensorboard."""
    return "tensorboard" in ([report_to] if isinstance(report_to, str) else report_to)


def log_scalars(log_dir: str | Path, scalars: dict[str, float], step: int) -> None:
    """Append `scalars` ({tag: value}) at `step` to a new event file in `log_dir`."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir)) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every scalar in the event files directly in `log_dir`, in step
    order (a resumed run's re-logged steps replace the killed session's: EventAccumulator purges
    events past a restart). FileNotFoundError when `log_dir` holds no event file."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    if not Path(log_dir).parent.is_dir():
        raise FileNotFoundError(f"{Path(log_dir).parent}: no such run directory")
    if not any(Path(log_dir).glob("events.out.tfevents.*")):
        raise FileNotFoundError(f"{log_dir}: no TensorBoard event file (was the run trained with train.report_to: tensorboard?)")
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0})  # 0: keep every point, no sampling
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()[SCALARS]}
