"""`python -m pipeline inspect` against the cached numbers, read back independently: the shard with
pyarrow, the teacher columns through the codec's decode, the tokenizer for the text."""
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher
from storage_schemas import DEFAULT_ENCODING, Manifest, get_encoding
from storage_schemas.codecs import decode_teacher

K = 8
ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+(.+)$")


@pytest.fixture(scope="module")
def default_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    """Stage one (hf engine) with the default encoding: quantized relative values, id deltas, a mass column, tail draws."""
    cache = tmp_path_factory.mktemp("inspect") / "cache"
    run_cache_teacher(load_config(None, [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={cache}",
                                         "cache.engine=hf", f"cache.k={K}", "cache.rows_per_shard=8", "data.max_length=48"]))
    assert Manifest.load(cache).settings.encoding == DEFAULT_ENCODING
    return cache


def stored_position(cache, example: int):
    """(input ids, loss mask, decoded ids [n, k], log-probs [n, k], target log-probs [n]) of one example."""
    manifest = Manifest.load(cache)
    table = pq.read_table([cache / r.file for r in manifest.shards][example // 8])  # 8 rows per shard, no gaps
    row = table.to_pylist()[example % 8]
    assert row["example_id"] == example
    mass = np.asarray(row["topk_mass"]) if "topk_mass" in row else None
    ids, logprobs, target = decode_teacher(get_encoding(manifest.settings.encoding), np.asarray(row["topk_ids"]),
                                           np.asarray(row["topk_logprobs"]), np.asarray(row["target_logprob"]), K, mass)
    return row["input_ids"], row["loss_mask"], ids, logprobs.astype(np.float64), target.astype(np.float64)


@pytest.mark.parametrize("example", [3, 11])  # a first-shard and a later-shard row
def test_inspect_prints_the_cached_target_and_top_k_in_order(example, default_cache, tiny_model_dir, capsys):
    input_ids, mask, ids, logprobs, target = stored_position(default_cache, example)
    # the trained position whose two most likely cached tokens differ most: ranks tell apart at 4 decimals
    slot = int(np.argmax(np.exp(logprobs[:, 0]) - np.exp(logprobs[:, 1])))
    position = int(np.flatnonzero(mask)[slot])
    assert cli_main(["inspect", str(default_cache), "--example", str(example), "--position", str(position),
                     "--top", str(K), "--model", str(tiny_model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p_y, y = math.exp(target[slot]), input_ids[position + 1]
    assert lines[0] == f"example {example}, position {position} (k={K}, encoding {DEFAULT_ENCODING})"
    assert repr(tok.decode(input_ids[max(0, position - 12):position + 1])) in lines[1]
    got_target = re.search(r"target  : (.+) \(id (\d+)\)  p = ([0-9.]+)$", lines[2])
    assert got_target[1] == repr(tok.decode([y])) and int(got_target[2]) == y
    assert float(got_target[3]) == pytest.approx(p_y, abs=6e-5)  # printed with 4 decimals
    rows = [ROW.match(line).groups() for line in lines[4:4 + K]]
    p = np.exp(logprobs[slot])
    assert [int(r[0]) for r in rows] == list(range(1, K + 1))
    assert [int(r[1]) for r in rows] == ids[slot].tolist()  # the cached ids, in descending probability
    assert [float(r[2]) for r in rows] == pytest.approx(p.tolist(), abs=6e-5)
    assert [float(r[3]) for r in rows] == pytest.approx((p / (1 - p_y)).tolist(), abs=6e-5)  # renormalized without y
    assert [r[4] for r in rows] == [repr(tok.decode([i])) for i in ids[slot]]
    assert round(p[0], 4) != round(p[1], 4)  # a value shown at the wrong rank would be seen
    tail = (1 - p_y) - p.sum()
    summary = re.search(r"1 - p_y = ([0-9.]+); mass outside the cached 8 = ([-0-9.e]+) \(R_T = ([-0-9.e]+) of", lines[4 + K])
    assert float(summary[1]) == pytest.approx(1 - p_y, abs=6e-5)
    assert float(summary[2]) == pytest.approx(tail, rel=1e-3) and float(summary[3]) == pytest.approx(tail / (1 - p_y), rel=1e-3)
    # The default encoding has tail draws (sampled_tail): one more line, the position's drawn ids.
    assert get_encoding(DEFAULT_ENCODING).has_draws and len(lines) == 4 + K + 2
    assert re.match(r"^  16 draws from the tail \(entropy H_T = [0-9.]+ nats\): ", lines[-1])


def test_inspect_refuses_an_example_not_in_the_cache(default_cache, capsys):
    rows = Manifest.load(default_cache).num_rows
    assert cli_main(["inspect", str(default_cache), "--example", str(rows)]) == 2
    assert f"example {rows} is not in" in capsys.readouterr().err


def test_trained_positions_are_listed_as_spans():
    from pipeline.inspect_cache import _spans

    assert _spans(np.array([3, 4, 5, 6, 7, 12, 13, 14, 15, 20])) == "3-7, 12-15, 20"
    assert _spans(np.array([0])) == "0"
