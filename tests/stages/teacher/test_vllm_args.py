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
