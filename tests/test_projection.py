"""Per-layer random projections of per-sample gradients (README, "Recording a run": Projection)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks.capture import rule_for
from influence_hooks.errors import ConfigurationError
from influence_hooks.capture.projection import (LayerProjector, ProjectionSpec, kronecker_split, plan_projection,
                                                split_k)

try:  # transformers is optional: only the GPT-2 Conv1D cases need it
    from transformers.pytorch_utils import Conv1D as GPT2Conv1D
except ImportError:  # pragma: no cover
    GPT2Conv1D = None

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


from _layers import ScaleShift, frozen  # noqa: E402


def gpt2_conv1d(nf: int, nx: int) -> nn.Module:
    if GPT2Conv1D is None:
        pytest.skip("transformers is not installed")
    return GPT2Conv1D(nf, nx)


# name -> (module factory, input factory, k); batch size 4
BILINEAR = {
    "linear_2d": (lambda: nn.Linear(7, 5), lambda: torch.randn(4, 7), 12),
    "linear_3d_no_bias": (lambda: nn.Linear(7, 5, bias=False), lambda: torch.randn(4, 6, 7), 12),
    "linear_frozen_weight": (
        lambda: frozen(nn.Linear(7, 5), "weight"),
        lambda: torch.randn(4, 6, 7),
        3,
    ),
    "linear_identity_left": (lambda: nn.Linear(30, 2), lambda: torch.randn(4, 3, 30), 20),
    "conv1d_strided": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        lambda: torch.randn(4, 3, 11),
        9,
    ),
    "conv2d_same_even_kernel": (
        lambda: nn.Conv2d(3, 5, 4, padding="same", dilation=(1, 2)),
        lambda: torch.randn(4, 3, 7, 6),
        12,
    ),
    "conv2d_reflect_strided": (
        lambda: nn.Conv2d(3, 5, 3, stride=2, padding=2, padding_mode="reflect"),
        lambda: torch.randn(4, 3, 7, 7),
        12,
    ),
    "conv2d_no_bias": (lambda: nn.Conv2d(3, 5, 3, bias=False), lambda: torch.randn(4, 3, 6, 6), 12),
    "conv2d_frozen_weight": (
        lambda: frozen(nn.Conv2d(3, 5, 3), "weight"),
        lambda: torch.randn(4, 3, 6, 6),
        3,
    ),
    "embedding_padding_idx": (
        lambda: nn.Embedding(11, 6, padding_idx=0),
        lambda: torch.randint(0, 11, (4, 9)),
        12,
    ),
    "linear_3d_few_positions": (lambda: nn.Linear(7, 12), lambda: torch.randn(4, 3, 7), 20),
    "conv2d_few_positions": (lambda: nn.Conv2d(3, 16, 3), lambda: torch.randn(4, 3, 4, 4), 30),
    "gpt2_conv1d": (lambda: gpt2_conv1d(5, 7), lambda: torch.randn(4, 6, 7), 12),
    # factors of 12 dims and more are projected row-major (rules.ROW_MAJOR_FROM_K), smaller ones
    # transposed (unless padded, below)
    "linear_2d_row_major": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 60), 400),
    "linear_3d_row_major": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 3, 60), 400),
    "gpt2_conv1d_row_major": (lambda: gpt2_conv1d(50, 60), lambda: torch.randn(4, 6, 60), 400),
    "embedding_row_major": (lambda: nn.Embedding(60, 50), lambda: torch.randint(0, 60, (4, 9)), 400),
    "gpt2_conv1d_frozen_bias_row_major": (lambda: frozen(gpt2_conv1d(50, 60), "bias"),
                                          lambda: torch.randn(4, 6, 60), 400),
    # on the CPU, factors of 12 to 15 dims, and of fewer dims over rows of 1024 and more, are
    # computed with 16 columns, the extra ones zeros (rules.PAD_TO)
    "linear_2d_padded": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 60), 169),
    "linear_3d_padded": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 3, 60), 169),
    "linear_long_inputs_padded": (lambda: nn.Linear(1100, 30), lambda: torch.randn(4, 3, 1100), 64),
    "linear_long_outputs_padded": (lambda: nn.Linear(30, 1100), lambda: torch.randn(4, 30), 64),
    # one factor padded, the other transposed: their outer products are not laid out row-major
    "linear_2d_long_inputs_padded": (lambda: nn.Linear(1100, 30), lambda: torch.randn(4, 1100), 64),
    "linear_2d_mixed_split": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 60), 128),
    "gpt2_conv1d_long_inputs_padded": (lambda: gpt2_conv1d(60, 1100), lambda: torch.randn(4, 6, 1100), 64),
    # more positions than output dims: the output-gradient side is summed over positions first
    "linear_3d_many_positions_row_major": (lambda: nn.Linear(60, 50), lambda: torch.randn(4, 60, 60), 400),
    "gpt2_conv1d_frozen_bias": (
        lambda: frozen(gpt2_conv1d(5, 7), "bias"),
        lambda: torch.randn(4, 6, 7),
        12,
    ),
}
DENSE = {
    "layernorm": (lambda: nn.LayerNorm(6), lambda: torch.randn(4, 3, 6), 5),
    "func_custom_module": (lambda: ScaleShift(6), lambda: torch.randn(4, 3, 6), 5),
    "conv2d_grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), lambda: torch.randn(4, 4, 6, 6), 10),
}


def make(case: dict, name: str, dtype=torch.float64):
    torch.manual_seed(sum(map(ord, name)))
    module_factory, input_factory, k = case[name]
    module, x = module_factory().to(dtype), input_factory()
    return module, (x.to(dtype) if x.is_floating_point() else x), k


def hook_view(module: nn.Module, x: torch.Tensor):
    """(inputs, output, grad_output) of a nonlinear summed loss, as capture hooks see them."""
    out = module(x)
    (grad_output,) = torch.autograd.grad((torch.sin(out) + out**2).sum(), out)
    return (x,), out.detach(), grad_output


def projector(name, module, k, kind="auto", seed=0):
    rule = rule_for(module)
    return LayerProjector(name, module, rule, plan_projection(name, module, rule, k, kind, seed))


@pytest.mark.parametrize("case", sorted(BILINEAR))
def test_kronecker_projection_equals_dense_matrix_times_exact_gradient(case):
    module, x, k = make(BILINEAR, case)
    proj = projector(case, module, k)
    assert proj.spec.kind == "kronecker"
    view = hook_view(module, x)

    got = proj.per_sample(module, *view)

    exact = proj.rule.exact(module, *view)
    assert got.shape == (len(x), proj.spec.out_dim)
    assert proj.spec.out_dim <= k
    torch.testing.assert_close(got, exact @ proj.dense_matrix().T, rtol=0, atol=1e-10)


def test_kronecker_projection_of_linear_is_factor_matrices_applied_to_gradient_built_by_hand():
    module, x, _ = make(BILINEAR, "linear_2d")
    x = torch.randn(4, 6, 7, dtype=torch.float64)
    proj = projector("fc", module, 12)
    p_left, p_right = proj.kronecker_factors()  # [kL, 5], [kR, 8]
    inputs, out, grad_output = hook_view(module, x)

    got = proj.per_sample(module, inputs, out, grad_output)

    one = torch.ones(1, dtype=x.dtype)
    for n in range(len(x)):
        g = sum(torch.outer(grad_output[n, t], torch.cat([x[n, t], one])) for t in range(6))
        p_kron = torch.kron(p_left, p_right)
        torch.testing.assert_close(got[n], (p_left @ g @ p_right.T).flatten(), rtol=0, atol=1e-10)
        torch.testing.assert_close(got[n], p_kron @ g.flatten(), rtol=0, atol=1e-10)


def test_kronecker_projection_of_embedding_is_factor_matrices_applied_to_gradient_built_by_hand():
    module, ids, k = make(BILINEAR, "embedding_padding_idx")
    proj = projector("emb", module, k)
    p_left, p_right = proj.kronecker_factors()
    inputs, out, grad_output = hook_view(module, ids)

    got = proj.per_sample(module, inputs, out, grad_output)

    for n in range(len(ids)):
        g = torch.zeros(11, 6, dtype=torch.float64)
        for t, i in enumerate(ids[n].tolist()):
            if i != module.padding_idx:
                g[i] += grad_output[n, t]
        torch.testing.assert_close(got[n], (p_left @ g @ p_right.T).flatten(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
@pytest.mark.parametrize("case", sorted(DENSE) + ["linear_2d"])
def test_dense_projection_equals_matrix_times_exact_gradient(case, kind):
    module, x, k = make({**DENSE, **BILINEAR}, case)
    proj = projector(case, module, k, kind)
    assert proj.spec.kind == kind and proj.spec.out_dim == k
    view = hook_view(module, x)

    got = proj.per_sample(module, *view)

    p = proj.dense_matrix()
    assert p.shape == (k, proj.rule.grad_dim(module))
    torch.testing.assert_close(got, proj.rule.exact(module, *view) @ p.T, rtol=0, atol=1e-10)


def test_auto_projection_is_dense_gaussian_for_non_bilinear_layers():
    for case in DENSE:
        module, _, k = make(DENSE, case)
        assert projector(case, module, k).spec.kind == "gaussian"


def test_rademacher_entries_are_plus_minus_one_over_sqrt_k():
    module = nn.Linear(7, 5)
    p = projector("fc", module, 9, "rademacher").dense_matrix()
    assert set(p.abs().flatten().tolist()) == {1 / math.sqrt(9)}
    assert 0.3 < (p > 0).double().mean() < 0.7


def test_projected_inner_products_are_unbiased_for_each_layer_and_for_their_concatenation():
    """E[<Pg1, Pg2>] = <g1, g2> layer by layer: a wrong per-layer scale would reweight layers."""
    torch.manual_seed(0)
    layers = {  # different shapes, kinds and budgets
        "fc": (nn.Linear(12, 10), torch.randn(2, 3, 12), 30),
        "fc_wide": (nn.Linear(40, 3), torch.randn(2, 40), 10),
        "conv": (nn.Conv2d(2, 4, 3), torch.randn(2, 2, 5, 5), 20),
        "emb": (nn.Embedding(15, 6), torch.randint(0, 15, (2, 8)), 24),
        "ln": (nn.LayerNorm(10), torch.randn(2, 3, 10), 8),
        "custom": (ScaleShift(5), torch.randn(2, 4, 5), 6),
    }
    if GPT2Conv1D is not None:
        layers["gpt2"] = (GPT2Conv1D(9, 4), torch.randn(2, 5, 4), 16)
    seeds = range(400)
    exact, ips, sq_norms = {}, {}, {}
    for name, (module, x, k) in layers.items():
        module.double()
        x = x.double() if x.is_floating_point() else x
        view = hook_view(module, x)
        g = rule_for(module).exact(module, *view)
        exact[name] = (g[0] @ g[1], g[0] @ g[0])
        pgs = [projector(name, module, k, seed=s).per_sample(module, *view) for s in seeds]
        ips[name] = torch.stack([pg[0] @ pg[1] for pg in pgs])
        sq_norms[name] = torch.stack([pg[0] @ pg[0] for pg in pgs])
    ips["all"], sq_norms["all"] = sum(ips.values()), sum(sq_norms.values())
    exact["all"] = tuple(sum(e[i] for e in exact.values()) for i in range(2))

    for name in ips:
        for samples, target in zip((ips[name], sq_norms[name]), exact[name]):
            std_error = samples.std() / math.sqrt(len(samples))
            assert abs(samples.mean() - target) < 5 * std_error, name
        assert abs(sq_norms[name].mean() / exact[name][1] - 1) < 0.35, name


def test_projection_matrices_are_deterministic_and_ignore_the_global_rng():
    module = nn.Linear(7, 5)
    torch.manual_seed(1)
    a = projector("block.0.fc", module, 12, seed=3)
    torch.manual_seed(2)
    torch.randn(100)
    b = projector("block.0.fc", module, 12, seed=3)
    assert torch.equal(a.dense_matrix(), b.dense_matrix())
    for x, y in zip(a.kronecker_factors(), b.kronecker_factors()):
        assert torch.equal(x, y)


def test_different_layer_names_and_seeds_give_different_matrices():
    module = nn.Linear(7, 5)
    base = projector("a", module, 12).dense_matrix()
    assert not torch.allclose(base, projector("b", module, 12).dense_matrix())
    assert not torch.allclose(base, projector("a", module, 12, seed=1).dense_matrix())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case", ["linear_2d", "conv2d_reflect_strided", "embedding_padding_idx", "layernorm"]
)
def test_projection_does_not_depend_on_device_placement(case, device):
    module, x, k = make({**BILINEAR, **DENSE}, case)
    view = hook_view(module, x)
    expected = projector(case, module, k).per_sample(module, *view)
    module = module.to(device)
    moved = tuple(t.to(device) for t in (view[0][0], view[1], view[2]))

    got = projector(case, module, k).per_sample(module, (moved[0],), moved[1], moved[2])

    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["kronecker", "gaussian", "rademacher", "none"])
def test_spec_round_trips_through_json_and_rebuilds_the_same_projection(kind):
    module = nn.Linear(7, 5)
    rule = rule_for(module)
    spec = plan_projection("fc", module, rule, 12, kind, seed=7)

    again = ProjectionSpec.from_dict(json.loads(json.dumps(spec.to_dict())))

    assert again == spec and again.kind == kind
    rebuilt = LayerProjector("fc", module, rule, again).dense_matrix()
    assert torch.equal(rebuilt, LayerProjector("fc", module, rule, spec).dense_matrix())


@pytest.mark.parametrize(
    "k, left_dim, right_dim, expected",
    [(64, 100, 100, (8, 8)), (100, 3, 1000, (3, 33)), (100, 1000, 2, (50, 2)), (12, 5, 8, (3, 4))],
)
def test_k_is_split_into_balanced_factors_within_their_dims(k, left_dim, right_dim, expected):
    assert split_k(k, left_dim, right_dim) == expected


@pytest.mark.parametrize("k", [7, 31, 97, 1009, 4096, 5000])
def test_k_split_uses_nearly_all_of_the_budget_with_factors_within_a_factor_two(k):
    kl, kr = split_k(k, 10_000, 10_000)
    assert kl * kr <= k and kl * kr >= 0.85 * k
    assert max(kl, kr) <= 2 * min(kl, kr)


def test_identity_factor_when_k_reaches_the_factor_dim():
    module, x, k = make(BILINEAR, "linear_identity_left")  # d_out = 2
    proj = projector("fc", module, k)
    assert (proj.spec.k_left, proj.spec.left_dim) == (2, 2)
    assert torch.equal(proj.kronecker_factors()[0], torch.eye(2, dtype=torch.float64))


def test_exact_when_k_is_none_or_reaches_the_gradient_dim():
    module, x, _ = make(BILINEAR, "linear_2d")
    view = hook_view(module, x)
    for k in (None, 40, 1000):
        proj = projector("fc", module, k)
        assert proj.spec.kind == "none" and proj.spec.out_dim == 40
        torch.testing.assert_close(proj.per_sample(module, *view), proj.rule.exact(module, *view))


def test_conv_projection_never_unfolds_the_input(monkeypatch):
    module, x, k = make(BILINEAR, "conv2d_reflect_strided")
    view = hook_view(module, x)
    proj = projector("conv", module, k)
    expected = proj.rule.exact(module, *view) @ proj.dense_matrix().T

    def refuse(*args, **kwargs):
        raise AssertionError("F.unfold called while projecting")

    monkeypatch.setattr(F, "unfold", refuse)
    torch.testing.assert_close(proj.per_sample(module, *view), expected, rtol=0, atol=1e-10)


def test_embedding_projection_never_builds_a_one_hot(monkeypatch):
    module, ids, k = make(BILINEAR, "embedding_padding_idx")
    view = hook_view(module, ids)
    proj = projector("emb", module, k)
    expected = proj.rule.exact(module, *view) @ proj.dense_matrix().T

    def refuse(*args, **kwargs):
        raise AssertionError("F.one_hot called while projecting")

    monkeypatch.setattr(F, "one_hot", refuse)
    torch.testing.assert_close(proj.per_sample(module, *view), expected, rtol=0, atol=1e-10)


def test_half_precision_gradients_are_projected_in_float32():
    module, x, k = make(BILINEAR, "linear_3d_no_bias", dtype=torch.bfloat16)
    view = hook_view(module, x)
    proj = projector("fc", module, k)
    got = proj.per_sample(module, *view)
    assert got.dtype == torch.float32
    expected = proj.rule.exact(module, *view).double() @ proj.dense_matrix().T
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, "positive int"),
        ({"k": 4, "kind": "sparse"}, "kind"),
        ({"k": 4, "kind": "kronecker", "module": nn.LayerNorm(6)}, "bilinear"),
    ],
)
def test_invalid_plans_fail_at_planning_time(kwargs, match):
    module = kwargs.pop("module", nn.Linear(7, 5))
    with pytest.raises(ConfigurationError, match=match):
        plan_projection("layer", module, rule_for(module), **kwargs)


def test_inconsistent_spec_is_rejected():
    with pytest.raises(ConfigurationError, match="out_dim"):
        ProjectionSpec(
            kind="kronecker", seed=0, out_dim=5, grad_dim=40,
            k_left=2, k_right=3, left_dim=5, right_dim=8,
        )
    with pytest.raises(ConfigurationError, match="unknown"):
        ProjectionSpec.from_dict(
            {"kind": "none", "seed": 0, "out_dim": 3, "grad_dim": 3, "extra": 1}
        )


def test_projector_refuses_a_module_whose_trainable_parameters_changed_after_planning():
    module, x, k = make(BILINEAR, "linear_2d")
    proj = projector("fc", module, k)
    module.weight.requires_grad_(False)
    with pytest.raises(ConfigurationError, match="frozen or unfrozen"):
        proj.per_sample(module, *hook_view(module, x))


# ---------------------------------------------------------------------------- identity on a small factor
def rank_one_variance(kl: int, kr: int, dl: int, dr: int) -> float:
    """Relative variance of |(P_L x P_R) vec(a b^T)|^2 with Gaussian factors (0 on an identity side)."""
    vl = 0.0 if kl == dl else 2 / kl
    vr = 0.0 if kr == dr else 2 / kr
    return (1 + vl) * (1 + vr) - 1


@pytest.mark.parametrize("k", [12, 64, 85, 256, 341, 1024])
@pytest.mark.parametrize("dims", [(10, 513), (513, 10), (32, 28), (16, 10), (64, 289), (3, 1000), (40, 40)])
def test_kronecker_split_takes_the_identity_on_a_small_factor_and_never_adds_variance(k, dims):
    dl, dr = dims
    if k >= dl * dr:
        return  # exact anyway
    kl, kr = kronecker_split(k, dl, dr)
    assert 1 <= kl <= dl and 1 <= kr <= dr and kl * kr <= k
    small = [d for d in (dl, dr) if d <= min(k, 2 * math.sqrt(k))]
    if small:
        assert kl == dl or kr == dr
        assert rank_one_variance(kl, kr, dl, dr) <= rank_one_variance(*split_k(k, dl, dr), dl, dr) + 1e-12
    else:
        assert (kl, kr) == split_k(k, dl, dr)


def test_kronecker_split_prefers_the_identity_on_the_output_gradient_side():
    assert kronecker_split(256, 32, 28, prefer="left") == (32, 8)
    assert kronecker_split(256, 32, 28, prefer="right") == (9, 28)
    module = nn.Conv2d(3, 32, 3)  # output channels are the left factor: 32 x 8, no input-side convolution
    spec = plan_projection("conv", module, rule_for(module), 256)
    assert (spec.k_left, spec.k_right) == (32, 8)


@pytest.mark.parametrize("module, x, k, identity_side", [
    (lambda: nn.Linear(5, 40), lambda: torch.randn(4, 3, 5), 30, "right"),
    (lambda: nn.Linear(40, 4), lambda: torch.randn(4, 40), 30, "left"),
    (lambda: nn.Conv2d(2, 6, 3), lambda: torch.randn(4, 2, 6, 6), 30, "left"),
], ids=["linear_small_input", "linear_small_output", "conv_few_channels"])
def test_identity_split_equals_the_dense_projection_and_preserves_inner_products_in_expectation(
        module, x, k, identity_side):
    torch.manual_seed(0)
    module, x = module().double(), x().double()
    view = hook_view(module, x)
    g = rule_for(module).exact(module, *view)
    proj = projector("layer", module, k)
    s = proj.spec
    assert (s.k_left == s.left_dim) if identity_side == "left" else (s.k_right == s.right_dim)
    torch.testing.assert_close(proj.per_sample(module, *view), g @ proj.dense_matrix().T, rtol=0, atol=1e-10)
    ips = torch.stack([(lambda pg: pg[0] @ pg[1])(projector("layer", module, k, seed=seed).per_sample(module, *view))
                       for seed in range(400)])
    assert abs(ips.mean() - g[0] @ g[1]) < 5 * ips.std() / math.sqrt(len(ips))


def test_a_run_planned_with_the_balanced_split_is_rebuilt_with_its_own_factors(tmp_path):
    """Runs recorded before the identity split keep their k_left / k_right: they are rebuilt from
    the manifest, not re-planned."""
    from influence_hooks.capture.select import layers_from_manifest, layers_manifest, plan_layers, select_layers

    module = nn.Sequential(nn.Conv2d(3, 32, 3))
    rule = rule_for(module[0])
    old = ProjectionSpec(kind="kronecker", seed=0, out_dim=256, grad_dim=32 * 28, k_left=16, k_right=16,
                         left_dim=32, right_dim=28)
    meta = layers_manifest(plan_layers(select_layers(module), 256))
    assert (meta[0]["projection"]["k_left"], meta[0]["projection"]["k_right"]) == (32, 8)  # planned today
    meta[0]["projection"] = old.to_dict()
    (rebuilt,) = layers_from_manifest(module, json.loads(json.dumps(meta)))
    assert rebuilt.spec == old
    expected = LayerProjector("0", module[0], rule, old).dense_matrix()
    assert torch.equal(rebuilt.projector.dense_matrix(), expected)


# ---------------------------------------------------------------------------- writing into a row block
@pytest.mark.parametrize("case", sorted(BILINEAR) + sorted(DENSE) + ["exact"])
def test_per_sample_writes_into_its_columns_of_a_row_block(case):
    module, x, k = make({**DENSE, **BILINEAR, "exact": BILINEAR["linear_2d"]}, case)
    proj = projector(case, module, None if case == "exact" else k)
    view = hook_view(module, x)
    expected = proj.per_sample(module, *view)
    for dtype in (torch.float64, torch.float32):  # the block's dtype may differ from the layer's
        block = torch.full((len(x), proj.spec.out_dim + 7), -1.0, dtype=dtype)
        cols = block[:, 3:3 + proj.spec.out_dim]

        got = proj.per_sample(module, *view, out=cols)

        assert got.data_ptr() == cols.data_ptr()
        torch.testing.assert_close(cols, expected.to(dtype), rtol=1e-6 if dtype == torch.float32 else 0,
                                   atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert (block[:, :3] == -1).all() and (block[:, 3 + proj.spec.out_dim:] == -1).all()
