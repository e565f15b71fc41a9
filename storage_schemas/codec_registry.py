"""The registry of codecs: one small class per codec, each with encode and decode.

    codecs = teacher_codecs(enc)            # TeacherCodecs(values, target, mass), built from the Encoding's fields
    stored = codecs.values.encode(logprobs) # [n, k] float32 -> floats as stored, or int32 grid codes

An `Encoding` (`storage_schemas.cache_schema`) names its codecs in three fields, looked up here:
`value_codec` in VALUE_CODECS (the `topk_logprobs` column), `target_codec` in TARGET_CODECS
(`target_logprob`) and `mass_codec` in MASS_CODECS (`topk_mass`; "none": no such column). An
unknown name is refused naming the registered ones. Registering a codec = one class here plus its
entry; `storage_schemas.codecs` runs the three of an encoding over a shard's columns (and the
id order). What each codec promises (its error, in log-prob nats) is stated in docs/design.md §8 and
checked from first principles by the round-trip tests (tests/codec_promises.py).
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

__all__ = [
    "Float32Codec", "Float16Codec", "BFloat16Codec", "LogGridCodec", "SqrtProbGridCodec", "RelativePowerGridCodec",
    "MassLogitCodec", "VALUE_CODECS", "TARGET_CODECS", "MASS_CODECS", "MASS_LOGIT_RANGE", "TeacherCodecs",
    "codec_class", "teacher_codecs", "ValueCodec", "CodecParams",
]

MASS_LOGIT_RANGE = 32.0  # S or 1 - S below e^-32 (1.3e-14) is clamped there
# Stand-in for log(1 - p_y) when p_y rounds to 1 in float32 (a_y == 0, so 1 - p_y < 2^-25): the
# masked estimators renormalize by max(log(1 - p_y), logsumexp(a_S)) and so never see the scale.
_LOG_NONTARGET_FLOOR = -25 * np.log(2.0)


class CodecParams(Protocol):
    """The `Encoding` fields the codecs are built from (declared here: this module imports no Encoding)."""

    value_codec: str
    value_step: float
    value_max_code: int
    value_delta: bool
    value_power: float
    target_codec: str
    mass_codec: str
    mass_step: float


class ValueCodec(Protocol):
    """What every codec of `topk_logprobs` (and, floats only, of `target_logprob`) provides."""

    name: ClassVar[str]                  # its registered name, as an Encoding spells it
    arrow_type: ClassVar[pa.DataType]    # the stored element type
    quantized: ClassVar[bool]            # stores integer grid codes
    relative: ClassVar[bool]             # decodes relative values: the mass codec holds their scale
    decodes_zero_probability: ClassVar[bool]  # may decode a value to -inf (p = 0) on purpose

    def encode(self, a: np.ndarray) -> np.ndarray: ...                 # log-probs -> stored, same shape
    def decode(self, stored: np.ndarray, where: str) -> np.ndarray: ...  # stored (any width) -> log-probs

# --- floats (values or targets) -----------------------------------------------------------------
def _floats(x: np.ndarray, codec: str, where: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"{where}: {codec} expects floats, got {x.dtype} (integer codes mean another encoding: "
                         "decode with the cache's manifest.settings.encoding)")
    return x.astype(np.float32, copy=False)


class Float32Codec:
    """f32: IEEE float32, exact."""

    name: ClassVar[str] = "f32"
    arrow_type: ClassVar[pa.DataType] = pa.float32()
    quantized, relative, decodes_zero_probability = False, False, False

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "Float32Codec":
        return cls()

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32)

    def decode(self, x: np.ndarray, where: str) -> np.ndarray:
        return _floats(x, self.name, where)


class Float16Codec:
    """f16: IEEE float16; relative half-ulp 2^-11 (subnormals: half their absolute step, 2^-25)."""

    name: ClassVar[str] = "f16"
    arrow_type: ClassVar[pa.DataType] = pa.float16()
    quantized, relative, decodes_zero_probability = False, False, False

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "Float16Codec":
        return cls()

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32).astype(np.float16)

    def decode(self, x: np.ndarray, where: str) -> np.ndarray:
        return _floats(x, self.name, where)


class BFloat16Codec:
    """bf16: the upper 16 bits of the float32 after round-to-nearest-even (what torch's bfloat16
    cast does), stored as uint16; relative half-ulp 2^-8."""

    name: ClassVar[str] = "bf16"
    arrow_type: ClassVar[pa.DataType] = pa.uint16()
    quantized, relative, decodes_zero_probability = False, False, False

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "BFloat16Codec":
        return cls()

    def encode(self, x: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)

    def decode(self, x: np.ndarray, where: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise ValueError(f"{where}: bf16 expects integer bit patterns, got {x.dtype}")
        return (x.astype(np.uint32) << 16).view(np.float32)


# --- integer grids (values only) ----------------------------------------------------------------
class _GridCodes:
    """How every grid codec stores its codes: int32 in [0, max_code], delta-coded along each
    position's k entries when `delta` (prob order makes them monotone: small differences that
    compress well)."""

    def __init__(self, max_code: int, delta: bool) -> None:
        self.max_code, self.delta = max_code, delta

    def store(self, codes: np.ndarray) -> np.ndarray:
        """Grid positions [n, k] (floats) -> stored int32; NaN and +inf go to max_code."""
        codes = np.clip(np.nan_to_num(codes, nan=self.max_code, posinf=self.max_code), 0,
                        self.max_code).astype(np.int64)
        return (np.diff(codes, axis=1, prepend=0) if self.delta else codes).astype(np.int32)

    def load(self, stored: np.ndarray, where: str) -> np.ndarray:
        """Stored integers [n, k] (any width) -> codes float64 [n, k]."""
        stored = np.asarray(stored)
        if stored.dtype.kind not in "iu":
            raise ValueError(f"{where}: should hold integer codes, got {stored.dtype}")
        codes = stored.astype(np.int64, copy=False)
        return (np.cumsum(codes, axis=1) if self.delta else codes).astype(np.float64)


class LogGridCodec:
    """log_q: code round(-a / step) clamped to [0, max_code]. |error| <= step/2 nats inside the range
    [-max_code * step, 0]; below it the value is clamped to the range's floor."""

    name: ClassVar[str] = "log_q"
    arrow_type: ClassVar[pa.DataType] = pa.int32()
    quantized, relative, decodes_zero_probability = True, False, False

    def __init__(self, step: float, max_code: int, delta: bool = False) -> None:
        self.step, self.max_code, self.codes = step, max_code, _GridCodes(max_code, delta)

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "LogGridCodec":
        return cls(enc.value_step, enc.value_max_code, enc.value_delta)

    def encode(self, a: np.ndarray) -> np.ndarray:
        return self.codes.store(np.rint(-np.asarray(a, np.float64) / self.step))

    def decode(self, stored: np.ndarray, where: str) -> np.ndarray:
        return (-self.codes.load(stored, where) * self.step).astype(np.float32)


class SqrtProbGridCodec:
    """sqrtp_q: code round(sqrt(exp(a)) / step) clamped to max_code; |error in sqrt p| <= step/2, so
    |log error| <= 2 log(1 + step / (2 sqrt p)): fine where p is large, where D_k is sensitive to
    it. Code 0 decodes to -inf on purpose: p < step^2 / 4 is dropped into the tail bucket (bound inf)."""

    name: ClassVar[str] = "sqrtp_q"
    arrow_type: ClassVar[pa.DataType] = pa.int32()
    quantized, relative, decodes_zero_probability = True, False, True

    def __init__(self, step: float, max_code: int, delta: bool = False) -> None:
        self.step, self.max_code, self.codes = step, max_code, _GridCodes(max_code, delta)

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "SqrtProbGridCodec":
        return cls(enc.value_step, enc.value_max_code, enc.value_delta)

    def encode(self, a: np.ndarray) -> np.ndarray:
        return self.codes.store(np.rint(np.exp(0.5 * np.asarray(a, np.float64)) / self.step))

    def decode(self, stored: np.ndarray, where: str) -> np.ndarray:
        codes = self.codes.load(stored, where)
        with np.errstate(divide="ignore"):  # code 0 -> -inf on purpose (p below the grid)
            return (2.0 * np.log(codes * self.step)).astype(np.float32)


class RelativePowerGridCodec:
    """relpow_q: each value relative to its position's top-1, r = p / p_1 in (0, 1], as the code
    round((1 - r^power) / step) in [0, 1/step]; |error in r^power| <= step/2, and the bottom code
    (r^power < step/2) decodes to r^power = step/4. Decodes to log(p / p_1), float64: the scale is
    the mass codec's (`MassLogitCodec.rescale`), so the decoded values hold exactly the cached mass
    and the tail estimator's 1 - sum_S p~ is not rebuilt from rounded values."""

    name: ClassVar[str] = "relpow_q"
    arrow_type: ClassVar[pa.DataType] = pa.int32()
    quantized, relative, decodes_zero_probability = True, True, False

    def __init__(self, step: float, max_code: int, power: float, delta: bool = False) -> None:
        self.step, self.power, self.codes = step, power, _GridCodes(max_code, delta)

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "RelativePowerGridCodec":
        return cls(enc.value_step, enc.value_max_code, enc.value_power, enc.value_delta)

    def encode(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float64)
        return self.codes.store(np.rint(-np.expm1(self.power * (a - a.max(axis=1, keepdims=True))) / self.step))

    def decode(self, stored: np.ndarray, where: str) -> np.ndarray:
        root = np.maximum(1.0 - self.codes.load(stored, where) * self.step, self.step / 4)  # bottom code: step/4
        return np.log(root) / self.power


# --- the cached mass (relative values only) -----------------------------------------------------
def _log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0 in float64, accurate at both ends; -inf at 0."""
    x = np.minimum(x, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def _log_nontarget(target: np.ndarray) -> np.ndarray:
    """log(1 - p_y) from the (decoded) target log-probs, float64."""
    a_y = np.asarray(target, np.float64)
    return np.where(a_y < 0, _log1mexp(a_y), _LOG_NONTARGET_FLOOR)


def _logsumexp_rows(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1, keepdims=True)
    return top[:, 0] + np.log(np.exp(a - top).sum(axis=1))


class MassLogitCodec:
    """logit_q: S = sum_S p / (1 - p_y), the share of the non-target mass the k cached tokens hold,
    as the int32 code round((log(S / (1 - S)) + R) / step) clamped to [0, 2R / step], R =
    MASS_LOGIT_RANGE. The logit keeps the relative error of both S and the tail 1 - S below step/2
    whether the teacher is flat (S ~ 1e-3) or peaked (1 - S ~ 1e-9)."""

    name: ClassVar[str] = "logit_q"
    arrow_type: ClassVar[pa.DataType] = pa.int32()

    def __init__(self, step: float) -> None:
        self.step = step
        self.max_code = int(round(2 * MASS_LOGIT_RANGE / step))

    @classmethod
    def from_encoding(cls, enc: CodecParams) -> "MassLogitCodec":
        return cls(enc.mass_step)

    def encode(self, a: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Log-probs [n, k] and target log-probs [n] -> int32 codes [n] of each position's share."""
        log_share = np.minimum(_logsumexp_rows(np.asarray(a, np.float64)) - _log_nontarget(target), 0.0)
        with np.errstate(divide="ignore"):
            logit = log_share - _log1mexp(log_share)  # +inf when S rounds to 1 (k = V - 1): clamped
        codes = np.rint((np.clip(logit, -MASS_LOGIT_RANGE, MASS_LOGIT_RANGE) + MASS_LOGIT_RANGE) / self.step)
        return np.clip(codes, 0, self.max_code).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes [n] -> log S, float64."""
        logit = np.asarray(codes, np.float64) * self.step - MASS_LOGIT_RANGE
        return -np.logaddexp(0.0, -logit)  # log sigmoid

    def rescale(self, log_rel: np.ndarray, target: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Relative log-probs [n, k] (a relative codec's decode) -> log-probs float32 [n, k] holding
        exactly the coded mass of the decoded target's non-target mass."""
        scale = _log_nontarget(target) + self.decode(codes) - _logsumexp_rows(log_rel)
        return (log_rel + scale[:, None]).astype(np.float32)



# --- the registry -------------------------------------------------------------------------------
_FLOAT_CODECS = (Float32Codec, Float16Codec, BFloat16Codec)
VALUE_CODECS: dict[str, type] = {c.name: c for c in (*_FLOAT_CODECS, LogGridCodec, SqrtProbGridCodec,
                                                     RelativePowerGridCodec)}
TARGET_CODECS: dict[str, type] = {c.name: c for c in _FLOAT_CODECS}
MASS_CODECS: dict[str, type | None] = {"none": None, MassLogitCodec.name: MassLogitCodec}
_REGISTRIES = {"value_codec": VALUE_CODECS, "target_codec": TARGET_CODECS, "mass_codec": MASS_CODECS}


def codec_class(field: str, name: str) -> type | None:
    """The class registered as `name` for the Encoding field `field` ("value_codec", "target_codec"
    or "mass_codec"; mass "none" is None). ValueError naming the registered ones otherwise."""
    registry = _REGISTRIES[field]
    if name not in registry:
        raise ValueError(f"unknown {field} {name!r}; registered: {sorted(registry)}")
    return registry[name]


class TeacherCodecs(NamedTuple):
    """The codecs of one encoding's teacher columns."""

    values: ValueCodec             # topk_logprobs
    target: ValueCodec             # target_logprob (a float codec)
    mass: MassLogitCodec | None    # topk_mass, or None: no such column


def teacher_codecs(enc: CodecParams) -> TeacherCodecs:
    """The codec instances an encoding names, built from its parameters."""
    mass = codec_class("mass_codec", enc.mass_codec)
    return TeacherCodecs(codec_class("value_codec", enc.value_codec).from_encoding(enc),
                         codec_class("target_codec", enc.target_codec).from_encoding(enc),
                         mass.from_encoding(enc) if mass is not None else None)
