"""Stage two end to end on the tiny model: learning, files, kill-and-resume, accumulation, sharing a cache."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from reference_kl import reference_kl
from run_configs import make_config
from safetensors.torch import load_file
from tiny_models import build_tiny_llama
from transformers import AutoModelForCausalLM, TrainerCallback

from pipeline.config import Config, load_config
from stages.common.stage_config import save_config
from stages.student.adapters import adapter_state, base_state
from stages.student.collator import CacheCollator, pad_token_id
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.runner import run_train
from stages.student.settings import LoraSettings
from stages.student.trainer import last_checkpoint
from storage_schemas import Manifest

REPO = Path(__file__).resolve().parents[3]


class Capture(TrainerCallback):
    """Keeps the weights at the start, the gradients of each step, and the model at the end."""

    def __init__(self):
        self.grads, self.model = [], None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.base, self.lora = base_state(model), adapter_state(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@torch.no_grad()
def mean_ce(model, cache_dir, model_dir, rows: int = 16) -> float:
    manifest = open_cache(cache_dir, model_dir, verify=False)
    dataset = load_cache_dataset(cache_dir, manifest)
    batch = CacheCollator(pad_token_id(model_dir), manifest.settings.k,
                         encoding=manifest.settings.encoding)([dataset[i] for i in range(rows)])
    return batch_loss(model.eval(), batch, get_method("none"), 0.0).ce.item()


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --- one run: learning, weights, files -----------------------------------------------------------
def test_training_learns_keeps_base_and_writes_a_reloadable_adapter(tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=12, learning_rate=5e-3)
    capture = Capture()
    metrics = run_train(config, callbacks=[capture])
    run = tmp_path / "run"
    base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ce_before = mean_ce(base_model, tiny_cache, tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base_model, run / "adapter")
    ce_after = mean_ce(reloaded, tiny_cache, tiny_model_dir)
    assert ce_after < ce_before - 0.5 and metrics["final_ce"] < metrics["ce_start"]
    # frozen base unchanged, adapter changed
    trained = capture.model
    assert all(torch.equal(capture.base[n], p) for n, p in base_state(trained).items())
    assert all(not torch.equal(capture.lora[n], p) for n, p in adapter_state(trained).items() if "lora_B" in n)
    # stock peft reload == the trained model
    x = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, trained.eval()(input_ids=x).logits, rtol=0, atol=1e-6)
    # exactly these files
    assert {p.name for p in run.iterdir()} == {
        "adapter", "checkpoints", "config.yaml", "cache_fingerprint.json", "metrics.json", "log.csv", "tensorboard"}
    assert {p.name for p in (run / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"checkpoint-9", "checkpoint-12"}
    assert load_config(run / "config.yaml") == config
    fingerprint = json.loads((run / "cache_fingerprint.json").read_text())
    assert fingerprint["token_ids_sha256"] == Manifest.load(tiny_cache).token_ids_sha256
    assert set(fingerprint) == {"teacher", "tokenizer", "dataset", "settings", "token_ids_sha256"}
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("final_ce", "final_kl", "final_loss", "steps", "tokens", "wall_time_s", "tokens_per_s",
                "peak_rss_mib", "ce_start", "ce_end"):
        assert saved[key] is not None, key
    assert saved["steps"] == 12 and saved["final_kl"] > 0
    log = csv_rows(run / "log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 13)) and float(log[-1]["ce"]) == pytest.approx(saved["final_ce"])


# --- logged values against an independent computation -------------------------------------------
@pytest.fixture(scope="module")
def other_teacher_cache(tiny_model_dir, tiny_token_ids, build_cache, tmp_path_factory) -> Path:
    """A k = 8 cache of the 30 tiny sequences scored by ANOTHER random tiny Llama (seed 1, same tokenizer):
    the student (seed 0) differs from this teacher at step 0, so every cached KL is far from 0 there."""
    other = tmp_path_factory.mktemp("teacher-seed1")
    shutil.copytree(tiny_model_dir, other, dirs_exist_ok=True)
    build_tiny_llama(other, vocab_size=json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"], seed=1)
    out = tmp_path_factory.mktemp("cache-seed1")
    build_cache(other, tiny_token_ids, out, k=8)
    return out


def cached_rows(cache_dir: Path) -> list[dict]:
    """Every row of a topk_f32 cache, read with pyarrow alone (raw float32 columns: no decoding)."""
    rows = []
    for record in Manifest.load(cache_dir).shards:
        rows.extend(pq.read_table(cache_dir / record.file).to_pylist())
    return rows


class StudentLogits(TrainerCallback):
    """The trained model's logits for each row (unpadded, float64) after optimizer step 1, i.e. what step
    2's forward sees. LoRA dropout is 0 and Llama has none, so train mode computes the same function."""

    def __init__(self, rows: list[dict]):
        self.rows, self.logits = rows, None

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.logits = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double() for r in self.rows]


def masked_kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, target: int) -> torch.Tensor:
    """Design doc §1 at one position, float64: D = sum_{v != y} p~_v (log p~_v - log q~_v), teacher p first."""
    keep = torch.arange(student.numel()) != target
    p, q = torch.softmax(teacher, 0)[keep], torch.softmax(student, 0)[keep]
    p, q = p / p.sum(), q / q.sum()
    return (p * (p.log() - q.log())).sum()


def bernoulli_kl(p: float, q: float) -> float:
    """KL(Bern(p) || Bern(q)) in nats, float64, by its definition."""
    return sum(a * math.log(a / b) for a, b in ((p, q), (1 - p, 1 - q)) if a > 0)


def expected_step(method: str, rows: list[dict], student: list[torch.Tensor], base: list[torch.Tensor], weight: float):
    """(loss, ce, kl, binary share) per labelled token over all rows: CE from the logits, KL from tests/reference_kl.py
    (cached methods, the teacher from the cache) or by hand from the base model's logits (live). The binary share:
    sum of KL(Bern(p_y) || Bern(q_y)) over the full KL, which is the method's own KL (full_kl), the live teacher's
    full KL by its definition (live), or B + (1 - p_y) D (topk: its D estimate); None where the full KL is 0."""
    binary, full = 0.0, 0.0
    for row, logits, base_logits in zip(rows, student, base):
        mask = torch.tensor(row["loss_mask"])
        z, targets = logits[:-1][mask], torch.tensor(row["input_ids"][1:])[mask]
        q = torch.softmax(z, -1)
        if method in ("topk", "full_kl"):
            p_y = torch.tensor(row["target_logprob"], dtype=torch.float64).exp()
        else:
            p_y = torch.softmax(base_logits[:-1][mask], -1).gather(-1, targets[:, None]).squeeze(-1)
        q_y = q.gather(-1, targets[:, None]).squeeze(-1)
        b = [bernoulli_kl(pv, qv) for pv, qv in zip(p_y.tolist(), q_y.tolist())]
        binary += sum(b)
        if method == "full_kl":
            ids = torch.tensor(row["topk_ids"]).view(-1, 8)
            values = torch.tensor(row["topk_logprobs"], dtype=torch.float64).view(-1, 8)
            full += reference_kl(z, targets, ids, values, torch.tensor(row["target_logprob"], dtype=torch.float64), method).sum().item()
        elif method == "topk":
            ids = torch.tensor(row["topk_ids"]).view(-1, 8)
            values = torch.tensor(row["topk_logprobs"], dtype=torch.float64).view(-1, 8)
            d = reference_kl(z, targets, ids, values, torch.tensor(row["target_logprob"], dtype=torch.float64), method)
            full += sum(bv + (1 - pv) * dv for bv, pv, dv in zip(b, p_y.tolist(), d.tolist()))
        elif method == "live":
            p = torch.softmax(base_logits[:-1][mask], -1)
            full += (p * (p.log() - q.log())).sum().item()
    ce_kl = _expected_ce_kl(method, rows, student, base, weight)
    return (*ce_kl, binary / full if method != "none" and full > 1e-12 else None)


def _expected_ce_kl(method: str, rows: list[dict], student: list[torch.Tensor], base: list[torch.Tensor], weight: float):
    ce, kl, n = 0.0, 0.0, 0
    for row, logits, base_logits in zip(rows, student, base):
        mask = torch.tensor(row["loss_mask"])
        z, targets = logits[:-1][mask], torch.tensor(row["input_ids"][1:])[mask]
        ce += torch.nn.functional.cross_entropy(z, targets, reduction="sum").item()
        n += len(targets)
        if method in ("topk", "full_kl"):
            ids = torch.tensor(row["topk_ids"]).view(-1, 8)
            values = torch.tensor(row["topk_logprobs"], dtype=torch.float64).view(-1, 8)
            kl += reference_kl(z, targets, ids, values, torch.tensor(row["target_logprob"], dtype=torch.float64), method).sum().item()
        elif method == "live":
            kl += sum(masked_kl_by_hand(zt, bt, int(y)).item() for zt, bt, y in zip(z, base_logits[:-1][mask], targets))
    return ce / n + weight * kl / n, ce / n, kl / n


@pytest.mark.parametrize("method", ["none", "topk", "full_kl", "live"])
def test_logged_loss_ce_and_kl_equal_an_independent_computation(method, tiny_model_dir, other_teacher_cache, tmp_path):
    """One batch of all 30 cached rows per step (batch_size 30), so the batch is known whatever order the
    sampler draws (per-token means do not depend on it). Step 1: the student is the base model (LoRA
    B = 0); step 2: the adapter after one step, its logits taken by a callback. For live the KL is 0
    at step 1 (the teacher is the student with its adapter off) and is checked at step 2."""
    rows = cached_rows(other_teacher_cache)
    with torch.no_grad():
        base_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
        base = [base_model(input_ids=torch.tensor([r["input_ids"]])).logits[0].double() for r in rows]
    after_one = StudentLogits(rows)
    weight = 0.5  # the logged loss must be CE + 0.5 KL, not CE + KL
    with pytest.warns(UserWarning, match="other teacher weights"):
        run_train(make_config(tiny_model_dir, other_teacher_cache, tmp_path / method, method=method, max_steps=2, save_steps=2,
                              batch_size=len(rows), learning_rate=0.02, reg_weight=weight, allow_model_mismatch=True),
                  callbacks=[after_one])
    log = csv_rows(tmp_path / method / "log.csv")
    assert [int(r["step"]) for r in log] == [1, 2]
    expected = [expected_step(method, rows, student, base, weight) for student in (base, after_one.logits)]
    for row, (loss, ce, kl, share) in zip(log, expected):
        # float32 training forward (padded batch) vs float64 here on unpadded rows: seen 1e-7 relative
        assert float(row["ce"]) == pytest.approx(ce, rel=1e-5), row["step"]
        assert float(row["kl"]) == pytest.approx(kl, rel=1e-5, abs=1e-7), row["step"]
        assert float(row["loss"]) == pytest.approx(loss, rel=1e-5), row["step"]
        if share is None:  # none; live at step 1 (student = teacher: no KL to share out)
            assert row["binary_share"] == "", row["step"]
        else:
            assert 0 < share < 1 and float(row["binary_share"]) == pytest.approx(share, rel=1e-4), row["step"]
    assert (expected[0][2] > 0.1) == (method in ("topk", "full_kl"))  # other teacher: far from 0; live, none: 0 at step 1
    assert (expected[1][2] > 1e-4) == (method != "none")  # the student moved: live's KL is not 0 at step 2


@pytest.mark.parametrize("streaming", [False, True])
def test_one_epoch_sees_every_cached_token_once(streaming, tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=0, epochs=1.0, grad_accum=2,
                         streaming=streaming)
    metrics = run_train(config)
    assert metrics["steps"] == 4  # ceil(30 rows / (4 x 2))
    assert metrics["tokens"] == Manifest.load(tiny_cache).num_tokens


def test_existing_run_is_not_overwritten_and_changed_config_is_not_resumed(tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=2, save_steps=1)
    run_train(config)
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(config)
    config.train.reg_weight = 0.25
    with pytest.raises(ValueError, match=r"train.reg_weight: 1.0 -> 0.25"):
        run_train(config, resume=True)


def test_resuming_a_finished_run_trains_nothing(tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", max_steps=2, save_steps=1)
    first = run_train(config)
    adapter = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    again = run_train(config, resume=True)
    assert again == first and again["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_live_with_pissa_is_refused_before_any_work(tiny_model_dir, tiny_cache, tmp_path):
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", method="live", lora=LoraSettings(variant="pissa"))
    with pytest.raises(ValueError, match="disable_adapter"):
        run_train(config)
    assert not (tmp_path / "run").exists()


# --- gradient accumulation -----------------------------------------------------------------------
def test_accumulation_gives_the_full_batch_gradient(tiny_model_dir, tiny_cache, tmp_path):
    """Batch 4 x 1 and batch 2 x 2 see the same 4 sequences per step; uneven label counts per
    micro-batch make a per-micro-batch mean differ, the step-wide count does not."""
    runs = {}
    for name, batch, accum in (("full", 4, 1), ("accum", 2, 2)):
        capture = Capture()
        run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / name, batch_size=batch, grad_accum=accum,
                              max_steps=3, save_steps=3), callbacks=[capture])
        runs[name] = capture
    for g_full, g_accum in zip(runs["full"].grads, runs["accum"].grads):
        for n in g_full:
            torch.testing.assert_close(g_accum[n], g_full[n], rtol=1e-5, atol=1e-6, msg=n)
    full, accum = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("full", "accum"))
    for n in full:
        torch.testing.assert_close(accum[n], full[n], rtol=1e-5, atol=1e-5)  # Adam amplifies 1e-7 noise
    ce_full, ce_accum = (csv_rows(tmp_path / n / "log.csv") for n in ("full", "accum"))
    assert [float(r["loss"]) for r in ce_full] == pytest.approx([float(r["loss"]) for r in ce_accum], rel=1e-5)


# --- kill and resume -----------------------------------------------------------------------------
STALL_AFTER_SAVE = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from pipeline.config import load_config
from stages.student.runner import run_train

class StallAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        Path(sys.argv[2]).write_text(str(state.global_step))
        time.sleep(600)  # a long job; the test kills it here

run_train(load_config(sys.argv[1]), callbacks=[StallAfterSave()])
"""


def start_run(config: Config, tmp_path: Path, name: str, script: str, *extra: str,
              threads: int | None = None) -> subprocess.Popen:
    save_config(config, tmp_path / f"{name}.yaml")
    (tmp_path / f"{name}.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if threads:  # concurrent runs on 2 cores: oversubscribed OpenMP threads spin and crawl
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, str(tmp_path / f"{name}.py"), str(tmp_path / f"{name}.yaml"), *extra],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"run ended (rc={proc.returncode}) before {path.name}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_killed_run_resumes_to_the_same_result(tiny_model_dir, tiny_cache, tmp_path):
    reference = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / "reference"))
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "killed")
    marker = tmp_path / "saved"
    proc = start_run(config, tmp_path, "killed", STALL_AFTER_SAVE, str(marker))
    wait_for(marker, proc, tmp_path / "killed.log")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = tmp_path / "killed"
    assert marker.read_text() == "3" and not (run / "adapter").exists()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"checkpoint-3"}
    resumed = run_train(config, resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == reference["steps"] == 6
    for key in ("final_ce", "final_kl", "final_loss", "tokens"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-6), key
    expected = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-6, atol=1e-6)
    ref_log, log = csv_rows(tmp_path / "reference" / "log.csv"), csv_rows(run / "log.csv")
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]  # no duplicated or missing rows
    assert [float(r["ce"]) for r in log] == pytest.approx([float(r["ce"]) for r in ref_log], rel=1e-6)


# --- two runs, one cache -------------------------------------------------------------------------
PLAIN_RUN = """
import sys
from pipeline.config import load_config
from stages.student.runner import run_train
run_train(load_config(sys.argv[1]))
"""


def test_two_runs_share_one_cache_without_touching_it(tiny_model_dir, cache_copy, tmp_path, snapshot):
    before = snapshot(cache_copy)
    settings = {"a": dict(reg_weight=0.5, lora=LoraSettings(rank=4), seed=0),
                "b": dict(reg_weight=2.0, lora=LoraSettings(rank=8), seed=1)}
    procs = {name: start_run(make_config(tiny_model_dir, cache_copy, tmp_path / name, max_steps=4, **s),
                             tmp_path, name, PLAIN_RUN, threads=1) for name, s in settings.items()}
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    metrics = {n: json.loads((tmp_path / n / "metrics.json").read_text()) for n in procs}
    assert metrics["a"]["steps"] == metrics["b"]["steps"] == 4 and metrics["a"]["final_loss"] != metrics["b"]["final_loss"]
    assert snapshot(cache_copy) == before


def test_resume_skips_a_checkpoint_killed_mid_save(tmp_path):
    for step, complete in ((3, True), (6, False)):
        path = tmp_path / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"")
        if complete:  # the Trainer writes trainer_state.json last
            (path / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path).name == "checkpoint-3"


# --- fused loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["tail", "none"])
def test_fused_loss_trains_like_the_unfused_loss(estimator, tiny_model_dir, tiny_cache, tmp_path):
    """Same steps with train.fused_loss on and off (chunks of 16 rows, accumulation over 2 micro-batches):
    the same logged losses and the same gradients at every step."""
    runs = {}
    for fused in (False, True):
        capture = Capture()
        run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / str(fused), method=estimator, batch_size=2,
                              grad_accum=2, max_steps=3, save_steps=3, fused_loss=fused, fused_chunk_size=16),
                  callbacks=[capture])
        runs[fused] = (csv_rows(tmp_path / str(fused) / "log.csv"), capture.grads)
    (log_ref, grads_ref), (log_fused, grads_fused) = runs[False], runs[True]
    assert len(log_fused) == len(log_ref) == 3
    for ref, got in zip(log_ref, log_fused):
        for key in ("loss", "ce", "kl"):
            assert float(got[key]) == pytest.approx(float(ref[key]), rel=1e-5, abs=1e-7), key
        if ref["binary_share"] or got["binary_share"]:  # step 1 of tail: student = teacher, no KL to share out
            assert float(got["binary_share"]) == pytest.approx(float(ref["binary_share"]), rel=1e-5)
    assert (float(log_ref[-1]["kl"]) > 0) == (estimator == "tail")
    for g_ref, g_got in zip(grads_ref, grads_fused):
        for n in g_ref:
            torch.testing.assert_close(g_got[n], g_ref[n], rtol=1e-5, atol=1e-6, msg=n)
