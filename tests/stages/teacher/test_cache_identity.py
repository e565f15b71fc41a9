"""A half-written cache resumes only under the same engine, dtype and input rules (issue 14, fault 7):
any other resume is refused by field name before a shard is written, so shards never mix."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import stages.teacher.stage_one as stage_one
from pipeline.config import load_config
from stages.data.inputs import INPUT_RULES
from stages.teacher.runner import run_cache_teacher
from storage_schemas import FingerprintMismatch, Manifest

OLD_CACHE = Path(__file__).parents[2] / "storage_schemas" / "data" / "v1-topk_f32"


def make_config(model_dir, data_path, cache_dir, *extra):
    return load_config(None, [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}",
                              "cache.engine=hf", "cache.k=8", "cache.rows_per_shard=8", "data.max_length=48", *extra])


@pytest.fixture(scope="module")
def full_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("identity") / "full"
    run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, cache_dir))  # 30 rows: 4 shards, float32
    return cache_dir


@pytest.fixture
def half_cache(full_cache, tmp_path):
    """The cache as a run killed after its third shard leaves it."""
    cache_dir = tmp_path / "half"
    shutil.copytree(full_cache, cache_dir)
    manifest = Manifest.load(cache_dir)
    last = manifest.shards.pop()
    (cache_dir / last.file).unlink()
    manifest.complete, manifest.token_ids_sha256 = False, ""
    manifest.save(cache_dir)
    return cache_dir


def _files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*")}


def _refused(config, cache_dir: Path, field: str) -> str:
    before, manifest = _files(cache_dir), (cache_dir / "manifest.json").read_text()
    with pytest.raises(FingerprintMismatch, match=field.replace(".", r"\.") + " differs") as err:
        run_cache_teacher(config)
    assert _files(cache_dir) == before and len(before) == 3, "a shard was written"
    assert (cache_dir / "manifest.json").read_text() == manifest
    return str(err.value)


def test_resume_with_another_dtype_is_refused(half_cache, tiny_model_dir, tiny_jsonl):
    message = _refused(make_config(tiny_model_dir, tiny_jsonl, half_cache, "cache.dtype=bfloat16"), half_cache, "engine.dtype")
    assert "engine.dtype differs: cache has 'float32', this run has 'bfloat16'" in message


def test_resume_with_another_engine_is_refused_before_it_opens(half_cache, tiny_model_dir, tiny_jsonl, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("engine opened")

    monkeypatch.setattr(stage_one, "open_engine", refuse)  # no vLLM start: the refusal comes first
    message = _refused(make_config(tiny_model_dir, tiny_jsonl, half_cache, "cache.engine=vllm"), half_cache, "engine.name")
    assert "engine.name differs: cache has 'hf', this run has 'vllm'" in message


def test_package_versions_and_locations_are_not_identity(half_cache):
    cache = Manifest.load(half_cache)
    moved = dataclasses.replace(
        cache, engine=dataclasses.replace(cache.engine, versions={"torch": "0.0.1"}),
        teacher=dataclasses.replace(cache.teacher, model_path="/elsewhere"),
        dataset=dataclasses.replace(cache.dataset, source="/elsewhere.jsonl"))
    cache.check_same_origin(moved)  # does not raise
    with pytest.raises(FingerprintMismatch, match=r"engine\.dtype differs"):
        cache.check_same_origin(dataclasses.replace(cache, engine=dataclasses.replace(cache.engine, dtype="float16")))


def test_manifest_records_the_input_rules_and_the_same_run_resumes(half_cache, tiny_model_dir, tiny_jsonl, full_cache):
    assert Manifest.load(half_cache).dataset.input_rules == INPUT_RULES["text"] == 2  # text rules unchanged by issue 23
    assert run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, half_cache)).shards_written_now == 1
    assert Manifest.load(half_cache).token_ids_sha256 == Manifest.load(full_cache).token_ids_sha256


def test_a_cache_from_before_the_input_rules_reads_as_version_1_and_is_not_resumed(half_cache, tiny_model_dir, tiny_jsonl):
    assert Manifest.load(OLD_CACHE).dataset.input_rules == 1  # checked-in manifest, written without the field
    raw = json.loads((half_cache / "manifest.json").read_text())
    del raw["dataset"]["input_rules"]  # as the code before input rules were versioned wrote it
    (half_cache / "manifest.json").write_text(json.dumps(raw, indent=2))
    assert Manifest.load(half_cache).dataset.input_rules == 1
    message = _refused(make_config(tiny_model_dir, tiny_jsonl, half_cache), half_cache, "dataset.input_rules")
    assert f"dataset.input_rules differs: cache has 1, this run has {INPUT_RULES['text']}" in message


def test_scale_out_workers_and_merge_refuse_mixed_dtypes(tiny_model_dir, tiny_jsonl, tmp_path):
    from stages.teacher.runner import teacher_job
    from stages.teacher.scale_out.merge import MergeError, merge_parts
    from stages.teacher.scale_out.parts import WorkerSpec
    from stages.teacher.scale_out.workers import run_worker

    cache_dir = tmp_path / "cache"
    config = make_config(tiny_model_dir, tiny_jsonl, cache_dir)
    assert run_worker(teacher_job(config), WorkerSpec(0, 2)).shards_written_now == 2
    before = _files(cache_dir)
    with pytest.raises(FingerprintMismatch, match=r"worker-00000-of-00002\.json belongs to a cache of something else: "
                                                  r"engine\.dtype differs: cache has 'float32', this run has 'bfloat16'"):
        run_worker(teacher_job(make_config(tiny_model_dir, tiny_jsonl, cache_dir, "cache.dtype=bfloat16")), WorkerSpec(1, 2))
    assert _files(cache_dir) == before and not (cache_dir / "parts" / "worker-00001-of-00002.json").exists()
    run_worker(teacher_job(config), WorkerSpec(1, 2), merge=False)
    part = cache_dir / "parts" / "worker-00001-of-00002.json"
    raw = json.loads(part.read_text())
    raw["engine"]["dtype"] = "bfloat16"  # as if worker 1 had run under another dtype before the check existed
    part.write_text(json.dumps(raw))
    with pytest.raises(MergeError, match=r"different caches: engine\.dtype differs"):
        merge_parts(str(cache_dir))


def test_other_settings_are_all_named_with_the_settings_that_resume(half_cache, tiny_model_dir, tiny_jsonl):
    """A cache written under other defaults (k and encoding both, as before issue 27): one refusal names every
    differing setting and the overrides that resume it; following that advice literally resumes it."""
    other = make_config(tiny_model_dir, tiny_jsonl, half_cache, "cache.k=16", "cache.encoding=topk_idd_rel4q112")
    message = _refused(other, half_cache, "settings.k")
    assert "settings.encoding differs: cache has 'topk_idd_rel4q112_draws16', this run has 'topk_idd_rel4q112'" in message
    advice = message.split("pass its settings: ")[1].split(". Or use")[0]
    assert advice == "cache.k=8 cache.encoding=topk_idd_rel4q112_draws16"
    summary = run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, half_cache, "cache.k=16", "cache.encoding=topk_idd_rel4q112",
                                            *advice.split()))
    assert summary.shards_written_now == 1 and Manifest.load(half_cache).complete
