"""Stage two under torchrun with DDP (gloo, 2 CPU processes): the same loss, CE, KL and adapter as
one process for the same global batch, and each rank reads a disjoint part of the cache."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_configs import make_config
from safetensors.torch import load_file

from stages.common.stage_config import save_config
from stages.student.runner import run_train

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(module: str, config_path: Path, *args: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", module, *args, "--config", str(config_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_same_global_batch(tiny_model_dir, tiny_cache, tmp_path):
    # Global batch 8 both ways: 1 process x 4 rows x 2 accumulation steps, or 2 processes x 4 rows.
    # accelerate's seeded sampler gives both the same permutation: micro-batch r of a step is rank r's batch.
    common = dict(max_steps=3, save_steps=100, batch_size=4, reg_weight=1.0, seed=0)
    single = make_config(tiny_model_dir, tiny_cache, tmp_path / "single", grad_accum=2, **common)
    ddp = make_config(tiny_model_dir, tiny_cache, tmp_path / "ddp", grad_accum=1, **common)
    save_config(ddp, tmp_path / "ddp.yaml")
    torchrun("pipeline", tmp_path / "ddp.yaml", "train")
    run_train(single)

    one, two = log_rows(tmp_path / "single"), log_rows(tmp_path / "ddp")
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["1", "2", "3"]
    for a, b in zip(one, two):
        for name in ("loss", "ce", "kl"):
            assert float(b[name]) == pytest.approx(float(a[name]), rel=1e-5, abs=1e-7), (a["step"], name)
    assert float(one[0]["kl"]) < 1e-6 < float(one[-1]["kl"])  # B = 0 at step 1; the adapter moved after
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("single", "ddp")]
    assert metrics[0]["tokens"] == metrics[1]["tokens"] > 0  # both saw the same 24 rows
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("single", "ddp")]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(w.abs().max() > 0 for n, w in weights[0].items() if "lora_B" in n)


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True])
def test_each_rank_reads_a_disjoint_part_of_the_cache(tiny_model_dir, tiny_cache, tmp_path, streaming):
    # 30 rows in 4 shards; batch 3 -> 10 batches, 5 per rank, so no rank pads its last batch with repeats
    config = make_config(tiny_model_dir, tiny_cache, tmp_path / "run", batch_size=3, epochs=1.0, max_steps=0,
                         streaming=streaming)
    save_config(config, tmp_path / "c.yaml")
    torchrun("pipeline", tmp_path / "c.yaml", "rank-rows")
    ranks = [json.loads((tmp_path / "run" / "rank_rows" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(30))
    if streaming:  # whole shard files per rank: shards hold examples [0, 8), [8, 16), [16, 24), [24, 30)
        shards = [{i // 8 for i in ids} for ids in ranks]
        assert not shards[0] & shards[1]
