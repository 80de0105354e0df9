"""Exact curvature on a transformers GPT-2 as a user builds it: tied input and output embeddings
(wte / lm_head), the default scaled-dot-product attention, queries given as a Dataset.

The reference is forward-mode differentiation (torch.func.jvp) of the SGD training written out
functionally, with respect to each sample's weight in the window's batch losses (removal
influence to first order is minus that derivative)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Subset, TensorDataset

from influence_hooks import GradientRecorder, dit, open_run

transformers = pytest.importorskip("transformers")

N, T, B, STEPS, LR = 8, 6, 4, 4, 0.5


def build():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=24, n_positions=T, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).double()


def loss_fn(model, batch):
    """Next-token cross-entropy in the model's dtype (transformers' own loss upcasts to float32)."""
    x = batch[0]
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 24, (N + 3, T), generator=g)
    train, queries = TensorDataset(tokens[:N]), Subset(TensorDataset(tokens), [N, N + 1, N + 2])
    model = build()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, as GPT-2 is by default
    assert model.config._attn_implementation == "sdpa"
    init = copy.deepcopy(dict(model.named_parameters()))
    path = tmp_path_factory.mktemp("gpt2") / "run"
    with pytest.warns(RuntimeWarning):  # tied weights, and wpe left out (shared by the batch)
        rec = GradientRecorder(str(path), model, projection="none", storage_dtype="float64", queries=queries,
                               query_loss_fn=loss_fn, query_every_n_steps=1, snapshot_every_n_steps=1,
                               snapshot_scope="model", verbose=False)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        order = [torch.arange(b, b + B) for _ in range(STEPS * B // N) for b in range(0, N, B)]
        for ids in order:
            rec.begin_micro_batch(ids)
            loss_fn(model, (tokens[ids],)).backward()
            rec.end_step(opt)
            opt.step()
            opt.zero_grad()
        rec.finish()
    return open_run(path), model, init, train, queries, tokens, order


def reference(model, init, tokens, queries, order, window, te):
    """[N, Q]: minus d f_q(w_te) / d c_i, training by SGD with the window's samples weighted by c."""
    names = [n for n, _ in model.named_parameters()]
    qtokens = torch.stack([queries[i][0] for i in range(len(queries))])

    def sample_losses(w, x):
        def one(xi):
            return loss_fn_params(w, xi[None])
        return vmap(one)(x)

    def loss_fn_params(w, x):
        with sdpa_kernel([SDPBackend.MATH]):
            logits = functional_call(model, w, (), {"input_ids": x}).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

    def query_losses(c):
        w = {n: init[n].detach() for n in names}
        for t in range(te):
            ids = order[t]
            weights = c[ids] if window[0] <= t < window[1] else torch.ones(len(ids), dtype=torch.float64)
            g = grad(lambda w: (sample_losses(w, tokens[ids]) * weights).sum() / len(ids))(w)
            w = {n: w[n] - LR * g[n] for n in names}
        return sample_losses(w, qtokens)

    ones = torch.ones(N, dtype=torch.float64)
    return -vmap(lambda v: jvp(query_losses, (ones,), (v,))[1])(torch.eye(N, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["removal", "accrued"])
def test_exact_curvature_on_a_tied_gpt2_with_sdpa_equals_the_derivative_of_training(recorded, mode):
    run, model, init, train, queries, tokens, order = recorded
    res = dit(run, window=(1, 3), mode=mode, curvature="exact", model=model, dataset=train, queries=queries,
              loss_fn=loss_fn, params="model", progress=False)
    assert res.meta["recording_check"]["relative_error"] < 1e-10  # the tied blocks are checked apart
    assert res.query_ids.tolist() == [N, N + 1, N + 2]  # the Subset's indices, as the recorder keeps them
    if mode == "removal":
        truth = reference(model, init, tokens, queries, order, (1, 3), 3)
    else:
        truth = (reference(model, init, tokens, queries, order, (0, 3), 3)
                 - reference(model, init, tokens, queries, order, (0, 1), 1))
    assert float((res.values - truth).norm() / truth.norm()) < 1e-8


def test_the_recorded_layers_of_a_tied_gpt2_include_the_shared_weight_once(recorded):
    run, model, _, train, queries, *_ = recorded
    res = dit(run, window=(1, 3), curvature="exact", model=model, dataset=train, queries=queries, loss_fn=loss_fn,
              progress=False)
    names = res.meta["parameter_names"]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names  # one tensor, both uses
    assert "transformer.wpe.weight" not in names  # not recorded (shared by the batch), so held fixed
