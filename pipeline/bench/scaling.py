"""Stage-one throughput with 1, 2, ... data-parallel workers on this machine (BENCHMARKS.md).

    python -m pipeline bench-scaling --config configs/demo.yaml --workers 1 2 [section.key=value ...]

For each N: a fresh cache, N `cache-teacher --num-workers N --worker-rank r` processes started at
once (the real CLI path), each reporting its own teacher-pass tok/s (engine start excluded).
Aggregate tok/s = all tokens / the longest worker pass (the passes overlap: every worker starts
its engine at the same moment); wall = the whole run incl. engine starts and the merge.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["measure", "bench_scaling"]

_LINE = re.compile(r"worker (\d+) of (\d+) \(\w+\): .* written now, ([\d,]+) tokens at ([\d,]+) tok/s")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def measure(config: str, overrides: list[str], workers: int, root: Path) -> dict:
    """Run `workers` concurrent worker processes into a fresh cache; their figures."""
    cache = root / f"cache-{workers}w"
    command = [sys.executable, "-m", "pipeline", "cache-teacher", "--config", config, *overrides, f"cache.dir={cache}",
               "--num-workers", str(workers)]
    start = time.perf_counter()
    procs = [subprocess.Popen([*command, "--worker-rank", str(r)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for r in range(workers)]
    outputs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise RuntimeError("a worker failed:\n" + "\n".join(outputs))
    found = [m for out in outputs for m in _LINE.finditer(out)]
    tokens = [_number(m.group(3)) for m in found]
    rates = [_number(m.group(4)) for m in found]
    longest_pass = max(t / r for t, r in zip(tokens, rates))
    return {"workers": workers, "tokens": int(sum(tokens)), "per_worker": rates,
            "aggregate": sum(tokens) / longest_pass, "wall": wall}


def bench_scaling(config: str, overrides: list[str], workers: list[int]) -> list[dict]:
    """`python -m pipeline bench-scaling`: `measure` for each worker count, each into a fresh cache; prints
    the table (aggregate tok/s relative to the first count) and returns the rows."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mtcache-scaling-") as tmp:
        for n in workers:
            rows.append(measure(config, overrides, n, Path(tmp)))
    base = rows[0]["aggregate"]
    print("| workers | tokens | per-worker tok/s | aggregate tok/s | / 1 worker | wall incl. engine start |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = ", ".join(f"{x:,.0f}" for x in r["per_worker"])
        print(f"| {r['workers']} | {r['tokens']:,} | {per} | {r['aggregate']:,.0f} | {r['aggregate'] / base:.2f} | {r['wall']:.1f} s |")
    return rows
