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

from stages.teacher.chunking import chunk_rows, element_bytes, pooled_topk_rows

__all__ = ["PREFIX", "POOLING_TASK", "TopKWorkerExtension", "pooling_llm_kwargs", "pooling_params", "unpack"]

PREFIX = "MtcacheTopK"
POOLING_TASK = "token_classify"


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


def pooling_params(num_top: int, chunk_bytes: int | None = None, draws: int = 0, draw_seed: int = 0, draw_key: int = 0):
    """Per-request parameters asking the twin's pooler for the top `num_top` entries; `chunk_bytes`:
    the output layer's chunk budget (stages.teacher.chunking.chunk_rows; None: the device's default);
    `draws` > 0: also that many tail draws per position, keyed by (`draw_seed`, `draw_key`, position)."""
    from vllm import PoolingParams

    extra = {"num_top": int(num_top)}
    if draws:
        extra.update(draws=int(draws), draw_seed=int(draw_seed), draw_key=int(draw_key))
    if chunk_bytes is not None:
        extra["chunk_bytes"] = int(chunk_bytes)
    return PoolingParams(task=POOLING_TASK, extra_kwargs=extra)


def unpack(packed: torch.Tensor, num_top: int, draws: int = 0) -> tuple[np.ndarray, ...]:
    """[P, 2*num_top+1 (+ draws+1)] float32 pooler rows -> (top ids [P, num_top] int64, log-probs float32,
    target log-probs [P] float32), as `topk_from_prompt_logprobs` returns them; with `draws` also
    (tail draw ids [P, draws] int32, tail entropies [P] float32)."""
    packed = packed.contiguous()
    width = 2 * num_top + 1 + (draws + 1 if draws else 0)
    if packed.ndim != 2 or packed.shape[1] != width or packed.dtype != torch.float32:
        raise ValueError(f"unexpected top-k pooler output: {tuple(packed.shape)} {packed.dtype}, "
                         f"want [positions, {width}] float32")
    ids = packed[:, :num_top].view(torch.int32).numpy().astype(np.int64)
    out = (ids, packed[:, num_top:2 * num_top].numpy(), packed[:, 2 * num_top].numpy())
    if not draws:
        return out
    first = 2 * num_top + 1
    return (*out, packed[:, first:first + draws].contiguous().view(torch.int32).numpy(), packed[:, first + draws].numpy())


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
            self.pooler = TopKPooler(self, vllm_config.model_config.get_vocab_size())

    TopKModel.__name__ = TopKModel.__qualname__ = PREFIX + architecture
    return TopKModel


class TopKPooler(Pooler):
    """Per finished request: [T-1, 2*num_top+1] float32 rows (see the module docstring).

    The positions of all finished requests of a step go through the output layer together, in chunks
    sized by bytes (stages.teacher.chunking: 64 MiB of [rows, V] buffers on CPU, 1 GiB on a GPU, or
    the requests' `chunk_bytes`), so a short request does not make a small chunk of its own."""

    def __init__(self, model, vocab_size: int):
        from vllm.model_executor.layers.pooler.tokwise.methods import AllPool

        super().__init__()
        self.compute_logits = model.compute_logits  # a bound method: not registered as a submodule
        self.vocab_size = vocab_size
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
        out: list[torch.Tensor | None] = [None] * len(states)
        groups: dict[tuple[int, int, int], list[int]] = {}  # (num_top, draws, seed) -> finished requests asking for it
        for i, (h, params) in enumerate(zip(states, pooling_metadata.pooling_params)):
            if h is not None:
                extra = params.extra_kwargs or {}
                groups.setdefault((_num_top(params), int(extra.get("draws", 0)), int(extra.get("draw_seed", 0))), []).append(i)
        for (num_top, draws, seed), members in groups.items():
            budgets = [(pooling_metadata.pooling_params[i].extra_kwargs or {}).get("chunk_bytes") for i in members]
            budget = min((b for b in budgets if b is not None), default=None)
            # Position t of a request predicts its token t+1: each contributes its first T-1 positions.
            hidden = torch.cat([states[i][:-1] for i in members])
            targets = torch.cat([token_ids[i][1:states[i].shape[0]] for i in members]).to(hidden.device)
            rows = chunk_rows(self.vocab_size, hidden.device, budget, element_bytes(hidden.dtype))
            keys = positions = None
            if draws:  # each position's draw key (its request's) and index within its request
                lengths = [states[i].shape[0] - 1 for i in members]
                keys = torch.cat([torch.full((n,), int(pooling_metadata.pooling_params[i].extra_kwargs["draw_key"]),
                                             dtype=torch.long) for i, n in zip(members, lengths)]).to(hidden.device)
                positions = torch.cat([torch.arange(n) for n in lengths]).to(hidden.device)
            packed = pooled_topk_rows(hidden, targets, self.compute_logits, num_top, rows, draws, seed, keys, positions).cpu()
            for i, part in zip(members, packed.split([states[i].shape[0] - 1 for i in members])):
                out[i] = part.clone()  # its own storage: a view would carry the whole batch along
        return out


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
