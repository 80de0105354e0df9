"""Capture rules: exact per-sample gradients of a module's own parameters.

The reference is torch.func: vmap over samples of the gradient of each sample's own loss,
taken through the layer and a nonlinear head, w.r.t. the layer's trainable own parameters.
The rule sees only what hooks see: inputs, output, and grad_output of the summed loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks.capture import FuncRule, LayerRule, UnsupportedModuleError, rule_for
from influence_hooks.errors import InfluenceHooksError

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

try:  # transformers is optional: only the GPT-2 Conv1D cases need it
    import transformers.pytorch_utils as transformers_utils
except ImportError:  # pragma: no cover
    transformers_utils = None


from _layers import ScaleShift, frozen  # noqa: E402


def _ids(*shape: int, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, shape)
    ids[:, 0] = 0  # make sure padding_idx=0 occurs
    return ids


# name -> (module factory, input factory); batch size 4 everywhere
CASES = {
    "linear_2d": (lambda: nn.Linear(5, 3), lambda: torch.randn(4, 5)),
    "linear_3d_no_bias": (lambda: nn.Linear(5, 3, bias=False), lambda: torch.randn(4, 6, 5)),
    "linear_4d": (lambda: nn.Linear(5, 3), lambda: torch.randn(4, 2, 3, 5)),
    "linear_frozen_bias": (lambda: frozen(nn.Linear(5, 3), "bias"), lambda: torch.randn(4, 6, 5)),
    "linear_frozen_weight": (
        lambda: frozen(nn.Linear(5, 3), "weight"),
        lambda: torch.randn(4, 6, 5),
    ),
    "conv1d_stride_padding": (
        lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
        lambda: torch.randn(4, 3, 11),
    ),
    "conv1d_same_circular_dilated": (
        lambda: nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular", dilation=2),
        lambda: torch.randn(4, 3, 12),
    ),
    "conv2d_stride_padding_dilation": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        lambda: torch.randn(4, 3, 9, 8),
    ),
    "conv2d_same_even_kernel": (
        lambda: nn.Conv2d(3, 4, 4, padding="same"),
        lambda: torch.randn(4, 3, 7, 6),
    ),
    "conv2d_valid_no_bias": (
        lambda: nn.Conv2d(3, 4, 3, padding="valid", bias=False),
        lambda: torch.randn(4, 3, 7, 6),
    ),
    "conv2d_reflect": (
        lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"),
        lambda: torch.randn(4, 3, 6, 6),
    ),
    "conv2d_frozen_weight": (
        lambda: frozen(nn.Conv2d(3, 4, 3, padding=1), "weight"),
        lambda: torch.randn(4, 3, 6, 6),
    ),
    "conv2d_grouped": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=2),
        lambda: torch.randn(4, 4, 7, 7),
    ),
    "embedding_padding_idx": (
        lambda: nn.Embedding(10, 4, padding_idx=0),
        lambda: _ids(4, 7, vocab=10),
    ),
    "embedding_2d_ids": (lambda: nn.Embedding(10, 4), lambda: torch.randint(0, 10, (4, 3, 2))),
    "layernorm": (lambda: nn.LayerNorm(6), lambda: torch.randn(4, 3, 6)),
    "layernorm_2d_shape_no_bias": (
        lambda: nn.LayerNorm([3, 6], bias=False),
        lambda: torch.randn(4, 2, 3, 6),
    ),
    "layernorm_no_positions": (lambda: nn.LayerNorm(6), lambda: torch.randn(4, 6)),
    "rmsnorm": (lambda: nn.RMSNorm(6), lambda: torch.randn(4, 3, 6)),
    "gpt2_conv1d": (lambda: transformers_utils.Conv1D(3, 5), lambda: torch.randn(4, 6, 5)),
    "gpt2_conv1d_frozen_bias": (
        lambda: frozen(transformers_utils.Conv1D(3, 5), "bias"),
        lambda: torch.randn(4, 6, 5),
    ),
    "func_custom_module": (lambda: ScaleShift(6), lambda: torch.randn(4, 3, 6)),
    "func_groupnorm": (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(4, 4, 5)),
}

EXPECTED_RULE = {
    "linear": "linear", "conv1d": "conv1d", "conv2d": "conv2d", "embedding": "embedding",
    "layernorm": "layernorm", "rmsnorm": "rmsnorm", "gpt2": "gpt2_conv1d", "func": "func",
}


def make_case(name: str, dtype=torch.float64):
    if name.startswith("gpt2") and transformers_utils is None:
        pytest.skip("transformers is not installed")
    torch.manual_seed(sum(map(ord, name)))
    module_factory, input_factory = CASES[name]
    module = module_factory().to(dtype)
    x = input_factory()
    return module, (x.to(dtype) if x.is_floating_point() else x)


def head(out: torch.Tensor) -> torch.Tensor:
    """Per-sample nonlinear loss of the layer output: ``[N, ...] -> [N]``."""
    weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=out.dtype).view(out.shape[1:])
    return (torch.tanh(out) * weights).flatten(1).sum(1) + 0.5 * out.flatten(1).pow(2).sum(1)


def hook_view(module: nn.Module, x: torch.Tensor):
    """What capture hooks see for the summed loss: (inputs, output, grad_output)."""
    out = module(x)
    (grad_output,) = torch.autograd.grad(head(out).sum(), out)
    return (x,), out.detach(), grad_output


def torch_func_per_sample(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[N, grad_dim]``: per-sample grads of head(module(x_n)), canonical layout."""
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}

    def loss(params, x_n):
        return head(torch.func.functional_call(module, params, (x_n.unsqueeze(0),)))[0]

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    return torch.cat([grads[n].reshape(x.shape[0], -1) for n in params], dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_rule_matches_torch_func_per_sample_gradients(case):
    module, x = make_case(case)
    rule = rule_for(module)
    assert isinstance(rule, LayerRule)
    assert rule.name == EXPECTED_RULE[case.split("_")[0]]

    got = rule.exact(module, *hook_view(module, x))

    expected = torch_func_per_sample(module, x)
    assert got.shape == (x.shape[0], rule.grad_dim(module))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_param_shapes_list_trainable_own_parameters_in_named_parameters_order(case):
    module, _ = make_case(case)
    rule = rule_for(module)
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    assert list(rule.param_shapes(module).items()) == [(n, tuple(p.shape)) for n, p in own]
    assert rule.grad_dim(module) == sum(p.numel() for _, p in own)


def test_embedding_padding_row_gets_zero_gradient():
    module, ids = make_case("embedding_padding_idx")
    g = rule_for(module).exact(module, *hook_view(module, ids)).view(len(ids), 10, 4)
    assert (ids == 0).any(dim=1).all()
    assert g[:, 0].abs().max() == 0
    assert g[:, 1:].abs().sum() > 0


def test_half_precision_is_computed_in_float32():
    torch.manual_seed(0)
    module = nn.Linear(8, 4).to(torch.bfloat16)
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    inputs, out, grad_output = hook_view(module, x)
    got = rule_for(module).exact(module, inputs, out, grad_output)
    assert got.dtype == torch.float32
    ref = torch.einsum("nto,nti->noi", grad_output.double(), x.double()).reshape(3, -1)
    torch.testing.assert_close(got[:, :32].double(), ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_is_refused_because_it_mixes_samples():
    with pytest.raises(UnsupportedModuleError, match="BatchNorm2d") as err:
        rule_for(nn.BatchNorm2d(3))
    assert "batch" in str(err.value).lower() and "Linear" in str(err.value)
    assert isinstance(err.value, InfluenceHooksError)


@pytest.mark.parametrize(
    "module",
    [nn.ReLU(), nn.Sequential(nn.Linear(2, 2)), frozen(frozen(nn.Linear(2, 2), "weight"), "bias")],
    ids=["no_params", "params_only_in_children", "all_frozen"],
)
def test_module_without_trainable_own_parameters_is_refused(module):
    with pytest.raises(UnsupportedModuleError, match="no trainable parameters of its own"):
        rule_for(module)


@pytest.mark.parametrize("kwargs", [{"scale_grad_by_freq": True}, {"sparse": True}])
def test_embedding_options_that_mix_samples_or_change_gradient_format_are_refused(kwargs):
    (option,) = kwargs
    with pytest.raises(UnsupportedModuleError, match=option):
        rule_for(nn.Embedding(5, 2, **kwargs))


@pytest.mark.parametrize(
    "module", [nn.Bilinear(2, 3, 4), nn.MultiheadAttention(4, 2), nn.LSTM(3, 4)],
    ids=["two_inputs", "multihead_attention", "lstm"],
)
def test_modules_with_several_inputs_or_outputs_are_refused(module):
    with pytest.raises(UnsupportedModuleError, match=type(module).__name__):
        rule_for(module)


def test_subclass_that_overrides_forward_gets_the_generic_rule():
    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class PlainSubclass(nn.Linear):
        pass

    assert isinstance(rule_for(ScaledLinear(3, 2)), FuncRule)
    assert rule_for(PlainSubclass(3, 2)).name == "linear"
    torch.manual_seed(0)
    module, x = ScaledLinear(3, 2).double(), torch.randn(4, 5, 3, dtype=torch.float64)
    got = rule_for(module).exact(module, *hook_view(module, x))
    torch.testing.assert_close(got, torch_func_per_sample(module, x), rtol=0, atol=1e-10)


def test_generic_rule_rejects_tuple_outputs_at_capture_time():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w, x

    module, x = Pair(), torch.randn(2, 3)
    rule = rule_for(module)
    with pytest.raises(UnsupportedModuleError, match="one tensor output"):
        rule.exact(module, (x,), module(x), torch.ones(2, 3))


def test_register_rule_serves_a_new_layer_type_and_its_subclasses():
    from influence_hooks.capture import register_rule, rules

    class Diag(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    class DiagChild(Diag):
        pass

    try:

        @register_rule(Diag)
        class DiagRule(LayerRule):
            name = "diag"

            def exact(self, module, inputs, output, grad_output):
                return (inputs[0] * grad_output).reshape(len(grad_output), -1, 3).sum(1)

        module, x = DiagChild(), torch.randn(4, 2, 3, dtype=torch.float64)
        assert rule_for(module).name == "diag"
        got = rule_for(module).exact(module, *hook_view(module, x))
        torch.testing.assert_close(got, torch_func_per_sample(module, x), rtol=0, atol=1e-12)
    finally:
        rules._RULES.pop(Diag, None)


def test_gpt2_conv1d_is_matched_without_importing_transformers_in_the_rules():
    if transformers_utils is None:
        pytest.skip("transformers is not installed")
    import influence_hooks.capture.layers.gpt2 as gpt2

    assert "transformers" not in vars(gpt2)
    assert rule_for(transformers_utils.Conv1D(3, 5)).name == "gpt2_conv1d"
