"""Shared helpers: the torch.func reference for per-sample gradients, and reading a run back.

The reference never looks at what the recorder computed: it differentiates each sample's own
loss (a batch of one) with torch.func at given parameters, over the canonical layout (each
layer's trainable own parameters in named_parameters(recurse=False) order, flattened row-major,
layers concatenated in the order given).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from influence_hooks.storage.reader import open_run

SampleLoss = Callable[..., torch.Tensor]  # (call, *sample batch of one) -> scalar; call(*inputs) runs the model


def layer_param_names(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Full parameter names of the layers' trainable own parameters, in canonical order."""
    names = []
    for layer in layers:
        for n, p in model.get_submodule(layer).named_parameters(recurse=False):
            if p.requires_grad:
                names.append(f"{layer}.{n}" if layer else n)
    return names


def func_per_sample_grads(model: nn.Module, sample_loss: SampleLoss, batch: Sequence[torch.Tensor],
                          layers: Sequence[str], params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """[N, D]: grad of sample n's own loss w.r.t. the layers' parameters, at `params` (names as in
    model.named_parameters(); missing ones: the model's current values)."""
    fixed = {k: v.detach() for k, v in (params or {}).items()}
    current = dict(model.named_parameters())
    names = layer_param_names(model, layers)
    own = {n: fixed.get(n, current[n]).detach() for n in names}

    def one(own_params, *sample):
        sample = tuple(s.unsqueeze(0) for s in sample)
        call = lambda *inputs: functional_call(model, {**fixed, **own_params}, inputs)  # noqa: E731
        return sample_loss(call, *sample)

    g = vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(own, *batch)
    return torch.cat([g[n].reshape(len(batch[0]), -1) for n in names], dim=1)


def read_steps(run_dir, **kw) -> dict[int, tuple[np.ndarray, torch.Tensor]]:
    """{step: (sample ids, float64 rows)} of every (finite) recorded step."""
    with open_run(run_dir) as run:
        return {b.step: (b.sample_ids.numpy(), b.grads) for b in run.iter_steps(dtype=torch.float64, **kw)}


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = 1e-10) -> None:
    """Max-abs error relative to the largest entry, so the check is scale-free."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max() / scale
    assert err < rel, f"relative error {err:.3g} >= {rel:g}"



@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: intra-op threads only add synchronization (10x slower on 2 cores). A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
