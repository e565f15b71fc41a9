"""Which project files one single-process stage-one run walks through, and how often it comes back.

    python -m pipeline trace-stage-one --config configs/demo.yaml cache.engine=hf cache.dir=/tmp/trace-cache

Runs `python -m pipeline cache-teacher` in this process under `sys.setprofile`, keeping only frames
of the project's own files (pipeline/, stages/, storage_schemas/; this file left out) and prints:

- the files visited and the calls between them, in the order first seen;
- **stays**: the time-ordered sequence of project files that run code, one stay per maximal run in
  one file (a call into another file ends a stay, the return starts a new one in the caller);
  *re-entered stays* are those in a file already left once (a return counts: the caller comes back);
- **call-stack cycles**: calls into a file that is already on the call stack below another file
  (A -> B -> A). A layered design has none outside `storage_schemas/` (the schema's own helpers
  call each other); this is the structural figure, the stays are the walking distance.

Only the calling process is traced (vLLM's engine runs in its own processes).
"""
from __future__ import annotations

import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

__all__ = ["FileTracer", "summarize", "render", "trace_stage_one"]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline/", "stages/", "storage_schemas/")
SELF = str(Path(__file__).resolve().relative_to(ROOT))


def _project_file(filename: str) -> str | None:
    try:
        rel = str(Path(filename).resolve().relative_to(ROOT))
    except ValueError:
        return None
    return rel if rel.startswith(PACKAGES) and rel != SELF else None


class FileTracer:
    """sys.setprofile hook: project call/return events reduced to file-level moves."""

    def __init__(self) -> None:
        self.stack: list[str] = []          # project file of each live project frame, outermost first
        self.frames: list[object] = []
        self.stays: list[str] = []
        self.edges: Counter = Counter()
        self.cycles: Counter = Counter()    # (file re-entered, path since its earlier frame)

    def _enter_stay(self, file: str) -> None:
        if not self.stays or self.stays[-1] != file:
            self.stays.append(file)

    def __call__(self, frame, event, arg) -> None:
        if event not in ("call", "return"):
            return
        file = _project_file(frame.f_code.co_filename)
        if file is None:
            return
        if event == "call":
            if self.stack and self.stack[-1] != file:
                self.edges[(self.stack[-1], file)] += 1
                if file in self.stack:
                    below = self.stack[self.stack.index(file):]
                    self.cycles[" -> ".join([*dict.fromkeys(below), file])] += 1
            self.stack.append(file)
            self.frames.append(frame)
            self._enter_stay(file)
        elif self.frames and self.frames[-1] is frame:
            self.stack.pop()
            self.frames.pop()
            if self.stack:
                self._enter_stay(self.stack[-1])


def summarize(tracer: FileTracer) -> dict:
    left, reentered = set(), 0
    for previous, current in zip(tracer.stays, tracer.stays[1:]):
        left.add(previous)
        reentered += current in left
    files = list(dict.fromkeys(tracer.stays))
    outside_schema = {k: v for k, v in tracer.cycles.items() if not k.split(" -> ")[0].startswith("storage_schemas/")}
    return {"files": files, "num_files": len(files), "stays": len(tracer.stays), "reentered_stays": reentered,
            "calls_between_files": sum(tracer.edges.values()), "distinct_file_edges": len(tracer.edges),
            "call_stack_cycles": dict(tracer.cycles), "call_stack_cycles_outside_storage_schemas": outside_schema,
            "edges": {f"{a} -> {b}": n for (a, b), n in tracer.edges.items()}}


def render(summary: dict) -> str:
    lines = [f"{summary['num_files']} project files, {summary['stays']} stays "
             f"({summary['reentered_stays']} back into a file already left), "
             f"{summary['calls_between_files']} calls between files over {summary['distinct_file_edges']} file pairs",
             "files, in the order first entered:", *[f"  {f}" for f in summary["files"]],
             "call-stack cycles (a file called again while it is still below on the stack):"]
    lines += [f"  {n:5d}x  {path}" for path, n in sorted(summary["call_stack_cycles"].items())] or ["  none"]
    lines.append("call-stack cycles outside storage_schemas/: "
                 f"{sum(summary['call_stack_cycles_outside_storage_schemas'].values())}")
    return "\n".join(lines)


def trace_stage_one(config: str, json_path: str, overrides: list[str], run_cli: Callable[[list[str]], int]) -> int:
    """`python -m pipeline trace-stage-one`: `run_cli(["cache-teacher", ...])` under the tracer (cache.engine=hf
    and a temporary cache.dir first, `overrides` after them); prints `render`, writes the summary to `json_path`
    if given; returns the run's exit status. `run_cli` is the command table's `run_command`, passed in so that
    this instrument does not import the entry point."""
    with tempfile.TemporaryDirectory() as tmp:
        tracer = FileTracer()
        sys.setprofile(tracer)
        try:
            code = run_cli(["cache-teacher", "--config", config, "cache.engine=hf", f"cache.dir={tmp}/cache", *overrides])
        finally:
            sys.setprofile(None)
    summary = summarize(tracer)
    print(render(summary))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
    return code
