"""`train.bf16=true` on the real path: run_train -> TrainingArguments(bf16=True, use_cpu=True) ->
accelerate's CPU autocast, with the base loaded in bfloat16 (torch 2.13 CPU supports both).

Checked: the training forward really computes in bfloat16 (a float32 LoRA layer emits bfloat16, which
only autocast does), the run trains, and its first-step loss (the untrained model: LoRA B = 0, so
nothing but precision differs) is within a stated bound of the float32 run's. Measured: CE 7.30622
(bf16) vs 7.30878 (float32), KL 2.9e-5 vs -1.2e-8.
"""
import pytest
import torch
from run_configs import make_config
from transformers import TrainerCallback

from stages.student.runner import run_train

# bfloat16 keeps 8 significand bits: unit roundoff u = 2^-8. As in tests/stages/teacher/test_cache_dtypes.py
# (where the bound is argued and measured), a log-prob computed through this 2-layer model in
# bfloat16 moves by at most 32 u = 0.125 nats; the step-1 CE is a mean of target log-probs, so it
# moves by no more. At step 1 the student is the teacher (LoRA B = 0): the float32 KL is 0 up to
# float32 rounding, and the bf16 run's KL is the divergence its rounding alone causes, for log-prob
# errors d at most 32 u: KL ~ Var_p(d) / 2 <= (32 u)^2 / 2 = 7.8e-3.
LOGPROB_BOUND = 32 * 2.0 ** -8
FIRST_STEP_KL_BOUND = LOGPROB_BOUND ** 2 / 2


class FirstStep(TrainerCallback):
    """The logged loss, CE and KL of step 1 and the dtypes a LoRA layer saw in the training forward."""

    def __init__(self):
        self.logs, self.dtypes, self.lora_dtype, self.hook = None, set(), None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
        self.lora_dtype = lora_a.weight.dtype
        self.hook = lora_a.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.logs is None and logs and "ce" in logs:
            self.logs = {"step": state.global_step, **{k: float(logs[k]) for k in ("loss", "ce", "kl")}}

    def on_train_end(self, args, state, control, **kwargs):
        self.hook.remove()


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_cache, tmp_path_factory):
    out = {}
    for bf16 in ("false", "true"):
        capture = FirstStep()
        config = make_config(tiny_model_dir, tiny_cache, tmp_path_factory.mktemp(f"bf16-{bf16}") / "run", max_steps=10,
                             learning_rate=5e-3, bf16=bf16)
        out[bf16] = run_train(config, callbacks=[capture]), capture
    return out


def test_bf16_run_computes_in_bfloat16_and_trains(runs):
    metrics, capture = runs["true"]
    assert capture.lora_dtype == torch.float32  # peft keeps the adapter in float32 ...
    assert capture.dtypes == {torch.bfloat16}   # ... and autocast runs its matmul in bfloat16
    assert runs["false"][1].dtypes == {torch.float32}
    assert metrics["steps"] == 10 and torch.isfinite(torch.tensor([metrics["final_ce"], metrics["ce_start"]])).all()
    assert metrics["final_ce"] < metrics["ce_start"] - 0.1  # it learns: 10 steps at lr 5e-3 lower the CE


def test_bf16_first_step_loss_is_the_float32_loss_within_bf16_precision(runs):
    f32, bf16 = runs["false"][1].logs, runs["true"][1].logs
    assert f32["step"] == bf16["step"] == 1
    for name in ("loss", "ce"):
        assert abs(bf16[name] - f32[name]) <= LOGPROB_BOUND, (name, bf16[name], f32[name])
    assert bf16["loss"] != f32["loss"]  # a different computation, not float32 relabelled
    assert abs(f32["kl"]) < 1e-6 and 0 < bf16["kl"] <= FIRST_STEP_KL_BOUND, (f32["kl"], bf16["kl"])
