"""FSDP2 (`torch.distributed.fsdp.fully_shard`) sharding of the student on a 2-process CPU gloo mesh:
the project's loss (`batch_loss`, method tail, lambda = 1) on a global batch of 8 cached rows, 4 per
rank, and a backward give the loss and the LoRA gradients of one process on the 8 rows.

This file is also the worker: `torchrun --nproc_per_node 2 test_fsdp.py MODEL CACHE OUT`. What stays
untested here is FSDP through the HF Trainer (accelerate enables it only on accelerator setups): docs/scale-out.md.

Tolerance: float32, rel 1e-5 on the loss and rtol 1e-4 / atol 1e-6 on the gradients (as test_ddp.py):
the two runs pad to different widths and reduce in another order, so sums differ in the last bits.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
GLOBAL_ROWS, WORLD, SEED = 8, 2, 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seeded_student(model_dir: Path):
    """The tiny student with a seeded adapter whose B is not 0 (else A's gradient is 0 and the KL too)."""
    from stages.student.adapters import make_student
    from stages.student.settings import LoraSettings

    torch.manual_seed(SEED)
    model = make_student(model_dir, LoraSettings(rank=4), torch.float32)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def batches(model_dir: Path, cache_dir: Path, parts: int) -> tuple[list[dict], int]:
    """The first GLOBAL_ROWS cached rows collated in `parts` equal micro-batches, and their labelled count."""
    from stages.student.collator import CacheCollator, pad_token_id
    from stages.student.reader import load_cache_dataset, open_cache

    manifest = open_cache(cache_dir, model_dir)
    dataset = load_cache_dataset(cache_dir, manifest)
    collate = CacheCollator(pad_token_id(model_dir), manifest.settings.k, encoding=manifest.settings.encoding)
    size = GLOBAL_ROWS // parts
    out = [collate([dataset[i] for i in range(p * size, (p + 1) * size)]) for p in range(parts)]
    return out, sum(int((b["labels"][:, 1:] != -100).sum()) for b in out)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """name -> the full gradient of each trainable parameter (DTensor shards gathered)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


# --- the worker (one per rank, under torchrun) -------------------------------------------------
def worker(model_dir: Path, cache_dir: Path, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from stages.student.loss_mixin import batch_loss
    from stages.student.methods import get_method

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = seeded_student(model_dir)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    sharded = all(isinstance(p, DTensor) and p.placements == (Shard(0),) and p.to_local().numel() < p.numel() for p in lora)
    parts, n_items = batches(model_dir, cache_dir, WORLD)
    mine = batch_loss(model, parts[rank], get_method("tail"), 1.0, num_items=n_items)  # this rank's share of the global loss
    (mine.loss * WORLD).backward()  # FSDP averages gradients over ranks; the shares must add up
    total, kl = mine.loss.detach().clone(), mine.regularizer.detach().clone()
    dist.all_reduce(total)
    grads = trainable_grads(model)
    if rank == 0:
        torch.save({"loss": total, "kl_rank0": kl, "grads": grads, "sharded": sharded}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(*(Path(a) for a in sys.argv[1:4]))


# --- the test -----------------------------------------------------------------------------------
def test_fsdp2_sharded_student_gives_the_one_process_loss_and_lora_gradients(tiny_model_dir, tiny_cache, tmp_path):
    from stages.student.loss_mixin import batch_loss
    from stages.student.methods import get_method

    out = tmp_path / "fsdp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), __file__, str(tiny_model_dir), str(tiny_cache), str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    fsdp = torch.load(out)

    model = seeded_student(tiny_model_dir)
    (whole,), _ = batches(tiny_model_dir, tiny_cache, 1)
    parts = batch_loss(model, whole, get_method("tail"), 1.0)
    parts.loss.backward()
    single = trainable_grads(model)

    assert fsdp["sharded"], "a LoRA parameter was not sharded across the two ranks"
    assert float(fsdp["kl_rank0"]) > 1e-4 and float(parts.regularizer) > 1e-4  # the regularizer is in the loss
    torch.testing.assert_close(fsdp["loss"], parts.loss.detach(), rtol=1e-5, atol=0)
    assert fsdp["grads"].keys() == single.keys() and len(single) > 0
    assert any(g.abs().max() > 0 for n, g in single.items() if "lora_A" in n)
    for name, grad in single.items():
        torch.testing.assert_close(fsdp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
