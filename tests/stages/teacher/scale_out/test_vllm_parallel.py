"""vLLM tensor/pipeline parallelism from the config: validated, and passed to `vllm.LLM` as is.

The engine check needs 2 GPUs (skipped elsewhere). On this 2-core CPU the same pass-through was
checked by hand: `cache.tensor_parallel_size=2` starts a vLLM CPU engine whose parallel_config
reports 2 and scores, when VLLM_CPU_OMP_THREADS_BIND="0|1" binds one core per worker (one NUMA
node here); it takes minutes to start, too long for the suite."""
import numpy as np
import pytest
import torch

from pipeline.config import load_config


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_sizes_are_validated(key):
    assert getattr(load_config(None, [f"cache.{key}=4"]).cache, key) == 4
    with pytest.raises(ValueError, match="must be >= 1"):
        load_config(None, [f"cache.{key}=0"])


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_parallel_engine_scores_like_one_gpu(tiny_model_dir):
    from stages.teacher.stage_one import open_teacher_engine

    sequence = [np.arange(1, 40)]
    results = {}
    for tp in (1, 2):
        config = load_config(None, [f"model={tiny_model_dir}", f"cache.tensor_parallel_size={tp}", "cache.k=8", "data.max_length=48"])
        engine = open_teacher_engine(config)
        try:
            assert engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == tp
            results[tp] = engine.score(sequence)[0]
        finally:
            engine.close()
    np.testing.assert_allclose(results[2].topk_logprobs, results[1].topk_logprobs, atol=1e-4)
