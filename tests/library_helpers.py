"""Helpers shared by the library-API and TRL tests: docs/library.md snippets run as printed, and a non-zero adapter."""
from __future__ import annotations

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SNIPPETS = REPO / "docs" / "library.md"


def readme_snippet(name: str) -> str:
    """The python block right after `<!-- snippet: name -->` in docs/library.md."""
    found = re.search(rf"<!-- snippet: {name} -->\s*```python\n(.*?)```", SNIPPETS.read_text(), re.S)
    assert found, f"docs/library.md has no snippet {name!r}"
    return found.group(1)


def run_snippet(code: str, model_dir: Path, cache_dir: Path, out: Path) -> dict:
    """exec the docs' code with the tiny model, cache and a temp output dir in place of its paths;
    returns its namespace. Each path must appear in the code (a snippet that stopped naming one fails)."""
    for old, new in (("build/default/base-model", model_dir), ("runs/demo/cache", cache_dir), ("runs/my-trainer", out)):
        assert old in code, old
        code = code.replace(old, str(new))
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(code, "docs/library.md", "exec"), namespace)
    return namespace


def perturb_adapter(model: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """Give every lora_B a seeded non-zero value (at init B = 0 and the adapter changes nothing, so a
    comparison would not see it); returns a copy of the trainable (adapter) parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step_loss(trainer, ref, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`trainer.compute_loss` and `ref.compute_loss` on one batch give the same loss, CE and KL (float32,
    atol 1e-6), with a KL (> 1e-3) that moves the loss. Eval mode: no logging window is touched, and
    dropout is 0, so the values are the training step's. Returns `trainer`'s (loss, {"ce", "kl"})."""
    n_items = (batch["labels"][:, 1:] != -100).sum()
    trainer.model.eval()
    ref.model.eval()
    with torch.no_grad():
        loss, parts = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True, num_items_in_batch=n_items)
        ref_loss, ref_parts = ref.compute_loss(ref.model, dict(batch), return_outputs=True, num_items_in_batch=n_items)
    assert ref_parts["kl"].item() > 1e-3
    for got, want in ((loss, ref_loss), (parts["ce"], ref_parts["ce"]), (parts["kl"], ref_parts["kl"])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return loss, parts
