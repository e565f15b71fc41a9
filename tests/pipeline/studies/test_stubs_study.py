"""The evidence study's quick preset: configs/stubs_adapters.yaml in miniature (sweep --quick) on the real
stubs generator, every adapter family, every gap finite; and the scenario check's figures by hand."""
from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline.config import load_config
from pipeline.embedded.scenarios import STUBS_FILES, StubsSpec, write_stubs
from pipeline.studies.frontier import cell_gaps
from pipeline.studies.sweep import QUICK_STEPS, quick_config, run_sweep

FAMILIES = ["lora", "dora", "randlora", "sinelora"]


def test_quick_preset_runs_every_adapter_family_on_the_stubs_scenario(tiny_model_dir, tiny_jsonl, tmp_path):
    data = tmp_path / "data"
    write_stubs(data, StubsSpec(train_rows=48, heldout_rows=16))
    config = load_config("configs/stubs_adapters.yaml", [
        f"model={tiny_model_dir}", f"data.path={data / STUBS_FILES['train']}", f"cache.dir={tmp_path / 'cache'}",
        "cache.engine=hf", "cache.k=8", f"eval.target_path={data / STUBS_FILES['heldout']}", f"eval.source_path={tiny_jsonl}",
        f"sweep.output_dir={tmp_path / 'adapters'}", f"sweep.lora_variants=[{', '.join(FAMILIES)}]", "train.batch_size=4"])
    quick = quick_config(config)
    assert quick.train.max_steps == QUICK_STEPS == 10 and quick.sweep.seeds == [0, 1] and not quick.sweep.records_dir
    assert quick.sweep.reg_weights == [0.1, 1.0] and quick.sweep.method_reg_weights == {"full_kl": [0.1, 0.3]}
    assert quick.sweep.output_dir.endswith("adapters-quick")
    # In 10 steps the configured lambdas barely move a tiny student, and seeds scatter its target loss more
    # than that, so the two curves' seeds would not overlap. Ends far apart (the student free / held at the
    # teacher) give every family's tail and full_kl a common range; the grid's shape is the config's.
    quick.sweep = dataclasses.replace(quick.sweep, reg_weights=[0.01, 100.0], method_reg_weights={"full_kl": [0.01, 100.0]})
    records = run_sweep(quick)
    assert {r["variant"] for r in records} == set(FAMILIES) and len(records) == 4 * (2 + 2 * 2 * 2)
    rows = cell_gaps(records, "tail")
    assert sorted(r["cell"] for r in rows) == sorted(FAMILIES)  # full_kl against tail in each family
    for row in rows:
        assert "reason" not in row, row
        assert all(math.isfinite(row[k]) for k in ("gap_mid", "two_se_mid", "gap_max", "two_se_max", "gap_ppl_mid")), row
    assert all(r["binary_share"] is not None for r in records if r["method"] != "none")


def test_trigram_and_overlap_against_hand_counts():
    from pipeline.studies.scenario_check import TrigramModel, ngram_overlap

    train = [[0, 5, 6, 5, 6], [0, 5, 7]]
    model = TrigramModel(train, vocab_size=10)
    # p(6 | 0, 5): trigram (0,5) saw {6: 1, 7: 1} -> lam = 2/4; bigram 5 saw {6: 2, 7: 1} -> lam = 3/5;
    # unigram p(6) = (2 + 1) / (6 + 10)
    uni = 3 / 16
    bi = 3 / 5 * 2 / 3 + 2 / 5 * uni
    assert model.logprob([0, 5], 6) == pytest.approx(math.log(2 / 4 * 1 / 2 + 2 / 4 * bi))
    assert model.logprob([9], 9) == pytest.approx(math.log(1 / 16))  # unseen context and word: the add-one unigram
    share, n = ngram_overlap(train, [[0, 5, 6], [1, 5, 6], [5, 7]], n=3)
    assert (share, n) == (pytest.approx(1 / 2), 2)
