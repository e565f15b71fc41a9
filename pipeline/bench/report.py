"""The bench's markdown tables, from its JSON result (so a saved JSON can be re-rendered)."""
from __future__ import annotations

__all__ = ["render_markdown", "estimators_section"]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows], ""]


def _tok(value: float) -> str:
    return f"{value:,.0f}"


def _x(value: float) -> str:
    return f"{value:.2f}"


def _stage_one(result: dict) -> list[str]:
    rows = []
    for name, model in result["stage_one"].items():
        m = model["main"]
        rows.append([f"{name} (V={model['vocab_size']:,})", _tok(m["plain_tok_s"]),
                     f"{_tok(m['vllm_e2e_tok_s'])} (**{_x(m['vllm_e2e_over_plain'])}**)",
                     f"{_tok(m['vllm_score_tok_s'])} ({_x(m['vllm_score_over_plain'])})",
                     f"{_tok(m['stock_e2e_tok_s'])} ({_x(m['stock_e2e_over_plain'])})",
                     f"{_tok(m['hf_e2e_tok_s'])} ({_x(m['hf_e2e_over_plain'])})", f"{m['bytes_per_token']:.1f}"])
    m = next(iter(result["stage_one"].values()))["main"]
    lines = [f"### (a) Stage one, tok/s (/ vLLM plain prefill): {m['sequences']} x {m['length']} tokens, k = {m['k']}", ""]
    return lines + _table(["model", "vLLM plain prefill", "vLLM end to end (pooler)", "vLLM pooler score() only",
                           "vLLM end to end (stock prompt_logprobs)", "hf end to end", "bytes/token"], rows)


def _stage_two(result: dict) -> list[str]:
    rows = [[e, f"{r['step_s'] * 1e3:.0f}", _x(r["time_ratio"]), f"{r['peak_mib']:.0f}", _x(r["peak_ratio"])]
            for e, r in result["stage_two"].items()]
    s = result["settings"]
    lines = [f"### (b) Stage two: one LoRA step, batch {s['batch']} x {s['length']}, k = {s['k']} (peak = RSS on CPU)", ""]
    return lines + _table(["estimator", "step ms (median)", "/ CE-only", "peak MiB", "/ CE-only"], rows)


def _reader(result: dict) -> list[str]:
    r = result["reader"]
    lines = [f"### (c) Cache reader: shards -> training tensors ({r['rows']} rows, batches of {r['batch']})", ""]
    return lines + _table(["decode tok/s", "tail step consumes tok/s", "decode / consumption", "Parquet -> Arrow once (s)"],
                          [[_tok(r["decode_tok_s"]), _tok(r["train_tok_s"]), f"**{r['decode_over_train']:.1f}x**",
                            f"{r['arrow_conversion_s']:.2f}"]])


def _real_vocab(result: dict) -> list[str]:
    rows = []
    for name, m in result.get("real_vocab", {}).items():
        st, ev = m["steps"], m["eval"]
        rows.append([f"{name} (V={m['vocab_size']:,})",
                     *[f"{_tok(st[r]['tok_s'])} / {st[r]['peak_mib']:,.0f}" for r in ("none+fused", "tail+fused", "tail")],
                     f"{ev['chunked_peak_mib']:,.0f} / {ev['unchunked_peak_mib']:,.0f}"])
    if not rows:
        return []
    s = result["settings"]
    lines = [f"### (e) By vocabulary: stage two tok/s / peak RSS MiB (batch {s['batch']} x {s['length']}, k = {s['k']}), "
             "eval peak RSS MiB", ""]
    return lines + _table(["model", "CE-only (fused)", "tail fused (default)", "tail unfused",
                           "eval peak chunked / unchunked"], rows)


def _penalty(result: dict) -> list[str]:
    rows = []
    for name, shape in result.get("penalty", {}).items():
        s = shape["shape"]
        label = f"{name} (h {s['hidden_size']}, r {s['rank']}, {s['batch']} x {s['seq']})"
        for r in shape["rows"].values():
            alone = "-" if r["penalty_s"] is None else f"{r['penalty_s'] * 1e3:.2f}"
            rows.append([label, r["row"], f"{r['step_s'] * 1e3:.1f}", f"{r['step_min_s'] * 1e3:.1f}-{r['step_max_s'] * 1e3:.1f}",
                         _x(r["ratio_to_diag"]), _x(r["ratio_to_none"]), alone])
    if not rows:
        return []
    lines = ["### (f) Penalty step cost (lalora curvature forms): one LoRA step with CE + reg_weight * R, rows interleaved; "
             "penalty alone = R forward + backward without the model", ""]
    return lines + _table(["shape", "row", "median ms", "min-max ms", "ratio to diag", "ratio to none", "penalty alone ms"], rows)


def _scaling(result: dict) -> list[str]:
    lines = []
    for key, label in (("k", "k"), ("length", "sequence length"), ("vocab", "vocabulary")):
        rows = [[f"{r[key]:,}", _x(r["stage_one_over_plain"]), f"{r['bytes_per_token']:.1f}", _x(r["tail_over_none"])]
                for r in result["scaling"][key]]
        lines += [f"### (d) Cost vs {label}", ""]
        lines += _table([label, "stage one end to end / plain prefill", "bytes/token", "tail step / CE-only step"], rows)
    return lines


def estimators_section(result: dict) -> list[str]:
    rows = [[r["candidate"], f"{r['bytes_per_position']:.1f}", f"{_tok(r['tok_s'])} ({r['stage_one_ratio']:.3f})",
             f"{r['step_s'] * 1e3:.1f} ({r['step_ratio']:.3f})"] for r in result.get("estimators", [])]
    if not rows:
        return []
    repeats = result["estimators"][0]["repeats"]
    lines = [f"### (g) Estimator candidates: medians of {repeats} interleaved repetitions, ratios to the first", ""]
    return lines + _table(["candidate", "bytes / trained position", "stage one tok/s (/ first)", "fused step ms (/ first)"], rows)


def render_markdown(result: dict) -> str:
    meta = result["meta"]
    head = [f"## Bench {meta['timestamp']}{' (quick: tiny shapes, numbers meaningless)' if meta['quick'] else ''}", "",
            f"`{meta['command']}` on {meta['machine']}; load average before {meta['load_before']}, after "
            f"{meta['load_after']}; {meta['wall_s']:.0f} s wall.", ""]
    return "\n".join(head + _stage_one(result) + _stage_two(result) + _reader(result) + _scaling(result)
                     + _real_vocab(result) + _penalty(result) + estimators_section(result))
