"""The codec registry: every codec an encoding names is registered, each class meets its own stated
promise (docs/design.md §8) on an encode -> decode round trip, and an unknown name is refused naming the registered ones.

(`test_encodings.py` holds whole encodings to the promises of docs/design.md §8 through real Parquet
shards; here each codec class is held to its promise alone, parameters taken from the encodings that use it.)"""
import re

import numpy as np
import pytest
from codec_promises import target_promise, value_promise

from storage_schemas import ENCODINGS, Encoding
from storage_schemas.codec_registry import MASS_CODECS, TARGET_CODECS, VALUE_CODECS, MassLogitCodec, codec_class, teacher_codecs

K = 16
# every registered encoding, plus grid codecs with delta coding and prob order (none registered uses both)
EXTRA = [
    Encoding("log_q rank-delta", "topk_nontarget", "", value_codec="log_q", value_step=2.0 ** -6,
             value_max_code=65535, value_delta=True),
    Encoding("log_q uint4", "topk_nontarget", "", value_codec="log_q", value_step=0.5, value_max_code=15),
    Encoding("sqrtp rank-delta", "topk_nontarget", "", value_codec="sqrtp_q", value_step=2.0 ** -8,
             value_max_code=256, value_delta=True),
    Encoding("relpow sqrt rank-delta", "topk_nontarget", "", value_codec="relpow_q", value_step=2.0 ** -6,
             value_max_code=64, value_power=0.5, value_delta=True, mass_codec="logit_q", mass_step=2.0 ** -8),
    Encoding("bf16", "topk_nontarget", "", value_codec="bf16", target_codec="bf16"),
]
ALL = list(ENCODINGS.values()) + EXTRA


def _positions(scale: float, n: int = 300, vocab: int = 400, seed: int = 0):
    """Top-k non-target log-probs [n, K] (descending) and target log-probs [n] of real log-softmaxes."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, vocab)) * scale
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    a_y = lp[:, 0].copy()
    lp[:, 0] = -np.inf
    a = -np.sort(-lp, axis=1)[:, :K]
    return a.astype(np.float32), a_y.astype(np.float32)


def test_every_codec_an_encoding_names_is_registered():
    for enc in ALL:
        codecs = teacher_codecs(enc)
        assert codecs.values.name == enc.value_codec and enc.value_codec in VALUE_CODECS
        assert codecs.target.name == enc.target_codec and enc.target_codec in TARGET_CODECS
        assert enc.mass_codec in MASS_CODECS and (codecs.mass is None) == (enc.mass_codec == "none")
    used = {(field, getattr(e, field)) for e in ENCODINGS.values() for field in ("value_codec", "target_codec", "mass_codec")}
    registered = {(f, name) for f, reg in (("value_codec", VALUE_CODECS), ("target_codec", TARGET_CODECS),
                                           ("mass_codec", MASS_CODECS)) for name in reg}
    assert used <= registered
    for registry in (VALUE_CODECS, TARGET_CODECS, MASS_CODECS):  # each key is its class's own name
        assert all(cls is None or cls.name == name for name, cls in registry.items())
    assert set(TARGET_CODECS) <= set(VALUE_CODECS) and not any(c.quantized for c in TARGET_CODECS.values())


@pytest.mark.parametrize("enc", ALL, ids=[e.name for e in ALL])
@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0], ids=["flat", "peaked", "spiky"])
def test_each_codec_keeps_its_documented_promise(enc, scale):
    """Each codec class alone, held to the promise of docs/design.md §8 (tests/codec_promises.py)."""
    a, a_y = _positions(scale)
    codecs = teacher_codecs(enc)
    stored = codecs.values.encode(a)
    assert stored.shape == a.shape and stored.dtype == codecs.values.arrow_type.to_pandas_dtype()
    decoded = codecs.values.decode(stored, "test").astype(np.float64)
    if codecs.values.relative:  # log(p / p_1): the promise is about ratios to the top-1 only
        assert np.all(decoded <= 0) and np.all(decoded.max(axis=1) == 0)
    assert value_promise(enc, a, decoded) == []
    assert target_promise(enc, a_y, codecs.target.decode(codecs.target.encode(a_y), "test")) == []
    if codecs.mass is not None:  # the share S = sum_S p / (1 - p_y), and 1 - S, within mass_step/2 in log
        log_share = np.logaddexp.reduce(a.astype(np.float64), axis=1) - np.log(-np.expm1(a_y.astype(np.float64)))
        got = codecs.mass.decode(codecs.mass.encode(a, a_y))
        assert np.all(np.abs(got - log_share) <= enc.mass_step / 2 + 1e-9)
        resolved = log_share < np.log1p(-1e-3)
        assert np.all(np.abs(np.log(-np.expm1(got)) - np.log(-np.expm1(log_share)))[resolved] <= enc.mass_step / 2 + 1e-6)


def test_the_mass_codec_clamps_to_its_range():
    codec = MassLogitCodec(2.0 ** -8)
    a = np.log(np.array([[0.5, 0.5 - 1e-30]]))  # the whole non-target mass: S = 1, logit +inf
    assert codec.encode(a, np.array([-np.inf]))[0] == codec.max_code
    assert codec.encode(np.full((1, 2), -80.0), np.array([-1.0]))[0] == 0  # S below e^-32


@pytest.mark.parametrize("field, name, registry", [
    ("value_codec", "int3", VALUE_CODECS), ("target_codec", "log_q", TARGET_CODECS), ("mass_codec", "sum_q", MASS_CODECS),
])
def test_an_unknown_codec_is_refused_naming_the_registered_ones(field, name, registry):
    message = f"unknown {field} {name!r}; registered: {sorted(registry)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        codec_class(field, name)
    with pytest.raises(ValueError, match=re.escape(f"encoding 'bad': {message}")):
        Encoding("bad", "topk_nontarget", "", **{field: name})
