"""Teacher engine on vLLM: the default engine of stage one.

    from stages.teacher.engine import open_engine
    engine = open_engine("vllm", "path/to/model", k=32, kv_cache_gib=1.0)
    try:
        scores = engine.score(sequences)
    finally:
        engine.close()                       # stops vLLM's engine-core and worker processes

vLLM starts its engine core and workers as *spawned* processes: a script that opens this engine
needs an `if __name__ == "__main__":` guard (pytest needs nothing: its entry point is guarded).

Two ways to get the top k+1 per position out of vLLM (`output=`):
- "pooler" (default): the model is loaded as its top-k twin from `vllm_topk_model`, a pooling model
  whose pooler runs lm_head + float32 log-softmax + top-k + the prompt token's log-prob inside
  vLLM's worker and returns one small float32 tensor per sequence (`LLM.encode`). No per-position
  Python object is built anywhere, which is what made the stock path slow on CPU.
- "prompt_logprobs": the stock API, kept as the fallback (any vLLM build, any model vLLM can load
  as a generator). Same numbers: both compute `compute_logits` then `log_softmax(float32)` + topk.

Stock path: each request asks for `prompt_logprobs=k+1` with `flat_logprobs=True`. In that layout a
request's `FlatLogprobs` holds, for every position but the first, the prompt token's own entry first and then
the top k+1 by rank (K+1 entries, the prompt token possibly twice); the older dict layout holds the
top entries plus the prompt token only if it is not among them. `topk_from_prompt_logprobs` handles
both with array operations, so no per-token Python object is built on our side.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager

import numpy as np

from stages.teacher.orphan_guard import guard_descendants
from stages.teacher.scores import PositionScores, check_sequences, read_model_config
from stages.teacher.select import select_nontarget_topk
from stages.teacher.settings import no_draws_message
from stages.teacher.tail_draws import check_keys
from storage_schemas import DEFAULT_VALUE_ENCODING

__all__ = ["VLLMEngine", "OUTPUTS", "llm_kwargs", "topk_from_prompt_logprobs", "topk_from_pooler"]

OUTPUTS = ("pooler", "prompt_logprobs")


class VLLMEngine:
    """One `vllm.LLM`, scoring many sequences per `generate` call. See `open_engine` for arguments.

    Extra keyword arguments: `output` ("pooler" or "prompt_logprobs", see the module docstring),
    `kv_cache_gib` (CPU only, KV-cache size, default 1 GiB, overridden by an already-set
    VLLM_CPU_KVCACHE_SPACE), `gpu_memory_utilization` (CUDA only), `chunk_bytes` (pooler only: the
    output layer's chunk budget in bytes, stages.teacher.chunking; None: the device's default), and
    anything else is passed to `vllm.LLM` as is.
    """

    name = "vllm"

    def __init__(self, model_dir: str, k: int, dtype: str = "float32", max_length: int = 512,
                 batch_tokens: int = 32768, *, vocab_size: int, output: str = "pooler", kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.85, chunk_bytes: int | None = None, draws: int = 0,
                 draw_seed: int = 0, **extra_llm_kwargs):
        if draws and output != "pooler":
            raise ValueError(no_draws_message(output, f"the engine was opened with draws={draws}"))
        try:
            from vllm import LLM, SamplingParams
        except ImportError as err:
            raise ImportError(f"the vllm teacher engine needs vLLM ({err}); install it (extra 'cpu' or "
                              f"'gpu') or use the 'hf' engine") from err

        self.k, self.max_length, self.batch_tokens, self.output = k, max_length, batch_tokens, output
        self.chunk_bytes, self.draws, self.draw_seed = chunk_bytes, draws, draw_seed
        kwargs = {**llm_kwargs(model_dir, output, k, dtype, max_length, kv_cache_gib, gpu_memory_utilization),
                  **extra_llm_kwargs}
        # vLLM refuses a prompt as long as max_model_len (it must leave room for the one token it
        # samples), so max_length-token sequences need max_model_len = max_length + 1. That extra
        # position is never run through the model (max_tokens=1 ends the request at prefill), so
        # allowing it past the model's max_position_embeddings is safe.
        limit = read_model_config(model_dir).get("max_position_embeddings")
        allow_long = limit is not None and kwargs["max_model_len"] > int(limit)
        guard_descendants()  # the engine's processes die with this one, kill -9 included
        with _env(VLLM_ALLOW_LONG_MAX_MODEL_LEN="1" if allow_long else None,
                  VLLM_CPU_OMP_THREADS_BIND=cpu_threads_bind(kwargs),
                  MTCACHE_ENGINE_OWN_GROUP="1"):  # quiet runs: Ctrl-C reaches this process only (pipeline/_startup)
            self.llm = LLM(**kwargs)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        if self.vocab_size != vocab_size:
            self.close()
            raise ValueError(f"{model_dir}: vLLM reports vocab_size={self.vocab_size}, config.json {vocab_size}")
        # temperature=0: the one sampled token is discarded, greedy skips the random sampler.
        self.params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k + 1,
                                     detokenize=False, flat_logprobs=True)

    def score(self, sequences: list[np.ndarray], keys: list[int] | None = None) -> list[PositionScores]:
        """One PositionScores per sequence, in input order; ~batch_tokens tokens per generate call. `keys`
        (one per sequence, e.g. the example id) key the tail draws of an engine opened with draws."""
        from vllm.inputs import TokensPrompt

        sequences = check_sequences(sequences, self.max_length, self.vocab_size)
        keys = check_keys(keys, len(sequences), self.draws)
        results: list[PositionScores] = []
        start = 0
        for group in _groups(sequences, self.batch_tokens):
            group_keys, start = keys[start:start + len(group)], start + len(group)
            prompts = [TokensPrompt(prompt_token_ids=seq.tolist()) for seq in group]
            if self.output == "pooler":
                from stages.teacher.vllm_topk_model import POOLING_TASK, pooling_params

                params = [pooling_params(self.k + 1, self.chunk_bytes, self.draws, self.draw_seed, key) for key in group_keys]
                outputs = self.llm.encode(prompts, params, pooling_task=POOLING_TASK, use_tqdm=False)
                tops = [topk_from_pooler(out.outputs.data, seq, self.k + 1, self.draws) for seq, out in zip(group, outputs)]
            else:
                outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
                tops = [topk_from_prompt_logprobs(out.prompt_logprobs, seq, self.k + 1) for seq, out in zip(group, outputs)]
            for seq, (top_ids, top_lp, target_lp, *draws) in zip(group, tops):
                ids, lp = select_nontarget_topk(top_ids, top_lp, seq[1:], self.k)
                results.append(PositionScores(ids, lp, target_lp, *draws))
        return results

    def close(self) -> None:
        """Stop the engine-core process (and its workers); safe to call twice."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            engine_core.shutdown()
        del llm
        gc.collect()


def topk_from_pooler(packed, sequence: np.ndarray, num_top: int, draws: int = 0):
    """(top ids [T-1, num_top] int64, log-probs float32, target log-probs [T-1] float32) from the
    top-k twin's pooler output for one sequence, with `draws` also (draw ids [T-1, draws], tail
    entropies [T-1]); ValueError if it does not cover every position."""
    from stages.teacher.vllm_topk_model import unpack

    arrays = unpack(packed, num_top, draws)
    if arrays[0].shape[0] != len(sequence) - 1:
        raise ValueError(f"vLLM's top-k pooler returned {arrays[0].shape[0]} positions for a sequence of "
                         f"{len(sequence)} tokens (want {len(sequence) - 1})")
    return arrays


def topk_from_prompt_logprobs(prompt_logprobs, sequence: np.ndarray, num_top: int):
    """(top ids [T-1, num_top] int64, their log-probs float32, target log-probs [T-1] float32).

    `prompt_logprobs` is a request's `FlatLogprobs` (position 0 empty). At each position, one
    entry of the prompt token is removed when there are num_top+1 entries (in the flat layout the
    first entry is always the prompt token's), and the rest are sorted by descending log-prob.
    """
    targets = np.asarray(sequence)[1:]
    P = targets.shape[0]
    starts = np.asarray(prompt_logprobs.start_indices[1:], dtype=np.int64)
    ends = np.asarray(prompt_logprobs.end_indices[1:], dtype=np.int64)
    if len(starts) != P:
        raise ValueError(f"vLLM returned prompt log-probs for {len(starts)} positions, expected {P}")
    if np.any(starts[1:] != ends[:-1]):
        raise ValueError("unexpected vLLM prompt log-prob layout: positions are not contiguous")
    if P == 0:
        return np.empty((0, num_top), np.int64), np.empty((0, num_top), np.float32), np.empty(0, np.float32)
    ids = np.asarray(prompt_logprobs.token_ids, dtype=np.int64)[starts[0]:ends[-1]]
    lps = np.asarray(prompt_logprobs.logprobs, dtype=np.float32)[starts[0]:ends[-1]]
    counts = ends - starts
    pos = np.repeat(np.arange(P), counts)
    # The first entry of each position holding the prompt token gives its log-prob.
    target_entries = np.flatnonzero(ids == targets[pos])
    found, first = np.unique(pos[target_entries], return_index=True)
    if len(found) != P:
        missing = np.setdiff1d(np.arange(P), found)[0]
        raise ValueError(f"vLLM returned no log-prob for the prompt token at position {missing}")
    target_entry = target_entries[first]
    keep = np.ones(len(ids), dtype=bool)
    keep[target_entry[counts == num_top + 1]] = False
    if not np.all(np.bincount(pos[keep], minlength=P) == num_top):
        raise ValueError(f"unexpected vLLM prompt log-prob layout: expected {num_top} top entries per position")
    top_ids, top_lp = ids[keep].reshape(P, num_top), lps[keep].reshape(P, num_top)
    # Ranks already order them; re-sorting by value keeps the contract if a layout ever changes.
    order = np.argsort(-top_lp, axis=1, kind="stable")
    return np.take_along_axis(top_ids, order, 1), np.take_along_axis(top_lp, order, 1), lps[target_entry]


# --- helpers ------------------------------------------------------------------------------------

def llm_kwargs(model_dir: str, output: str, k: int, dtype: str = "float32", max_length: int = 512,
               kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.85) -> dict:
    """The `vllm.LLM` arguments of an engine with this `output` on this platform (see VLLMEngine)."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown vLLM engine output {output!r}; known: {', '.join(OUTPUTS)}")
    from vllm.platforms import current_platform

    # max_logprobs defaults to 20; the request asks for k+1 per position. Prefix caching off for
    # both outputs: a prefix-cache hit skips the cached positions' forward, and every position's
    # hidden state (pooler) or logits (prompt log-probs) is needed.
    kwargs = dict(model=model_dir, dtype=dtype, max_model_len=max_length + 1, max_logprobs=k + 1,
                  enable_prefix_caching=False)
    if current_platform.is_cpu():
        # No CUDA graphs to capture on CPU, and compiling costs minutes on small machines.
        kwargs["enforce_eager"] = True
        # Same effect as VLLM_CPU_KVCACHE_SPACE (which vLLM applies on top when set) but takes
        # fractions of a GiB; vLLM's own default (4 GiB or a share of RAM) is too much for CI boxes.
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if output == "pooler":
        from stages.teacher.vllm_topk_model import pooling_llm_kwargs

        kwargs.update(pooling_llm_kwargs(_architecture(model_dir)))
    return kwargs


SMALL_CPU = 4  # at most this many usable CPUs: vLLM's worker gets them all (cpu_threads_bind)


def cpu_threads_bind(kwargs: dict) -> str | None:
    """VLLM_CPU_OMP_THREADS_BIND for an engine with these `vllm.LLM` arguments, or None (vLLM's own).

    On x86 vLLM's automatic binding keeps one core per worker for its scheduler process, which on a
    2-core machine leaves the model (and the top-k pooler) one thread: half the machine idles while
    the worker computes (stage one at a 151,936-token vocabulary ran at ~1,250 tok/s bound that way,
    ~1,930 with both cores; the demo model ~13k and ~22k, 32 x 256 tokens, k=32).
    So on a CPU with at most SMALL_CPU usable CPUs and one worker (no tensor or pipeline split) the
    worker's threads are bound to every usable CPU. A user's own VLLM_CPU_OMP_THREADS_BIND or
    VLLM_CPU_NUM_OF_RESERVED_CPU is left alone."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU"):
        return None
    if kwargs.get("tensor_parallel_size", 1) * kwargs.get("pipeline_parallel_size", 1) != 1:
        return None
    from vllm.platforms import current_platform

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not current_platform.is_cpu() or not 1 < len(cpus) <= SMALL_CPU:
        return None
    return ",".join(map(str, cpus))


def _architecture(model_dir: str) -> str:
    architectures = read_model_config(model_dir).get("architectures") or []
    if not architectures:
        raise ValueError(f"{model_dir}/config.json names no architectures; the vLLM 'pooler' output needs one "
                         f"(or set cache.engine=hf; or cache.vllm_output=prompt_logprobs with an encoding without tail "
                         f"draws, cache.encoding={DEFAULT_VALUE_ENCODING})")
    return architectures[0]


def _groups(sequences: list[np.ndarray], batch_tokens: int) -> list[list[np.ndarray]]:
    """Consecutive sequences in groups of at most ~batch_tokens tokens (at least one each)."""
    groups: list[list[np.ndarray]] = [[]]
    tokens = 0
    for seq in sequences:
        if groups[-1] and tokens + len(seq) > batch_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(seq)
        tokens += len(seq)
    return [g for g in groups if g]


@contextmanager
def _env(**values: str | None):
    """Set the given environment variables (None: leave alone) for the duration of the block."""
    saved = {key: os.environ.get(key) for key, value in values.items() if value is not None}
    os.environ.update({key: value for key, value in values.items() if value is not None})
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
