"""The one entry point: `python -m pipeline <command> --help`.

    python -m pipeline --help                      # every command, one line each
    python -m pipeline cache-teacher --help        # one command: what it does, an example, its arguments

The commands, their arguments and handlers are one table, pipeline/commands.py `COMMANDS`. Here:
`--verbose` is global (before or after the command; without it third-party logs are held back), and
a user error (bad config key, missing file, ...) is one `error: ...` line and exit status 2.
"""
from __future__ import annotations

import os
import sys

from pipeline.commands import run_command
from pipeline.quiet import quiet_third_party

__all__ = ["main"]

VERBOSE = "--verbose"  # shows third-party logs (vLLM, transformers, datasets, torch); quiet without it
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = VERBOSE in argv  # global, before or after the command: taken out before anything parses
    argv = [a for a in argv if a != VERBOSE]
    if not verbose:  # before vLLM, transformers, datasets and torch are imported (pipeline/quiet.py)
        quiet_third_party()
    try:
        return run_command(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
