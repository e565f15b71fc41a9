"""Run by Python at start-up in every child process of a quiet `python -m pipeline` run, before the
child imports anything: `pipeline.quiet.quiet_third_party` puts this directory on PYTHONPATH.
vLLM's engine core and workers are spawned processes that print a few warnings while vLLM is being
imported, before any setting of vLLM's applies; `pipeline.quiet.drop_known_noise` holds back
exactly those (pipeline/quiet.py); the engine's processes get a process group of their own (below).
Then the `sitecustomize` this one shadows, if any, runs.
"""
import importlib.machinery
import importlib.util
import os
import sys

try:
    from pipeline.quiet import drop_known_noise
except ImportError:  # a Python without this project installed: nothing to hold back
    pass
else:
    drop_known_noise()

# vLLM's engine core and workers of a quiet run (stages/teacher/vllm_engine.py sets this variable
# while it starts them): a process group of their own, so a terminal's Ctrl-C reaches only the
# pipeline process, which stops them itself, instead of each printing its own traceback.
if os.environ.get("MTCACHE_ENGINE_OWN_GROUP") == "1":
    os.setpgrp()


def _run_shadowed() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_run_shadowed()
