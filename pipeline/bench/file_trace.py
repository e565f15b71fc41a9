"""Which project files one single-process stage-one run walks through, and how often it comes back.

    python -m pipeline trace-stage-one --config configs/demo.yaml cache.engine=hf cache.dir=/tmp/trace-cache

Runs `python -m pipeline cache-teacher` in this process under `sys.setprofile` (and
`threading.setprofile` for the shard writer's thread), keeping only frames
of the project's own files (pipeline/, stages/, storage_schemas/; this file left out) and prints:

- the files visited, in the order first entered, and the calls between files;
- **pairs that call each other**: file pairs with calls in both directions (A calls B, B calls A):
  the "bouncing" between modules of one job;
- **call-stack cycles**: calls into a file that is already on the call stack below another file
  (A -> B -> A);
- **the walk**: the time-ordered files that run code on the first pass through each call (a call
  from function f to function g is followed the first time only: loops over examples and shards
  would otherwise repeat the same steps thousands of times), one *stay* per maximal run in one file;
  a return to the caller starts a stay too, and a stay in a file already left once counts as
  *re-entered*.

A layered stage one has no pair calling each other and no cycle outside `storage_schemas/` (the
schema's own modules); the walk is its walking distance.

Only the calling process is traced (vLLM's engine runs in its own processes).
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
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
    """sys.setprofile / threading.setprofile hook: project call/return events reduced to file-level
    moves. Each thread keeps its own stack (stage one writes shards on a background thread); the
    walk follows the main thread, the calls between files and the cycles count every thread."""

    def __init__(self) -> None:
        self.stacks: dict[int, list[tuple[str, object]]] = {}  # thread -> (project file, frame) of its live frames
        self.muted: object | None = None           # main thread: a repeated call's frame, its subtree not walked again
        self.seen_calls: set[tuple[object, object]] = set()
        self.walk: list[str] = []
        self.edges: Counter = Counter()
        self.cycles: Counter = Counter()
        self.main = threading.get_ident()

    def _stay(self, file: str) -> None:
        if not self.walk or self.walk[-1] != file:
            self.walk.append(file)

    def _call(self, stack: list, frame, file: str, walked: bool) -> None:
        caller, caller_frame = stack[-1] if stack else (None, None)
        if caller is not None and caller != file:
            self.edges[(caller, file)] += 1
            files = [f for f, _ in stack]
            if file in files:
                self.cycles[" -> ".join([*dict.fromkeys(files[files.index(file):]), file])] += 1
        stack.append((file, frame))
        key = (caller_frame.f_code if caller_frame is not None else None, frame.f_code)
        if walked and self.muted is None:
            if key in self.seen_calls:
                self.muted = frame
            else:
                self.seen_calls.add(key)
                self._stay(file)

    def _return(self, stack: list, frame, walked: bool) -> None:
        stack.pop()
        if not walked:
            return
        if self.muted is frame:
            self.muted = None
        if self.muted is None and stack:
            self._stay(stack[-1][0])

    def __call__(self, frame, event, arg) -> None:
        if event not in ("call", "return"):
            return
        file = _project_file(frame.f_code.co_filename)
        if file is None:
            return
        thread = threading.get_ident()
        stack, walked = self.stacks.setdefault(thread, []), thread == self.main
        if event == "call":
            self._call(stack, frame, file, walked)
        elif stack and stack[-1][1] is frame:
            self._return(stack, frame, walked)


def _outside_schema(names) -> list[str]:
    return [n for n in names if not all(part.startswith("storage_schemas/") for part in n.split(" <-> "))]


def summarize(tracer: FileTracer) -> dict:
    left, reentered = set(), 0
    for previous, current in zip(tracer.walk, tracer.walk[1:]):
        left.add(previous)
        reentered += current in left
    both_ways = sorted({" <-> ".join(sorted((a, b))) for a, b in tracer.edges if (b, a) in tracer.edges})
    cycles_outside = {k: v for k, v in tracer.cycles.items() if not k.split(" -> ")[0].startswith("storage_schemas/")}
    return {"files": list(dict.fromkeys(tracer.walk)), "walk": tracer.walk, "stays": len(tracer.walk),
            "reentered_stays": reentered, "calls_between_files": sum(tracer.edges.values()),
            "edges": {f"{a} -> {b}": n for (a, b), n in sorted(tracer.edges.items())},
            "pairs_calling_each_other": both_ways, "pairs_calling_each_other_outside_storage_schemas": _outside_schema(both_ways),
            "call_stack_cycles": dict(tracer.cycles), "call_stack_cycles_outside_storage_schemas": cycles_outside}


def render(summary: dict) -> str:
    lines = [f"{len(summary['files'])} project files; the walk (first pass through each call): {summary['stays']} stays, "
             f"{summary['reentered_stays']} back into a file already left; {summary['calls_between_files']} calls "
             f"between files over {len(summary['edges'])} file pairs",
             "files, in the order first entered:", *[f"  {f}" for f in summary["files"]],
             "pairs of files that call each other:"]
    lines += [f"  {pair}" for pair in summary["pairs_calling_each_other"]] or ["  none"]
    lines.append("call-stack cycles (a file called again while it is still below on the stack):")
    lines += [f"  {n:5d}x  {path}" for path, n in sorted(summary["call_stack_cycles"].items())] or ["  none"]
    lines.append(f"outside storage_schemas/: {len(summary['pairs_calling_each_other_outside_storage_schemas'])} pairs "
                 f"calling each other, {sum(summary['call_stack_cycles_outside_storage_schemas'].values())} call-stack cycles")
    return "\n".join(lines)


def trace_stage_one(config: str, json_path: str, overrides: list[str], run_cli: Callable[[list[str]], int]) -> int:
    """`python -m pipeline trace-stage-one`: `run_cli(["cache-teacher", ...])` under the tracer (cache.engine=hf
    and a temporary cache.dir first, `overrides` after them); prints `render`, writes the summary to `json_path`
    if given; returns the run's exit status. `run_cli` is the command table's `run_command`, passed in so that
    this instrument does not import the entry point."""
    with tempfile.TemporaryDirectory() as tmp:
        tracer = FileTracer()
        threading.setprofile(tracer)
        sys.setprofile(tracer)
        try:
            code = run_cli(["cache-teacher", "--config", config, "cache.engine=hf", f"cache.dir={tmp}/cache", *overrides])
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
    summary = summarize(tracer)
    print(render(summary))
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=1))
    return code
