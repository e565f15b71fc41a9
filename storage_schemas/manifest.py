"""`manifest.json`: the only index of a cache.

A shard not listed here does not exist. The manifest fingerprints what produced the cache (teacher
weights, tokenizer, data and the rules that tokenized and masked it, settings, engine and dtype) so
that a reader can refuse a cache that does not belong to its model, and a resume or merge can refuse
to mix shards of two origins, naming the field that differs. It is rewritten atomically (temp file
+ rename) after every shard, so a killed writer leaves either the old or the new manifest, never
half of one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from storage_schemas.cache_schema import LEGACY_ENCODINGS, SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, get_encoding

__all__ = [
    "MANIFEST_NAME", "TeacherFingerprint", "TokenizerFingerprint", "DatasetFingerprint", "CacheSettings",
    "EngineInfo", "ShardRecord", "Manifest", "FingerprintMismatch",
]

MANIFEST_NAME = "manifest.json"


class FingerprintMismatch(ValueError):
    """A cache was made from something other than what it is being used with."""


@dataclass(frozen=True)
class TeacherFingerprint:
    model_path: str
    revision: str | None       # the Hub commit the model was resolved from (None: a local directory was given)
    weights_sha256: str        # over all weight files, sorted by name
    config_sha256: str         # over config.json
    hub_id: str = ""           # the Hub id (org/name) it was resolved from; "" for a local directory
                               # (manifests written before Hub ids were read have no such key)


@dataclass(frozen=True)
class TokenizerFingerprint:
    sha256: str                # over the tokenizer files, sorted by name
    vocab_size: int            # rows of the model's output layer (what log-probs range over)


@dataclass(frozen=True)
class DatasetFingerprint:
    source: str                # path or name the dataset was loaded from
    split: str
    field: str                 # the column(s) read: text field, messages field, or "prompt,completion" fields
    format: str                # "text", "chat" or "prompt-completion"
    source_sha256: str         # over the input file bytes (or the saved dataset's files)
    num_examples: int
    input_rules: int = 1       # stages.data.inputs.INPUT_RULES[format]: tokenization + trained-token mask rules
                               # (manifests written before it was recorded read as 1)
    tools_field: str = ""      # chat: the column of tool definitions passed to the template ("" for text)
    skipped_examples: list[int] = field(default_factory=list)  # ids refused and skipped (data.on_bad_example: skip): gaps
    leading_bos_dropped: int = 0  # text rows that began with the BOS string, whose duplicated BOS was dropped
    assistant_eos: str = "none"   # chat: "append" = the tokenizer's EOS inserted after each unclosed assistant turn
    unclosed_assistant_turns: int = 0  # chat: assistant turns the template closes with no stop token or closing text
    heldout_fraction: float = 0.0      # data.heldout_fraction: the share of examples kept out of the cache
    heldout_examples: list[int] = field(default_factory=list)  # their ids (gaps, like skipped ones): eval's default target


@dataclass(frozen=True)
class CacheSettings:
    k: int
    encoding: str
    max_length: int
    truncation: str            # "right": keep the first max_length tokens
    rows_per_shard: int
    zstd_level: int


@dataclass(frozen=True)
class EngineInfo:
    name: str                  # "vllm" or "hf"
    dtype: str
    versions: dict[str, str]   # package -> version


@dataclass(frozen=True)
class ShardRecord:
    index: int
    file: str
    first_example: int         # examples [first_example, first_example + rows) live here
    rows: int
    tokens: int                # sum of sequence lengths
    positions: int             # trained positions (rows of teacher arrays)
    truncated: int             # examples cut to max_length
    bytes: int
    sha256: str                # of the shard file
    token_ids_sha256: str      # of the cached input ids, to fingerprint the data actually cached


_IDENTITY_FIELDS = ("teacher", "tokenizer", "dataset", "settings", "engine")
# Where things were found is recorded but is not identity: a moved model or data file with the same
# bytes still matches its cache, and so does the local directory of a Hub snapshot given by id.
_LOCATION_FIELDS = {"teacher.model_path", "teacher.revision", "teacher.hub_id", "dataset.source"}
# Package versions are recorded but are not identity: a patch release of torch must not orphan a
# half-written cache. The engine's name and dtype are (their values differ in the last bits).
_RECORDED_ONLY = _LOCATION_FIELDS | {"engine.versions"}


@dataclass
class Manifest:
    teacher: TeacherFingerprint
    tokenizer: TokenizerFingerprint
    dataset: DatasetFingerprint
    settings: CacheSettings
    engine: EngineInfo
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False     # every shard of the dataset is present
    token_ids_sha256: str = "" # over the shards' token hashes in order; set when complete

    # --- derived figures -------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def shard(self, index: int) -> ShardRecord | None:
        return next((s for s in self.shards if s.index == index), None)

    # --- identity ----------------------------------------------------------------------------
    def identity(self) -> dict[str, dict]:
        """What makes this cache this cache: each identity group's fields, without those only
        recorded (locations, package versions)."""
        return {group: {key: value for key, value in asdict(getattr(self, group)).items()
                        if f"{group}.{key}" not in _RECORDED_ONLY} for group in _IDENTITY_FIELDS}

    def identity_differences(self, other: "Manifest") -> list[tuple[str, object, object]]:
        """(group.field, this cache's value, `other`'s value) for every identity field where they differ."""
        mine, theirs = self.identity(), other.identity()
        return [(f"{group}.{key}", value, theirs[group][key]) for group in _IDENTITY_FIELDS
                for key, value in mine[group].items() if value != theirs[group][key]]

    def check_same_origin(self, other: "Manifest") -> None:
        """Raise FingerprintMismatch naming every field where `other` differs from this cache."""
        differences = self.identity_differences(other)
        if differences:
            raise FingerprintMismatch("; ".join(f"{name} differs: cache has {mine!r}, this run has {theirs!r}"
                                                for name, mine, theirs in differences))

    # --- (de)serialization -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict, where: str = MANIFEST_NAME) -> "Manifest":
        version = raw.get("schema_version")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ValueError(f"{where}: schema_version {version!r} is not supported "
                             f"(this reader: {SUPPORTED_SCHEMA_VERSIONS}; written now: {SCHEMA_VERSION})")
        try:
            parts = {
                "teacher": TeacherFingerprint(**raw["teacher"]),
                "tokenizer": TokenizerFingerprint(**raw["tokenizer"]),
                "dataset": DatasetFingerprint(**raw["dataset"]),
                "settings": CacheSettings(**raw["settings"]),
                "engine": EngineInfo(**raw["engine"]),
                "shards": [ShardRecord(**s) for s in raw["shards"]],
            }
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: malformed manifest ({err})") from err
        get_encoding(parts["settings"].encoding)
        if version == 1 and parts["settings"].encoding not in LEGACY_ENCODINGS:
            raise ValueError(f"{where}: schema_version 1 cannot hold encoding {parts['settings'].encoding!r} "
                             f"(version 1 had {LEGACY_ENCODINGS})")
        scalars = {f.name: raw[f.name] for f in fields(cls) if f.name not in parts and f.name in raw}
        return cls(**parts, **scalars)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "Manifest":
        path = Path(cache_dir) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no manifest; is {cache_dir} a teacher cache?")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(raw, where=str(path))

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Atomic rewrite: readers see the old manifest or the new one, never a partial file."""
        path = Path(cache_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as fh:
            fh.write(self.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
