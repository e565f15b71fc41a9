"""`python -m pipeline show-mask`: one example as stage one would train it, with the trained text marked.

    python -m pipeline show-mask --config my.yaml --example 3
    python -m pipeline show-mask --config my.yaml --example 3 --tokens   # one line per token

The text is the tokenizer's decoding of the example's tokens; `--tokens` adds each token's own
piece (e.g. SentencePiece's "▁Hello", byte-level "Ġthe"), which shows where spaces belong.
It reads the example through the same code as stage one (stages/data/inputs.py: format, template,
mask, truncation), so what it marks is what the cache and the loss would use, before any teacher
time is spent (as axolotl's `preprocess --debug` does). Trained text is printed between ⟦ and ⟧;
an example stage one would refuse is printed with the reason and exits 1.
"""
from __future__ import annotations

import dataclasses

from pipeline.config import Config

__all__ = ["show_mask", "OPEN", "CLOSE"]

OPEN, CLOSE = "⟦", "⟧"  # around trained text: brackets that do not occur in templates or code


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _marked_text(tokenizer, ids: list[int], trained: list[bool]) -> str:
    """The decoded sequence with each trained run between OPEN and CLOSE. Run edges are cut in the
    decoding of the whole sequence (a SentencePiece "▁Hello" decoded alone loses its space), at the
    length of each prefix's decoding; runs are decoded one by one only where a prefix's decoding is
    not a prefix of the whole."""
    edges = [t for t in range(1, len(ids)) if trained[t] != trained[t - 1]] + [len(ids)]
    whole, pieces, begin, at = _decode(tokenizer, ids), [], 0, 0
    for edge in edges:
        prefix = _decode(tokenizer, ids[:edge])
        if not whole.startswith(prefix) or len(prefix) < at:
            return "".join(f"{OPEN}{_decode(tokenizer, ids[b:e])}{CLOSE}" if trained[b] else _decode(tokenizer, ids[b:e])
                           for b, e in zip([0, *edges[:-1]], edges))
        text = whole[at:len(prefix)]
        pieces.append(f"{OPEN}{text}{CLOSE}" if trained[begin] else text)
        begin, at = edge, len(prefix)
    return "".join(pieces)


def show_mask(config: Config, example: int, tokens: bool = False) -> tuple[str, int]:
    """(the text to print, the exit status) for example `example` of config.data read with
    config.model's tokenizer: the rendered text with trained spans marked, or the refusal."""
    from transformers import AutoTokenizer

    from stages.data.inputs import InputReport, input_format, load_rows, tokenize_rows

    data = dataclasses.replace(config.data, on_bad_example="refuse")  # a skipped example still shows its reason
    rows = load_rows(data)
    if not 0 <= example < len(rows):
        raise ValueError(f"--example {example}: {data.path} has examples 0..{len(rows) - 1}")
    fmt = input_format(data, rows.column_names)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    report = InputReport()
    head = f"{data.path}: example {example} ({fmt.kind}, column{'s' if len(fmt.fields) > 1 else ''} {', '.join(fmt.fields)})"
    try:
        [shown] = tokenize_rows(rows.select([example]), tokenizer, data, first_id=example, report=report, fmt=fmt)
    except ValueError as err:
        return f"{head}\nrefused by stage one: {err}", 1
    ids, trained = shown.input_ids.tolist(), [False] + shown.loss_mask.tolist()  # token t is trained at position t-1
    lines = [head, f"{len(ids)} tokens, {sum(trained)} trained"
             + (f"; truncated to data.max_length={data.max_length}" if shown.truncated else "")
             + f"; trained text between {OPEN} and {CLOSE}", "-" * 72, _marked_text(tokenizer, ids, trained), "-" * 72]
    if tokens:
        lines.append("position      id trained  decoded          token")
        lines += [f"{t:8d} {token:7d} {'T' if on else '.':>7}  {_decode(tokenizer, [token])!r:<16} {tokenizer.convert_ids_to_tokens(token)}"
                  for t, (token, on) in enumerate(zip(ids, trained))]
    lines += [f"warning: {line}" for line in report.warnings()]
    return "\n".join(lines), 0
