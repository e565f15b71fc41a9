"""What each value / target / mass codec promises, as documented in docs/design.md §8 ("Encodings and
codecs", the table of promises), checked from first principles: the tolerances come from the
promises, never from the code under test (the codecs carry no error bound of their own).

    problems = promise_violations(enc, a, a_y, decoded, decoded_y)   # [] when the round trip keeps every promise

`a` / `decoded` are [n, k] log-probs of the same ids in the same order (float32 as cached / as
decoded), `a_y` / `decoded_y` the [n] target log-probs. Slack: decoded values are float32, so each
check allows the rounding of a float32 log-prob (2^-24 relative), stated where it is added.
"""
from __future__ import annotations

import numpy as np

__all__ = ["promise_violations", "value_promise", "target_promise", "mass_promise", "F32_SLACK"]

F32_SLACK = 2.0 ** -23  # two float32 roundings of a log-prob, relative to its size
MASS_LOGIT_RANGE = 32.0  # docs: the cached share's logit is clamped to [-32, 32]


def _fails(name: str, err: np.ndarray, allowed: np.ndarray) -> list[str]:
    bad = ~(err <= allowed)
    if not bad.any():
        return []
    i = np.unravel_index(np.argmax(np.where(bad, err - allowed, -np.inf)), err.shape)
    return [f"{name}: {int(bad.sum())} of {bad.size} outside the promise, worst error {float(err[i]):.3g} > {float(allowed[i]):.3g}"]


def _float_promise(codec: str, a: np.ndarray, got: np.ndarray, name: str) -> list[str]:
    """f32 exact; f16 within half an ulp (2^-11 relative, 2^-25 absolute among subnormals); bf16 2^-8 relative."""
    err = np.abs(got - a)
    if codec == "f32":
        return _fails(name, err, np.zeros_like(a))
    relative = {"f16": 2.0 ** -11, "bf16": 2.0 ** -8}[codec]
    floor = 2.0 ** -25 if codec == "f16" else 0.0
    return _fails(name, err, np.maximum(np.abs(a) * relative, floor))


def value_promise(enc, a: np.ndarray, got: np.ndarray) -> list[str]:
    """The `topk_logprobs` promise of enc.value_codec (relpow_q: only the part about ratios to the top-1)."""
    a, got = np.asarray(a, np.float64), np.asarray(got, np.float64)
    codec, step = enc.value_codec, enc.value_step
    if codec in ("f32", "f16", "bf16"):
        return _float_promise(codec, a, got, f"{codec} values")
    if codec == "log_q":  # |error| <= step/2 down to -max_code * step; below it the floor itself
        floor = -enc.value_max_code * step
        inside = a >= floor
        problems = _fails("log_q values", np.abs(got - a)[inside], step / 2 + F32_SLACK * np.abs(a[inside]))
        return problems + _fails("log_q clamped values", np.abs(got - floor)[~inside], np.zeros(int((~inside).sum())))
    if codec == "sqrtp_q":  # |error of sqrt p| <= step/2 everywhere (a value below the grid decodes to p = 0)
        return _fails("sqrtp_q sqrt(p)", np.abs(np.exp(got / 2) - np.exp(a / 2)), step / 2 + F32_SLACK * np.abs(a) + 1e-12)
    if codec == "relpow_q":  # |error of (p / p_1)^power| <= step/2 for every value, p_1 the position's top-1
        u = np.exp(enc.value_power * (a - a.max(axis=1, keepdims=True)))
        u_got = np.exp(enc.value_power * (got - got.max(axis=1, keepdims=True)))
        slack = enc.value_power * 2 * F32_SLACK * np.abs(a).max()
        return _fails("relpow_q (p/p_1)^power", np.abs(u_got - u), np.full(u.shape, step / 2 + slack))
    raise AssertionError(f"no documented promise for value codec {codec!r}: add it to docs/design.md §8 and here")


def target_promise(enc, a_y: np.ndarray, got_y: np.ndarray) -> list[str]:
    return _float_promise(enc.target_codec, np.asarray(a_y, np.float64), np.asarray(got_y, np.float64), f"{enc.target_codec} target")


def _log_share(a: np.ndarray, a_y: np.ndarray) -> np.ndarray:
    """log S = log(sum_S p / (1 - p_y)), float64."""
    return np.logaddexp.reduce(np.asarray(a, np.float64), axis=1) - np.log(-np.expm1(np.asarray(a_y, np.float64)))


def mass_promise(enc, a, a_y, got, got_y) -> list[str]:
    """logit_q: the decoded values' share S of the decoded non-target mass has |error of log S| <= mass_step/2
    and |error of log(1 - S)| <= mass_step/2 while the logit of S lies in [-32, 32]. float32 log-probs
    resolve S only to about k * 2^-23, so log(1 - S) is checked where 1 - S is 100x that, with the
    resolution divided by 1 - S as slack (the float32 cache has the same limit)."""
    if enc.mass_codec == "none":
        return []
    half, resolution = enc.mass_step / 2, a.shape[1] * 2.0 ** -23
    usable = np.asarray(a_y) < 0  # p_y rounded to 1: no non-target mass to share (the codec uses a floor)
    want, have = _log_share(a, a_y)[usable], _log_share(got, got_y)[usable]
    with np.errstate(divide="ignore", invalid="ignore"):  # S rounding to 1 (or just above): no resolved tail
        tail_want, tail_have = np.log(-np.expm1(want)), np.log(-np.expm1(have))
    inside = ~(want - tail_want < -MASS_LOGIT_RANGE)  # S above e^-32 (the logit's floor)
    resolved = inside & (tail_want > np.log(100 * resolution)) & (want - tail_want <= MASS_LOGIT_RANGE)
    problems = _fails("logit_q log S", np.abs(have - want)[inside], np.full(int(inside.sum()), half + resolution))
    return problems + _fails("logit_q log(1 - S)", np.abs(tail_have - tail_want)[resolved],
                             half + resolution / np.exp(tail_want[resolved]))


def promise_violations(enc, a, a_y, got, got_y) -> list[str]:
    """Every documented promise of `enc` that the round trip (a, a_y) -> (got, got_y) breaks."""
    return value_promise(enc, a, got) + target_promise(enc, a_y, got_y) + mass_promise(enc, a, a_y, got, got_y)
