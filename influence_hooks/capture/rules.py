"""Per-layer capture rules: each sample's gradient w.r.t. one module's own parameters.

A rule turns what a module's hooks see -- the forward ``inputs``, the ``output`` and
``grad_output`` (the gradient of some scalar w.r.t. the output) -- into per-sample gradients of
that scalar w.r.t. the module's own trainable parameters (``recurse=False``). The batch is dim 0
of the first input and of the output; every other position (sequence, spatial) is summed.

Canonical exact layout, shared by every rule, by projection and by storage: for each trainable
own parameter in ``module.named_parameters(recurse=False)`` order, its per-sample gradient
flattened row-major, concatenated: ``[N, grad_dim]``.

Layer types register a rule with ``@register_rule(nn.Linear)`` (Opacus style); ``rule_for``
walks the module's MRO and falls back to a generic torch.func rule (``FuncRule``).

Bilinear layers (Linear, Conv, Embedding, GPT-2 Conv1D) have per-sample gradients
``G_n = L_n^T R_n`` with factors ``L [N, T, dl]`` and ``R [N, T, dr]``; a bias is folded in as a
constant-1 column of the input-side factor. ``G_n`` is ``[dl, dr]``; its row-major entries are a
permutation of the canonical layout (``canonical_index``). Projection (``projection.py``) uses
the factors so that the full gradient is never formed.
"""

from __future__ import annotations

import inspect
from typing import Callable, ClassVar

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_hooks.errors import InfluenceHooksError

__all__ = [
    "UnsupportedModuleError",
    "LayerRule",
    "BilinearRule",
    "FuncRule",
    "register_rule",
    "refuse_module",
    "rule_for",
    "compute_dtype",
    "factor_product",
    "row_projector",
    "own_trainable",
    "trainable",
]


class UnsupportedModuleError(InfluenceHooksError, TypeError):
    """No capture rule can compute exact per-sample gradients for this module."""


# type, or "module.QualName" for classes of optional packages (matched without importing them)
_RULES: dict[type | str, LayerRule] = {}
_REFUSED: dict[type | str, str] = {}


def _key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_rule(*module_types: type | str):
    """Class decorator registering a ``LayerRule`` subclass for the given module types.

    A type may be given as a dotted string ("transformers.pytorch_utils.Conv1D") so that an
    optional package is never imported just to register its layers.
    """

    def decorate(rule_cls: type[LayerRule]) -> type[LayerRule]:
        rule = rule_cls()
        for t in module_types:
            _RULES[t] = rule
        return rule_cls

    return decorate


def refusal_reason(module: nn.Module) -> str | None:
    """Why `module`'s type is refused (it mixes samples, or cannot be hooked per sample), or None."""
    for cls in type(module).__mro__:
        reason = _REFUSED.get(cls, _REFUSED.get(_key(cls)))
        if reason is not None:
            return reason
        if cls in _RULES or _key(cls) in _RULES:
            return None
    return None


def refuse_module(module_type: type | str, reason: str) -> None:
    """Declare that modules of this type (and subclasses) cannot be captured, and why."""
    _REFUSED[module_type] = reason


def supported_types() -> list[str]:
    """Registered module types, e.g. ["Linear", ..., "transformers Conv1D"]."""
    names = (
        f"{t.split('.')[0]} {t.rsplit('.', 1)[-1]}" if isinstance(t, str) else t.__name__
        for t in _RULES
    )
    return list(dict.fromkeys(names))


def _unsupported(module: nn.Module, reason: str) -> UnsupportedModuleError:
    return UnsupportedModuleError(
        f"cannot capture per-sample gradients of {type(module).__name__}: {reason}. "
        f"Supported exactly: {', '.join(supported_types())}; any other module with trainable "
        "parameters of its own whose forward maps one tensor to one tensor, sample by sample, "
        "goes through the generic torch.func rule."
    )


def own_trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable own parameters in canonical (``named_parameters(recurse=False)``) order."""
    return {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}


def trainable(module: nn.Module, name: str) -> bool:
    """Whether ``module.<name>`` is an own parameter that requires grad."""
    p = module._parameters.get(name)
    return p is not None and p.requires_grad


def compute_dtype(module: nn.Module, grad_output: Tensor) -> torch.dtype:
    """float64 if the module's parameters are float64; float32 for fp16/bf16 (upcast, so that
    summing over positions does not lose precision); otherwise the gradient's dtype."""
    # called in every hook: the parameter dict itself, not the named_parameters() generators
    if any(p is not None and p.dtype == torch.float64 for p in module._parameters.values()):
        return torch.float64
    if grad_output.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return grad_output.dtype


def rule_for(module: nn.Module) -> LayerRule:
    """The capture rule for ``module``; raises ``UnsupportedModuleError`` with the reason.

    A registered rule applies to a subclass only if the subclass keeps the registered forward
    and has no extra trainable own parameters; otherwise only the generic rule is correct.
    """
    own = own_trainable(module)
    if not own:
        raise _unsupported(
            module,
            "it has no trainable parameters of its own (capture attaches to the modules that "
            "own parameters, e.g. its submodules)",
        )
    for cls in type(module).__mro__:  # the most derived registration, rule or refusal, wins
        reason = _REFUSED.get(cls, _REFUSED.get(_key(cls)))
        if reason is not None:
            raise _unsupported(module, reason)
        rule = _RULES.get(cls, _RULES.get(_key(cls)))
        if rule is None:
            continue
        if type(module).forward is cls.forward and set(own) <= set(rule.param_names):
            rule.check(module)
            return rule
        break
    FuncRule.check_static(module)
    return _FUNC_RULE


class LayerRule:
    """Per-sample gradients of one module type. Stateless: one instance serves every module."""

    name: ClassVar[str] = ""
    #: own parameters the rule knows how to differentiate (a subset may be trainable)
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def check(self, module: nn.Module) -> None:
        """Raise ``UnsupportedModuleError`` for configurations the rule cannot handle."""

    def param_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        """Trainable own parameters in canonical order: name -> shape."""
        return {n: tuple(p.shape) for n, p in own_trainable(module).items()}

    def grad_dim(self, module: nn.Module) -> int:
        """Length of the canonical exact per-sample gradient."""
        return sum(int(torch.Size(s).numel()) for s in self.param_shapes(module).values())

    def is_bilinear(self, module: nn.Module) -> bool:
        """Whether per-sample gradients factor as ``L^T R`` (see ``BilinearRule``)."""
        return False

    def exact(
        self, module: nn.Module, inputs: tuple, output: Tensor, grad_output: Tensor
    ) -> Tensor:
        """Exact per-sample gradients ``[N, grad_dim]`` in ``compute_dtype``."""
        raise NotImplementedError

    def _pack(self, module: nn.Module, grads: dict[str, Tensor]) -> Tensor:
        """Concatenate per-parameter grads ``{name: [N, *shape]}`` into ``[N, grad_dim]``."""
        return torch.cat(
            [grads[n].reshape(grads[n].shape[0], -1) for n in self.param_shapes(module)], dim=1
        )


#: ``(inputs, grad_output) -> (left, right)``: a bilinear rule's projected factors for one call
FactorFn = Callable[[tuple, Tensor], tuple[Tensor, Tensor]]


class BilinearRule(LayerRule):
    """Rules whose per-sample gradient is ``G_n = L_n^T R_n``, ``G_n`` of shape ``[dl, dr]``.

    Subclasses implement ``factor_dims``, ``canonical_index`` and ``bind``; the default ``exact``
    multiplies the unprojected factors.
    """

    #: the factor that is the output gradient itself, "left" or "right": left unprojected it is
    #: a view, so its projection can also be applied after the sum over positions
    grad_side: ClassVar[str] = "left"

    def is_bilinear(self, module: nn.Module) -> bool:
        return True

    def factor_dims(self, module: nn.Module) -> tuple[int, int]:
        """``(dl, dr)``, with ``dl * dr == grad_dim``."""
        raise NotImplementedError

    def canonical_index(self, module: nn.Module) -> Tensor:
        """``[grad_dim]`` long: entry ``c`` of the canonical layout is ``G.flatten()[index[c]]``."""
        raise NotImplementedError

    def bind(self, module: nn.Module, p_left: Tensor | None, p_right: Tensor | None,
             dtype: torch.dtype) -> FactorFn:
        """The projected factors of ``module`` as a function of one call's ``(inputs,
        grad_output)``: ``(L P_L^T [N, T, kL], R P_R^T [N, T, kR])``, or ``[N, kL]`` and
        ``[N, kR]`` when there is one position (T = 1); any strides, in ``dtype``.

        ``p_left [kL, dl]`` / ``p_right [kR, dr]`` are in ``dtype`` on the gradient's device; None
        is the identity (the factor itself). The projector binds once per device and dtype and
        again when trainable parameters change, so what does not depend on the batch (which
        parameters train, a bias column split off, a convolution kernel) is settled here and the
        function does only the per-batch arithmetic: hooks run it at every step.
        """
        raise NotImplementedError

    def project_factors(self, module: nn.Module, inputs: tuple, grad_output: Tensor,
                        p_left: Tensor | None, p_right: Tensor | None) -> tuple[Tensor, Tensor]:
        """``bind``'s factors for one call (bound anew: for one-off use)."""
        return self.bind(module, p_left, p_right, compute_dtype(module, grad_output))(inputs, grad_output)

    def exact(
        self, module: nn.Module, inputs: tuple, output: Tensor, grad_output: Tensor
    ) -> Tensor:
        left, right = self.project_factors(module, inputs, grad_output, None, None)
        return self._from_matrix(module, factor_product(left, right))  # [N, dl, dr]

    def _from_matrix(self, module: nn.Module, g: Tensor) -> Tensor:
        """``G [N, dl, dr]`` -> canonical ``[N, grad_dim]``."""
        flat = g.reshape(g.shape[0], -1)
        # built once per module, layout and device: a fresh host-to-device copy every step would
        # synchronise with the GPU
        key = (flat.device, tuple(own_trainable(module)))
        cached = _INDEX_CACHE.setdefault(module, {})
        if key not in cached:
            index = self.canonical_index(module)
            cached[key] = None if torch.equal(index, torch.arange(len(index))) else index.to(flat.device)
        index = cached[key]
        return flat if index is None else flat[:, index]


_INDEX_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def input_side_index(
    module: nn.Module, out_dim: int, in_dim: int, input_side: str
) -> Tensor:
    """``canonical_index`` for a weight ``[out_dim, in_dim...]`` and a bias ``[out_dim]`` whose
    gradient matrix is ``G = [dW | db]`` (input side right, ``G [out_dim, dw + db]``) or
    ``G = [dW ; db]`` (input side left, weight stored ``[in_dim, out_dim]``,
    ``G [dw + db, out_dim]``).
    """
    dw = in_dim if trainable(module, "weight") else 0
    db = 1 if trainable(module, "bias") else 0
    if input_side == "left":  # weight rows, then the bias row
        weight = torch.arange(dw * out_dim)
        blocks = {"weight": weight, "bias": dw * out_dim + torch.arange(out_dim)}
    else:  # each row o holds dW[o, :] then db[o]
        rows = torch.arange(out_dim)[:, None] * (dw + db)
        blocks = {"weight": (rows + torch.arange(dw)).flatten(), "bias": (rows + dw).flatten()}
    return torch.cat([blocks[n] for n in own_trainable(module)])


def factor_product(left: Tensor, right: Tensor, out: Tensor | None = None) -> Tensor:
    """``L_n^T R_n`` for every sample n: ``[N, kL, kR]`` from factors ``[N, T, kL]`` and
    ``[N, T, kR]`` (positions summed), or ``[N, kL]`` and ``[N, kR]`` (one position: outer
    products, cheaper than a batched matmul). Written into ``out`` if given (any strides)."""
    if left.dim() == 3 and left.shape[1] == 1:
        left, right = left[:, 0], right[:, 0]
    if left.dim() == 2:
        return torch.mul(left.unsqueeze(2), right.unsqueeze(1), out=out)
    return torch.bmm(left.transpose(1, 2), right, out=out)


# Below this many projected dims a product is computed as P a^T and returned transposed (unless
# it is padded to PAD_TO columns, below): the row-major a P^T is then a GEMM with very few output
# columns, which MKL runs up to 2x slower (measured on GPT-2 and MLP shapes; from 12 on,
# row-major is as fast or up to 25% faster, the per-sample products reading its contiguous
# factors included).
ROW_MAJOR_FROM_K = 12
PAD_TO = 16


def _padded_width(k: int, d: int, device: torch.device) -> int:
    """The number of columns a product of rows of length ``d`` with ``k`` projected dims is
    computed with: on the CPU, PAD_TO for 12 <= k < PAD_TO, and for 4 <= k < 12 when d >= 1024
    (the extra columns of the matrix are zeros; the result is a view of the first k); else k.
    Measured with torch 2.13's MKL on this project's 2-core AMD EPYC (AVX2), 1024 rows: 16 columns
    run 1.5x to 2x faster than 12 to 15; than the transposed product of 4 to 11 columns, about as
    fast over rows of 1024 and 1.4x to 2x faster over 2048, but slower over shorter rows, and
    below 4 columns always."""
    if device.type != "cpu" or k >= PAD_TO or k < 4 or (k < ROW_MAJOR_FROM_K and d < 1024):
        return k
    return PAD_TO


def _over_rows(product: Callable[[Tensor], Tensor], k: int) -> Callable[[Tensor], Tensor]:
    """``product`` (``[M, d] -> [M, k]``) applied to the rows of ``a [..., d]``: ``[..., k]``."""
    def apply(a: Tensor) -> Tensor:
        if a.dim() == 2:
            return product(a)
        return product(a.reshape(-1, a.shape[-1])).view(*a.shape[:-1], k)

    return apply


def row_projector(p: Tensor | None) -> Callable[[Tensor], Tensor]:
    """``a -> a P^T`` for rows ``a [..., d]`` and ``p [k, d]``: ``[..., k]`` (``a`` itself if ``p``
    is None). The matrix is laid out once, at bind time; a call is one matrix product, row-major
    from ``ROW_MAJOR_FROM_K`` dims on, else a transposed view of ``P a^T``; on the CPU, with
    PAD_TO columns where ``_padded_width`` says so."""
    if p is None:
        return lambda a: a
    k = p.shape[0]
    width = _padded_width(k, p.shape[1], p.device)
    if width > k:
        p_t = F.pad(p.T, (0, width - k))  # zero columns after the k of P^T
        return _over_rows(lambda m: torch.mm(m, p_t)[:, :k], k)
    if k < ROW_MAJOR_FROM_K:
        p = p.contiguous()
        return _over_rows(lambda m: torch.mm(p, m.T).T, k)
    p_t = p.T.contiguous()
    return _over_rows(lambda m: torch.mm(m, p_t), k)


def affine_projector(p: Tensor | None, use_x: bool, use_one: bool) -> Callable[[Tensor], Tensor]:
    """``x -> [x, 1] P^T`` for ``x [..., d]`` (``[..., k]``, laid out as by ``row_projector``), with
    ``P [k, d + 1]`` split and laid out once; the constant-1 column carries the bias, and ``use_x`` /
    ``use_one`` leave out the frozen parts (``P`` then has only the others' columns). ``p`` None:
    ``[x, 1]`` itself. The bias is added inside the matrix product (addmm), not in a second pass,
    and ``[x, 1]`` is never concatenated."""
    if p is None:
        def concatenated(x: Tensor) -> Tensor:
            parts = [x] if use_x else []
            if use_one:
                parts.append(x.new_ones(*x.shape[:-1], 1))
            return torch.cat(parts, dim=-1)

        return concatenated
    if not use_x:  # only the bias column: R P^T = P[:, 0] at every position
        column = p[:, 0]
        return lambda x: column.expand(*x.shape[:-1], column.shape[0])
    d, k = p.shape[1] - int(use_one), p.shape[0]
    if not use_one:
        return row_projector(p[:, :d])
    width = _padded_width(k, d, p.device)
    if width > k:  # see row_projector
        p_x_t, p_one = F.pad(p[:, :d].T, (0, width - k)), F.pad(p[:, d:].T, (0, width - k))
        return _over_rows(lambda m: torch.addmm(p_one, m, p_x_t)[:, :k], k)
    if k < ROW_MAJOR_FROM_K:  # see row_projector
        p_x, p_one = p[:, :d].contiguous(), p[:, d:].contiguous()  # [k, d], [k, 1]
        return _over_rows(lambda m: torch.addmm(p_one, p_x, m.T).T, k)
    p_x_t, p_one = p[:, :d].T.contiguous(), p[:, d:].T.contiguous()  # [d, k], [1, k]
    return _over_rows(lambda m: torch.addmm(p_one, m, p_x_t), k)


class FuncRule(LayerRule):
    """Generic rule: torch.func per-sample gradients of ``sum(module(x_n) * grad_out_n)``.

    Reruns the module's forward once per sample (vmapped), so it is exact for any module whose
    forward maps one tensor to one tensor without mixing samples, but slower than a layer rule.
    Computes in the parameters' dtype (frozen parameters and buffers keep theirs) and returns
    ``compute_dtype``.
    """

    name = "func"

    @staticmethod
    def check_static(module: nn.Module) -> None:
        try:
            sig = inspect.signature(module.forward)
        except (TypeError, ValueError):
            return
        required = [
            p
            for p in sig.parameters.values()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) > 1:
            raise _unsupported(
                module,
                f"its forward takes {len(required)} tensors and no layer rule is registered "
                "for it (the generic rule needs a single-tensor input); register a rule with "
                "@register_rule, or freeze it",
            )

    def exact(
        self, module: nn.Module, inputs: tuple, output: Tensor, grad_output: Tensor
    ) -> Tensor:
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            raise _unsupported(
                module,
                "the generic rule needs a forward with one tensor input and one tensor output; "
                "register a rule with @register_rule, or freeze it",
            )
        params = {n: p.detach() for n, p in own_trainable(module).items()}
        dtype = next(iter(params.values())).dtype
        x = inputs[0].detach()
        x = x.to(dtype) if x.is_floating_point() else x

        def contracted(params: dict[str, Tensor], x_n: Tensor, g_n: Tensor) -> Tensor:
            out = torch.func.functional_call(module, params, (x_n.unsqueeze(0),))
            return (out * g_n.unsqueeze(0)).sum()

        grads = torch.func.vmap(torch.func.grad(contracted), in_dims=(None, 0, 0))(
            params, x, grad_output.detach().to(dtype)
        )
        return self._pack(module, grads).to(compute_dtype(module, grad_output))


_FUNC_RULE = FuncRule()
