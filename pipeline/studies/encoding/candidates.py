"""The encodings the study compares: (encoding, zstd level) pairs at one k, named by what varies."""
from __future__ import annotations

import dataclasses

from pipeline.studies.encoding.settings import DEFAULT_LEVEL
from storage_schemas import (
    DEFAULT_VALUE_ENCODING,
    INPUT_IDS_COLUMN,
    MASS_COLUMN,
    TARGET_LOGPROB_COLUMN,
    TOPK_IDS_COLUMN,
    TOPK_LOGPROBS_COLUMN,
    Encoding,
    get_encoding,
)

__all__ = ["candidates"]

_BSS = (INPUT_IDS_COLUMN, TARGET_LOGPROB_COLUMN, TOPK_IDS_COLUMN, TOPK_LOGPROBS_COLUMN)
_BSS_MASS = (*_BSS, MASS_COLUMN)


def _enc(name: str, **kw) -> Encoding:
    return Encoding(name, "topk_nontarget", "", **kw)


def _float_and_log_grids() -> list[tuple[Encoding, int]]:
    q = dict(value_max_code=65535)
    rows = [
        (_enc("int32 ids / f32 (topk_f32, exact)"), 3),
        (_enc("int32 ids / f16 (topk_f16)", value_codec="f16"), 3),
        (_enc("f32 + BSS", byte_stream_split=_BSS), 3),
        (_enc("f16 + BSS", value_codec="f16", byte_stream_split=_BSS), 3),
        (_enc("bf16 + BSS", value_codec="bf16", byte_stream_split=_BSS), 3),
        (_enc("id-delta ids / f16 + BSS", id_order="id_delta", value_codec="f16", byte_stream_split=_BSS), 3),
        (_enc("f16 + dictionary", value_codec="f16", dictionary=(INPUT_IDS_COLUMN, TOPK_IDS_COLUMN)), 3),
    ]
    for e in (5, 6, 7, 8, 9):
        rows.append((_enc(f"log_q 2^-{e}, rank-delta (prob order) + BSS", value_codec="log_q", value_step=2.0 ** -e,
                          value_delta=True, byte_stream_split=_BSS, **q), 3))
    rows.append((_enc("log_q uint8: step 1/16, range [-16, 0], prob order + BSS", value_codec="log_q",
                      value_step=1 / 16, value_max_code=255, byte_stream_split=_BSS), 3))
    rows.append((_enc("log_q uint4: step 1/2, range [-7.5, 0], prob order + BSS", value_codec="log_q",
                      value_step=0.5, value_max_code=15, byte_stream_split=_BSS), 3))
    rows.append((dataclasses.replace(get_encoding("topk_idd_logq7"), name="topk_idd_logq7 (the first study's default)"), 3))
    return rows


def _sqrtp_and_relpow_grids() -> list[tuple[Encoding, int]]:
    rows = []
    for e in (8, 9, 10, 11, 12):
        rows.append((_enc(f"sqrtp_q 2^-{e}, id-delta ids + BSS", id_order="id_delta", value_codec="sqrtp_q",
                          value_step=2.0 ** -e, value_max_code=2 ** e, byte_stream_split=_BSS), 3))
    rows.append((_enc("sqrtp_q 2^-10, rank-delta (prob order) + BSS", value_codec="sqrtp_q", value_step=2.0 ** -10,
                      value_max_code=1024, value_delta=True, byte_stream_split=_BSS), 3))
    # relpow_q: values relative to the top-1 on a (p / p_1)^power grid, the cached mass in topk_mass
    rel = dict(value_codec="relpow_q", mass_codec="logit_q", target_codec="f16", byte_stream_split=_BSS_MASS,
               data_page_bytes=64 << 20)  # the default's target codec and layout: compare the grids alone
    for power, levels, mass_e in ((0.5, 128, 8), (0.25, 64, 8), (0.25, 96, 8), (0.25, 104, 8), (0.25, 128, 8),
                                  (0.25, 256, 8), (0.125, 128, 8), (0.25, 112, 10), (0.25, 112, 12)):
        rows.append((_enc(f"relpow_q (p/p_1)^{power:g} 1/{levels}, mass 2^-{mass_e}, id-delta ids + BSS",
                          id_order="id_delta", value_power=power, value_step=1 / levels, value_max_code=levels,
                          mass_step=2.0 ** -mass_e, **rel), 3))
    rows.append((_enc("relpow_q (p/p_1)^0.25 1/112, mass 2^-8, rank-delta (prob order) + BSS", value_power=0.25,
                      value_step=1 / 112, value_max_code=112, value_delta=True, mass_step=2.0 ** -8, **rel), 3))
    return rows


def _default_variants() -> list[tuple[Encoding, int]]:
    """The default with one thing changed: target codec, layout, zstd level, page and row-group size."""
    default = get_encoding(DEFAULT_VALUE_ENCODING)
    rows = []
    for target in ("f16", "bf16"):
        rows.append((dataclasses.replace(default, name=f"default, target {target}", target_codec=target), DEFAULT_LEVEL))
    rows.append((dataclasses.replace(default, name="default without BSS", byte_stream_split=()), DEFAULT_LEVEL))
    rows.append((dataclasses.replace(default, name="default + dictionary ids", dictionary=(TOPK_IDS_COLUMN,),
                                     byte_stream_split=tuple(c for c in default.byte_stream_split
                                                             if c != TOPK_IDS_COLUMN)),
                 DEFAULT_LEVEL))
    for level in (1, 3, 9, 12, 19):
        rows.append((dataclasses.replace(default, name=f"default, zstd {level}"), level))
    rows.append((dataclasses.replace(default, name="default, 1 MiB pages (pyarrow's default)", data_page_bytes=None),
                 DEFAULT_LEVEL))
    for group in (16, 64):
        rows.append((dataclasses.replace(default, name=f"default, row groups of {group} rows", row_group_rows=group),
                     DEFAULT_LEVEL))
    return rows


def candidates() -> list[tuple[Encoding, int]]:
    """(encoding, zstd level) pairs compared at one k, the DEFAULT first; names say what varies."""
    default = dataclasses.replace(get_encoding(DEFAULT_VALUE_ENCODING), name=f"DEFAULT {DEFAULT_VALUE_ENCODING}")
    return [(default, DEFAULT_LEVEL), *_float_and_log_grids(), *_sqrtp_and_relpow_grids(), *_default_variants()]
