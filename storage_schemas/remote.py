"""Where a cache lives: a local directory, or any URI a pyarrow (or fsspec) filesystem opens.

    store = CacheStore.open("s3://bucket/caches/sft?endpoint_override=http://127.0.0.1:9000")
    store.put_file(local_shard_path, "shard-00003.parquet")    # temp object, then its final name
    store.write_text("manifest.json", manifest.to_json())      # the publish step, written last
    mirror_cache("s3://bucket/caches/sft", "/scratch/sft")      # a local, sha256-checked copy

Atomicity is the local contract (docs/design.md §9) carried over: every object is first written as
`NAME.tmp-<random>` and moved to NAME only when complete (a rename on a local disk; a server-side
copy on S3, where an object appears whole or not at all), and the manifest, the only index, is
written after the shards it lists. A reader that lists nothing but the manifest never sees a
half-written shard.

Schemes pyarrow knows (file, s3, gs, hdfs, abfs) use its native filesystems, which read
credentials from the usual environment (AWS_ACCESS_KEY_ID, ...) and options from the URI query
(`?endpoint_override=...&region=...`); any other scheme goes through fsspec if it has one.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from storage_schemas.fingerprints import files_sha256
from storage_schemas.manifest import MANIFEST_NAME, Manifest

__all__ = ["CacheStore", "is_remote", "mirror_cache", "local_cache_copy", "default_local_dir"]


def is_remote(uri: str | os.PathLike) -> bool:
    """True for `scheme://...` URIs other than file://: the cache is not a plain local directory."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def default_local_dir(uri: str) -> Path:
    """The local working copy of a remote cache when `cache.local_dir` is not set."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return Path(os.environ.get("MTCACHE_HOME", Path.home() / ".cache" / "mtcache")) / "remote" / digest


def _open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    if not is_remote(uri):
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), str(Path(local).resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as native_error:  # ArrowInvalid: a scheme pyarrow has no filesystem for
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"cache URI {uri!r}: pyarrow cannot open it ({native_error})") from None
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as err:
            raise ValueError(f"cache URI {uri!r}: neither pyarrow ({native_error}) nor fsspec ({err}) opens it") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


@dataclass
class CacheStore:
    """A cache location: names are relative to the cache root (`manifest.json`, `parts/...`)."""

    uri: str
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str | os.PathLike) -> "CacheStore":
        fs, root = _open_filesystem(str(uri))
        return cls(str(uri), fs, root.rstrip("/"))

    @property
    def remote(self) -> bool:
        return is_remote(self.uri)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str) -> str:
        """How to name an object in a message: the URI the user gave, then the name."""
        return f"{self.uri.split('?', 1)[0].rstrip('/')}/{name}"

    # --- reading ---------------------------------------------------------------------------
    def size(self, name: str) -> int | None:
        """Bytes of object `name`, None if it does not exist."""
        info = self.fs.get_file_info(self.path(name))
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, name: str) -> bool:
        return self.size(name) is not None

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(name)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.where(name)}: not found") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def list(self, prefix_dir: str) -> list[str]:
        """Names (relative to the root) of the files directly under `prefix_dir`, sorted."""
        selector = pafs.FileSelector(self.path(prefix_dir), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(f"{prefix_dir}/{i.base_name}" for i in infos if i.type == pafs.FileType.File)

    def get_file(self, name: str, local_path: str | os.PathLike) -> None:
        """Copy object `name` to a local file (via a temp name: a local file that exists is whole)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f"{local_path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_input_stream(self.path(name)) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        os.replace(tmp, local_path)

    # --- writing (temp object, then its final name) ---------------------------------------------
    def _publish(self, name: str, write) -> None:
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"  # unique: concurrent writers never share one
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(tmp) as out:
            write(out)
        self.fs.move(tmp, final)

    def write_bytes(self, name: str, data: bytes) -> None:
        self._publish(name, lambda out: out.write(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def put_file(self, local_path: str | os.PathLike, name: str) -> None:
        def copy(out):
            with open(local_path, "rb") as src:
                while block := src.read(1 << 22):
                    out.write(block)
        self._publish(name, copy)

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_file(self.path(name))


def mirror_cache(uri: str, local_dir: str | os.PathLike) -> Path:
    """Download a remote cache's manifest and the shards it lists into `local_dir`; a local shard
    whose sha256 already matches the manifest is kept. Returns `local_dir` (verify it as usual)."""
    from tqdm.auto import tqdm

    store, local_dir = CacheStore.open(uri), Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    if not store.exists(MANIFEST_NAME):
        raise FileNotFoundError(f"{store.where(MANIFEST_NAME)}: no manifest; is {uri} a teacher cache?")
    manifest = Manifest.from_dict(json.loads(store.read_text(MANIFEST_NAME)), where=store.where(MANIFEST_NAME))
    for record in tqdm(manifest.shards, desc=f"mirroring {uri}", unit="shard", leave=False):
        local = local_dir / record.file
        if not (local.exists() and local.stat().st_size == record.bytes and files_sha256([local], with_names=False) == record.sha256):
            store.get_file(record.file, local)
    # last, as on the remote side; a unique temp name, as DDP ranks may mirror into one directory at once
    CacheStore.open(local_dir).write_text(MANIFEST_NAME, manifest.to_json())
    return local_dir


def local_cache_copy(cache: str, local_dir: str = "") -> str:
    """`cache` itself when it is a local directory; else its local mirror (`local_dir`, or the
    default under ~/.cache/mtcache), downloaded and ready for the usual verification."""
    if not is_remote(cache):
        return cache
    return str(mirror_cache(cache, local_dir or default_local_dir(cache)))
