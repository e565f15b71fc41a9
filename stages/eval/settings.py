"""Eval's settings: the `eval:` section of a config (composed in pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.common.checks import require

__all__ = ["EvalConfig", "HarnessConfig"]


@dataclass
class HarnessConfig:
    tasks: list[str] = field(default_factory=list, metadata={"help": (
        "lm-evaluation-harness tasks run on the base and the adapted model by `eval` (also `eval --lm-eval a,b`), e.g. "
        "[mtcache_source_heldout] (the embedded default's local task) or [wikitext, lambada_openai] (their data must be "
        "in the local datasets cache); [] = none")})
    num_fewshot: int = field(default=-1, metadata={"help": "few-shot examples per task; -1 = each task's own default"})
    apply_chat_template: bool = field(default=False, metadata={"help": "render prompts with the tokenizer's chat template"})
    add_bos_token: bool = field(default=False, metadata={"help": (
        "HFLM's add_bos_token: encode texts with the tokenizer's special tokens too. false: a perplexity task's text "
        "follows the harness's one prefix token (BOS), as eval scores it; true doubles the BOS of a tokenizer that adds "
        "one (some models, e.g. Gemma, want it for choice tasks)")})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward in the harness"})
    max_length: int = field(default=0, metadata={"help": (
        "the harness's context window (rolling windows for perplexity tasks); 0 = eval.max_length")})
    limit: float = field(default=0, metadata={"help": (
        "documents per task: in (0, 1) a fraction, a whole number >= 1 a count; 0 = all")})
    device: str = field(default="", metadata={"help": "cpu | cuda | cuda:N; \"\" = cuda when available, else cpu"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16: both models' weights in the harness"})
    cache_dir: str = field(default="", metadata={"help": (
        "where the base model's harness results are kept, keyed by model, tasks, harness version and settings; "
        "\"\" = <parent of the run directory>/lm_eval_base")})

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        require(isinstance(self.tasks, list) and all(isinstance(t, str) and t for t in self.tasks),
                f"eval.lm_eval.tasks: expected a list of task names, got {self.tasks!r}")
        require(self.num_fewshot >= -1, f"eval.lm_eval.num_fewshot: must be >= 0 (or -1 = the task's), got {self.num_fewshot}")
        require(self.batch_size >= 1 and self.max_length >= 0, "eval.lm_eval.batch_size >= 1 and eval.lm_eval.max_length >= 0")
        require(self.limit >= 0 and (self.limit < 1 or float(self.limit).is_integer()),
                f"eval.lm_eval.limit: a fraction in (0, 1), a whole count >= 1 or 0 (all), got {self.limit}")
        require(self.dtype in ("float32", "bfloat16", "float16"), f"eval.lm_eval.dtype: {self.dtype!r} not in float32|bfloat16|float16")


@dataclass
class EvalConfig:
    source_path: str = field(default="build/default/data/source_heldout.jsonl", metadata={"help": (
        "retention set: what must not be forgotten (forgetting). Each set is read as stage one reads data, in the "
        "format its own columns hold (data.format's auto rule): text scores every token, chat the assistant bodies, "
        "prompt-completion the completion. A Hub dataset id works too")})
    target_path: str = field(default="build/default/data/target_heldout.jsonl", metadata={"help": (
        "held-out data of the new task (learning); read as source_path is. The defaults of both are the embedded "
        "demo's sets: for any other model eval refuses until both are set")})
    split: str = field(default="", metadata={"help": (
        "the split of each eval set that is a dataset folder with several splits (save_to_disk DatasetDict); "
        "\"\" = its only split (a folder with several is refused, naming them); data files have one split")})
    target_split: str = field(default="", metadata={"help": "the target set's split, when its folder needs another than eval.split"})
    source_split: str = field(default="", metadata={"help": "the source set's split, when its folder needs another than eval.split"})
    max_length: int = field(default=256, metadata={"help": "sequences are truncated to this many tokens"})
    max_examples: int = field(default=300, metadata={"help": "per set; 0 = all"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    lm_eval: HarnessConfig = field(default_factory=HarnessConfig, metadata={"help": (
        "EleutherAI's lm-evaluation-harness on the base and the adapted model (stages/eval/harness.py)")})
    chunked: bool = field(default=True, metadata={"help": (
        "true: log-probs, accuracy and drift from the last hidden state, the head applied in row chunks within "
        "256 MiB (stages/eval/evaluate.py), so memory does not grow with batch x length x vocabulary; false: from full "
        "[B, T, V] logits (the reference path, kept to measure against)")})

    def __post_init__(self) -> None:
        require(self.max_length >= 2, f"eval.max_length: must be >= 2, got {self.max_length}")
        require(self.max_examples >= 0 and self.batch_size >= 1, "eval.max_examples >= 0 and eval.batch_size >= 1")
