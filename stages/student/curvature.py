"""LaLoRA's curvature: the empirical Fisher of the source cross-entropy over the adapter's trainable
weights, in the three forms of LaLoRA (arXiv 2512.17720, Sec. 3): `diag`, `kfac` (block-diagonal
K-FAC) and `tri_kfac` (block tri-diagonal K-FAC).

The Fisher (the same one for all three forms): N proxy sequences n, each with its mean-token CE_n
over its trained positions (the loss mask), at the current weights, model in eval mode:

    F = 1/N * sum_n  vec(grad CE_n) vec(grad CE_n)^T                  (empirical Fisher, dense)

`diag` keeps its diagonal exactly: F_i = 1/N sum_n (d CE_n / d theta_i)^2.

`kfac`: one Kronecker block per weight W [d_out, d_in] of a trainable nn.Linear (peft's lora_A and
lora_B). With a_t the layer's input and g_t = d CE_n / d y_t the gradient at its output at position
t, grad W = sum_t g_t a_t^T, so vec(grad W) = sum_t a_t (x) g_t (column-major vec). K-FAC "expand"
(Eschenhagen et al., NeurIPS 2023) drops the cross-position terms and factorizes the expectation
(Martens & Grosse, ICML 2015):

    F_W ~= Sigma_in (x) Sigma_out,   Sigma_in  = 1/M sum_{n,t} a_t a_t^T       [d_in, d_in]
                                     Sigma_out = 1/N sum_{n,t} g_t g_t^T       [d_out, d_out]

over the M trained positions t of the N sequences (positions outside the loss mask carry gradient
through attention but are left out of both factors). For lora_A: a = x, g = s B^T g_y; for lora_B:
a = A x, g = s g_y (s the LoRA scaling): the factors are read from hooks on the two nn.Linear
modules, so the scaling is in them. On one sequence with one trained position, and a layer with no
mixing across positions, the product is the dense block exactly (tests). The penalty of a block is
1/2 vec(D)^T (Sigma_in (x) Sigma_out) vec(D) = 1/2 tr(D^T Sigma_out D Sigma_in), never formed as a
Kronecker product: O(d_out^2 d_in + d_out d_in^2) per block and step.

`tri_kfac` adds, per adapted module, the cross block between its lora_A and lora_B:

    F_AB ~= Sigma_in^AB (x) Sigma_out^AB,   Sigma_in^AB = 1/M sum a_A a_B^T  [d_in, r]
                                            Sigma_out^AB = 1/N sum g_A g_B^T [r, d_out]

and the penalty gains vec(D_A)^T F_AB vec(D_B) = <D_A, Sigma_out^AB D_B (Sigma_in^AB)^T>. It is
positive semi-definite by construction: with the joint second moments C_a = 1/M sum [a_A; a_B][a_A; a_B]^T
and C_g = 1/N sum [g_A; g_B][g_A; g_B]^T (both PSD), the 2x2-block matrix [[F_AA, F_AB], [F_BA, F_BB]]
is the principal submatrix of C_a (x) C_g on the rows (a-block i, g-block i), and a principal
submatrix of a PSD matrix is PSD. (It is the K-FAC tri-diagonal *structure* of Martens & Grosse's
Sec. 4.3 restricted to the A-B pair of each module; their block-tridiagonal *inverse* is not needed:
the Laplace penalty uses F itself.)

Parameters a Kronecker form does not cover (DoRA's magnitude vectors) keep their exact diagonal in
`kfac` and `tri_kfac`. Adapters whose trainable weights are not applied as a Linear layer's
`input @ W^T` (randlora's scaling vectors, sinelora's sin(w BA)) are refused for kfac/tri_kfac: the
check `sum_t g_t a_t^T == grad W` on the first sequence names the parameter where it fails.

The floor (why: stages/student/weight_penalties.py): every form gets the same isotropic term
`floor * mean diagonal of F` added, the diagonal of a Kronecker block being diag(Sigma_in) (x) diag(Sigma_out).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from stages.student.variants import LALORA_CURVATURES

__all__ = ["CURVATURES", "Curvature", "estimate_curvature", "kron_quadratic", "cross_term"]

CURVATURES = LALORA_CURVATURES


class _KronQuadratic(torch.autograd.Function):
    """<D, G> with G = Sigma_out D Sigma_in, and its gradient 2 G (Sigma_in, Sigma_out symmetric): the d^2 r
    products run once per step, in the forward, instead of again in autograd's backward of <Sigma_out D, D Sigma_in>
    (a step's penalty reads each Sigma once: half the time at hidden 1024, rank 16; pipeline/bench/penalty.py)."""

    @staticmethod
    def forward(ctx, delta: torch.Tensor, sigma_in: torch.Tensor, sigma_out: torch.Tensor) -> torch.Tensor:
        g = sigma_out @ delta @ sigma_in  # left to right: an r x r product first for lora_A, last for lora_B
        ctx.save_for_backward(g)
        return (delta * g).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        g, = ctx.saved_tensors
        return 2 * grad * g, None, None


def kron_quadratic(delta: torch.Tensor, sigma_in: torch.Tensor, sigma_out: torch.Tensor) -> torch.Tensor:
    """vec(D)^T (Sigma_in (x) Sigma_out) vec(D) = tr(D^T Sigma_out D Sigma_in) for D [d_out, d_in]
    (column-major vec), Sigma_in [d_in, d_in], Sigma_out [d_out, d_out] symmetric. 0-dim tensor; its gradient
    to D (only: the Sigmas take none here) is 2 Sigma_out D Sigma_in."""
    if sigma_in.requires_grad or sigma_out.requires_grad:
        raise ValueError("kron_quadratic: Sigma_in and Sigma_out are constants (the curvature), not trainable")
    return _KronQuadratic.apply(delta, sigma_in, sigma_out)


def cross_term(delta_a: torch.Tensor, delta_b: torch.Tensor, sigma_in: torch.Tensor, sigma_out: torch.Tensor) -> torch.Tensor:
    """vec(D_A)^T (Sigma_in^AB (x) Sigma_out^AB) vec(D_B) for D_A [r, d_in], D_B [d_out, r],
    Sigma_in^AB [d_in, r], Sigma_out^AB [r, d_out]: (P (x) Q) vec(X) = vec(Q X P^T). 0-dim tensor."""
    return (delta_a * (sigma_out @ delta_b @ sigma_in.T)).sum()


@dataclass
class Curvature:
    """One estimate of F for a model's trainable parameters (names as in `named_parameters`).

    diagonal  {name: F_i, like the parameter}: every parameter (`diag`) or the ones no block covers
    kron      {weight name: (Sigma_in [d_in, d_in], Sigma_out [d_out, d_out])}
    cross     {(lora_A weight name, lora_B weight name): (Sigma_in^AB [d_in, r], Sigma_out^AB [r, d_out])}
    Tensors are float32 (float64 for a float64 model). `sequences`/`positions`: N and M.
    """
    kind: str
    diagonal: dict[str, torch.Tensor] = field(default_factory=dict)
    kron: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cross: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    sequences: int = 0
    positions: int = 0

    def mean_diagonal(self) -> float:
        """The mean of F's diagonal over every covered entry (what the floor scales)."""
        total = sum(float(d.sum()) for d in self.diagonal.values())
        total += sum(float(torch.diagonal(i).sum() * torch.diagonal(o).sum()) for i, o in self.kron.values())
        entries = sum(d.numel() for d in self.diagonal.values()) + sum(i.shape[0] * o.shape[0] for i, o in self.kron.values())
        return total / entries

    def quadratic(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """vec(D)^T F vec(D) (no 1/2, no floor) for {name: D}; every name of the curvature must be given."""
        terms = [(self.diagonal[n] * deltas[n] * deltas[n]).sum() for n in self.diagonal]
        terms += [kron_quadratic(deltas[n], i, o) for n, (i, o) in self.kron.items()]
        terms += [2 * cross_term(deltas[a], deltas[b], i, o) for (a, b), (i, o) in self.cross.items()]
        return torch.stack(terms).sum()

    def to(self, device, dtype=torch.float32) -> Curvature:
        move = lambda t: t.to(device, dtype)  # noqa: E731
        return Curvature(self.kind, {n: move(d) for n, d in self.diagonal.items()},
                         {n: (move(i), move(o)) for n, (i, o) in self.kron.items()},
                         {k: (move(i), move(o)) for k, (i, o) in self.cross.items()}, self.sequences, self.positions)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat {key: tensor} for safetensors (`from_tensors` inverts it)."""
        flat = {f"diag::{n}": d for n, d in self.diagonal.items()}
        for n, (i, o) in self.kron.items():
            flat[f"kron_in::{n}"], flat[f"kron_out::{n}"] = i, o
        for (a, b), (i, o) in self.cross.items():
            flat[f"cross_in::{a}::{b}"], flat[f"cross_out::{a}::{b}"] = i, o
        return {k: v.contiguous() for k, v in flat.items()}

    @classmethod
    def from_tensors(cls, kind: str, flat: dict[str, torch.Tensor], sequences: int, positions: int) -> Curvature:
        out = cls(kind, sequences=sequences, positions=positions)
        for key, value in flat.items():
            part, _, rest = key.partition("::")
            if part == "diag":
                out.diagonal[rest] = value
            elif part == "kron_in":
                out.kron[rest] = (value, flat[f"kron_out::{rest}"])
            elif part == "cross_in":
                a, b = rest.split("::")
                out.cross[(a, b)] = (value, flat[f"cross_out::{rest}"])
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


# --- estimation ------------------------------------------------------------------------------------
class _LinearRecorder:
    """Forward hooks on the trainable nn.Linear modules: each call's input, and the output gradient of
    the calls the loss depends on (DoRA also calls lora_A/lora_B on an identity matrix to form BA for
    its detached norm: that call gets no gradient and is not a position of the data)."""

    def __init__(self, modules: dict[str, torch.nn.Linear]) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, dict[int, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            calls = self.inputs.setdefault(name, [])
            calls.append(args[0].detach())
            if output.requires_grad:
                index = len(calls) - 1
                output.register_hook(lambda grad: self.grads.setdefault(name, {}).__setitem__(index, grad.detach()))
        return hook

    def used_call(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, output gradient) of the one call of `name` whose output the loss depends on."""
        grads = self.grads.get(name, {})
        if len(grads) != 1:
            raise ValueError(f"train.lalora_curvature: the Linear {name!r} ran {len(grads)} time(s) per forward with an output "
                             "the loss depends on; K-FAC needs exactly one (use lalora_curvature=diag for this adapter)")
        (index, grad), = grads.items()
        return self.inputs[name][index], grad

    def clear(self) -> None:
        self.inputs.clear(), self.grads.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _trainable_linears(model: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Linear]:
    """{weight parameter name: its nn.Linear} for every Linear whose (only trainable) weight is trainable."""
    found = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and f"{name}.weight" in params and (module.bias is None or not module.bias.requires_grad):
            found[f"{name}.weight"] = module
    return found


def _lora_pairs(kron_names: list[str]) -> list[tuple[str, str]]:
    """(lora_A weight, lora_B weight) of each adapted module, paired by name (peft: <m>.lora_A.<adapter>.weight)."""
    names = set(kron_names)
    return [(n, n.replace(".lora_A.", ".lora_B.")) for n in kron_names if ".lora_A." in n and n.replace(".lora_A.", ".lora_B.") in names]


def estimate_curvature(model: torch.nn.Module, examples, kind: str = "diag") -> Curvature:
    """The raw (unfloored) empirical Fisher of `kind` in CURVATURES at the model's current weights.

    `examples`: `stages.data.inputs.Example`s (input_ids [T], loss_mask [T-1] bool), one forward and
    backward each (batch size one: `diag` needs every sequence's own gradient), model in eval mode,
    its .grad fields left as they were. Returns a `Curvature` in float32 (float64 for a float64 model).
    ValueError: unknown kind, no example with a trained position, or (kfac, tri_kfac) a trainable
    weight whose gradient is not the product of its Linear's input and output gradient.
    """
    if kind not in CURVATURES:
        raise ValueError(f"train.lalora_curvature: {kind!r} not in {CURVATURES}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("curvature: the model has no trainable parameters")
    dtype = torch.float64 if next(iter(params.values())).dtype == torch.float64 else torch.float32
    device = next(iter(params.values())).device
    linears = _trainable_linears(model, params) if kind != "diag" else {}
    pairs = _lora_pairs(list(linears)) if kind == "tri_kfac" else []
    diag_names = [n for n in params if n not in linears]
    sq = {n: torch.zeros(params[n].shape, dtype=dtype, device=device) for n in diag_names}
    s_in = {n: torch.zeros(m.in_features, m.in_features, dtype=dtype, device=device) for n, m in linears.items()}
    s_out = {n: torch.zeros(m.out_features, m.out_features, dtype=dtype, device=device) for n, m in linears.items()}
    x_in = {p: torch.zeros(linears[p[0]].in_features, linears[p[1]].in_features, dtype=dtype, device=device) for p in pairs}
    x_out = {p: torch.zeros(linears[p[0]].out_features, linears[p[1]].out_features, dtype=dtype, device=device) for p in pairs}
    modules = {n[: -len(".weight")]: m for n, m in linears.items()}
    recorder = _LinearRecorder(modules) if linears else None
    saved_grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    model.eval()
    sequences = positions = 0
    try:
        for example in examples:
            ids = torch.as_tensor(example.input_ids, dtype=torch.long, device=device)[None]
            mask = torch.as_tensor(example.loss_mask, dtype=torch.bool, device=device)
            if not bool(mask.any()):
                continue
            if recorder:
                recorder.clear()
            logits = model(input_ids=ids).logits[0, :-1][mask]
            ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ids[0, 1:][mask])
            grads = dict(zip(params, torch.autograd.grad(ce, list(params.values()), allow_unused=True)))
            for n in diag_names:
                if grads[n] is not None:
                    sq[n] += grads[n].to(dtype) ** 2
            if linears:
                factors = {}
                for n in linears:
                    factors[n] = _factors(n, recorder, grads[n], mask, check=sequences == 0)
                    a, g = factors[n]
                    s_in[n] += a.T @ a
                    s_out[n] += g.T @ g
                for pa, pb in pairs:
                    x_in[(pa, pb)] += factors[pa][0].T @ factors[pb][0]
                    x_out[(pa, pb)] += factors[pa][1].T @ factors[pb][1]
            sequences += 1
            positions += int(mask.sum())
    finally:
        if recorder:
            recorder.remove()
        model.train(was_training)
        for n, p in params.items():
            p.grad = saved_grads[n]
    if sequences == 0:
        raise ValueError("train.fisher_data: no example with a trained position")
    out = Curvature(kind, {n: s / sequences for n, s in sq.items()}, sequences=sequences, positions=positions)
    out.kron = {n: (s_in[n] / positions, s_out[n] / sequences) for n in linears}
    out.cross = {p: (x_in[p] / positions, x_out[p] / sequences) for p in pairs}
    return out


def _factors(weight: str, recorder: _LinearRecorder, grad: torch.Tensor | None, mask: torch.Tensor, check: bool):
    """(a [M, d_in], g [M, d_out]) at the trained positions of one sequence for one Linear weight;
    on the first sequence, checks that the hooks account for the whole gradient."""
    a, g = recorder.used_call(weight[: -len(".weight")])
    a, g = a[0], g[0]  # [T, d_in], [T, d_out]
    dtype = torch.float64 if grad is not None and grad.dtype == torch.float64 else torch.float32
    a, g = a.to(dtype), g.to(dtype)
    if check:
        whole = g.T @ a
        expected = torch.zeros_like(whole) if grad is None else grad.to(dtype)
        scale = float(expected.abs().max()) or 1.0
        if float((whole - expected).abs().max()) > 1e-3 * scale + 1e-12:
            raise ValueError(f"train.lalora_curvature: the gradient of {weight!r} is not the product of its Linear's output "
                             "gradient and input (the adapter uses the weight outside `input @ W^T`); use lalora_curvature=diag")
    keep = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    keep[: mask.shape[0]] = mask
    return a[keep], g[keep]
