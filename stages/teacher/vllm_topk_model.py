"""A vLLM pooling model that runs lm_head + log-softmax + top-k inside vLLM's worker.

    from stages.teacher.vllm_topk_model import pooling_params, unpack
    llm = LLM(**llm_kwargs(model_dir, "pooler", k))   # stages.teacher.vllm_engine: incl. pooling_llm_kwargs
    out = llm.encode(prompts, pooling_params(num_top=k + 1), pooling_task=POOLING_TASK)
    top_ids, top_lp, target_lp = unpack(out[i].outputs.data, num_top=k + 1)

Why: vLLM's stock `prompt_logprobs` computes the same top-k as tensors in its worker, but its
front end turns them into per-position Python lists and objects (`LogprobsProcessor`), which on a
CPU costs about as much as the forward pass. A *pooling* model's per-request output travels back as
one tensor, untouched. So each causal-LM architecture vLLM knows gets a twin, `MtcacheTopK<Arch>`:
the same model (same weights, same `compute_logits`, hence the same numerics as `prompt_logprobs`)
whose pooler takes every position's final hidden state, computes its full-vocabulary log-softmax in
float32, and returns per position [top num_top ids (int32 bits) | their log-probs | the next
prompt token's log-prob] as one float32 row.

How it is wired, with vLLM's public extension points only:
- `ModelRegistry.register_model` names the twin (done at import of this module, in every process
  that imports it: the caller, and vLLM's worker via `worker_extension_cls` below, because vLLM
  spawns its workers on CPU and a registration made in the caller is not inherited);
- `hf_overrides` points the model's `architectures` at the twin;
- each request's `PoolingParams.extra_kwargs["num_top"]` says how many entries to return (so one
  engine serves any k);
- `runner="pooling"` + `PoolerConfig(task="token_classify")` makes vLLM return the pooler output.
"""
from __future__ import annotations

import numpy as np
import torch
from vllm import ModelRegistry
from vllm.model_executor.layers.pooler.abstract import Pooler

__all__ = ["PREFIX", "POOLING_TASK", "TopKWorkerExtension", "pooling_llm_kwargs", "pooling_params", "unpack"]

PREFIX = "MtcacheTopK"
POOLING_TASK = "token_classify"
ROWS_PER_CHUNK = 2048               # positions per lm_head chunk: bounds the [rows, V] logits


def pooling_llm_kwargs(architecture: str) -> dict:
    """`vllm.LLM` arguments that load `architecture`'s top-k twin as a pooling model."""
    from vllm.config import PoolerConfig

    # Registered with the class itself here (not the lazy "module:Class" string the worker uses),
    # so vLLM inspects it in this process instead of in a subprocess.
    ModelRegistry.register_model(PREFIX + architecture, __getattr__(PREFIX + architecture))
    return dict(
        runner="pooling", convert="none",
        hf_overrides={"architectures": [PREFIX + architecture]},
        pooler_config=PoolerConfig(task=POOLING_TASK),
        worker_extension_cls=f"{__name__}.TopKWorkerExtension",
    )


def pooling_params(num_top: int):
    """Per-request parameters asking the twin's pooler for the top `num_top` entries."""
    from vllm import PoolingParams

    return PoolingParams(task=POOLING_TASK, extra_kwargs={"num_top": int(num_top)})


def unpack(packed: torch.Tensor, num_top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[P, 2*num_top+1] float32 pooler rows -> (top ids [P, num_top] int64, log-probs float32,
    target log-probs [P] float32), as `topk_from_prompt_logprobs` returns them."""
    packed = packed.contiguous()
    if packed.ndim != 2 or packed.shape[1] != 2 * num_top + 1 or packed.dtype != torch.float32:
        raise ValueError(f"unexpected top-k pooler output: {tuple(packed.shape)} {packed.dtype}, "
                         f"want [positions, {2 * num_top + 1}] float32")
    ids = packed[:, :num_top].view(torch.int32).numpy().astype(np.int64)
    return ids, packed[:, num_top:2 * num_top].numpy(), packed[:, 2 * num_top].numpy()


class TopKWorkerExtension:
    """Named in `worker_extension_cls` so that vLLM's (spawned) worker imports this module, which
    registers the twins there; it adds nothing to the worker."""


# --- the model ------------------------------------------------------------------------------------
def _register(architecture: str) -> None:
    name = PREFIX + architecture
    if name not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(name, f"{__name__}:{name}")


def _make_topk_class(architecture: str) -> type:
    from vllm.model_executor.models.interfaces_base import VllmModelForPooling

    base = ModelRegistry._try_load_model_cls(architecture)  # the registry's own lazy import of the class
    if base is None:
        raise ValueError(f"vLLM has no model class for architecture {architecture!r}")

    class TopKModel(base, VllmModelForPooling):
        is_pooling_model = True

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            self.pooler = TopKPooler(self)

    TopKModel.__name__ = TopKModel.__qualname__ = PREFIX + architecture
    return TopKModel


class TopKPooler(Pooler):
    """Per finished request: [T-1, 2*num_top+1] float32 rows (see the module docstring)."""

    def __init__(self, model):
        from vllm.model_executor.layers.pooler.tokwise.methods import AllPool

        super().__init__()
        self.compute_logits = model.compute_logits  # a bound method: not registered as a submodule
        self.pooling = AllPool()  # every position's hidden state, chunked prefill reassembled

    def get_supported_tasks(self):
        return {POOLING_TASK}

    def get_pooling_updates(self, task):
        from vllm.model_executor.layers.pooler.common import PoolingParamsUpdate

        return PoolingParamsUpdate(requires_token_ids=True)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata) -> list[torch.Tensor | None]:
        states = self.pooling(hidden_states, pooling_metadata)
        # vLLM's runner fills only the CPU copy of the prompt ids (requires_token_ids above).
        token_ids = pooling_metadata.get_prompt_token_ids_cpu()
        return [None if h is None else self._score(h, ids[: h.shape[0]].to(h.device), _num_top(params))
                for h, ids, params in zip(states, token_ids, pooling_metadata.pooling_params)]

    def _score(self, hidden: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> torch.Tensor:
        """hidden [T, H], token_ids [T] -> [T-1, 2*num_top+1] float32."""
        rows = []
        for start in range(0, hidden.shape[0] - 1, ROWS_PER_CHUNK):
            stop = min(start + ROWS_PER_CHUNK, hidden.shape[0] - 1)
            logprobs = self.compute_logits(hidden[start:stop]).log_softmax(-1, dtype=torch.float32)
            values, ids = logprobs.topk(num_top, dim=-1)
            target = logprobs.gather(-1, token_ids[start + 1:stop + 1, None].long())
            rows.append(torch.cat([ids.to(torch.int32).view(torch.float32), values, target], dim=1))
        if not rows:
            return hidden.new_zeros((0, 2 * num_top + 1), dtype=torch.float32)
        return torch.cat(rows).cpu()


def _num_top(params) -> int:
    num_top = (params.extra_kwargs or {}).get("num_top")
    if not isinstance(num_top, int) or num_top < 1:
        raise ValueError(f"{PREFIX} pooler: each request needs PoolingParams(extra_kwargs={{'num_top': n}}), got "
                         f"{params.extra_kwargs!r}")
    return num_top


_classes: dict[str, type] = {}


def __getattr__(name: str):
    """`MtcacheTopK<Arch>`: the twin class, built on first use (how the registry imports it)."""
    if name.startswith(PREFIX):
        if name not in _classes:
            _classes[name] = _make_topk_class(name[len(PREFIX):])
        return _classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_all() -> None:
    """Register a twin for every architecture vLLM knows (lazily: nothing is imported here)."""
    for arch in list(ModelRegistry.get_supported_archs()):
        if not arch.startswith(PREFIX):
            _register(arch)


_register_all()
