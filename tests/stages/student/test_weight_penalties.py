"""Weight-space baselines `l2` and `lalora` (stages/student/weight_penalties.py) on the tiny model."""
import json
import math
from pathlib import Path

import pytest
import torch
from run_configs import make_config
from transformers import TrainerCallback

from stages.student.adapters import make_student
from stages.student.methods import build_penalty, get_method
from stages.student.runner import run_train
from stages.student.settings import LoraSettings, TrainConfig
from stages.student.weight_penalties import WeightPenalty, empirical_fisher, fisher_examples


class Capture(TrainerCallback):
    """The gradients of each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.fixture
def student(tiny_model_dir):
    torch.manual_seed(0)
    return make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32)


def test_l2_is_zero_at_init_and_its_gradient_is_the_distance(student):
    penalty = WeightPenalty(student)
    assert penalty().item() == 0.0
    with torch.no_grad():
        for _, p in penalty.params:
            p.add_(0.01 * torch.randn_like(p))
    reg_weight = 0.7
    value = reg_weight * penalty()
    assert value.item() > 0
    grads = torch.autograd.grad(value, [p for _, p in penalty.params])
    for (n, p), g in zip(penalty.params, grads):
        torch.testing.assert_close(g, reg_weight * (p.detach() - penalty.anchor[n]), rtol=1e-6, atol=1e-9, msg=n)


def test_l2_is_positive_after_a_step(student):
    penalty = WeightPenalty(student)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    loss = torch.nn.functional.cross_entropy(student(input_ids=ids).logits[0, :-1], ids[0, 1:])
    loss.backward()
    torch.optim.SGD([p for _, p in penalty.params], lr=0.1).step()
    assert penalty().item() > 0


def test_lalora_fisher_is_nonnegative_floored_on_A_and_zero_penalty_at_init(student, tiny_model_dir, tiny_jsonl):
    examples = fisher_examples(str(tiny_jsonl), str(tiny_model_dir), 4, 32)
    assert len(examples) == 4
    raw = empirical_fisher(student, examples, floor=0.0)
    floored = empirical_fisher(student, examples, floor=0.1)
    a_names = [n for n in raw if "lora_A" in n]
    b_names = [n for n in raw if "lora_B" in n]
    assert a_names and b_names
    assert all(torch.all(f >= 0) for f in raw.values())
    assert all(torch.all(raw[n] == 0) for n in a_names)  # B = 0 at init: no curvature reaches A
    assert sum(raw[n].sum().item() for n in b_names) > 0
    mean = sum(f.sum() for f in raw.values()) / sum(f.numel() for f in raw.values())
    for n in raw:
        torch.testing.assert_close(floored[n], raw[n] + 0.1 * mean, msg=n)
    assert all(torch.all(floored[n] > 0) for n in a_names)
    assert all(p.grad is None for _, p in student.named_parameters() if p.requires_grad)  # grads untouched
    penalty = WeightPenalty(student, floored)
    assert penalty().item() == 0.0


def test_lalora_needs_fisher_data():
    with pytest.raises(ValueError, match=r"train\.fisher_data"):
        TrainConfig(method="lalora")


def test_lalora_with_missing_fisher_data_names_the_key(student, tiny_model_dir, tmp_path):
    train = TrainConfig(method="lalora", fisher_data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=r"train\.fisher_data"):
        build_penalty(train, get_method(train.method), student, str(tiny_model_dir))


@pytest.mark.parametrize("estimator", ["l2", "lalora"])
def test_weight_penalties_train_through_run_train(estimator, tiny_model_dir, tiny_cache, tiny_jsonl, tmp_path):
    extra = dict(fisher_data=str(tiny_jsonl), fisher_examples=4, fisher_max_length=32) if estimator == "lalora" else {}
    metrics = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / estimator, method=estimator,
                                    reg_weight=10.0, max_steps=2, save_steps=2, **extra))
    assert metrics["steps"] == 2
    assert all(math.isfinite(metrics[k]) for k in ("final_ce", "final_penalty", "final_loss"))
    assert metrics["final_penalty"] > 0  # the penalty after the first step


def test_penalty_is_added_once_per_optimizer_step(tiny_model_dir, tiny_cache, tmp_path):
    """Batch 4 x 1 and 2 x 2 give the same gradient: the accumulated penalty counts once per step."""
    grads = {}
    for name, batch, accum in (("full", 4, 1), ("accum", 2, 2)):
        capture = Capture()
        run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / name, method="l2", reg_weight=50.0,
                              batch_size=batch, grad_accum=accum, max_steps=2, save_steps=2), callbacks=[capture])
        grads[name] = capture.grads
    # Step 1 is at the anchor (penalty 0); at step 2 the penalty's gradient 50 * (theta - theta0) is
    # ~1e-1 per entry, so counting it twice (or half) would be far outside this tolerance, while Adam's
    # amplified float noise in theta (~1e-8, times 50) stays inside it.
    for g_full, g_accum in zip(grads["full"], grads["accum"]):
        for n in g_full:
            torch.testing.assert_close(g_accum[n], g_full[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


# --- LaLoRA's curvature forms, proxy batches and the curvature store ---------------------------------
def _lalora(tiny_jsonl, tmp_path, **kw):
    settings = dict(method="lalora", fisher_data=str(tiny_jsonl), fisher_examples=4, fisher_max_length=32,
                    output_dir=str(tmp_path / "run"), curvature_dir=str(tmp_path / "store"))
    return TrainConfig(**{**settings, **kw})


@pytest.mark.parametrize("variant", ["lora", "dora", "olora"])
def test_kfac_forms_on_a_real_model_are_psd_and_account_for_every_gradient(variant, tiny_model_dir, tiny_jsonl):
    """All-linear LoRA / DoRA on the tiny Llama with B != 0: the hooks' check passes (every Linear's
    gradient is its factors' product), DoRA's magnitudes keep a diagonal, and the penalty is >= 0 in
    random directions, > 0 off the anchor, exactly 0 at it."""
    from stages.student.curvature import estimate_curvature
    from stages.student.weight_penalties import CurvaturePenalty

    torch.manual_seed(0)
    model = make_student(tiny_model_dir, LoraSettings(variant=variant, rank=4), torch.float32)
    if variant != "olora":  # olora starts with B != 0 (its QR of W); the others at B = 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    examples = fisher_examples(str(tiny_jsonl), str(tiny_model_dir), 3, 24)
    tri = estimate_curvature(model, examples, "tri_kfac")
    assert tri.kron and tri.cross and len(tri.cross) * 2 == len(tri.kron)
    assert all(float(o.abs().max()) > 0 for _, o in tri.cross.values())  # B != 0: the cross blocks are not zero
    assert set(tri.diagonal) == {n for n, p in model.named_parameters() if p.requires_grad and "magnitude" in n}
    assert bool(tri.diagonal) == (variant == "dora")
    penalty = CurvaturePenalty(model, tri, floor=0.0)
    assert penalty().item() == 0.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in penalty.params:
                p.copy_(penalty.anchor[n] + 0.1 * torch.randn(p.shape, generator=g))
        assert penalty().item() > 0


def test_fisher_batches_count_batch_size_texts_and_too_few_texts_are_named(student, tiny_model_dir, tiny_jsonl, tmp_path):
    train = _lalora(tiny_jsonl, tmp_path, fisher_batches=2, fisher_examples=64, batch_size=3)
    penalty = build_penalty(train, get_method("lalora"), student, str(tiny_model_dir))
    assert penalty.report["sequences"] == 6 and not penalty.report["reused"]
    with pytest.raises(ValueError, match=r"holds 30 texts; train\.fisher_batches=20 x train\.batch_size=2 asks for 40"):
        build_penalty(_lalora(tiny_jsonl, tmp_path, fisher_batches=20, fisher_examples=64, batch_size=2), get_method("lalora"), student,
                      str(tiny_model_dir))


@pytest.mark.parametrize("bad,match", [
    (dict(fisher_batches=2, fisher_examples=8), r"set one of them"),
    (dict(fisher_batches=2), r"set one of them"),  # _lalora's fisher_examples=4
    (dict(fisher_batches=-1), r"train\.fisher_batches: must be >= 0"),
    (dict(lalora_curvature="kron"), r"train\.lalora_curvature: 'kron' not in diag\|kfac\|tri_kfac"),
])
def test_curvature_settings_are_checked(bad, match, tiny_jsonl, tmp_path):
    with pytest.raises(ValueError, match=match):
        _lalora(tiny_jsonl, tmp_path, **bad)


def test_curvature_store_is_reused_across_lambdas_and_keyed_by_what_it_is_computed_from(tiny_model_dir, tiny_jsonl, tmp_path):
    def penalty(seed=0, **kw):
        torch.manual_seed(seed)
        model = make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32)
        return build_penalty(_lalora(tiny_jsonl, tmp_path, seed=seed, **{"lalora_curvature": "kfac", **kw}), get_method("lalora"),
                             model, str(tiny_model_dir))

    first = penalty()
    assert not first.report["reused"] and first.report["bytes"] > 0 and first.report["seconds"] >= 0
    again = penalty(reg_weight=123.0, learning_rate=0.5, max_steps=7)  # what the curvature does not depend on
    assert again.report["reused"] and again.report["path"] == first.report["path"]
    for n, (s_in, s_out) in first.curvature.kron.items():
        assert torch.equal(again.curvature.kron[n][0], s_in) and torch.equal(again.curvature.kron[n][1], s_out)
    keys = {first.report["key"]}
    for changed in (dict(seed=1), dict(fisher_examples=5), dict(fisher_max_length=16), dict(lalora_curvature="tri_kfac"),
                    dict(lalora_curvature="diag")):
        report = penalty(**changed).report
        assert not report["reused"] and report["key"] not in keys, changed
        keys.add(report["key"])
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 6


def test_kfac_lalora_trains_through_run_train_and_records_its_curvature(tiny_model_dir, tiny_cache, tiny_jsonl, tmp_path, capsys):
    extra = dict(fisher_data=str(tiny_jsonl), fisher_examples=4, fisher_max_length=32, lalora_curvature="tri_kfac")
    metrics = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / "a", method="lalora", reg_weight=10.0,
                                    max_steps=2, save_steps=2, **extra))
    assert metrics["final_penalty"] > 0 and metrics["curvature"]["curvature"] == "tri_kfac"
    assert (tmp_path / "curvature").is_dir()  # beside the run: <parent of output_dir>/curvature
    assert "lalora: tri_kfac curvature of 4 texts" in capsys.readouterr().out


# --- the matrix: adapter family x curvature x {fused, unfused, gradient checkpointing} ---------------
MATRIX_VARIANTS = ("lora", "dora", "randlora", "sinelora")


@pytest.mark.parametrize("variant", MATRIX_VARIANTS)
@pytest.mark.parametrize("curvature", ["diag", "kfac", "tri_kfac"])
def test_every_adapter_and_curvature_trains_or_is_refused_by_name(variant, curvature, tiny_model_dir, tiny_cache, tiny_jsonl,
                                                                   tmp_path):
    """Each cell: lalora trains two steps (fused loss, gradient checkpointing on), or the config is refused
    naming the variant and why K-FAC does not apply to it."""
    train = dict(method="lalora", reg_weight=10.0, max_steps=2, save_steps=2, fisher_data=str(tiny_jsonl), fisher_examples=3,
                 fisher_max_length=24, lalora_curvature=curvature, fused_loss="true",
                 trainer_args={"gradient_checkpointing": True}, lora=LoraSettings(variant=variant, rank=4))
    if curvature != "diag" and variant in ("randlora", "sinelora"):
        with pytest.raises(ValueError, match=rf"lalora_curvature={curvature}: not with train.lora.variant={variant} \(its "):
            make_config(tiny_model_dir, tiny_cache, tmp_path / "run", **train)
        return
    metrics = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / "run", **train))
    assert metrics["steps"] == 2 and metrics["fused_loss"] is True
    assert metrics["final_penalty"] > 0 and metrics["curvature"]["curvature"] == curvature


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_tri_kfac_lalora_is_the_same_fused_unfused_and_checkpointed(variant, tiny_model_dir, tiny_cache, tiny_jsonl, tmp_path):
    """Three steps of tri_kfac lalora give the same adapter with the fused loss, the unfused one and
    gradient checkpointing: the penalty does not depend on how the CE is computed."""
    from safetensors.torch import load_file

    adapters = {}
    for name, extra in (("fused", dict(fused_loss="true")), ("unfused", dict(fused_loss="false")),
                        ("checkpointed", dict(fused_loss="false", trainer_args={"gradient_checkpointing": True}))):
        run = run_train(make_config(tiny_model_dir, tiny_cache, tmp_path / name, method="lalora", reg_weight=1e3, max_steps=3,
                                    save_steps=3, fisher_data=str(tiny_jsonl), fisher_examples=3, fisher_max_length=24,
                                    lalora_curvature="tri_kfac", lora=LoraSettings(variant=variant, rank=4), **extra))
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
        assert run["final_penalty"] > 0
    # Adam turns float-rounding differences of near-zero gradients into steps of up to lr: 2e-5 is <1% of
    # the 3e-3 x 3 steps an entry can move, while a missing or doubled penalty moves them by ~lr
    for name in ("unfused", "checkpointed"):
        for key, value in adapters["fused"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=0, atol=2e-5, msg=lambda m, k=key, n=name: f"{n} {k}: {m}")


# --- the curvature store as a user meets it: damaged files, shared settings, a bad place ---------------
def _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path, **kw):
    torch.manual_seed(0)
    model = make_student(tiny_model_dir, LoraSettings(rank=4), torch.float32)
    return build_penalty(_lalora(tiny_jsonl, tmp_path, **{"lalora_curvature": "kfac", **kw}), get_method("lalora"), model,
                         str(tiny_model_dir))


def _nan_tensors(path):
    from safetensors.torch import load_file, save_file

    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}, str(path))


@pytest.mark.parametrize("damage,said", [
    (_nan_tensors, "its bytes do not match the sha256 recorded"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "its bytes do not match the sha256 recorded"),
    (lambda p: p.with_suffix(".json").write_text('{"key": "2edae8d4'), "is missing or not valid JSON"),
    (lambda p: p.with_suffix(".json").write_text(p.with_suffix(".json").read_text().replace('"key": "', '"key": "0')),
     "records another key"),
    (lambda p: p.unlink(), "it cannot be read"),
])
def test_a_damaged_stored_curvature_is_recomputed_and_said(damage, said, tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    first = _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path)
    path = Path(first.report["path"])
    damage(path)
    again = _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path)
    out = capsys.readouterr().out
    assert not again.report["reused"] and out.startswith(f"lalora: recomputing the stored curvature {path}: ") and said in out, out
    for n, (s_in, s_out) in first.curvature.kron.items():
        assert torch.equal(again.curvature.kron[n][0], s_in) and torch.equal(again.curvature.kron[n][1], s_out)
    assert _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path).report["reused"]  # and stored whole again


def test_the_recompute_line_names_the_reason(tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    path = Path(_store_penalty(tiny_model_dir, tiny_jsonl, tmp_path).report["path"])
    _nan_tensors(path)
    capsys.readouterr()
    _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path)
    assert capsys.readouterr().out.startswith(f"lalora: recomputing the stored curvature {path}: its bytes do not match the sha256")


def test_the_same_texts_named_two_ways_share_one_curvature(tiny_model_dir, tiny_jsonl, tmp_path):
    """fisher_examples=8 and fisher_batches=2 x batch_size=4 read the same 8 texts; dropout is off in eval mode."""
    first = _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path, fisher_examples=8, lora=LoraSettings(rank=4))
    assert _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path, fisher_batches=2, fisher_examples=64, batch_size=4,
                          lora=LoraSettings(rank=4)).report["reused"]
    torch.manual_seed(0)
    model = make_student(tiny_model_dir, LoraSettings(rank=4, dropout=0.1), torch.float32)
    train = _lalora(tiny_jsonl, tmp_path, fisher_examples=8, lalora_curvature="kfac", lora=LoraSettings(rank=4, dropout=0.1))
    assert build_penalty(train, get_method("lalora"), model, str(tiny_model_dir)).report["path"] == first.report["path"]


def test_an_unwritable_store_is_named_before_the_curvature_is_computed(tiny_model_dir, tiny_jsonl, tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"train\.curvature_dir: cannot create the curvature store .*afile/sub"):
        _store_penalty(tiny_model_dir, tiny_jsonl, tmp_path, curvature_dir=str(tmp_path / "afile" / "sub"))


@pytest.mark.parametrize("rows,match", [
    ([{"body": "some prose"}], r"train\.fisher_data: .*no \"text\" column .*its columns: \['body'\]\. Rename"),
    ([{"prompt": "a"}], r"train\.fisher_data: .*no \"text\" column .*its columns: \['prompt'\]"),
])
def test_proxy_data_without_a_text_column_names_the_key(rows, match, student, tiny_model_dir, tmp_path):
    path = tmp_path / "proxy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=match):
        fisher_examples(str(path), str(tiny_model_dir), 1, 16)


def test_a_non_finite_penalty_stops_training(student):
    penalty = WeightPenalty(student)
    with torch.no_grad():
        penalty.params[0][1].fill_(float("nan"))
    with pytest.raises(ValueError, match=r"weight penalty: nan \(non-finite\)"):
        penalty()
