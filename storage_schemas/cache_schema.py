"""Arrow schema of one cache shard: one row per training sequence.

Row layout (T = sequence length, n = number of trained positions, k = cached tokens per position):

    example_id        int64                 index of the example in the source dataset
    input_ids         list<int32>  [T]      the token ids the teacher saw
    loss_mask         list<bool>   [T-1]    position i (predicting token i+1) is trained
    target_logprob    list<float32> [n]     teacher log p(y) at each trained position
    topk_ids          list<int32>  [n*k]    the k most likely NON-target ids, per trained position,
                                            in descending teacher probability, flattened row-major
    topk_logprobs     list<V>      [n*k]    their teacher log-probs (full-vocabulary log-softmax,
                                            not renormalized); V is set by the value encoding

Only trained positions carry teacher arrays: prompt tokens of chat data cost no bytes. Flat lists
(not nested) keep decoding a single `np.frombuffer`-style reshape with no per-token Python work.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = ["SCHEMA_VERSION", "Encoding", "ENCODINGS", "SHARD_COLUMNS", "shard_schema", "shard_file_name"]

# Bump when a column is added, removed or changes meaning; readers refuse other versions by name.
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Encoding:
    """How the per-position teacher values are stored.

    `selection` says which tokens are cached at each position ("topk_nontarget" today; a sampled
    estimator would register e.g. "sampled_nontarget" with its own weight column). `value_type` is
    the Arrow type of `topk_logprobs`.
    """

    name: str
    selection: str
    value_type: pa.DataType
    description: str


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("topk_f32", "topk_nontarget", pa.float32(),
                 "k largest non-target teacher log-probs, float32 (exact)"),
        Encoding("topk_f16", "topk_nontarget", pa.float16(),
                 "k largest non-target teacher log-probs, float16 (half the value bytes; "
                 "~1e-3 relative error on log-probs)"),
    )
}

SHARD_COLUMNS = ("example_id", "input_ids", "loss_mask", "target_logprob", "topk_ids", "topk_logprobs")


def get_encoding(name: str) -> Encoding:
    """The registered encoding called `name`; a clear error listing the known ones otherwise."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown value encoding {name!r}; supported: {sorted(ENCODINGS)}")
    return ENCODINGS[name]


def shard_schema(encoding: str) -> pa.Schema:
    """The Arrow schema every shard written with `encoding` has, exactly."""
    value_type = get_encoding(encoding).value_type
    return pa.schema(
        [
            pa.field("example_id", pa.int64(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("loss_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("target_logprob", pa.list_(pa.float32()), nullable=False),
            pa.field("topk_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("topk_logprobs", pa.list_(value_type), nullable=False),
        ],
        metadata={b"mtcache.schema_version": str(SCHEMA_VERSION).encode(), b"mtcache.encoding": encoding.encode()},
    )


def shard_file_name(index: int) -> str:
    """The one place shard names are spelled."""
    return f"shard-{index:05d}.parquet"
