"""Arrow schema of one cache shard (one row per training sequence) and the registry of encodings.

Row layout (T = sequence length, n = number of trained positions, k = cached tokens per position):

    example_id        int64            index of the example in the source dataset
    input_ids         list<int32> [T]  the token ids the teacher saw
    loss_mask         list<bool>  [T-1] position i (predicting token i+1) is trained
    target_logprob    list<.>     [n]  teacher log p(y) at each trained position
    topk_ids          list<int32> [n*k] the k most likely NON-target ids per trained position,
                                       flattened row-major (order/coding: the encoding's `id_order`)
    topk_logprobs     list<.>     [n*k] their teacher log-probs (full-vocabulary log-softmax, not
                                       renormalized), stored as the encoding's `value_codec` says
    topk_mass         list<int32> [n]  only in encodings with a `mass_codec`: the share of the
                                       non-target mass the k cached tokens hold, coded (see below)
    tail_draw_ids     list<int32> [n*m] only in encodings with `tail_draws` m > 0: m ids drawn from the
                                       teacher's tail (non-target ids outside the k), sorted ascending
                                       per position and delta-coded (first = the id; repeats are 0)
    tail_entropy      list<float16> [n] with them: the entropy of the teacher's within-tail distribution
                                       (nats); stages/teacher/tail_draws.py says how the draws are made

Only trained positions carry teacher arrays: prompt tokens of chat data cost no bytes. Flat lists
(not nested) keep decoding a reshape plus a few numpy ops, with no per-token Python work.

An `Encoding` says everything a reader needs to decode the three teacher columns (id order, value
and target codecs with their parameters) and how the Parquet file is laid out (byte-stream-split
and dictionary columns, row-group size). Its full spec is written into every shard's Arrow metadata
(`mtcache.encoding_spec`); readers look the name up here and refuse a shard whose spec differs.
The codecs themselves are classes in `storage_schemas.codec_registry` (looked up by the names an
`Encoding` gives, each documenting its format; their promises: docs/design.md §8), applied to the columns by
`storage_schemas.codecs`; the study that chose the default is
`python -m pipeline encoding-study` (BENCHMARKS.md, "Cache encodings").

Schema versions: 1 = the first format (encodings `topk_f32`/`topk_f16` only, no spec metadata);
2 = this one (the column set is the encoding's: `shard_columns(enc)`). Version-1 caches are read as
before (their columns are exactly those of the v2 `topk_f32`/`topk_f16` encodings); other versions
are refused by name, and a reader that predates an encoding refuses it by name (`get_encoding`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

import pyarrow as pa

from storage_schemas.codec_registry import MASS_LOGIT_RANGE, TARGET_CODECS, VALUE_CODECS, codec_class

__all__ = [
    "SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "LEGACY_ENCODINGS", "DEFAULT_ENCODING", "DEFAULT_VALUE_ENCODING",
    "Encoding", "ENCODINGS",
    "SHARD_COLUMNS", "SEQUENCE_COLUMNS", "TEACHER_COLUMNS", "EXAMPLE_ID_COLUMN", "INPUT_IDS_COLUMN", "LOSS_MASK_COLUMN",
    "TARGET_LOGPROB_COLUMN", "TOPK_IDS_COLUMN", "TOPK_LOGPROBS_COLUMN", "MASS_COLUMN", "ID_ORDERS",
    "DRAW_IDS_COLUMN", "TAIL_ENTROPY_COLUMN", "DRAW_COLUMNS",
    "get_encoding", "shard_schema", "shard_columns", "teacher_columns", "shard_file_name", "encoding_of_schema",
]

# Bump when a column is added, removed or changes meaning; readers refuse other versions by name.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
LEGACY_ENCODINGS = ("topk_f32", "topk_f16")  # the only encodings a version-1 cache can hold

# The column names, spelled here only (the layout above); every reader and writer imports them.
EXAMPLE_ID_COLUMN = "example_id"
INPUT_IDS_COLUMN = "input_ids"
LOSS_MASK_COLUMN = "loss_mask"
TARGET_LOGPROB_COLUMN = "target_logprob"
TOPK_IDS_COLUMN = "topk_ids"
TOPK_LOGPROBS_COLUMN = "topk_logprobs"
MASS_COLUMN = "topk_mass"  # the seventh column, present only in encodings with a mass codec
DRAW_IDS_COLUMN = "tail_draw_ids"      # present only in encodings with tail draws
TAIL_ENTROPY_COLUMN = "tail_entropy"   # ditto
DRAW_COLUMNS = (DRAW_IDS_COLUMN, TAIL_ENTROPY_COLUMN)
SEQUENCE_COLUMNS = (EXAMPLE_ID_COLUMN, INPUT_IDS_COLUMN, LOSS_MASK_COLUMN)  # stored exactly, whatever the encoding
TEACHER_COLUMNS = (TARGET_LOGPROB_COLUMN, TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN)
SHARD_COLUMNS = SEQUENCE_COLUMNS + TEACHER_COLUMNS

# prob: ids as they come, descending teacher probability.
# id_delta: each position's ids sorted ascending and stored as differences (first = the id itself);
#   values follow their ids; the decoder restores descending-probability order (ties: any order).
ID_ORDERS = ("prob", "id_delta")
# value_codec / target_codec / mass_codec name classes of `storage_schemas.codec_registry`
# (VALUE_CODECS, TARGET_CODECS, MASS_CODECS), each documenting its format: f32, f16,
# bf16 (floats); log_q, sqrtp_q, relpow_q (integer grids, delta-coded along each position's k entries
# when `value_delta`); logit_q (the `topk_mass` column relpow_q's relative values take their scale
# from, so rounding never moves mass between the cached tokens and the tail). relpow_q's power 1
# would spend bits in proportion to probability, power -> 0 is a log grid; 1/4 was the best of
# those tried (BENCHMARKS.md, "Cache encodings").


@dataclass(frozen=True)
class Encoding:
    """How the per-position teacher values are stored, and how the shard file is laid out.

    `selection` says which tokens are cached at each position: "topk_nontarget" (the k largest), or
    "topk_nontarget+tail_draws" (those, plus `tail_draws` ids drawn from the rest with the generator
    seed `draw_seed`, and the rest's entropy: the `sampled_tail` estimator's columns).
    """

    name: str
    selection: str
    description: str
    id_order: str = "prob"
    value_codec: str = "f32"
    value_step: float = 0.0          # quantized codecs only
    value_max_code: int = 0          # quantized codecs only: codes clamp to [0, value_max_code]
    value_delta: bool = False        # quantized codes stored as differences along the k entries
    value_power: float = 0.0         # relpow_q only: the exponent of p / p_1 that is gridded
    target_codec: str = "f32"
    mass_codec: str = "none"         # "logit_q": a topk_mass column (required by relpow_q)
    mass_step: float = 0.0           # logit_q only
    byte_stream_split: tuple[str, ...] = ()  # columns written with Parquet BYTE_STREAM_SPLIT
    dictionary: tuple[str, ...] = ()         # columns written with Parquet dictionary encoding
    row_group_rows: int | None = None        # sequences per Parquet row group (None: one per shard)
    data_page_bytes: int | None = None       # Parquet data page size (None: pyarrow's 1 MiB); zstd and
                                             # byte-stream-split work per page, so one page per column
                                             # chunk compresses better (1 to 1.5 bytes/token here)
    tail_draws: int = 0              # m ids drawn from the tail per position (0: no draw columns)
    draw_seed: int = 0               # the draws' seed (stages/teacher/tail_draws.py `uniforms`)

    def __post_init__(self) -> None:
        where = f"encoding {self.name!r}"
        if self.id_order not in ID_ORDERS:
            raise ValueError(f"{where}: id_order {self.id_order!r} not in {ID_ORDERS}")
        for field in ("value_codec", "target_codec", "mass_codec"):  # refused naming the registered ones
            try:
                codec_class(field, getattr(self, field))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if self.quantized and not (self.value_step > 0 and self.value_max_code >= 1):
            raise ValueError(f"{where}: {self.value_codec} needs value_step > 0 and value_max_code >= 1")
        if self.value_delta and not self.quantized:
            raise ValueError(f"{where}: value_delta applies to quantized codecs only")
        if self.value_codec == "relpow_q":
            if not 0 < self.value_power <= 1:
                raise ValueError(f"{where}: relpow_q needs 0 < value_power <= 1, got {self.value_power}")
            if self.value_max_code != round(1 / self.value_step):
                raise ValueError(f"{where}: relpow_q needs value_max_code = 1 / value_step = {round(1 / self.value_step)}")
            if self.mass_codec == "none":
                raise ValueError(f"{where}: relpow_q stores relative values only and needs a mass_codec for their scale")
        elif self.mass_codec != "none":
            raise ValueError(f"{where}: mass_codec {self.mass_codec!r} applies to relpow_q values only")
        if self.data_page_bytes is not None and self.data_page_bytes < 1024:
            raise ValueError(f"{where}: data_page_bytes must be >= 1024 (or None), got {self.data_page_bytes}")
        if self.mass_codec != "none" and not self.mass_step > 0:
            raise ValueError(f"{where}: mass_codec {self.mass_codec!r} needs mass_step > 0")
        if self.tail_draws < 0 or not 0 <= self.draw_seed < 2**32:
            raise ValueError(f"{where}: need tail_draws >= 0 and 0 <= draw_seed < 2^32")
        if (self.tail_draws > 0) != (self.selection == "topk_nontarget+tail_draws"):
            raise ValueError(f"{where}: selection 'topk_nontarget+tail_draws' goes with tail_draws > 0, "
                             f"got {self.selection!r} and {self.tail_draws}")
        for column in (*self.byte_stream_split, *self.dictionary):
            if column not in (*SHARD_COLUMNS, MASS_COLUMN, *DRAW_COLUMNS):
                raise ValueError(f"{where}: unknown column {column!r} in its Parquet options")

    @property
    def quantized(self) -> bool:
        return VALUE_CODECS[self.value_codec].quantized

    @property
    def decodes_zero_probability(self) -> bool:
        """Whether a sound cache of this encoding may decode a top-k value to -inf (p = 0) on purpose."""
        return VALUE_CODECS[self.value_codec].decodes_zero_probability

    @property
    def has_mass(self) -> bool:
        """Whether shards of this encoding carry the `topk_mass` column."""
        return self.mass_codec != "none"

    @property
    def has_draws(self) -> bool:
        """Whether shards of this encoding carry the tail-draw columns (`DRAW_COLUMNS`)."""
        return self.tail_draws > 0

    @property
    def mass_max_code(self) -> int:
        return int(round(2 * MASS_LOGIT_RANGE / self.mass_step)) if self.has_mass else 0

    @property
    def value_type(self) -> pa.DataType:
        """Arrow type of `topk_logprobs`."""
        return VALUE_CODECS[self.value_codec].arrow_type

    @property
    def target_type(self) -> pa.DataType:
        return TARGET_CODECS[self.target_codec].arrow_type

    def spec_json(self) -> str:
        """Everything that decides the bytes of a shard (the description is left out)."""
        spec = {key: value for key, value in asdict(self).items() if key != "description"}
        if not self.has_draws:  # the draw fields came later: an encoding without draws keeps its old spec (and bytes)
            del spec["tail_draws"], spec["draw_seed"]
        return json.dumps(spec, sort_keys=True)

    @classmethod
    def from_spec_json(cls, text: str, description: str = "") -> "Encoding":
        spec = json.loads(text)
        for key in ("byte_stream_split", "dictionary"):
            spec[key] = tuple(spec.get(key, ()))
        return cls(description=description, **spec)


_BSS_ALL = (INPUT_IDS_COLUMN, TARGET_LOGPROB_COLUMN, TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN)
_BSS_MASS = (*_BSS_ALL, MASS_COLUMN)

ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("topk_f32", "topk_nontarget", "k largest non-target teacher log-probs, float32 (exact); "
                 "the version-1 format"),
        Encoding("topk_f16", "topk_nontarget", "as topk_f32 with float16 log-probs (~1e-3 relative error on "
                 "log-probs); the version-1 format", value_codec="f16"),
        # The default of the first encoding study (BENCHMARKS.md, "Cache encodings"): ids sorted and
        # delta-coded (the set costs ~6 bits/id instead of ~11), values on a uniform log grid (the same
        # error at every probability scale: robust on flat large-vocabulary distributions), target exact
        # (it enters log1mexp(a_y); float16 shifts log(1 - p_y) by 1e-2 nats at p_y = 1 - 1e-6).
        Encoding("topk_idd_logq7", "topk_nontarget",
                 "ids sorted by id + delta-coded; values round(-log p * 128) (|error| <= 2^-8 nats down to "
                 "log p = -512); target float32; byte-stream-split",
                 id_order="id_delta", value_codec="log_q", value_step=2.0 ** -7, value_max_code=65535,
                 target_codec="f32", byte_stream_split=_BSS_ALL),
        # The default since the second encoding study (BENCHMARKS.md, "Cache encodings"): values
        # relative to the top-1 on a (p / p_1)^(1/4) grid, the cached share of the non-target mass
        # to 2^-9 relative in a column of its own, so rounding never moves mass between S and the
        # tail. The values are rebuilt on the decoded target's log(1 - p_y), so the masked estimators
        # (tail, topk) do not see the target's rounding at all and float16 is enough for it (full_kl
        # sees it only through p_y itself: 2^-11 relative).
        Encoding("topk_idd_rel4q112", "topk_nontarget",
                 "ids sorted by id + delta-coded; values round((1 - (p / p_1)^(1/4)) * 112); cached share of the "
                 "non-target mass as its logit on a 2^-8 grid (topk_mass); target float16; byte-stream-split; "
                 "64 MiB pages", id_order="id_delta", value_codec="relpow_q", value_step=1 / 112,
                 value_max_code=112, value_power=0.25, mass_codec="logit_q", mass_step=2.0 ** -8,
                 target_codec="f16", byte_stream_split=_BSS_MASS, data_page_bytes=64 << 20),
        Encoding("topk_idd_f16", "topk_nontarget",
                 "ids sorted by id + delta-coded; values float16 (relative error <= 2^-11); target float32; "
                 "byte-stream-split", id_order="id_delta", value_codec="f16", byte_stream_split=_BSS_ALL),
        # Smaller, for peaked (trained) teachers only: an absolute sqrt(p) grid loses precision where
        # every cached p is small (flat distributions), see the study's random32k table.
        Encoding("topk_idd_sqrtp10", "topk_nontarget",
                 "ids sorted by id + delta-coded; values round(sqrt(p) * 1024) (|error in sqrt p| <= 2^-11, "
                 "p < 2^-22 dropped to the tail); target float32; byte-stream-split",
                 id_order="id_delta", value_codec="sqrtp_q", value_step=2.0 ** -10, value_max_code=1024,
                 target_codec="f32", byte_stream_split=_BSS_ALL),
    )
}
# More k per byte (issue 27's deterministic candidate): the default's layout on a 4x coarser (p / p_1)^(1/4) grid,
# so a larger k fits the same bytes; the tail stays one bucket.
ENCODINGS["topk_idd_rel4q28"] = dataclasses.replace(
    ENCODINGS["topk_idd_rel4q112"], name="topk_idd_rel4q28", value_step=1 / 28, value_max_code=28,
    description="as topk_idd_rel4q112 with values round((1 - (p / p_1)^(1/4)) * 28): ~2 bits fewer per value, for a "
                "larger k in the same bytes")
# The `sampled_tail` estimator's caches (issue 27): the default's codecs plus m tail draws per position.
for _m in (4, 8, 16, 32):
    _base = ENCODINGS["topk_idd_rel4q112"]
    ENCODINGS[f"topk_idd_rel4q112_draws{_m}"] = Encoding(
        f"topk_idd_rel4q112_draws{_m}", "topk_nontarget+tail_draws",
        f"topk_idd_rel4q112 plus {_m} ids per position drawn from the teacher's tail (sorted, delta-coded) and the "
        "tail's entropy (float16): the sampled_tail estimator's columns", id_order=_base.id_order,
        value_codec=_base.value_codec, value_step=_base.value_step, value_max_code=_base.value_max_code,
        value_power=_base.value_power, mass_codec=_base.mass_codec, mass_step=_base.mass_step,
        target_codec=_base.target_codec, byte_stream_split=(*_BSS_MASS, *DRAW_COLUMNS),
        data_page_bytes=_base.data_page_bytes, tail_draws=_m)
# The default layout and codecs without draws: what the encoding studies compare and transcode to (a cache
# cannot gain draws without a new stage one), and the encoding for a cache read by `tail`/`topk`/`full_kl` only.
DEFAULT_VALUE_ENCODING = "topk_idd_rel4q112"
# What stage one writes by default (cache.encoding): those codecs plus 16 tail draws per position, the
# columns of the default method, `sampled_tail` (docs/results.md, issue 27).
DEFAULT_ENCODING = "topk_idd_rel4q112_draws16"


def get_encoding(name: str) -> Encoding:
    """The registered encoding called `name`; a clear error listing the known ones otherwise."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown value encoding {name!r}; supported: {list(ENCODINGS)}")
    return ENCODINGS[name]


def _resolve(encoding: str | Encoding) -> Encoding:
    return encoding if isinstance(encoding, Encoding) else get_encoding(encoding)


def _extra_columns(enc: Encoding) -> tuple[str, ...]:
    return ((MASS_COLUMN,) if enc.has_mass else ()) + (DRAW_COLUMNS if enc.has_draws else ())


def teacher_columns(encoding: str | Encoding) -> tuple[str, ...]:
    """The columns holding the teacher arrays in shards of `encoding` (what the collator decodes)."""
    return TEACHER_COLUMNS + _extra_columns(_resolve(encoding))


def shard_columns(encoding: str | Encoding) -> tuple[str, ...]:
    """Every column of a shard of `encoding`, in file order."""
    return SHARD_COLUMNS + _extra_columns(_resolve(encoding))


def shard_schema(encoding: str | Encoding) -> pa.Schema:
    """The Arrow schema every shard written with `encoding` (a registered name, or an `Encoding`
    object: the study's candidates) has, exactly; its metadata carries the full spec."""
    enc = _resolve(encoding)
    mass = [pa.field(MASS_COLUMN, pa.list_(pa.int32()), nullable=False)] if enc.has_mass else []
    if enc.has_draws:
        mass += [pa.field(DRAW_IDS_COLUMN, pa.list_(pa.int32()), nullable=False),
                 pa.field(TAIL_ENTROPY_COLUMN, pa.list_(pa.float16()), nullable=False)]
    return pa.schema(
        [
            pa.field(EXAMPLE_ID_COLUMN, pa.int64(), nullable=False),
            pa.field(INPUT_IDS_COLUMN, pa.list_(pa.int32()), nullable=False),
            pa.field(LOSS_MASK_COLUMN, pa.list_(pa.bool_()), nullable=False),
            pa.field(TARGET_LOGPROB_COLUMN, pa.list_(enc.target_type), nullable=False),
            pa.field(TOPK_IDS_COLUMN, pa.list_(pa.int32()), nullable=False),
            pa.field(TOPK_LOGPROBS_COLUMN, pa.list_(enc.value_type), nullable=False),
            *mass,
        ],
        metadata={
            b"mtcache.schema_version": str(SCHEMA_VERSION).encode(),
            b"mtcache.encoding": enc.name.encode(),
            b"mtcache.encoding_spec": enc.spec_json().encode(),
        },
    )


def encoding_of_schema(schema: pa.Schema, where: str) -> Encoding:
    """The encoding a shard's own metadata declares (version 1: its registered name); ValueError
    naming `where` when the metadata is missing, of an unsupported version, or unknown."""
    meta = schema.metadata or {}
    version = meta.get(b"mtcache.schema_version", b"?").decode()
    if version not in {str(v) for v in SUPPORTED_SCHEMA_VERSIONS}:
        raise ValueError(f"{where}: shard schema version {version!r} is not supported "
                         f"(this reader: {SUPPORTED_SCHEMA_VERSIONS})")
    name = meta.get(b"mtcache.encoding", b"").decode()
    if b"mtcache.encoding_spec" in meta:
        return Encoding.from_spec_json(meta[b"mtcache.encoding_spec"].decode())
    if name not in LEGACY_ENCODINGS:
        raise ValueError(f"{where}: version-{version} shard with encoding {name!r} and no encoding spec")
    return get_encoding(name)


def shard_file_name(index: int) -> str:
    """The one place shard names are spelled."""
    return f"shard-{index:05d}.parquet"
