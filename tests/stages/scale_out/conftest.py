"""Scale-out tests run stage one with the hf engine many times; its Triton top-k kernel is not the
subject here, and under the interpreter that tests/conftest.py enables on CPU it is ~100x slower."""
import os

import pytest


@pytest.fixture(scope="module", autouse=True)
def no_triton_interpreter():
    """In-process engines and the CLI subprocesses (which inherit the environment) use the torch path."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    yield
    if saved is not None:
        os.environ["TRITON_INTERPRET"] = saved
