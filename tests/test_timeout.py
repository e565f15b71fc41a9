"""The suite-wide timeout (pyproject.toml, pytest-timeout): a hanging test fails by name and the
session goes on to the next test. Shown on a throw-away test file run under the project's
settings, with the limit lowered to 3 s for the demonstration (`-o timeout=3`)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HANGS = '''import subprocess, sys

def test_waits_on_a_child_that_never_ends():
    subprocess.run([sys.executable, "-c", "import time; time.sleep(3600)"])

def test_after_the_hang():
    pass
'''


def test_the_project_timeout_is_on_and_interrupts_only_the_hanging_test(pytestconfig, tmp_path):
    assert float(pytestconfig.getini("timeout")) > 0 and pytestconfig.getini("timeout_method") == "signal"
    (tmp_path / "test_hangs.py").write_text(HANGS)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
                             "--rootdir", str(tmp_path), "-o", "timeout=3", str(tmp_path / "test_hangs.py")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "COLUMNS": "300"})  # the summary line untruncated
    assert result.returncode == 1, result.stdout[-3000:]
    assert "FAILED test_hangs.py::test_waits_on_a_child_that_never_ends - Failed: Timeout" in result.stdout, result.stdout[-3000:]
    assert "1 failed, 1 passed" in result.stdout  # the session went on after the hang
