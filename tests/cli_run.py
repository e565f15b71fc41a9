"""Run `python -m pipeline ...` in this process (tests that check a command's printed output)."""
from __future__ import annotations

import contextlib
import io

from pipeline.cli import main as cli_main


def run(*argv: str) -> str:
    """`python -m pipeline ARGV` in this process: its stdout; fails with its stderr on a non-zero exit."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(list(argv))
    assert code == 0, f"{argv[0]} exited {code}:\n{err.getvalue()[-3000:]}"
    return out.getvalue()
