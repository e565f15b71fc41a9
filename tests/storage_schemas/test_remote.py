"""Remote caches on a real S3-compatible server (moto in server mode, started here as a process):
two workers with separate local working copies write one cache to s3://, it merges, mirrors,
verifies, trains, and a damaged object is named. No client is mocked: pyarrow's S3 client talks
HTTP to the server."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pyarrow.fs as pafs
import pytest

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher, teacher_job
from stages.teacher.scale_out.parts import WorkerSpec
from stages.teacher.scale_out.workers import run_worker
from storage_schemas import Manifest
from storage_schemas.fingerprints import files_sha256
from storage_schemas.remote import CacheStore, is_remote

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(server: subprocess.Popen, port: int, seconds: float = 300) -> None:
    """Return once `server` accepts connections on `port`; fail with its stderr if it exits first,
    or with a message naming the port if it is still not listening after `seconds` (a hang guard,
    far above moto's start-up: 1.9 s measured with the load average at 10 on 2 cores)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if server.poll() is not None:
            pytest.fail(f"moto server exited with {server.returncode} before listening on port {port}:\n"
                        + server.stderr.read().decode()[-2000:])
        if time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"moto server (pid {server.pid}) still not listening on 127.0.0.1:{port} after {seconds:.0f} s")
        time.sleep(0.2)


def test_waiting_for_a_server_fails_by_name_instead_of_falling_through():
    port = free_port()  # nothing listens there
    exits = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('cannot bind')"], stderr=subprocess.PIPE)
    with pytest.raises(pytest.fail.Exception, match=rf"exited with 1 before listening on port {port}:\n.*cannot bind"):
        wait_for_port(exits, port)
    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stderr=subprocess.PIPE)
    with pytest.raises(pytest.fail.Exception, match=rf"\(pid {silent.pid}\) still not listening on 127.0.0.1:{port} after 1 s"):
        wait_for_port(silent, port, seconds=1)
    assert silent.wait(timeout=60) == -signal.SIGKILL  # not left running


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port with bucket `caches`; the AWS variables point clients at it."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(server, port)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    endpoint = f"http://127.0.0.1:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, region="us-east-1", allow_bucket_creation=True).create_dir("caches")
    yield endpoint
    server.terminate()
    server.wait(timeout=30)
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def s3_uri(endpoint: str, name: str) -> str:
    return f"s3://caches/{name}?endpoint_override={endpoint}&region=us-east-1"


def args(model_dir, data_path, cache, *extra):
    return [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache}", "cache.engine=hf", "cache.k=8",
            "cache.rows_per_shard=8", "data.max_length=48", *extra]


def objects(store: CacheStore) -> list[str]:
    infos = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    return sorted(i.path[len(store.root) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def s3_cache(s3_endpoint, tiny_model_dir, tiny_jsonl, tmp_path_factory):
    """(URI, local reference cache): two workers on 'different machines' (own local_dir) write to S3."""
    root = tmp_path_factory.mktemp("s3")
    uri = s3_uri(s3_endpoint, "tiny")
    run_cache_teacher(load_config(None, args(tiny_model_dir, tiny_jsonl, root / "reference")))
    for rank in (0, 1):
        config = load_config(None, args(tiny_model_dir, tiny_jsonl, uri, f"cache.local_dir={root / f'machine-{rank}'}"))
        summary = run_worker(teacher_job(config), WorkerSpec(rank, 2))
    assert summary.merged is not None and summary.merged.complete
    return uri, root / "reference"


def test_s3_cache_has_exactly_the_published_objects_and_mirrors_byte_identical(s3_cache, tmp_path, capsys):
    uri, reference = s3_cache
    assert objects(CacheStore.open(uri)) == [
        "config.yaml", "manifest.json", "parts/worker-00000-of-00002.json", "parts/worker-00001-of-00002.json",
        *[f"shard-{i:05d}.parquet" for i in range(4)]]  # no temp object survives its publish
    assert cli_main(["verify", uri, "--local-dir", str(tmp_path / "mirror")]) == 0
    assert "checksums verified" in capsys.readouterr().out
    mirror, ref = Manifest.load(tmp_path / "mirror"), Manifest.load(reference)
    assert [asdict(r) for r in mirror.shards] == [asdict(r) for r in ref.shards]
    assert mirror.complete and mirror.token_ids_sha256 == ref.token_ids_sha256
    for record in ref.shards:
        mirrored, original = tmp_path / "mirror" / record.file, reference / record.file
        assert files_sha256([mirrored], with_names=False) == files_sha256([original], with_names=False)


def test_a_damaged_s3_object_is_named_by_verify(s3_cache, s3_endpoint, tiny_model_dir, tiny_jsonl, tmp_path, capsys):
    uri = s3_uri(s3_endpoint, "damaged")
    config = load_config(None, args(tiny_model_dir, tiny_jsonl, uri, f"cache.local_dir={tmp_path / 'w'}"))
    run_worker(teacher_job(config), WorkerSpec(0, 1))
    store = CacheStore.open(uri)
    data = bytearray(store.read_bytes("shard-00001.parquet"))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes("shard-00001.parquet", bytes(data))
    assert cli_main(["verify", uri, "--local-dir", str(tmp_path / "mirror")]) == 1
    assert "shard-00001.parquet: sha256 mismatch" in capsys.readouterr().err


def test_stage_two_trains_from_the_s3_cache(s3_cache, tiny_model_dir, tiny_jsonl, tmp_path):
    from stages.student.runner import run_train

    uri, _ = s3_cache
    config = load_config(None, [*args(tiny_model_dir, tiny_jsonl, uri), f"cache.local_dir={tmp_path / 'mirror'}",
                                f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=4",
                                "train.lora.rank=4", "train.logging_steps=1"])
    metrics = run_train(config)
    assert metrics["steps"] == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "mirror").glob("shard-*")) == [f"shard-{i:05d}.parquet" for i in range(4)]


def test_filesystems_pyarrow_lacks_go_through_fsspec():
    uri = "memory://bucket/cache"
    assert is_remote(uri) and not is_remote("/tmp/x") and not is_remote("file:///tmp/x")
    store = CacheStore.open(uri)
    store.write_text("parts/a.json", json.dumps({"x": 1}))
    assert store.list("parts") == ["parts/a.json"] and json.loads(store.read_text("parts/a.json")) == {"x": 1}
    assert store.size("parts/a.json") == len(json.dumps({"x": 1})) and store.size("nothing") is None
    with pytest.raises(FileNotFoundError, match="memory://bucket/cache/nothing"):
        store.read_text("nothing")
