"""The `vllm.LLM` arguments of each vLLM output, without starting an engine (issue 14): both the
top-k pooler and the stock prompt log-probs path run with prefix caching off."""
import pytest

pytest.importorskip("vllm")

from stages.teacher.vllm_engine import OUTPUTS, llm_kwargs  # noqa: E402


@pytest.mark.parametrize("output", OUTPUTS)
def test_prefix_caching_is_off_for_every_output(output, tiny_model_dir):
    kwargs = llm_kwargs(str(tiny_model_dir), output, k=8, max_length=48)
    assert kwargs["enable_prefix_caching"] is False
    assert kwargs["max_logprobs"] == 9 and kwargs["max_model_len"] == 49
    assert (kwargs.get("runner") == "pooling") == (output == "pooler")


def test_unknown_output_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown vLLM engine output 'logits'; known: pooler, prompt_logprobs"):
        llm_kwargs(str(tiny_model_dir), "logits", k=8)


def test_small_cpu_machines_give_the_worker_every_cpu(monkeypatch):
    """vLLM's auto binding keeps a core for its scheduler: on <= SMALL_CPU CPUs the worker gets all."""
    from vllm.platforms import current_platform

    from stages.teacher.vllm_engine import SMALL_CPU, cpu_threads_bind

    if not current_platform.is_cpu():
        pytest.skip("CPU build of vLLM only")
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3, 1})
    assert cpu_threads_bind({}) == "1,3"
    assert cpu_threads_bind({"tensor_parallel_size": 2}) is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(SMALL_CPU + 1)))
    assert cpu_threads_bind({}) is None                   # many cores: vLLM's own binding
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    assert cpu_threads_bind({}) is None                   # the user's choice stands
