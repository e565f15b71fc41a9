"""lm-evaluation-harness in `eval` (stages/eval/harness.py): the harness's NLL equals eval's own on the same
texts, base and adapted; the table, the base store and the CLI. Real lm-eval, real peft, a tiny Llama."""
import json
import shutil

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.data.inputs import DataConfig
from stages.eval.evaluate import eval_batches, score_texts
from stages.eval.harness import (
    LOCAL_TASK,
    LOCAL_TASKS_DIR,
    compare_harness,
    first_token_context_matches,
    run_harness,
    total_nll,
    write_local_task,
)
from stages.eval.settings import EvalConfig, HarnessConfig
from stages.student.adapters import load_adapter, make_student
from stages.student.settings import LoraSettings

pytest.importorskip("lm_eval")  # the extra `eval`; make setup installs it


@pytest.fixture(scope="module")
def bos_model(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    """The tiny Llama with a tokenizer that adds <s> (as the embedded default's does), its local harness task
    beside it, and an adapter whose B is random (the adapted model differs from the base)."""
    root = tmp_path_factory.mktemp("harness")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(model)
    write_local_task(root / LOCAL_TASKS_DIR, tiny_jsonl, model, max_length=48)
    torch.manual_seed(0)
    student = make_student(model, LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    student.save_pretrained(root / "adapter")
    return root


def _eval_nll(model, model_dir, texts_path, max_length):
    """eval's own total NLL over the texts (stages/eval/evaluate.py), nats."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches, _ = eval_batches(str(texts_path), tokenizer, DataConfig(path=str(texts_path)),
                              EvalConfig(max_length=max_length, max_examples=0))
    scored = score_texts(model, batches)
    return scored["loss"] * scored["tokens"]


def test_the_harness_nll_equals_evals_own_for_base_and_adapted(bos_model):
    model_dir, texts = bos_model / "model", bos_model / LOCAL_TASKS_DIR / f"{LOCAL_TASK}.jsonl"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert first_token_context_matches(tokenizer)
    settings = HarnessConfig(tasks=[LOCAL_TASK], batch_size=4)
    totals = {}
    for name in ("base", "adapted"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if name == "adapted":
            model = load_adapter(model, bos_model / "adapter").merge_and_unload()
        harness = run_harness(model, tokenizer, settings, model_dir, max_length=48)
        ours = _eval_nll(model, model_dir, texts, 48)
        totals[name] = harness
        assert total_nll(harness, LOCAL_TASK) == pytest.approx(ours, rel=1e-4), name
        assert harness["n"][LOCAL_TASK] == len(texts.read_text().splitlines())
    base, adapted = (total_nll(totals[n], LOCAL_TASK) for n in ("base", "adapted"))
    assert abs(adapted - base) > 4e-4 * base  # the check can tell the two models apart
    rows = {r["metric"]: r for r in compare_harness(totals["base"], totals["adapted"])}
    assert set(rows) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    bpb = rows["bits_per_byte"]  # -sum ll / (bytes ln 2): its change is -(sum ll_a - sum ll_b) / (bytes ln 2)
    n_bytes = sum(s["bits_per_byte"][1] for s in totals["base"]["samples"][LOCAL_TASK].values())
    assert bpb["change"] == pytest.approx((adapted - base) / (n_bytes * 0.6931471805599453), rel=1e-6)
    assert bpb["change_se"] > 0 and bpb["docs"] == totals["base"]["n"][LOCAL_TASK]


def test_a_tokenizer_without_bos_is_said_not_to_share_the_first_token_context(tiny_model_dir):
    assert not first_token_context_matches(AutoTokenizer.from_pretrained(tiny_model_dir))  # it adds no <s>


def test_only_the_texts_that_fit_are_written_and_rewriting_is_idempotent(tiny_model_dir, tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("short one", "word " * 200, "another short")))
    yaml_path = write_local_task(tmp_path / "tasks", texts, tiny_model_dir, max_length=20)
    kept = (tmp_path / "tasks" / f"{LOCAL_TASK}.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in kept] == ["short one", "another short"]
    before = yaml_path.stat().st_mtime_ns
    write_local_task(tmp_path / "tasks", texts, tiny_model_dir, max_length=20)
    assert yaml_path.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match=r"no text fits 1 tokens"):
        write_local_task(tmp_path / "none", texts, tiny_model_dir, max_length=1)


def test_an_unknown_task_is_named_with_the_local_ones(bos_model):
    settings = HarnessConfig(tasks=["mtcache_nope"])
    with pytest.raises(ValueError, match=r"\['mtcache_nope'\] unknown to lm-evaluation-harness .*local tasks beside the model: "
                                         r"\['mtcache_source_heldout'\]"):
        run_harness(AutoModelForCausalLM.from_pretrained(bos_model / "model"), AutoTokenizer.from_pretrained(bos_model / "model"),
                    settings, bos_model / "model", max_length=48)


def test_eval_run_with_lm_eval_prints_the_table_writes_eval_json_and_reuses_the_base(bos_model, tiny_jsonl, tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config import load_config
    from stages.student.runner import run_train
    from stages.teacher.runner import run_cache_teacher

    model_dir = bos_model / "model"
    config = load_config(None, [f"model={model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={tmp_path / 'cache'}", "cache.engine=hf",
                                "cache.k=8", "data.max_length=48", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                                "train.batch_size=4", "train.learning_rate=0.05", "train.report_to=none"])
    run_cache_teacher(config)
    run_train(config)
    args = ["eval", "--run", str(tmp_path / "run"), "--lm-eval", LOCAL_TASK, f"eval.source_path={tiny_jsonl}",
            f"eval.target_path={tiny_jsonl}", "eval.max_length=48", "eval.lm_eval.batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "lm-evaluation-harness 0.4.13: base vs adapted" in out and f"{LOCAL_TASK:28s} bits_per_byte" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())["lm_eval"]
    assert result["harness_version"] == "0.4.13" and result["task_versions"] == {LOCAL_TASK: 1.0}
    assert result["same_first_token_context"] and not result["base_reused"]
    assert {r["metric"] for r in result["rows"]} == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    from stages.eval.evaluate import eval_scalars  # what goes to TensorBoard with train.report_to: tensorboard

    scalars = eval_scalars(json.loads((tmp_path / "run" / "eval.json").read_text()))
    assert {f"eval/lm_eval/{LOCAL_TASK}/bits_per_byte_{part}" for part in ("base", "adapted", "change")} <= set(scalars)
    assert main(args) == 0
    again = json.loads((tmp_path / "run" / "eval.json").read_text())["lm_eval"]
    assert again["base_reused"] and again["base"] == result["base"] and again["rows"] == result["rows"]
    assert "(base: reused" in capsys.readouterr().out


def test_without_the_extra_lm_eval_is_an_error_naming_it(monkeypatch):
    import sys

    from stages.eval.harness import harness_version

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[eval\]' \(the extra `eval`; make setup installs it\)"):
        harness_version()


def test_a_sweep_can_carry_a_harness_metric_as_its_forgetting_axis(bos_model, tiny_jsonl, tmp_path):
    from pipeline.config import load_config
    from pipeline.studies.frontier import frontier_gaps
    from pipeline.studies.sweep import run_sweep

    metric = f"{LOCAL_TASK}:bits_per_byte"
    config = load_config(None, [f"model={bos_model / 'model'}", f"data.path={tiny_jsonl}", f"cache.dir={tmp_path / 'cache'}",
                                "cache.engine=hf", "cache.k=8", "data.max_length=48", "train.max_steps=2", "train.batch_size=4",
                                "train.report_to=none", f"eval.source_path={tiny_jsonl}", f"eval.target_path={tiny_jsonl}",
                                "eval.max_length=48", f"sweep.output_dir={tmp_path / 'sweep'}", "sweep.methods=[none, tail]",
                                "sweep.reg_weights=[1.0, 3.0]", "sweep.seeds=[0]", f"sweep.lm_eval_metric={metric}"])
    records = run_sweep(config)
    assert len(records) == 3 and all(isinstance(r[f"lm_eval:{metric}"]["change"], float) for r in records)
    assert f"| {metric} change |" in (tmp_path / "sweep" / "results.md").read_text()
    assert (tmp_path / "sweep" / "frontier_lm_eval.png").stat().st_size > 0
    assert len(list((tmp_path / "sweep" / "lm_eval_base").glob("*.json"))) == 1  # the base ran through the harness once
    rows = frontier_gaps(records, "tail", forgetting=f"lm_eval:{metric}")
    assert [r["method"] for r in rows] == ["none"]


def test_hand_written_local_tasks_by_their_task_name_with_any_data_files_form(bos_model, tmp_path):
    """A multiple-choice YAML named differently from its file, its data_files a plain relative string."""
    model = tmp_path / "model"
    model.symlink_to(bos_model / "model")
    tasks = tmp_path / LOCAL_TASKS_DIR
    tasks.mkdir()
    rows = [{"q": f"{a} plus one is", "choices": [str(a + 1), str(a + 5)], "label": 0} for a in range(6)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "file_name.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs: {data_files: mc.jsonl}\noutput_type: multiple_choice\n"
        "test_split: train\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\nmetric_list: [{metric: acc}]\n")
    settings = HarnessConfig(tasks=["tiny_mc"], limit=4)
    out = run_harness(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model), settings, model, 48)
    assert out["n"] == {"tiny_mc": 4} and set(out["results"]["tiny_mc"]) == {"acc"}
    (tasks / "other.yaml").write_text("task: tiny_mc\n")
    with pytest.raises(ValueError, match=r"both name the task 'tiny_mc'; rename one"):
        run_harness(AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model), settings, model, 48)


@pytest.mark.parametrize("bad,match", [({"limit": 2.5}, r"eval.lm_eval.limit: a fraction in \(0, 1\), a whole count"),
                                       ({"limit": -1}, r"eval.lm_eval.limit"), ({"dtype": "float64"}, r"eval.lm_eval.dtype")])
def test_harness_settings_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        HarnessConfig(tasks=[LOCAL_TASK], **bad)


def test_a_sweep_metric_the_task_lacks_is_named_with_the_ones_it_has():
    from pipeline.config import load_config
    from pipeline.studies.sweep import _check_lm_eval_metric, forgetting_value

    config = load_config(None, [f"sweep.lm_eval_metric={LOCAL_TASK}:acc"])
    result = {"lm_eval": {"rows": [{"task": LOCAL_TASK, "metric": m} for m in ("bits_per_byte", "word_perplexity")]}}
    with pytest.raises(ValueError, match=r"the task mtcache_source_heldout reports \['bits_per_byte', 'word_perplexity'\], not 'acc'"):
        _check_lm_eval_metric(config, result)
    with pytest.raises(ValueError, match=r"has no lm_eval:x:y; its harness metrics: none"):
        forgetting_value({"name": "r"}, "lm_eval:x:y")
    with pytest.raises(ValueError, match=r"forgetting axis 'source_loss': expected source_loss_increase or lm_eval:TASK:METRIC"):
        forgetting_value({"source_loss": 4.0}, "source_loss")
