"""CLI, configuration and orchestration: `python -m pipeline --help`."""
