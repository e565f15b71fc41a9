"""`python -m pipeline show-mask`: one example as stage one would train it, with the trained text marked.

    python -m pipeline show-mask --config my.yaml --example 3
    python -m pipeline show-mask --config my.yaml --example 3 --tokens   # one line per token

It reads the example through the same code as stage one (stages/data/inputs.py: format, template,
mask, truncation), so what it marks is what the cache and the loss would use, before any teacher
time is spent (as axolotl's `preprocess --debug` does). Trained text is printed between ⟦ and ⟧;
an example stage one would refuse is printed with the reason and exits 1.
"""
from __future__ import annotations

from pipeline.config import Config

__all__ = ["show_mask", "OPEN", "CLOSE"]

OPEN, CLOSE = "⟦", "⟧"  # around trained text: brackets that do not occur in templates or code


def _runs(ids: list[int], trained: list[bool]) -> list[tuple[bool, list[int]]]:
    """Consecutive tokens grouped by whether they are trained."""
    runs: list[tuple[bool, list[int]]] = []
    for token, on in zip(ids, trained):
        if runs and runs[-1][0] == on:
            runs[-1][1].append(token)
        else:
            runs.append((on, [token]))
    return runs


def show_mask(config: Config, example: int, tokens: bool = False) -> tuple[str, int]:
    """(the text to print, the exit status) for example `example` of config.data read with
    config.model's tokenizer: the rendered text with trained spans marked, or the refusal."""
    from transformers import AutoTokenizer

    from stages.data.inputs import InputReport, input_format, load_rows, tokenize_rows

    data = config.data
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
    decode = lambda run: tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    lines = [head, f"{len(ids)} tokens, {sum(trained)} trained"
             + (f"; truncated to data.max_length={data.max_length}" if shown.truncated else "")
             + f"; trained text between {OPEN} and {CLOSE}", "-" * 72,
             "".join(f"{OPEN}{decode(run)}{CLOSE}" if on else decode(run) for on, run in _runs(ids, trained)), "-" * 72]
    if tokens:
        lines += [f"{t:5d} {token:7d} {'T' if on else '.'} {decode([token])!r}" for t, (token, on) in enumerate(zip(ids, trained))]
    lines += [f"warning: {line}" for line in report.warnings()]
    return "\n".join(lines), 0
