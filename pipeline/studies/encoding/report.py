"""The study's report: `study.md` (and `speed.md`) from the result dict, and the training-curve plot."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.studies.encoding.settings import DEFAULT_LEVEL, K_CURVE
from pipeline.studies.encoding.training import log_column, max_step_difference
from storage_schemas import DEFAULT_VALUE_ENCODING

__all__ = ["machine", "markdown", "speed_markdown", "plot_training"]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, " \
           f"pyarrow {pa.__version__}"


def _set_section(name: str, s: dict) -> list[str]:
    lines = [f"## {name}: vocab {s['vocab']}, {s['tokens']:,} tokens, {s['positions']:,} positions, "
             f"mean D_k (float32 cache) = {s['mean_dk_f32']:.4f}", "",
             "| encoding | zstd | bytes/token | rel. err of mean D_k | per-position rel. err mean / max | "
             "topk / full_kl rel. err of mean | write s | read+decode s |", "|---|---|---|---|---|---|---|---|"]
    for c in s["candidates"]:
        lines.append(f"| {c['encoding']} | {c['zstd']} | {c['bytes_per_token']:.1f} | {c['rel_err_mean_dk']:.1e} | "
                     f"{c['rel_err_pos_mean']:.1e} / {c['rel_err_pos_max']:.1e} | "
                     f"{c['rel_err_mean_topk']:.1e} / {c['rel_err_mean_full_kl']:.1e} | "
                     f"{c['write_s']:.3f} | {c['read_s']:.3f} |")
    lines += ["", "topk_ids column alone (bytes/token, zstd 3):", "", "| ids | plain | BSS | dictionary |",
              "|---|---|---|---|"]
    for row in s["ids_columns"]:
        lines.append(f"| {row['ids']} | {row['plain']:.1f} | {row.get('byte_stream_split', float('nan')):.1f} | "
                     f"{row.get('dictionary', float('nan')):.1f} |")
    lines += ["", f"Where the default's bytes go ({DEFAULT_VALUE_ENCODING}, bytes/token): "
              + ", ".join(f"{name} {value:.2f}" for name, value in s["default_columns"].items()), "",
              "Order-0 floors (bytes/token; see `floors` in pipeline/studies/encoding/measure.py): "
              + ", ".join(f"{name} {value:.1f}" for name, value in s["floors"].items())]
    lines += ["", f"Cost curve (bytes/token; topk_f32 at zstd 3, {DEFAULT_VALUE_ENCODING} at zstd {DEFAULT_LEVEL}):", "",
              "| k | " + " | ".join(str(k) for k in K_CURVE) + " |", "|---|" + "---|" * len(K_CURVE)]
    for enc in ("topk_f32", DEFAULT_VALUE_ENCODING):
        lines.append(f"| {enc} | " + " | ".join(f"{c['bytes_per_token']:.1f}" for c in s["k_curve"]
                                               if c["encoding"] == enc) + " |")
    return lines + [""]


def _training_section(t: dict) -> list[str]:
    lines = ["", f"## Training, {t['steps']} steps on the demo cache (configs/demo.yaml, tail, lambda 1)", "",
             "| cache | bytes/token | final loss | final CE | final KL |", "|---|---|---|---|---|"]
    for enc in ("topk_f32", DEFAULT_VALUE_ENCODING):
        r = t[enc]
        lines.append(f"| {enc} | {r['cache_bytes_per_token']:.1f} | {r['final_loss']:.5f} | {r['final_ce']:.5f} | "
                     f"{r['final_kl']:.5f} |")
    return lines + ["", f"Largest per-step difference over the {t['steps']} steps: loss "
                    f"{max_step_difference(t, 'loss'):.2e}, KL {max_step_difference(t, 'kl'):.2e} "
                    "(per-step curves: `training_curves.png`)."]


def markdown(result: dict) -> str:
    """`study.md`: one section per teacher set, the target codecs near p_y = 1, the training comparison."""
    cfg = result["config"]
    lines = [f"# Cache encoding study (k = {cfg['k']})", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}", ""]
    for name, s in result["sets"].items():
        lines += _set_section(name, s)
    lines += ["## Target log-prob codecs near p_y = 1: |shift of log(1 - p_y)| (nats)", "",
              "| p_y | f16 | bf16 |", "|---|---|---|"]
    lines += [f"| {r['p_y']} | {r['f16']:.2e} | {r['bf16']:.2e} |" for r in result["target_near_one"]]
    if result.get("training"):
        lines += _training_section(result["training"])
    return "\n".join(lines) + "\n"


def speed_markdown(rows: list[dict]) -> str:
    lines = ["| encoding | encode + write (tok/s) | read + decode (tok/s) |", "|---|---|---|"]
    lines += [f"| {r['encoding']} | {r['write_tok_per_s']:,.0f} | {r['read_tok_per_s']:,.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_training(training: dict, path: Path) -> None:
    """Loss and KL per step, float32 cache vs the default encoding, on shared axes: the issue asks
    for "no visible change in the training curve", which is a thing to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for enc, style in (("topk_f32", dict(lw=3, alpha=0.4)), (DEFAULT_VALUE_ENCODING, dict(lw=1, ls="--"))):
        label = f"{enc} ({training[enc]['cache_bytes_per_token']:.1f} B/token)"
        for ax, column in zip(axes, ("loss", "kl")):
            points = sorted(log_column(training, enc, column).items())
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
    for ax, title in zip(axes, ("training loss (CE + lambda KL)", "cached KL term (tail)")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{training['steps']} steps on the demo cache: float32 cache vs {DEFAULT_VALUE_ENCODING}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
