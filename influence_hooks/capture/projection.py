"""Random projections of per-sample gradients, one fixed projection per layer.

A layer's projection ``P [k, p]`` maps its canonical per-sample gradient ``g [p]`` (layout in
``capture/rules.py``) to ``P g`` with ``E[P^T P] = I``, so every layer preserves its own inner
products in expectation and no layer is reweighted against another (README, "Recording a run":
Projection):

- "gaussian": entries N(0, 1/k); "rademacher": entries +-1/sqrt(k). Dense: ``g @ P^T``.
- "kronecker" (bilinear rules only, LoGra): ``P = P_L (x) P_R`` over ``vec(G)`` (row-major),
  ``P_L [kL, dl]``, ``P_R [kR, dr]`` Gaussian with variances 1/kL and 1/kR. Computed from the
  projected factors, ``vec((L P_L^T)^T (R P_R^T))``, so the ``[dl, dr]`` gradient is never
  formed. A factor whose k reaches its dimension is the identity (exact on that side).
- "none": the exact gradient.

Matrices are drawn on the CPU in float64 from a generator seeded by sha256 of
(seed, layer name, factor tag, shape), then cast and moved, so they are identical on every
device and can be rebuilt after the run from the layer name and its ``ProjectionSpec``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from influence_hooks.capture.rules import LayerRule, compute_dtype, factor_product
from influence_hooks.errors import ConfigurationError

__all__ = ["KINDS", "ProjectionSpec", "plan_projection", "LayerProjector", "split_k", "kronecker_split",
           "any_projected"]

KINDS = ("none", "kronecker", "gaussian", "rademacher")


@dataclass(frozen=True, kw_only=True)
class ProjectionSpec:
    """Everything, besides the layer name, that determines a layer's projection."""

    kind: str = field(metadata={"help": "one of 'none', 'kronecker', 'gaussian', 'rademacher'"})
    seed: int = field(metadata={"help": "run-wide seed; matrices also depend on the layer name"})
    out_dim: int = field(metadata={"help": "length of a projected per-sample gradient"})
    grad_dim: int = field(metadata={"help": "length of the exact canonical per-sample gradient"})
    k_left: int | None = field(default=None, metadata={"help": "kronecker: rows of P_L"})
    k_right: int | None = field(default=None, metadata={"help": "kronecker: rows of P_R"})
    left_dim: int | None = field(default=None, metadata={"help": "kronecker: columns of P_L"})
    right_dim: int | None = field(default=None, metadata={"help": "kronecker: columns of P_R"})

    def __post_init__(self) -> None:
        def bad(why: str) -> ConfigurationError:
            return ConfigurationError(f"invalid ProjectionSpec {self}: {why}")

        if self.kind not in KINDS:
            raise bad(f"kind must be one of {KINDS}")
        kron = (self.k_left, self.k_right, self.left_dim, self.right_dim)
        if self.kind == "kronecker":
            if not all(isinstance(v, int) and v >= 1 for v in kron):
                raise bad("kronecker needs positive k_left, k_right, left_dim, right_dim")
            if self.k_left > self.left_dim or self.k_right > self.right_dim:
                raise bad("a factor's k exceeds its dimension")
            if self.left_dim * self.right_dim != self.grad_dim:
                raise bad("left_dim * right_dim must equal grad_dim")
            if self.out_dim != self.k_left * self.k_right:
                raise bad("out_dim must equal k_left * k_right")
        elif any(v is not None for v in kron):
            raise bad("k_left/k_right/left_dim/right_dim are for kind 'kronecker' only")
        if self.kind == "none" and self.out_dim != self.grad_dim:
            raise bad("kind 'none' keeps the exact gradient: out_dim must equal grad_dim")
        if not 1 <= self.out_dim <= self.grad_dim:
            raise bad("out_dim must be in [1, grad_dim]")

    def to_dict(self) -> dict:
        """JSON-safe dict; ``ProjectionSpec.from_dict`` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProjectionSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) - names:
            raise ConfigurationError(f"unknown ProjectionSpec fields {sorted(set(d) - names)}")
        return cls(**d)


def any_projected(specs) -> bool:
    """Whether any of these layer projections (ProjectionSpecs, or their dicts as stored in a
    manifest) is a random projection rather than the exact gradient."""
    return any((s["kind"] if isinstance(s, dict) else s.kind) != "none" for s in specs)


def split_k(k: int, left_dim: int, right_dim: int) -> tuple[int, int]:
    """Rows ``(kL, kR)`` of the Kronecker factors for a budget of ``k`` output dims.

    Maximises ``kL * kR <= k`` with ``kL <= left_dim``, ``kR <= right_dim``, keeping the two
    within a factor 2 of each other unless a factor is capped by its dimension (a lopsided split
    such as ``k x 1`` would leave one side almost unprojected and the other nearly rank one).
    Ties go to the most balanced pair, then to the one compressing both sides most evenly.
    """

    def score(kl: int) -> tuple[bool, int, int, float]:
        kr = min(right_dim, k // kl)
        balanced = (kl <= 2 * kr or kr == right_dim) and (kr <= 2 * kl or kl == left_dim)
        evenness = -abs(math.log(kl * right_dim / (kr * left_dim)))
        return balanced, kl * kr, -abs(kl - kr), evenness

    kl = max(range(1, min(left_dim, k) + 1), key=score)
    return kl, min(right_dim, k // kl)


def kronecker_split(k: int, left_dim: int, right_dim: int, prefer: str = "left") -> tuple[int, int]:
    """Rows ``(kL, kR)`` of the Kronecker factors as ``plan_projection`` chooses them: the identity
    on a factor whose dimension d is at most ``2 sqrt(k)``, the budget's ``k // d`` rows on the
    other side; otherwise ``split_k``'s balanced split.

    The identity loses nothing in expectation and no more in variance: for a gradient ``a b^T``
    the squared norm through Gaussian factors has relative variance ``2/kL + 2/kR + 4/(kL kR)``,
    ``4/sqrt(k) + 4/k`` when balanced, and ``2 d / k`` with the identity on a side of dimension
    d, no larger exactly when ``d <= 2 sqrt(k) + 2``. It is also cheaper: that side is not
    projected at all. When both sides qualify, ``prefer`` (the side whose unprojected factor is a
    view, the output gradient's) takes the identity.
    """
    sides = [("left", left_dim, right_dim), ("right", right_dim, left_dim)]
    if prefer != "left":
        sides.reverse()
    for side, d, other in sides:
        if d <= min(k, 2 * math.sqrt(k)):
            k_other = min(other, k // d)
            return (d, k_other) if side == "left" else (k_other, d)
    return split_k(k, left_dim, right_dim)


def plan_projection(
    layer_name: str,
    module: nn.Module,
    rule: LayerRule,
    k: int | None,
    kind: str = "auto",
    seed: int = 0,
) -> ProjectionSpec:
    """Choose a layer's projection for a budget of ``k`` output dims.

    ``k`` None, kind "none", or ``k >= grad_dim``: exact. kind "auto": "kronecker" for bilinear
    rules (``out_dim = kL * kR <= k``, split by ``kronecker_split``), "gaussian" otherwise
    (``out_dim = k``). Runs recorded before the split took the identity on small factors keep
    their own ``k_left`` / ``k_right`` in their manifest and are rebuilt from it.
    """
    if kind not in ("auto", *KINDS):
        raise ConfigurationError(
            f"{layer_name}: projection kind {kind!r} not in {('auto', *KINDS)}"
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1):
        raise ConfigurationError(
            f"{layer_name}: projection dim k must be a positive int, got {k!r}"
        )
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ConfigurationError(f"{layer_name}: seed must be an int, got {seed!r}")
    k, seed = (None if k is None else int(k)), int(seed)  # JSON-safe spec fields
    grad_dim = rule.grad_dim(module)
    if k is None or kind == "none" or k >= grad_dim:
        return ProjectionSpec(kind="none", seed=seed, out_dim=grad_dim, grad_dim=grad_dim)
    bilinear = rule.is_bilinear(module)
    if kind == "auto":
        kind = "kronecker" if bilinear else "gaussian"
    if kind != "kronecker":
        return ProjectionSpec(kind=kind, seed=seed, out_dim=k, grad_dim=grad_dim)
    if not bilinear:
        raise ConfigurationError(
            f"{layer_name}: a Kronecker projection needs a bilinear layer rule, and "
            f"{type(module).__name__} (rule {rule.name!r}) is not; use 'gaussian' or 'auto'"
        )
    left_dim, right_dim = rule.factor_dims(module)
    k_left, k_right = kronecker_split(k, left_dim, right_dim, prefer=getattr(rule, "grad_side", "left"))
    return ProjectionSpec(
        kind="kronecker",
        seed=seed,
        out_dim=k_left * k_right,
        grad_dim=grad_dim,
        k_left=k_left,
        k_right=k_right,
        left_dim=left_dim,
        right_dim=right_dim,
    )


def _generator_seed(seed: int, layer_name: str, tag: str, shape: tuple[int, int]) -> int:
    """Stable across processes and versions (unlike ``hash()``)."""
    payload = json.dumps([seed, layer_name, tag, list(shape)]).encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little") >> 1


def _random_matrix(kind: str, seed: int, layer_name: str, tag: str, rows: int, cols: int) -> Tensor:
    """``[rows, cols]`` float64 on the CPU with ``E[P^T P] = I`` (entry variance 1/rows)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_generator_seed(seed, layer_name, tag, (rows, cols)))
    if kind == "rademacher":
        m = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64) * 2 - 1
    else:
        m = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return m / math.sqrt(rows)


def _layout_key(module: nn.Module) -> tuple:
    """What a layer's planned projection and its compute dtype depend on, cheap enough to compare
    at every hook call: each own parameter's shape, dtype and whether it is trained."""
    return tuple((p.shape, p.dtype, p.requires_grad) for p in module._parameters.values() if p is not None)


class LayerProjector:
    """Applies one layer's fixed projection to per-sample gradients from its hooks.

    Matrices are built lazily and cached per (device, dtype).
    """

    def __init__(self, layer_name: str, module: nn.Module, rule: LayerRule, spec: ProjectionSpec):
        self.layer_name, self.rule, self.spec = layer_name, rule, spec
        self._check_layout(module)
        self._layout = _layout_key(module)
        # kept for dense_matrix, which is called without the module
        self._index = rule.canonical_index(module) if spec.kind == "kronecker" else None
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor | None, ...]] = {}
        self._kernels: dict[tuple, tuple[torch.dtype, Callable]] = {}  # see _kernel

    def _check_layout(self, module: nn.Module) -> None:
        spec, rule = self.spec, self.rule
        ok = rule.grad_dim(module) == spec.grad_dim
        if ok and spec.kind == "kronecker":
            ok = rule.is_bilinear(module) and tuple(rule.factor_dims(module)) == (
                spec.left_dim,
                spec.right_dim,
            )
        if not ok:
            raise ConfigurationError(
                f"{self.layer_name}: projection spec {spec} does not fit {type(module).__name__} "
                "with its current trainable parameters (were parameters frozen or unfrozen "
                "after planning?)"
            )

    def _host_matrices(self) -> tuple[Tensor | None, ...]:
        """float64 CPU: ``(P_L, P_R)`` for kronecker (None = identity), ``(P,)`` for dense."""
        s = self.spec
        if s.kind == "kronecker":
            sides = (("left", s.k_left, s.left_dim), ("right", s.k_right, s.right_dim))
            return tuple(
                None
                if k == d
                else _random_matrix("gaussian", s.seed, self.layer_name, f"kronecker/{tag}", k, d)
                for tag, k, d in sides
            )
        if s.kind == "none":
            return ()
        return (_random_matrix(s.kind, s.seed, self.layer_name, s.kind, s.out_dim, s.grad_dim),)

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
        mats = self._cache.get((device, dtype))  # every hook call: the key as given first
        if mats is None:
            key = (torch.device(device), dtype)
            if key not in self._cache:
                self._cache[key] = tuple(
                    None if m is None else m.to(dtype=dtype).to(device) for m in self._host_matrices()
                )
            mats = self._cache[(device, dtype)] = self._cache[key]
        return mats

    def _kernel(self, module: nn.Module, grad_output: Tensor) -> tuple[torch.dtype, Callable]:
        """``(compute dtype, kernel)`` for this module and this gradient's device and dtype: the
        kernel, ``(module, inputs, output, grad_output, out) -> [N, out_dim]``, has the projection
        bound (the rule's ``bind``), so a hook call does only the per-batch arithmetic."""
        key = (id(module), grad_output.device, grad_output.dtype)
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = self._kernels[key] = self._build_kernel(module, grad_output)
        return kernel

    def _build_kernel(self, module: nn.Module, grad_output: Tensor) -> tuple[torch.dtype, Callable]:
        dtype = compute_dtype(module, grad_output)
        mats = self._matrices(grad_output.device, dtype)
        s, rule = self.spec, self.rule
        if s.kind == "none":
            def exact(module, inputs, output, grad_output, out):
                g = rule.exact(module, inputs, output, grad_output)
                return g if out is None else out.copy_(g)

            return dtype, exact
        if s.kind != "kronecker":
            p_t = mats[0].T

            def dense(module, inputs, output, grad_output, out):
                return torch.mm(rule.exact(module, inputs, output, grad_output), p_t, out=out)

            return dtype, dense
        kl, kr = s.k_left, s.k_right
        factors = rule.bind(module, *mats, dtype)
        # With more positions than output-gradient dims (convolutions), summing over positions
        # before projecting that side, P_L (L^T R) instead of (L P_L^T)^T R, is the same projection
        # at less cost, and the projected per-position factor is never materialised.
        left_side = rule.grad_side == "left"
        p_grad = mats[0] if left_side else mats[1]
        d_grad = s.left_dim if left_side else s.right_dim
        if p_grad is not None:
            summed_first = rule.bind(module, None, mats[1], dtype) if left_side else rule.bind(module, mats[0], None, dtype)
            p_grad = p_grad if left_side else p_grad.T

        def kronecker(module, inputs, output, grad_output, out):
            n = grad_output.shape[0]
            result = None if out is None else out.view(n, kl, kr)
            if p_grad is not None and grad_output.numel() > n * d_grad * d_grad:
                m = factor_product(*summed_first(inputs, grad_output))  # output-gradient side exact
                p = p_grad.expand(n, *p_grad.shape)
                result = torch.bmm(p, m, out=result) if left_side else torch.bmm(m, p, out=result)
            else:
                result = factor_product(*factors(inputs, grad_output), out=result)
            return result.reshape(n, -1) if out is None else out  # a copy when the product is not row-major

        return dtype, kronecker

    def per_sample(self, module: nn.Module, inputs: tuple, output: Tensor, grad_output: Tensor,
                   out: Tensor | None = None) -> Tensor:
        """Projected per-sample gradients ``[N, out_dim]`` in ``compute_dtype`` (exact if kind
        "none"). Arguments as a forward hook / full backward hook see them. With ``out`` (an
        ``[N, out_dim]`` view, e.g. this layer's columns of a row block) the result is written
        there and ``out`` is returned."""
        if torch.is_grad_enabled():  # called directly with tensors still attached to the graph
            with torch.no_grad():
                return self.per_sample(module, inputs, output, grad_output, out)
        layout = _layout_key(module)
        if layout != self._layout:  # parameters frozen, unfrozen or recast since the last call
            self._check_layout(module)
            self._layout, self._kernels = layout, {}
        dtype, kernel = self._kernel(module, grad_output)
        if out is not None and out.dtype != dtype:
            return out.copy_(kernel(module, inputs, output, grad_output, None))
        return kernel(module, inputs, output, grad_output, out)

    def project_exact(self, flat: Tensor) -> Tensor:
        """Project exact canonical per-sample gradients ``[N, grad_dim]`` (computed elsewhere, e.g.
        by torch.func) the way ``per_sample`` projects them during recording: ``[N, out_dim]``, on
        the CPU in ``flat``'s dtype."""
        flat = flat.cpu()
        dtype, n, s = flat.dtype, flat.shape[0], self.spec
        if s.kind == "none":
            return flat
        if s.kind == "kronecker":
            p_left, p_right = self.kronecker_factors(dtype)
            g = torch.zeros(n, s.left_dim * s.right_dim, dtype=dtype)
            g[:, self._index] = flat
            g = g.view(n, s.left_dim, s.right_dim)
            return (p_left @ g @ p_right.T).reshape(n, -1)
        return flat @ self._matrices("cpu", dtype)[0].T

    def kronecker_factors(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(P_L [kL, dl], P_R [kR, dr])`` on the CPU, identities materialised."""
        if self.spec.kind != "kronecker":
            raise ConfigurationError(f"{self.layer_name}: projection kind is {self.spec.kind!r}")
        s = self.spec
        eyes = (torch.eye(s.left_dim, dtype=dtype), torch.eye(s.right_dim, dtype=dtype))
        return tuple(e if m is None else m for m, e in zip(self._matrices("cpu", dtype), eyes))

    def dense_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The equivalent ``[out_dim, grad_dim]`` matrix over the canonical layout (CPU).

        Builds the full Kronecker product: for tests and post-hoc use on modest layers.
        """
        if self.spec.kind == "none":
            return torch.eye(self.spec.grad_dim, dtype=dtype)
        if self.spec.kind != "kronecker":
            return self._matrices("cpu", dtype)[0].clone()
        p = torch.kron(*self.kronecker_factors(dtype))  # over row-major vec(G)
        # canonical entry c is vec(G)[index[c]], so its column is p[:, index[c]]
        return p[:, self._index]
