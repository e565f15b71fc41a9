"""LaLoRA's curvatures (stages/student/curvature.py) against references computed by hand, in float64.

The tiny layer: embedding -> Linear with a peft LoRA adapter -> output head, no mixing across
positions, so each position's gradient is its own. The references never use the project's hooks:
the layer's forward is written out (u = x A^T, v = u B^T, y = x W^T + s v) and autograd gives the
gradients at u and v directly.
"""
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from stages.student.curvature import Curvature, cross_term, estimate_curvature, kron_quadratic
from stages.student.weight_penalties import CurvaturePenalty

D_IN, D_OUT, VOCAB, RANK, ALPHA = 5, 4, 7, 2, 4.0
SCALE = ALPHA / RANK


class TinyLayerLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D_IN)
        self.proj = torch.nn.Linear(D_IN, D_OUT, bias=False)
        self.head = torch.nn.Linear(D_OUT, VOCAB, bias=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.head(self.proj(self.embed(input_ids))))


@dataclass
class Example:
    input_ids: list
    loss_mask: list


def tiny_layer(seed=0):
    torch.manual_seed(seed)
    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]), TinyLayerLM()).double()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():  # B != 0: A's curvature and the cross blocks are not zero
        model.proj.lora_B["default"].weight.normal_(0, 0.5)
    return model


def examples(seed, count=3, length=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        mask = (torch.rand(length - 1, generator=g) < 0.6).tolist()
        mask[-1] = True
        out.append(Example(ids, mask))
    return out


def by_hand(model, example):
    """(x [M, d_in], u = xA^T [M, r], g_u [M, r], g_v [M, d_out], grad A, grad B) at the trained positions."""
    A, B = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
    W, H, E = model.proj.base_layer.weight, model.head.weight, model.embed.weight
    ids, mask = torch.tensor(example.input_ids), torch.tensor(example.loss_mask)
    x = E[ids].detach()
    u = (x @ A.T).detach().requires_grad_(True)
    v = (u @ B.T).detach().requires_grad_(True)
    y = x @ W.T + SCALE * v
    ce = torch.nn.functional.cross_entropy((y @ H.T)[:-1][mask], ids[1:][mask])
    g_v, = torch.autograd.grad(ce, v)     # gradient at lora_B's output: s * dCE/dy
    g_u = g_v @ B                         # gradient at lora_A's output
    keep = torch.cat([mask, torch.tensor([False])])
    grad_a, grad_b = g_u[keep].T @ x[keep], g_v[keep].T @ u[keep].detach()
    return x[keep], u[keep].detach(), g_u[keep], g_v[keep], grad_a, grad_b


def vec(m):
    return m.T.reshape(-1)  # column-major, so vec(g a^T) = a (x) g


def dense_fisher(model, data):
    """1/N sum_n v_n v_n^T, v_n = [vec(grad A); vec(grad B)] of each sequence's mean-token CE."""
    vs = [torch.cat([vec(ga), vec(gb)]) for *_, ga, gb in (by_hand(model, e) for e in data)]
    return sum(torch.outer(v, v) for v in vs) / len(vs)


def brute_kfac(model, data, cross):
    """The Kronecker blocks from factors averaged by hand (expand: inputs over the M trained positions,
    output gradients summed over positions and averaged over the N sequences), as one dense matrix."""
    rows = [by_hand(model, e) for e in data]
    n, m = len(rows), sum(r[0].shape[0] for r in rows)
    x, u, gu, gv = (torch.cat([r[i] for r in rows]) for i in range(4))
    blocks = [[torch.kron(x.T @ x / m, gu.T @ gu / n), torch.kron(x.T @ u / m, gu.T @ gv / n)],
              [torch.kron(u.T @ x / m, gv.T @ gu / n), torch.kron(u.T @ u / m, gv.T @ gv / n)]]
    if not cross:
        blocks[0][1], blocks[1][0] = torch.zeros_like(blocks[0][1]), torch.zeros_like(blocks[1][0])
    return torch.cat([torch.cat(row, dim=1) for row in blocks])


A_NAME, B_NAME = "proj.lora_A.default.weight", "proj.lora_B.default.weight"


def dense_of(curvature: Curvature):
    """The curvature as one dense [vec A; vec B] matrix, via its penalty on the unit vectors (its own maths,
    kron_quadratic and cross_term, polarised: e_i^T F e_j = (q(e_i + e_j) - q(e_i) - q(e_j)) / 2)."""
    shapes = [(RANK, D_IN), (D_OUT, RANK)]
    size = RANK * D_IN + D_OUT * RANK

    def unvec(v):
        a, b = v[: RANK * D_IN], v[RANK * D_IN:]
        return {A_NAME: a.reshape(shapes[0][1], shapes[0][0]).T, B_NAME: b.reshape(shapes[1][1], shapes[1][0]).T}

    eye = torch.eye(size, dtype=torch.float64)
    q = [curvature.quadratic(unvec(eye[i])) for i in range(size)]
    return torch.stack([torch.stack([(curvature.quadratic(unvec(eye[i] + eye[j])) - q[i] - q[j]) / 2 for j in range(size)])
                        for i in range(size)])


def test_diag_is_the_dense_empirical_fishers_diagonal():
    model, data = tiny_layer(), examples(1)
    fisher = estimate_curvature(model, data, "diag")
    expected = torch.diagonal(dense_fisher(model, data))
    got = torch.cat([vec(fisher.diagonal[A_NAME]), vec(fisher.diagonal[B_NAME])])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    assert fisher.sequences == 3 and fisher.positions == sum(sum(e.loss_mask) for e in data)


@pytest.mark.parametrize("kind", ["kfac", "tri_kfac"])
def test_kfac_forms_equal_the_kronecker_products_of_factors_estimated_by_hand(kind):
    model, data = tiny_layer(2), examples(3, count=4)
    curvature = estimate_curvature(model, data, kind)
    torch.testing.assert_close(dense_of(curvature), brute_kfac(model, data, cross=kind == "tri_kfac"), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["kfac", "tri_kfac"])
def test_one_sequence_one_trained_position_is_the_dense_block_exactly(kind):
    model = tiny_layer(4)
    one = [Example([3, 1, 5, 2, 6], [False, False, True, False])]
    dense = dense_fisher(model, one)
    got = dense_of(estimate_curvature(model, one, kind))
    a = RANK * D_IN
    if kind == "kfac":  # the diagonal blocks only
        dense[:a, a:] = 0
        dense[a:, :a] = 0
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-14)


def test_tri_kfac_is_positive_semi_definite_and_differs_from_kfac():
    for seed in range(4):
        model, data = tiny_layer(seed), examples(10 + seed, count=5)
        tri = dense_of(estimate_curvature(model, data, "tri_kfac"))
        assert torch.linalg.eigvalsh(tri).min() > -1e-10 * tri.abs().max()
        block = dense_of(estimate_curvature(model, data, "kfac"))
        assert (tri - block).abs().max() > 1e-3 * block.abs().max()  # the cross blocks are not zero at B != 0


def test_kron_quadratic_and_cross_term_against_explicit_kronecker_products():
    g = torch.Generator().manual_seed(5)
    d_a, d_b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    s_in, s_out = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    s_in, s_out = s_in @ s_in.T, s_out @ s_out.T
    torch.testing.assert_close(kron_quadratic(d_a, s_in, s_out), vec(d_a) @ torch.kron(s_in, s_out) @ vec(d_a))
    c_in, c_out = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(cross_term(d_a, d_b, c_in, c_out), vec(d_a) @ torch.kron(c_in, c_out) @ vec(d_b))


def test_penalty_floor_and_value_against_the_dense_matrix():
    model, data = tiny_layer(6), examples(7)
    curvature = estimate_curvature(model, data, "tri_kfac")
    penalty = CurvaturePenalty(model, curvature.to("cpu", torch.float64), floor=0.1)
    dense = brute_kfac(model, data, cross=True)
    level = 0.1 * float(torch.diagonal(dense).mean().detach())
    assert penalty.level == pytest.approx(level, rel=1e-9)
    with torch.no_grad():
        for _, p in penalty.params:
            p.add_(0.1 * torch.randn_like(p))
    delta = torch.cat([vec(p.detach() - penalty.anchor[n]) for n, p in penalty.params])
    expected = 0.5 * (delta @ dense @ delta + level * delta @ delta)
    assert penalty().item() == pytest.approx(float(expected), rel=1e-5)


class TwiceLM(TinyLayerLM):
    """The adapted Linear called twice per forward: K-FAC's one (input, gradient) pair per position does not exist."""

    def forward(self, input_ids):
        h = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(self.proj(h) + self.proj(h).tanh()))


class WeightOutsideLM(TinyLayerLM):
    """lora_A's weight also used outside `input @ W^T`: the hooks cannot account for its gradient."""

    def forward(self, input_ids):
        out = super().forward(input_ids)
        return SimpleNamespace(logits=out.logits * (1 + self.proj.lora_A["default"].weight.sum()))


@pytest.mark.parametrize("model_class,match", [(TwiceLM, "ran 2 time"), (WeightOutsideLM, "not the product")])
def test_kfac_refuses_weights_it_cannot_factorize(model_class, match):
    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"]), model_class()).double()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():
        model.proj.lora_B["default"].weight.normal_(0, 0.5)
    with pytest.raises(ValueError, match=match):
        estimate_curvature(model, examples(1), "kfac")
    estimate_curvature(model, examples(1), "diag")  # the diagonal needs no factorization
