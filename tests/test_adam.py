"""Exact influence under Adam and AdamW (aggregate/fullspace/optimizers.py, AdamForm).

The independent reference is forward-mode differentiation (torch.func.jvp) of a functional Adam
training written out here from torch.optim's update rule, with respect to one sample's weight in
the batch losses of the window: removing a sample is its weight going from 1 to 0, so to first
order the removal influence f_q(without) - f_q(with) is minus that derivative. The adjoint must
agree to 1e-8 relative in float64, for Adam (L2 weight decay) and AdamW (decoupled), AMSGrad,
removal at the window end or later, and accrued influence; and it must follow actual retraining.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import TensorDataset

from influence_hooks.aggregate import dit
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage.reader import open_run

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, D, H, K, B = 16, 4, 5, 3, 4
EPOCHS = 3
T = EPOCHS * N // B


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    Y = torch.randint(0, K, (N,), generator=g)
    q = (torch.randn(3, D, generator=g, dtype=DT), torch.randint(0, K, (3,), generator=g))
    order = [p[b:b + B] for _ in range(EPOCHS) for p in [torch.randperm(N, generator=g)] for b in range(0, N, B)]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, K)).to(DT)
    return TensorDataset(X, Y), q, order, model


TEMPLATE = make_problem()[3]  # the architecture, for functional calls


def lr_at(t):
    return 0.05 * (1 - 0.5 * t / T)  # a decaying schedule, recorded step by step


def record(path, opt_cls, opt_kw, **cfg):
    ds, q, order, model = make_problem()
    init = copy.deepcopy(model.state_dict())
    rec = GradientRecorder(str(path), model, projection="none", queries=q, query_loss_fn=loss_fn,
                           query_every_n_steps=1, storage_dtype="float64", **cfg)
    X, Y = ds.tensors
    opt = opt_cls(model.parameters(), lr=lr_at(0), **opt_kw)
    for t, ids in enumerate(order):
        for g_ in opt.param_groups:
            g_["lr"] = lr_at(t)
        rec.begin_micro_batch(ids)
        loss_fn(model, (X[ids], Y[ids])).backward()
        rec.end_step(opt, epoch=t // (N // B))
        opt.step()
        opt.zero_grad()
    rec.finish()
    return open_run(path), model, init, ds, q, order


# ---------------------------------------------------------------------- the reference
def functional_adam(init, ds, order, opt_kw, decoupled, c, window, stop, lr_of=None):
    """Train from init to step `stop` with torch.optim's Adam/AdamW rule written out; the samples of
    steps in `window` carry loss weights c (the batch loss is (1/|B|) sum_i c_i l_i)."""
    model = TEMPLATE
    X, Y = ds.tensors
    b1, b2 = opt_kw.get("betas", (0.9, 0.999))
    eps, wd, ams = opt_kw.get("eps", 1e-8), opt_kw.get("weight_decay", 0.0), opt_kw.get("amsgrad", False)
    w = {n: v.clone() for n, v in init.items()}
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v = {n: torch.zeros_like(x) for n, x in w.items()}
    vmax = {n: torch.zeros_like(x) for n, x in w.items()}
    for t in range(stop):
        ids = order[t]
        weights = c[ids] if window[0] <= t < window[1] else torch.ones(len(ids), dtype=DT)

        def batch_loss(w):
            losses = F.cross_entropy(functional_call(model, w, (X[ids],)), Y[ids], reduction="none")
            return (losses * weights).sum() / len(ids)

        g = grad(batch_loss)(w)
        lr, k = (lr_of or lr_at)(t), t + 1
        new_w = {}
        for n in w:
            gn = g[n] if decoupled or not wd else g[n] + wd * w[n]
            m[n] = b1 * m[n] + (1 - b1) * gn
            v[n] = b2 * v[n] + (1 - b2) * gn * gn
            vmax[n] = torch.maximum(vmax[n], v[n])
            denom = torch.sqrt((vmax[n] if ams else v[n]) / (1 - b2 ** k)) + eps
            scaled = w[n] * (1 - lr * wd) if decoupled else w[n]
            new_w[n] = scaled - (lr / (1 - b1 ** k)) * m[n] / denom
        w = new_w
    return w


def removal_derivative(init, ds, q, order, opt_kw, decoupled, window, te, lr_of=None):
    """[N, Q]: minus the derivative of the query losses at step te with respect to each sample's
    weight in the window's batch losses (first-order removal influence)."""
    model = TEMPLATE

    def query_losses(c):
        w = functional_adam(init, ds, order, opt_kw, decoupled, c, window, te, lr_of)
        return F.cross_entropy(functional_call(model, w, (q[0],)), q[1], reduction="none")

    ones = torch.ones(N, dtype=DT)
    return -vmap(lambda tangent: jvp(query_losses, (ones,), (tangent,))[1])(torch.eye(N, dtype=DT))


def relative_error(ours, truth):
    return float((ours - truth).norm() / truth.norm())


OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"betas": (0.9, 0.99), "weight_decay": 0.1}, True),
    "adam-l2": (torch.optim.Adam, {"betas": (0.8, 0.95), "weight_decay": 0.05}, False),
    "amsgrad": (torch.optim.AdamW, {"betas": (0.9, 0.9), "weight_decay": 0.01, "amsgrad": True}, True),
}


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def adam_run(request, tmp_path_factory):
    opt_cls, kw, decoupled = OPTIMIZERS[request.param]
    run, model, init, ds, q, order = record(tmp_path_factory.mktemp(request.param), opt_cls, kw,
                                            snapshot_every_n_steps=1, snapshot_scope="model",
                                            checkpoint_every_n_steps=4)
    return run, model, init, ds, q, order, kw, decoupled


def exact(run, model, ds, q, **kw):
    return dit(run, curvature="exact", model=model, dataset=ds, queries=q, loss_fn=loss_fn, progress=False, **kw)


# ---------------------------------------------------------------------- the adjoint is the derivative
@pytest.mark.parametrize("window, eval_step", [((4, 8), None), ((0, 4), 10), ((8, 12), "final")])
def test_removal_equals_the_forward_mode_derivative_of_adam_training(adam_run, window, eval_step):
    run, model, init, ds, q, order, kw, decoupled = adam_run
    res = exact(run, model, ds, q, window=window, mode="removal", eval_step=eval_step)
    te = {None: window[1], "final": T}.get(eval_step, eval_step)
    truth = removal_derivative(init, ds, q, order, kw, decoupled, window, te)
    assert res.eval_step == te and not any("SGD form" in n for n in res.approximations)
    assert relative_error(res.values, truth) < 1e-8


def test_accrued_equals_the_difference_of_two_derivatives(adam_run):
    run, model, init, ds, q, order, kw, decoupled = adam_run
    res = exact(run, model, ds, q, windows=[(4, 8), (8, 12)], mode="accrued")
    for r, (t1, t2) in zip(res, [(4, 8), (8, 12)]):
        truth = (removal_derivative(init, ds, q, order, kw, decoupled, (0, t2), t2)
                 - removal_derivative(init, ds, q, order, kw, decoupled, (0, t1), t1))
        assert relative_error(r.values, truth) < 1e-8


def test_replay_from_a_checkpoint_equals_the_snapshots(adam_run):
    run, model, _, ds, q, *_ = adam_run
    snap = exact(run, model, ds, q, window=(5, 9), source="snapshots")
    replay = exact(run, model, ds, q, window=(5, 9), source="replay")
    assert "replayed from the checkpoint at step 4" in replay.meta["trajectory"]
    assert replay.meta["replayed_steps"] >= 5
    assert all(err < 1e-10 for _, err in replay.meta["replay_checks"])  # the replay reproduces training
    assert relative_error(replay.values, snap.values) < 1e-10


def test_the_sgd_form_on_an_adam_run_is_labelled_and_differs(adam_run):
    run, model, _, ds, q, *_ = adam_run
    adam = exact(run, model, ds, q, window=(4, 8))
    sgd = exact(run, model, ds, q, window=(4, 8), optimizer_form="sgd")
    assert "Adam" in adam.meta["optimizer_form"] and sgd.meta["optimizer_form"] == "plain SGD"
    assert any("plain SGD form" in n for n in sgd.approximations)
    assert relative_error(sgd.values, adam.values) > 0.1


def test_snapshots_without_adam_moments_name_what_to_record(tmp_path):
    from influence_hooks.errors import MissingDataError
    from influence_hooks.storage import format as fmt
    import h5py

    run, model, _, ds, q, _ = record(tmp_path / "r", torch.optim.AdamW, {}, snapshot_every_n_steps=1,
                                     snapshot_scope="model")
    for p in (tmp_path / "r" / fmt.PARAM_DIR).iterdir():  # as written before snapshots held the moments
        with h5py.File(p, "a") as f:
            if fmt.OPTIM_GROUP in f:
                del f[fmt.OPTIM_GROUP]
    with pytest.raises(MissingDataError, match="AdamW needs its moments.*checkpoint"):
        exact(open_run(tmp_path / "r"), model, ds, q, window=(4, 8))


# ---------------------------------------------------------------------- against retraining
def test_adamw_removal_follows_retraining(tmp_path):
    """Actual retraining without each sample in the window, with torch.optim.AdamW."""
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1}
    run, model, init, ds, q, order = record(tmp_path / "r", torch.optim.AdamW, kw, snapshot_every_n_steps=1,
                                            snapshot_scope="model")
    window = (4, 8)
    res = exact(run, model, ds, q, window=window)
    X, Y = ds.tensors

    def retrain(removed):
        _, _, _, m = make_problem()
        m.load_state_dict(init)
        opt = torch.optim.AdamW(m.parameters(), lr=lr_at(0), **kw)
        for t in range(window[1]):
            for g_ in opt.param_groups:
                g_["lr"] = lr_at(t)
            ids = order[t]
            keep = (ids != removed).to(DT) if window[0] <= t < window[1] else torch.ones(len(ids), dtype=DT)
            (F.cross_entropy(m(X[ids]), Y[ids], reduction="none") * keep).mean().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            return F.cross_entropy(m(q[0]), q[1], reduction="none")

    base = retrain(-1)
    present = res.present.numpy()
    truth = torch.stack([retrain(i) - base for i in range(N)])
    for j in range(q[1].shape[0]):
        r = np.corrcoef(res.values[present, j].numpy(), truth[present, j].numpy())[0, 1]
        assert r > 0.95


# ---------------------------------------------------------------------- through Lightning
def test_an_adamw_lightning_run_recorded_by_the_callback_scores_through_the_public_api(tmp_path):
    """No glue: InfluenceCallback records checkpoints, dit(curvature='exact') replays AdamW from the
    one at step 0 and uses the module's training_step as the loss."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from influence_hooks import InfluenceCallback, open_run as open_

    ds, q, order, _ = make_problem()
    kw = {"betas": (0.9, 0.99), "weight_decay": 0.1}

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_problem()[3]

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return loss_fn(self, batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.03, **kw)

    module = Module()
    init = {k[len("net."):]: v.clone() for k, v in module.state_dict().items()}
    ordered = TensorDataset(*(t[torch.cat(order[:N // B])] for t in ds.tensors))  # epoch 0's order, reused
    cb = InfluenceCallback(str(tmp_path / "run"), projection="none", storage_dtype="float64", queries=q,
                           query_every_n_steps=1, checkpoint_every_n_steps=100)
    pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, accelerator="cpu", devices=1).fit(
        module, DataLoader(ordered, batch_size=B, shuffle=False))
    run = open_(tmp_path / "run")
    res = dit(run, window=(2, 6), curvature="exact", model=module, dataset=ordered, queries=q, progress=False)
    assert "AdamW" in res.meta["optimizer_form"] and "replayed from the checkpoint at step 0" in res.meta["trajectory"]
    steps = [torch.arange(b, b + B) for _ in range(2) for b in range(0, N, B)]
    truth = removal_derivative(init, ordered, q, steps, kw, True, (2, 6), 6, lr_of=lambda t: 0.03)
    assert relative_error(res.values, truth) < 1e-8
