"""A training run's CE and regularizer curves, drawn from its TensorBoard event file.

    python -m pipeline plot-run runs/demo/train                          (-> runs/demo/train/curves.png)
    python -m pipeline plot-run runs/demo/train --out docs/demo_curves.png
    python -m pipeline plot-run runs/demo/train --check        (+ every log.csv figure == its scalar, or exit 1)

Reads <run>/tensorboard (written with train.report_to: tensorboard) with tensorboard's EventAccumulator
(stages/common/tensorboard_log.py `read_scalars`): the tags train/ce and train/kl or train/penalty, by step.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from stages.common.saved_config import read_saved_config
from stages.common.tensorboard_log import read_scalars, tensorboard_dir

__all__ = ["plot_run", "mismatches_with_log_csv", "plot_and_check"]

REGULARIZER_TAGS = ("train/kl", "train/penalty")  # stages/student/methods.py Method.log_key, logged as train/<key>


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write a PNG with two panels, CE and the method's regularizer per logged step; returns `out`.
    FileNotFoundError when the run has no event file; ValueError when it logged no train/ce."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(tensorboard_dir(run_dir))
    if "train/ce" not in scalars:
        raise ValueError(f"{tensorboard_dir(run_dir)}: no train/ce scalar (tags: {sorted(scalars)})")
    panels = [("train/ce", "CE, nats/token")] + [(t, t.split("/")[1]) for t in REGULARIZER_TAGS if t in scalars]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (tag, label) in zip(axes[0], panels):
        steps, values = zip(*scalars[tag])
        ax.plot(steps, values, marker=".")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(tag)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{_title(run_dir)} (drawn from {tensorboard_dir(run_dir).name}/ event file)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _title(run_dir: str | Path) -> str:
    """`method=tail reg_weight=1.0` from the run's config.yaml, else the directory's name."""
    path = Path(run_dir) / "config.yaml"
    train = read_saved_config(path).get("train", {}) if path.exists() else {}
    return f"method={train['method']} reg_weight={train['reg_weight']}" if "method" in train else Path(run_dir).name


def mismatches_with_log_csv(run_dir: str | Path) -> list[str]:
    """Every log.csv figure that is not the same train/<column> scalar (float32) at the same step in the
    event file, as readable lines; [] when all match. E.g. on the demo run after `make demo`."""
    with open(Path(run_dir) / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    scalars = {tag: dict(points) for tag, points in read_scalars(tensorboard_dir(run_dir)).items()}
    out = []
    for row in rows:
        for name, text in row.items():
            if name in ("step", "elapsed_s") or text == "":
                continue
            value, step = float(np.float32(float(text))), int(row["step"])
            got = scalars.get(f"train/{name}", {}).get(step)
            if got != value:
                out.append(f"step {step} {name}: log.csv {text}, event file {got}")
    return out


def plot_and_check(run: str | Path, out: str | Path | None = None, check: bool = False) -> int:
    """`python -m pipeline plot-run`: with `check`, print `mismatches_with_log_csv` (exit status 1 if any);
    then draw `plot_run` into `out` (default: <run>/curves.png) and print its path."""
    if check:
        bad = mismatches_with_log_csv(run)
        print("\n".join(bad) if bad else f"{run}: every log.csv figure equals its TensorBoard scalar")
        if bad:
            return 1
    print(plot_run(run, out or Path(run) / "curves.png"))
    return 0
