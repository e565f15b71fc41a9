"""Models and data by Hub id (stages/data/hub.py): resolved offline from a Hub cache built here, in the
standard layout huggingface_hub reads (`models--org--name/{blobs, refs/main, snapshots/<commit>}`),
with HF_HUB_OFFLINE=1; the cache they make is the cache of the snapshot's local directory."""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from stages.eval.evaluate import run_eval
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest

MODEL_ID, DATA_ID = "tiny-org/tiny-llama", "tiny-org/tiny-text"
MODEL_COMMIT, DATA_COMMIT = "a" * 40, "b" * 40


def write_hub_repo(hub_cache: Path, kind: str, repo_id: str, commit: str, files: dict[str, Path]) -> Path:
    """A repo as `snapshot_download` leaves it: content-addressed blobs, the snapshot's files as
    relative symlinks to them, refs/main naming the commit. Returns the snapshot directory."""
    repo = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub(tiny_model_dir, tiny_jsonl, tmp_path, monkeypatch):
    """A local Hub cache holding the tiny model and a dataset repo with one jsonl file; offline."""
    cache = tmp_path / "hf-home" / "hub"
    model = write_hub_repo(cache, "model", MODEL_ID, MODEL_COMMIT, {p.name: p for p in tiny_model_dir.iterdir() if p.is_file()})
    data = write_hub_repo(cache, "dataset", DATA_ID, DATA_COMMIT, {"data/train.jsonl": tiny_jsonl, "README.md": tiny_jsonl})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"model": model, "data": data}


def overrides(model: str, data: str, tmp_path: Path, run: str, target: str = f"hf://datasets/{DATA_ID}/data/train.jsonl") -> list[str]:
    return [f"model={model}", f"data.path={data}", f"cache.dir={tmp_path / 'cache'}", "cache.engine=hf", "cache.k=8",
            "cache.rows_per_shard=16", "data.max_length=32", f"train.output_dir={tmp_path / run}", "train.max_steps=2",
            "train.batch_size=4", "train.save_steps=100", "train.report_to=none", "train.lora.rank=4",
            f"eval.source_path={data}", f"eval.target_path={target}", "eval.max_examples=4"]


def test_stage_one_train_and_eval_run_from_hub_ids_offline(hub, tmp_path):
    config = load_config(None, overrides(MODEL_ID, DATA_ID, tmp_path, "run-id"))
    assert Path(config.model) == hub["model"]
    assert Path(config.data.path) == hub["data"] / "data" / "train.jsonl"  # the repo's one data file
    assert Path(config.eval.target_path) == Path(config.eval.source_path) == Path(config.data.path)
    assert config.hub_sources["model"] == {"id": MODEL_ID, "revision": "main", "commit": MODEL_COMMIT, "path": str(hub["model"])}
    assert config.hub_sources["data.path"]["id"] == DATA_ID and config.hub_sources["data.path"]["commit"] == DATA_COMMIT

    summary = run_cache_teacher(config)
    teacher = Manifest.load(tmp_path / "cache").teacher
    assert summary.examples == 30 and summary.shards_written_now == 2
    assert (teacher.hub_id, teacher.revision) == (MODEL_ID, MODEL_COMMIT)  # recorded in the manifest

    metrics = run_train(config)
    assert metrics["steps"] == 2
    saved = yaml.safe_load((tmp_path / "run-id" / "config.yaml").read_text())
    assert saved["model"] == str(hub["model"]) and saved["hub_sources"]["model"]["commit"] == MODEL_COMMIT

    results = run_eval(config, str(tmp_path / "run-id"))
    assert (tmp_path / "run-id" / "eval.json").is_file() and results["adapted"]["target"]["loss"] > 0

    # The same files given as local paths (the snapshot directory and its data file): the same cache.
    data = str(hub["data"] / "data" / "train.jsonl")
    local = load_config(None, overrides(str(hub["model"]), data, tmp_path, "run-local", target=data))
    assert local.hub_sources == {} and local.model == str(hub["model"])
    before = (tmp_path / "cache" / "manifest.json").read_text()
    assert run_cache_teacher(local).shards_written_now == 0  # stage one's origin check accepts it: nothing to redo
    assert (tmp_path / "cache" / "manifest.json").read_text() == before
    assert run_train(local)["steps"] == 2                    # stage two's fingerprint check accepts it


def test_a_missing_id_offline_is_a_clear_error(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model 'tiny-org/absent' \(revision v2\): not a local path, and not in "
                                                r"the local Hub cache .*HF_HUB_OFFLINE is set"):
        load_config(None, ["model=tiny-org/absent", "model_revision=v2"])
    with pytest.raises(FileNotFoundError, match=r"data.path 'tiny-org/no-data' \(revision main\): not a local path.*"
                                                r"--repo-type dataset"):
        load_config(None, [f"model={MODEL_ID}", "data.path=tiny-org/no-data"])
    with pytest.raises(FileNotFoundError, match=r"^data.path 'hf://datasets/tiny-org/no-data/train.jsonl': 'tiny-org/no-data' "
                                                r"\(revision main\): not a local path"):  # the spelling the user wrote
        load_config(None, [f"model={MODEL_ID}", "data.path=hf://datasets/tiny-org/no-data/train.jsonl"])


def test_a_revision_not_in_the_cache_is_not_main(hub, tmp_path):
    """model_revision reaches the Hub lookup: a branch the cache never fetched is refused, main resolves."""
    with pytest.raises(FileNotFoundError, match="revision dev"):
        load_config(None, [f"model={MODEL_ID}", "model_revision=dev"])
    assert load_config(None, [f"model={MODEL_ID}", f"model_revision={MODEL_COMMIT}"]).model == str(hub["model"])


def test_a_local_directory_named_like_an_id_wins(hub, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, tmp_path / MODEL_ID)   # ./tiny-org/tiny-llama, also the cached id
    (tmp_path / DATA_ID).parent.mkdir(exist_ok=True)
    (tmp_path / DATA_ID).write_text('{"text": "local"}\n')  # ./tiny-org/tiny-text, a file
    config = load_config(None, [f"model={MODEL_ID}", f"data.path={DATA_ID}"])
    assert (config.model, config.data.path, config.hub_sources) == (MODEL_ID, DATA_ID, {})


def test_a_dataset_repo_with_several_files_names_them(hub, tiny_jsonl, tmp_path):
    write_hub_repo(Path(os.environ["HF_HOME"]) / "hub", "dataset", "tiny-org/two", "c" * 40,
                   {"train.jsonl": tiny_jsonl, "extra/test.parquet": tiny_jsonl})
    with pytest.raises(ValueError, match=r"holds 2 data files .*train\.jsonl.*name one: data.path=hf://datasets/tiny-org/two/"):
        load_config(None, [f"model={MODEL_ID}", "data.path=tiny-org/two"])
    config = load_config(None, [f"model={MODEL_ID}", "data.path=hf://datasets/tiny-org/two/train.jsonl"])
    snapshot = Path(os.environ["HF_HOME"]) / "hub" / "datasets--tiny-org--two" / "snapshots" / ("c" * 40)
    assert config.data.path == str(snapshot / "train.jsonl")


def test_a_reloaded_config_keeps_its_record_only_for_the_same_path(hub, tmp_path):
    from stages.common.stage_config import save_config

    save_config(load_config(None, [f"model={MODEL_ID}"]), tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").hub_sources["model"]["id"] == MODEL_ID  # eval --run, resume
    moved = load_config(tmp_path / "config.yaml", [f"model={hub['model'].parent}"])
    assert "model" not in moved.hub_sources
