"""Teacher engine on a plain transformers forward: the oracle the vLLM engine is tested against,
and the engine for machines without vLLM.

    from stages.teacher.engine import open_engine
    engine = open_engine("hf", "path/to/model", k=32, dtype="float32")   # device: cuda if available
    scores = engine.score(sequences)

Sequences are packed (longest first) into batches of at most `batch_tokens` padded tokens, padded on
the right. The model body runs once per batch; the output layer and the top-(k+1) run on chunks of positions
sized by bytes (stages/teacher/chunking.py: `chunk_bytes`, default 64 MiB of [rows, vocab] buffers on
CPU, 1 GiB on a GPU), so a [positions, vocab] tensor is never built for the whole batch. On a GPU
the top-(k+1) and the log-sum-exp come from one Triton pass over the model-dtype logits
(stages/teacher/topk_kernel.py); elsewhere from float32 log_softmax + topk; for an encoding with tail draws,
on either device, from one float32 softmax (stages/teacher/tail_draws.py `topk_and_tail_draws`).
"""
from __future__ import annotations

import numpy as np
import torch

from stages.teacher.chunking import chunk_rows, element_bytes
from stages.teacher.scores import PositionScores, check_sequences
from stages.teacher.select import select_nontarget_topk_torch
from stages.teacher.tail_draws import check_keys, topk_and_tail_draws
from stages.teacher.topk_kernel import kernel_available, topk_logsumexp

__all__ = ["HFEngine"]

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    """transformers `AutoModelForCausalLM`, eval mode, no grad. See `open_engine` for the arguments."""

    name = "hf"

    def __init__(self, model_dir: str, k: int, dtype: str = "float32", max_length: int = 512,
                 batch_tokens: int = 32768, *, vocab_size: int, device: str | None = None,
                 chunk_bytes: int | None = None, topk_kernel: bool | None = None, draws: int = 0, draw_seed: int = 0):
        from transformers import AutoModelForCausalLM

        self.k, self.max_length, self.batch_tokens = k, max_length, batch_tokens
        self.draws, self.draw_seed = draws, draw_seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_TORCH_DTYPES[dtype])
        self.model.to(self.device).eval()
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        if self.vocab_size != vocab_size:
            self.close()
            raise ValueError(f"{model_dir}: output layer has {self.vocab_size} rows but config.json "
                             f"says vocab_size={vocab_size}")
        # Default: the kernel on CUDA; on CPU only when asked (tests run it under Triton's interpreter).
        self.use_kernel = (self.device.type == "cuda" and kernel_available(self.device)) if topk_kernel is None else topk_kernel
        if self.use_kernel and not kernel_available(self.device):
            raise ValueError(f"hf engine: the Triton top-k kernel does not run on {self.device} "
                             "(it needs CUDA, or TRITON_INTERPRET=1 for tests)")
        self._dtype, self._chunk_bytes = _TORCH_DTYPES[dtype], chunk_bytes  # for chunk_positions
        self._check_split_forward(dtype)

    @property
    def chunk_positions(self) -> int:
        """Positions per output-layer chunk: `chunk_bytes` (default: the device's budget) over the bytes per
        position of the [chunk, vocab] buffers: the logits, plus off the kernel a float32 copy and the float32
        log-softmax (or, with draws, the softmax); the kernel alone reads the model-dtype logits only. Read
        per pass, since callers may change `draws` between passes (a bench does)."""
        return chunk_rows(self.vocab_size, self.device, self._chunk_bytes,
                          element_bytes(self._dtype, log_softmax=not self.use_kernel or self.draws > 0))

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def score(self, sequences: list[np.ndarray], keys: list[int] | None = None) -> list[PositionScores]:
        """One PositionScores per sequence, in input order; `keys` (one per sequence, e.g. the example id)
        key the tail draws of an engine opened with draws."""
        sequences = check_sequences(sequences, self.max_length, self.vocab_size)
        keys = check_keys(keys, len(sequences), self.draws)
        results: list[PositionScores | None] = [None] * len(sequences)
        for batch in self._batches(sequences):
            for i, scores in zip(batch, self._score_batch([sequences[i] for i in batch], [keys[i] for i in batch])):
                results[i] = scores
        return results

    # --- batching -------------------------------------------------------------------------------

    def _batches(self, sequences: list[np.ndarray]) -> list[list[int]]:
        """Indices grouped longest first so that rows x longest row <= batch_tokens."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * len(sequences[batches[-1][0]]) <= self.batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.no_grad()
    def _score_batch(self, sequences: list[np.ndarray], keys: list[int]) -> list[PositionScores]:
        lengths = [len(s) for s in sequences]
        ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.from_numpy(seq)
        ids = ids.to(self.device)
        lengths_t = torch.tensor(lengths, device=self.device)
        columns = torch.arange(ids.shape[1], device=self.device)
        # No mask when nothing is padded: attention then takes the plain causal (flash) path.
        padded = min(lengths) < ids.shape[1]
        attention_mask = (columns[None, :] < lengths_t[:, None]).long() if padded else None
        hidden = self.model.base_model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        # Position i of a row predicts token i+1: rows contribute their first T-1 positions.
        if padded:
            scored = columns[None, :] < (lengths_t[:, None] - 1)
            hidden, targets = hidden[scored], torch.cat([ids[:, 1:], ids[:, :1]], dim=1)[scored]
        else:  # row-major either way; slicing avoids the boolean index (a device sync)
            hidden, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1)
        # Each position's draw key and index within its sequence, in the same row-major order.
        position_keys = torch.tensor(np.repeat(keys, [n - 1 for n in lengths]), dtype=torch.long, device=self.device)
        positions = torch.cat([torch.arange(n - 1, device=self.device) for n in lengths])
        arrays = self._top_logprobs(hidden, targets, position_keys, positions)
        bounds = np.cumsum([0] + [n - 1 for n in lengths])
        return [PositionScores(*(x[a:b] if x is not None else None for x in arrays)) for a, b in zip(bounds[:-1], bounds[1:])]

    # --- output layer in chunks ----------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own logits for hidden states [N, H] (checked at start-up): in the model's
        dtype for a plain head, float32 when a softcap or scale is applied."""
        logits = self.model.get_output_embeddings()(hidden)
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits.float() / softcap) * softcap
        scale = getattr(self.model, "logit_scale", None)  # e.g. Cohere
        return logits.float() * scale if isinstance(scale, (int, float)) else logits

    def _top_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor):
        """The k largest non-target (ids int32, log-probs) [N, k], the target log-probs [N], and with draws
        the tail draws [N, m] and tail entropies [N] (else None, None), as numpy arrays, one chunk of positions
        at a time. Selection happens on the device and results stay there until the end: one transfer, no
        synchronization per chunk."""
        top_ids, top_lp, target_lp, draw_ids, entropy = [], [], [], [], []
        rows = self.chunk_positions
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            logits = self._logits(hidden[chunk])
            chunk_targets = targets[chunk, None]
            if self.draws:  # the draws need every probability: one softmax, no kernel
                values, indices, target, ids_d, h_d = topk_and_tail_draws(
                    logits, chunk_targets[:, 0], self.k + 1, keys[chunk], positions[chunk], self.draws, self.draw_seed)
                target_lp.append(target)
                draw_ids.append(ids_d)
                entropy.append(h_d)
            elif self.use_kernel:
                values, indices, lse = topk_logsumexp(logits, self.k + 1)
                values = values - lse[:, None]
                target_lp.append(logits.gather(1, chunk_targets)[:, 0].float() - lse)
            else:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                values, indices = logprobs.topk(self.k + 1, dim=-1, sorted=True)
                target_lp.append(logprobs.gather(1, chunk_targets)[:, 0])
            ids_k, lp_k = select_nontarget_topk_torch(indices, values, chunk_targets[:, 0], self.k)
            top_ids.append(ids_k)
            top_lp.append(lp_k)
        if not top_ids:
            empty = (np.empty((0, self.draws), np.int32), np.empty(0, np.float32)) if self.draws else (None, None)
            return np.empty((0, self.k), np.int32), np.empty((0, self.k), np.float32), np.empty(0, np.float32), *empty
        parts = (top_ids, top_lp, target_lp) + ((draw_ids, entropy) if self.draws else ())
        return (*(torch.cat(p).cpu().numpy() for p in parts), *((None, None) if not self.draws else ()))

    @torch.no_grad()
    def _check_split_forward(self, dtype: str) -> None:
        """Refuse an architecture whose head does more than `_logits` knows (the split would be wrong)."""
        ids = torch.arange(min(8, self.max_length), device=self.device)[None] % self.vocab_size
        full = self.model(input_ids=ids).logits[0].float()
        split = self._logits(self.model.base_model(input_ids=ids).last_hidden_state[0]).float()
        tol = 1e-4 if dtype == "float32" else 5e-2
        err = (full - split).abs().max().item() / max(1.0, full.abs().max().item())
        if not err <= tol:
            raise ValueError(f"hf engine: body + output layer does not reproduce the model's logits "
                             f"(relative error {err:.2e}) for {type(self.model).__name__}")
