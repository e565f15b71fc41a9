"""Every encoding round-trips through a real zstd Parquet shard within the promise docs/design.md §8 states."""
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from codec_promises import promise_violations, value_promise

from stages.teacher.tail_draws import tail_draws
from storage_schemas import DEFAULT_VALUE_ENCODING, ENCODINGS, Encoding, get_encoding, shard_file_name
from storage_schemas.codec_registry import VALUE_CODECS, RelativePowerGridCodec
from storage_schemas.codecs import decode_teacher, encode_teacher
from storage_schemas.shard_io import ShardRow, decode_draw_columns, decode_table, parquet_options, read_shard, rows_to_table, write_shard

K = 16
_BSS = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs")


def teacher_rows(k: int = K, vocab: int = 300, seed: int = 0, scale: float = 3.0, draws: int = 0) -> list[ShardRow]:
    """Rows with real log-softmax values (peaked at `scale` = 3, flat at 0.1), some positions untrained; with
    `draws`, also that many tail draws per position and the tail entropies (stage one's own function)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(7):
        t = int(rng.integers(2, 40))
        mask = rng.random(t - 1) < 0.8
        n = int(mask.sum())
        logits = rng.normal(size=(n, vocab)) * scale
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        target = rng.integers(0, vocab, n)
        a_y = lp[np.arange(n), target].copy()
        lp[np.arange(n), target] = -np.inf
        top = np.argsort(-lp, 1, kind="stable")[:, :k]
        drawn = {}
        if draws:
            full = torch.from_numpy(lp).float().clone()
            full[torch.arange(n), torch.from_numpy(target)] = torch.from_numpy(a_y).float()
            draw_ids, entropy = tail_draws(full, torch.from_numpy(target), torch.from_numpy(top), torch.full((n,), i),
                                           torch.arange(n), draws, seed)
            drawn = {"tail_draw_ids": draw_ids.numpy(), "tail_entropy": entropy.numpy()}
        rows.append(ShardRow(i, rng.integers(0, vocab, t).astype(np.int32), mask, a_y.astype(np.float32),
                             top.astype(np.int32), np.take_along_axis(lp, top, 1).astype(np.float32), **drawn))
    return rows


AD_HOC = [
    Encoding("relpow sqrt, prob order, rank-delta", "topk_nontarget", "", value_codec="relpow_q", value_step=2.0 ** -6,
             value_max_code=64, value_power=0.5, value_delta=True, mass_codec="logit_q", mass_step=2.0 ** -8),
    Encoding("bf16 values and target", "topk_nontarget", "", value_codec="bf16", target_codec="bf16"),
    Encoding("f16 target", "topk_nontarget", "", target_codec="f16"),
    Encoding("log_q rank-delta", "topk_nontarget", "", value_codec="log_q", value_step=2.0 ** -6,
             value_max_code=65535, value_delta=True, byte_stream_split=_BSS),
    Encoding("log_q uint4 range [-7.5, 0]", "topk_nontarget", "", value_codec="log_q", value_step=0.5,
             value_max_code=15),
    Encoding("sqrtp rank-delta", "topk_nontarget", "", value_codec="sqrtp_q", value_step=2.0 ** -8,
             value_max_code=256, value_delta=True),
    Encoding("id-delta + dictionary + row groups", "topk_nontarget", "", id_order="id_delta",
             dictionary=("topk_ids",), row_group_rows=2),
]
ALL = list(ENCODINGS.values()) + AD_HOC


def _by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, 1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def _decoded_shard(enc: Encoding, rows: list[ShardRow], tmp_path):
    """Write `rows` as a real zstd Parquet shard of `enc`, read it back: (table, ids, values, target)."""
    record = write_shard(tmp_path, 0, 0, rows_to_table(rows, enc, K), zstd_level=3, truncated=0)
    table = pq.read_table(tmp_path / record.file)
    return (table, *decode_table(table, enc, K))


@pytest.mark.parametrize("enc", ALL, ids=[e.name for e in ALL])
@pytest.mark.parametrize("scale", [3.0, 0.1, 12.0], ids=["peaked", "flat", "spiky"])
def test_round_trip_keeps_the_documented_promise(enc, scale, tmp_path):
    """Each value, target and mass within what docs/design.md §8 promises for the encoding's codecs,
    checked by tests/codec_promises.py from the promise itself."""
    rows = teacher_rows(scale=scale, draws=enc.tail_draws)
    table, ids, values, target = _decoded_shard(enc, rows, tmp_path)
    if enc.has_draws:  # the draws exactly (each position's multiset, ascending), the entropy to float16
        draw_ids, entropy = decode_draw_columns(table, enc)
        np.testing.assert_array_equal(draw_ids, np.sort(np.concatenate([r.tail_draw_ids for r in rows]), axis=1))
        want_entropy = np.concatenate([r.tail_entropy for r in rows])
        assert draw_ids.dtype == np.int64 and np.all(np.abs(entropy - want_entropy) <= 2.0**-11 * np.abs(want_entropy) + 1e-7)
    want_ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int64)
    want_values = np.concatenate([r.topk_logprobs for r in rows])
    want_target = np.concatenate([r.target_logprob for r in rows])
    assert ids.dtype == np.int64 and values.dtype == np.float32 and target.dtype == np.float32
    # ids are lossless as a set per position; each value is compared with its own id's value
    got_ids, got_values = _by_id(ids, values)
    ref_ids, ref_values = _by_id(want_ids, want_values)
    np.testing.assert_array_equal(got_ids, ref_ids)
    assert promise_violations(enc, ref_values, want_target, got_values, target) == []
    assert not np.any(np.diff(values, axis=1) > 0)  # decoded in descending probability (-inf - -inf: nan)
    # the input ids and masks are stored exactly, whatever the encoding
    for row, got in zip(rows, table.select(["input_ids", "loss_mask"]).to_pylist()):
        np.testing.assert_array_equal(got["input_ids"], row.input_ids)
        np.testing.assert_array_equal(got["loss_mask"], row.loss_mask)


class _QuarterStepOff(RelativePowerGridCodec):
    """A wrong relpow_q: decodes each code a quarter of a step too far down the grid (a cell-edge bug).
    Its (p / p_1)^(1/4) errs by up to 3/4 of a step instead of 1/2; a loose log-prob bound (the
    deleted `error_bound` allowed 0.95 nats at the median, issue 17) would still allow it."""

    def decode(self, stored: np.ndarray, where: str) -> np.ndarray:
        codes = self.codes.load(stored, where)
        return np.log(np.maximum(1.0 - (codes + 0.25) * self.step, self.step / 4)) / self.power


@pytest.mark.parametrize("scale", [3.0, 0.1, 12.0], ids=["peaked", "flat", "spiky"])
def test_a_codec_off_by_a_quarter_step_breaks_the_promise(scale, tmp_path, monkeypatch):
    """The check can fail: the default encoding with the wrong codec registered as its relpow_q."""
    monkeypatch.setitem(VALUE_CODECS, "relpow_q", _QuarterStepOff)
    enc = get_encoding(DEFAULT_VALUE_ENCODING)
    rows = teacher_rows(scale=scale)
    _, ids, values, target = _decoded_shard(enc, rows, tmp_path)
    got_ids, got_values = _by_id(ids, values)
    _, ref_values = _by_id(np.concatenate([r.topk_ids for r in rows]), np.concatenate([r.topk_logprobs for r in rows]))
    problems = promise_violations(enc, ref_values, np.concatenate([r.target_logprob for r in rows]), got_values, target)
    assert len(problems) == 1 and problems[0].startswith("relpow_q (p/p_1)^power")


def test_lossless_encodings_are_exact(tmp_path):
    rows = teacher_rows()
    for enc in (get_encoding("topk_f32"), Encoding("idd", "topk_nontarget", "", id_order="id_delta")):
        record = write_shard(tmp_path, 0, 0, rows_to_table(rows, enc, K), zstd_level=3, truncated=0)
        ids, values, target = decode_table(pq.read_table(tmp_path / record.file), enc, K)
        np.testing.assert_array_equal(values, np.concatenate([r.topk_logprobs for r in rows]))
        np.testing.assert_array_equal(ids, np.concatenate([r.topk_ids for r in rows]))  # no ties here
        np.testing.assert_array_equal(target, np.concatenate([r.target_logprob for r in rows]))


def _round_trip(enc: Encoding, ids, logprobs, target, k: int):
    stored = encode_teacher(enc, ids, logprobs, target)
    return decode_teacher(enc, stored.ids, stored.values, stored.target, k, stored.mass)


def test_bf16_matches_torch_rounding():
    import torch

    x = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 10
    enc = Encoding("b", "topk_nontarget", "", value_codec="bf16")
    _, decoded, _ = _round_trip(enc, np.zeros((1000, 1)), x[:, None], x, 1)
    np.testing.assert_array_equal(decoded[:, 0], torch.from_numpy(x).bfloat16().float().numpy())


def test_log_q_clamps_below_its_stated_range():
    enc = Encoding("u4", "topk_nontarget", "", value_codec="log_q", value_step=0.5, value_max_code=15)
    a = np.array([[-0.2, -3.3, -7.5, -20.0]], np.float32)
    _, decoded, _ = _round_trip(enc, np.arange(4)[None], a, np.zeros(1), 4)
    np.testing.assert_array_equal(decoded, [[0.0, -3.5, -7.5, -7.5]])


def test_the_shard_declares_its_encoding_and_layout(tmp_path):
    enc = get_encoding("topk_idd_logq7")
    record = write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), enc.name, K), zstd_level=3, truncated=0)
    meta = pq.read_schema(tmp_path / record.file).metadata
    assert meta[b"mtcache.schema_version"] == b"2" and meta[b"mtcache.encoding"] == b"topk_idd_logq7"
    assert Encoding.from_spec_json(meta[b"mtcache.encoding_spec"].decode()).spec_json() == enc.spec_json()
    columns = pq.ParquetFile(tmp_path / record.file).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs.list.element"]
    assert parquet_options(enc)["use_dictionary"] is False


def test_row_groups_follow_the_encoding(tmp_path):
    enc = Encoding("rg", "topk_nontarget", "", row_group_rows=2)
    record = write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), enc, K), zstd_level=3, truncated=0)
    assert pq.ParquetFile(tmp_path / record.file).num_row_groups == 4  # 7 rows in groups of 2


# --- refusals -----------------------------------------------------------------------------------
def test_a_shard_of_another_encoding_is_refused_naming_both(tmp_path):
    write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), "topk_idd_logq7", K), zstd_level=3, truncated=0)
    with pytest.raises(ValueError, match=r"shard-00000.parquet: written with encoding 'topk_idd_logq7'.*'topk_f32'"):
        read_shard(tmp_path / shard_file_name(0), "topk_f32")


def test_float_decoder_refuses_integer_codes():
    enc = get_encoding("topk_idd_logq7")
    ids, codes, target, _ = encode_teacher(enc, np.arange(4)[None], np.full((1, 4), -1.0, np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="integer codes mean another encoding"):
        decode_teacher(get_encoding("topk_f32"), ids, codes, target, 4)


@pytest.mark.parametrize("bad, message", [
    (dict(id_order="random"), "id_order 'random'"),
    (dict(value_codec="int3"), "value_codec 'int3'"),
    (dict(value_codec="log_q"), "needs value_step > 0"),
    (dict(value_delta=True), "value_delta applies to quantized codecs only"),
    (dict(byte_stream_split=("logits",)), "unknown column 'logits'"),
    (dict(value_codec="relpow_q", value_step=2.0 ** -7, value_max_code=128, value_power=0.25),
     "needs a mass_codec for their scale"),
    (dict(value_codec="relpow_q", value_step=2.0 ** -7, value_max_code=100, value_power=0.25, mass_codec="logit_q",
          mass_step=0.001), "value_max_code = 1 / value_step = 128"),
    (dict(value_codec="relpow_q", value_step=2.0 ** -7, value_max_code=128, value_power=2.0, mass_codec="logit_q",
          mass_step=0.001), "0 < value_power <= 1"),
    (dict(mass_codec="logit_q", mass_step=0.001), "applies to relpow_q values only"),
    (dict(value_codec="relpow_q", value_step=2.0 ** -7, value_max_code=128, value_power=0.25, mass_codec="logit_q"),
     "needs mass_step > 0"),
])
def test_bad_encoding_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Encoding("bad", "topk_nontarget", "", **bad)


# --- relpow_q: relative values + the cached mass in its own column ------------------------------
REL = get_encoding("topk_idd_rel4q112")


def _nontarget_share(logprobs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """log of sum_S p / (1 - p_y), float64."""
    a = logprobs.astype(np.float64)
    return np.logaddexp.reduce(a, axis=1) - np.log(-np.expm1(target.astype(np.float64)))


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])
def test_relpow_keeps_the_cached_mass_and_the_tail(scale):
    """Rounding the values never moves mass between S and the tail: both keep mass_step/2 relative error."""
    rows = teacher_rows(scale=scale)
    ids = np.concatenate([r.topk_ids for r in rows])
    a = np.concatenate([r.topk_logprobs for r in rows])
    a_y = np.concatenate([r.target_logprob for r in rows])
    _, decoded, target = _round_trip(REL, ids, a, a_y, K)
    want, got = _nontarget_share(a, a_y), _nontarget_share(decoded, target)
    tol = REL.mass_step / 2 + 1e-6
    assert np.all(np.abs(got - want) <= tol)
    tail_want, tail_got = np.log(-np.expm1(want)), np.log(-np.expm1(got))
    # float32 log-probs (the float32 cache's too) resolve S only to ~k * 2^-24: a smaller tail is not resolved
    resolved = tail_want > np.log(1e-3)
    assert resolved.any()
    assert np.all(np.abs(tail_got - tail_want)[resolved] <= tol + K * 2.0 ** -24 / np.exp(tail_want[resolved]))


def test_relpow_extremes_decode_finite():
    """A whole-vocabulary position (no tail), a spike whose rest falls below the grid, p_y rounding to 1."""
    k = 4
    lp = np.log(np.array([[0.5, 0.25, 0.15, 0.1]]))           # k = V - 1: S = 1 - p_y exactly
    a_y = np.array([np.log(1e-9)], np.float32)
    lp = (lp + np.log1p(-1e-9)).astype(np.float32)
    spike = np.array([[-1e-6, -40.0, -41.0, -60.0]], np.float32)  # the rest is < e^-32 of the top
    sure = np.array([[-18.0, -19.0, -20.0, -21.0]], np.float32)   # p_y rounds to 1: a_y == 0
    ids = np.arange(k)[None]
    _, full, _ = _round_trip(REL, ids, lp, a_y, k)
    assert abs(np.logaddexp.reduce(full[0].astype(np.float64)) - np.log1p(-1e-9)) < 1e-6
    _, got, _ = _round_trip(REL, ids, spike, np.array([-20.0], np.float32), k)
    assert np.all(np.isfinite(got)) and abs(got[0, 0] - spike[0, 0]) < 1e-5 and np.all(got[0, 1:] < -20)
    _, got, target = _round_trip(REL, ids, sure, np.zeros(1, np.float32), k)
    assert np.all(np.isfinite(got)) and target[0] == 0.0
    assert value_promise(REL, sure, got) == []  # the ratios to the top-1 are kept as promised


def test_relpow_changes_the_masked_kl_little():
    """The loss the trainer computes, float32 cache vs the default encoding, on a perturbed student."""
    import torch

    from stages.student.loss import CachedTeacher, cached_kl

    rng = np.random.default_rng(1)
    n, vocab = 400, 300
    teacher = rng.normal(size=(n, vocab)) * 2
    lp = teacher - np.logaddexp.reduce(teacher, axis=1, keepdims=True)
    y = rng.integers(0, vocab, n)
    a_y = lp[np.arange(n), y].astype(np.float32)
    masked = lp.copy()
    masked[np.arange(n), y] = -np.inf
    ids = np.argsort(-masked, 1, kind="stable")[:, :K]
    a = np.take_along_axis(lp, ids, 1).astype(np.float32)
    student = torch.from_numpy(teacher + rng.normal(size=teacher.shape) * 0.3).float()
    targets = torch.from_numpy(y)
    exact = cached_kl(student, targets, CachedTeacher(torch.from_numpy(ids), torch.from_numpy(a), torch.from_numpy(a_y)))
    got_ids, got_a, got_y = _round_trip(REL, ids, a, a_y, K)
    coded = cached_kl(student, targets, CachedTeacher(torch.from_numpy(got_ids), torch.from_numpy(got_a),
                                                      torch.from_numpy(got_y)))
    assert abs(coded.mean().item() / exact.mean().item() - 1) < 5e-3
    # per position the rounding noise is larger (a few % of D here); it averages out over positions
    assert (coded - exact).abs().max().item() < 0.1 * exact.mean().item()


def _kl_term(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """g(x) = x log(x / q) - x (x log(x / q) is 0 at x = 0): one category's term of a KL, less x, which
    sums to 1 over the categories for every distribution and so leaves KL differences unchanged."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, x * np.log(x / q), 0.0) - x


def _tail_kl_change_bound(a: np.ndarray, a_y: np.ndarray, lq: np.ndarray, enc: Encoding) -> np.ndarray:
    """Largest change of the tail estimator D_k per position [n] that the default encoding's promise allows.

    From the promise (docs/design.md §8): every u = (p / p_1)^power within step/2 (so each ratio r = u^(1/power)
    in an interval), the cached share S within mass_step/2 in log and its tail 1 - S likewise. The decoded
    p~_i = S' r'_i / sum_j r'_j then lies in [S e^-m lo_i / sum hi, S e^m hi_i / sum lo], the tail in
    [R_T e^-m, R_T e^m]. D_k = sum_c g(p~_c) + 1 over the categories (S and the tail bucket) with
    g(x) = x log(x / q~_c) - x convex, so each term moves at most max(g(lo), g(hi)) - g(p) up or
    g(p) - min g down (min at x = q~_c, clipped to the interval).
    `lq` [n, k + 1]: the student's log q~ of the k cached ids and of the tail."""
    resolution = a.shape[1] * 2.0 ** -23  # what float32 log-probs resolve of S (and so of the tail 1 - S)
    step, power, m = enc.value_step, enc.value_power, enc.mass_step / 2 + resolution
    u = np.exp(power * (a - a.max(axis=1, keepdims=True)))
    lo_r = np.clip(u - step / 2, 0, 1) ** (1 / power)
    hi_r = np.clip(u + step / 2, 0, 1) ** (1 / power)
    share = np.exp(np.logaddexp.reduce(a, axis=1) - np.log(-np.expm1(a_y)))
    tail = np.maximum(1 - share, 0)[:, None]
    p = np.concatenate([np.exp(a) / -np.expm1(a_y)[:, None], tail], 1)
    lo = np.concatenate([share[:, None] * np.exp(-m) * lo_r / hi_r.sum(1, keepdims=True),
                         np.maximum(tail * np.exp(-m) - resolution, 0)], 1)
    hi = np.concatenate([np.minimum(share[:, None] * np.exp(m) * hi_r / lo_r.sum(1, keepdims=True), 1),
                         np.minimum(tail * np.exp(m) + resolution, 1)], 1)
    q = np.exp(lq)
    g_p, g_lo, g_hi = _kl_term(p, q), _kl_term(lo, q), _kl_term(hi, q)
    g_min = _kl_term(np.clip(q, lo, hi), q)
    return np.maximum(np.maximum(g_lo, g_hi) - g_p, g_p - g_min).sum(1)


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0], ids=["flat", "peaked", "spiky"])
def test_the_default_encoding_moves_the_masked_kl_within_its_documented_bound(scale):
    """|D_k(decoded cache) - D_k(float32 cache)| per position within the bound the promise implies, both D_k
    from the float64 reference (tests/reference_kl.py), not from the code under test."""
    import torch
    from reference_kl import reference_kl

    rng = np.random.default_rng(2)
    n, vocab = 200, 300
    logits = rng.normal(size=(n, vocab)) * scale
    lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    y = rng.integers(0, vocab, n)
    a_y = lp[np.arange(n), y].astype(np.float32)
    ids = np.argsort(-np.where(np.arange(vocab) == y[:, None], -np.inf, lp), 1, kind="stable")[:, :K]
    a = np.take_along_axis(lp, ids, 1).astype(np.float32)
    student = torch.from_numpy(logits + rng.normal(size=logits.shape) * 0.5)
    targets = torch.from_numpy(y)
    exact = reference_kl(student, targets, torch.from_numpy(ids), torch.from_numpy(a), torch.from_numpy(a_y), "tail").numpy()
    got_ids, got_a, got_y = _round_trip(REL, ids, a, a_y, K)
    coded = reference_kl(student, targets, torch.from_numpy(got_ids), torch.from_numpy(got_a), torch.from_numpy(got_y),
                         "tail").numpy()
    # the student's renormalized log-probs of the cached ids and of the tail, float64
    z = student.numpy()
    nontarget = np.arange(vocab) != y[:, None]
    in_tail = nontarget.copy()
    np.put_along_axis(in_tail, ids, False, 1)
    lz = np.logaddexp.reduce(np.where(nontarget, z, -np.inf), axis=1, keepdims=True)
    lq_S = np.take_along_axis(z, ids, 1) - lz
    lq_tail = np.logaddexp.reduce(np.where(in_tail, z, -np.inf), axis=1, keepdims=True) - lz
    bound = _tail_kl_change_bound(a.astype(np.float64), a_y.astype(np.float64), np.concatenate([lq_S, lq_tail], 1), REL)
    assert np.all(np.abs(coded - exact) <= bound + 1e-9), np.max(np.abs(coded - exact) - bound)
    assert np.median(bound / exact) < 0.5  # the bound says something: well below D_k itself


def test_a_mass_encoding_needs_its_mass_column():
    stored = encode_teacher(REL, np.arange(4)[None], np.log(np.full((1, 4), 0.1, np.float32)), np.full(1, -1.0))
    assert stored.mass is not None and stored.mass.shape == (1,)
    with pytest.raises(ValueError, match="needs its topk_mass column"):
        decode_teacher(REL, stored.ids, stored.values, stored.target, 4)
    with pytest.raises(ValueError, match="has no topk_mass column, but one was given"):
        decode_teacher(get_encoding("topk_idd_logq7"), stored.ids, stored.values, stored.target, 4, stored.mass)


def test_the_mass_column_is_in_the_shard_schema(tmp_path):
    from storage_schemas import MASS_COLUMN, shard_columns, teacher_columns

    record = write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), REL.name, K), zstd_level=3, truncated=0)
    table = read_shard(tmp_path / record.file, REL.name)
    assert tuple(table.column_names) == shard_columns(REL) and MASS_COLUMN in teacher_columns(REL)
    assert MASS_COLUMN not in shard_columns("topk_idd_logq7")
    n = sum(int(r.loss_mask.sum()) for r in teacher_rows())
    assert len(table.column(MASS_COLUMN).combine_chunks().flatten()) == n


def test_big_pages_are_written_and_read_back(tmp_path):
    """The default asks for one data page per column chunk; with columns over pyarrow's 1 MiB page
    the file is smaller than with 1 MiB pages, and it reads back the same."""
    import dataclasses

    rows = teacher_rows(k=64, vocab=3000) * 40  # > 1 MiB of codes in topk_ids / topk_logprobs
    rows = [dataclasses.replace(r, example_id=i) for i, r in enumerate(rows)]
    assert parquet_options(REL)["data_page_size"] == REL.data_page_bytes == 64 << 20
    small_pages = dataclasses.replace(REL, data_page_bytes=None)
    sizes, decoded = [], []
    for enc, sub in ((REL, "big"), (small_pages, "small")):
        (tmp_path / sub).mkdir()
        record = write_shard(tmp_path / sub, 0, 0, rows_to_table(rows, enc, 64), zstd_level=3, truncated=0)
        sizes.append(record.bytes)
        decoded.append(decode_table(pq.read_table(tmp_path / sub / record.file), enc, 64))
    assert sizes[0] < sizes[1]
    for a, b in zip(*decoded):
        np.testing.assert_array_equal(a, b)
