"""The command table (pipeline/commands.py): every entry documented and reachable, the help pages
generated from it, and no argument parser left in the instruments. Parsing only: nothing runs.
The commands themselves run in tests/pipeline/test_cli_commands.py."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.commands import COMMANDS, command_parser
from pipeline.config import ApproxConfig, SweepConfig

REPO = Path(__file__).resolve().parents[2]


def help_text(argv: list[str], capsys) -> str:
    """`python -m pipeline ARGV` in this process, which must print its help and exit 0: the help."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    assert exit_info.value.code == 0, argv
    return capsys.readouterr().out


def test_every_entry_has_a_help_line_an_example_and_a_handler():
    for name, command in COMMANDS.items():
        assert command.name == name and command.help and "\n" not in command.help, name
        assert "python -m pipeline" in command.description, f"{name}: no example command line"
        assert f"-m pipeline {name}" in command.description, f"{name}: the example runs another command"
        assert callable(command.handler), name
        command_parser(command)  # its arguments are valid argparse declarations


def test_top_level_help_lists_every_command_exactly_once(capsys):
    out = help_text(["--help"], capsys)
    listed = re.findall(r"^  ([a-z][a-z-]+) {2,}\S", out, flags=re.M)
    assert sorted(listed) == sorted(COMMANDS) and len(listed) == len(set(listed))
    for command in COMMANDS.values():
        assert command.help in out


def test_top_level_help_from_the_real_entry_point():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and all(name in result.stdout for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_help_shows_its_description_and_example(name, capsys):
    out = help_text([name, "--help"], capsys)
    assert out.startswith(f"usage: python -m pipeline {name}")
    examples = [line.strip() for line in COMMANDS[name].description.splitlines() if "-m pipeline" in line]
    assert examples and all(example in out for example in examples)


@pytest.mark.parametrize("command, section", [("sweep", SweepConfig), ("approx-study", ApproxConfig)])
def test_study_help_lists_every_key_of_its_section(command, section, capsys):
    out = help_text([command, "--help"], capsys)
    prefix = {SweepConfig: "sweep", ApproxConfig: "approx"}[section]
    for f in dataclasses.fields(section):
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {prefix}.{f.name}  ")]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default: {default!r})" in line, line
        help_ = f.metadata.get("help", "")
        assert " ".join(help_.split()) in " ".join(out.split()), f"{prefix}.{f.name}: its help is not shown"


def test_no_command_an_unknown_command_and_an_unknown_option_exit_2(capsys):
    for argv in ([], ["no-such-command"], ["verify", "x", "--no-such-option"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_instruments_parse_no_arguments_of_their_own():
    """Only the table parses: pipeline/bench/, pipeline/studies/ and plot-run take parsed values."""
    files = [*(REPO / "pipeline" / "bench").rglob("*.py"), *(REPO / "pipeline" / "studies").rglob("*.py"),
             REPO / "pipeline" / "plot_run.py", REPO / "pipeline" / "cli.py"]
    parsing = [str(p.relative_to(REPO)) for p in files if "ArgumentParser" in p.read_text() or "argparse" in p.read_text()]
    assert not parsing
