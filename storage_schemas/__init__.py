"""The data contract between stage one (writer) and stage two (reader).

Everything a cache holds is declared here once: the Arrow schema of a shard row, the value
encodings, the shard naming rule and the manifest. Writers and readers import these names;
nothing else in the project spells a column name or a version number.
"""
from storage_schemas.cache_schema import (
    DEFAULT_ENCODING,
    DEFAULT_VALUE_ENCODING,
    DRAW_COLUMNS,
    DRAW_IDS_COLUMN,
    ENCODINGS,
    EXAMPLE_ID_COLUMN,
    INPUT_IDS_COLUMN,
    LEGACY_ENCODINGS,
    LOSS_MASK_COLUMN,
    MASS_COLUMN,
    SCHEMA_VERSION,
    SEQUENCE_COLUMNS,
    SHARD_COLUMNS,
    SUPPORTED_SCHEMA_VERSIONS,
    TAIL_ENTROPY_COLUMN,
    TARGET_LOGPROB_COLUMN,
    TEACHER_COLUMNS,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    Encoding,
    get_encoding,
    shard_columns,
    shard_file_name,
    shard_schema,
    teacher_columns,
)
from storage_schemas.manifest import (
    MANIFEST_NAME,
    CacheSettings,
    DatasetFingerprint,
    EngineInfo,
    FingerprintMismatch,
    Manifest,
    ShardRecord,
    TeacherFingerprint,
    TokenizerFingerprint,
)

__all__ = [
    "DEFAULT_ENCODING", "DEFAULT_VALUE_ENCODING",
    "ENCODINGS", "LEGACY_ENCODINGS", "SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "SHARD_COLUMNS",
    "MASS_COLUMN", "DRAW_COLUMNS", "DRAW_IDS_COLUMN", "TAIL_ENTROPY_COLUMN",
    "Encoding", "get_encoding", "shard_columns", "shard_file_name", "shard_schema",
    "teacher_columns", "SEQUENCE_COLUMNS", "TEACHER_COLUMNS", "EXAMPLE_ID_COLUMN", "INPUT_IDS_COLUMN", "LOSS_MASK_COLUMN",
    "TARGET_LOGPROB_COLUMN", "TOPK_IDS_COLUMN", "TOPK_LOGPROBS_COLUMN",
    "MANIFEST_NAME", "CacheSettings", "DatasetFingerprint", "EngineInfo", "FingerprintMismatch",
    "Manifest", "ShardRecord", "TeacherFingerprint", "TokenizerFingerprint",
]
