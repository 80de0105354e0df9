"""Exact-curvature window-removal and accrued influence (aggregate/exact.py).

Every check is against an independent computation: the backward recursion written out with dense
Hessians (torch.func.hessian of the batch-mean loss at each w_t), derivatives of retraining with a
down-weighted sample (finite differences), and retraining without the sample.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import TensorDataset

from influence_hooks.aggregate import dit
from influence_hooks.errors import ConfigurationError, MissingDataError
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage.reader import open_run

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, D, H, K, B = 48, 5, 6, 3, 12


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    Y = torch.randint(0, K, (N,), generator=g)
    Xq = torch.randn(3, D, generator=g, dtype=DT)
    Yq = torch.randint(0, K, (3,), generator=g)
    return TensorDataset(X, Y), (Xq, Yq)


def make_model(hidden=H, seed=0):
    torch.manual_seed(seed)
    if hidden == 0:
        return nn.Sequential(nn.Linear(D, K)).to(DT)
    return nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, K)).to(DT)


def batch_order(epochs=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [p[b:b + B] for _ in range(epochs) for p in [torch.randperm(N, generator=g)] for b in range(0, N, B)]


def train(model, ds, order, opt_kw, *, rec=None, weights=None):
    """SGD over the given batches; weights(step, ids) -> per-sample loss weights (default 1).
    The batch loss is (1/|B|) sum_i c_i l_i: a removed sample keeps the denominator."""
    X, Y = ds.tensors
    opt = torch.optim.SGD(model.parameters(), **opt_kw)
    for t, ids in enumerate(order):
        if rec is not None:
            rec.begin_micro_batch(ids)
        losses = F.cross_entropy(model(X[ids]), Y[ids], reduction="none")
        c = torch.ones(len(ids), dtype=DT) if weights is None else weights(t, ids)
        (losses * c).mean().backward()
        if rec is not None:
            rec.end_step(opt, epoch=t // (N // B))
        opt.step()
        opt.zero_grad()
    if rec is not None:
        rec.finish()
    return model


def record(tmp_path, opt_kw, *, hidden=H, projection="none", layers=None, **cfg):
    ds, q = make_data()
    model = make_model(hidden)
    init = copy.deepcopy(model.state_dict())
    rec = GradientRecorder(str(tmp_path / "run"), model, projection=projection, queries=q, query_loss_fn=loss_fn,
                           query_every_n_steps=1, storage_dtype="float64", layers=layers, **cfg)
    order = batch_order()
    train(model, ds, order, opt_kw, rec=rec)
    return open_run(tmp_path / "run"), model, init, ds, q, order


PLAIN = {"lr": 0.5}
MOMENTUM = {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.01, "dampening": 0.1}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return record(tmp_path_factory.mktemp("plain"), PLAIN, snapshot_every_n_steps=1, snapshot_scope="model",
                  checkpoint_every_n_steps=3)


@pytest.fixture(scope="module")
def momentum_run(tmp_path_factory):
    return record(tmp_path_factory.mktemp("mom"), MOMENTUM, snapshot_every_n_steps=1, snapshot_scope="model",
                  checkpoint_every_n_steps=3)


def scores(run, model, ds, q, window, mode, curvature="exact", **kw):
    where = {"windows": window} if isinstance(window, list) else {"window": window}
    return dit(run, **where, mode=mode, curvature=curvature, model=model, dataset=ds, queries=q, loss_fn=loss_fn,
               progress=False, **kw)


# ---------------------------------------------------------------------- dense reference
def dense_removal(run, model, ds, q, t1, t2, te, names=None, ggn=False):
    """Window-removal influence written out: explicit per-sample gradients and dense H_t (or GGN)
    of the batch-mean loss at the snapshot w_t. Returns [N, Q]."""
    names = names or [n for n, _ in model.named_parameters()]
    X, Y = ds.tensors
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    sizes = [int(np.prod(s)) for s in shapes.values()]

    def unflat(v):
        return {n: c.reshape(s) for (n, s), c in zip(shapes.items(), torch.split(v, sizes))}

    def flat_at(t):
        w = run.load_parameters(t)
        return torch.cat([w[n].flatten() for n in names]), w

    def out(v, w, x):
        return functional_call(model, {**w, **unflat(v)}, (x,))

    def batch_loss(v, w, x, y):
        return F.cross_entropy(out(v, w, x), y)

    v, w = flat_at(te)
    Xq, Yq = q
    u = torch.stack([torch.autograd.functional.jacobian(lambda vv: batch_loss(vv, w, Xq[j:j + 1], Yq[j:j + 1]), v)
                     for j in range(len(Xq))], 1)  # [P, Q]
    res = torch.zeros(N, len(Xq), dtype=DT)
    for t in range(te - 1, t1 - 1, -1):
        v, w = flat_at(t)
        ids = next(run.iter_steps((t, t + 1))).sample_ids
        lr = float(run.lrs[run.step_position(t)])
        if t < t2:
            for i in ids.tolist():
                g = torch.autograd.functional.jacobian(lambda vv: batch_loss(vv, w, X[i:i + 1], Y[i:i + 1]), v)
                res[i] += lr / len(ids) * (g @ u)
        if ggn:
            J = jacrev(lambda vv: out(vv, w, X[ids]))(v).reshape(len(ids) * K, -1)
            z = out(v, w, X[ids]).detach()
            Hz = hessian(lambda zz: F.cross_entropy(zz.reshape(len(ids), K), Y[ids]))(z.flatten())
            Hm = J.T @ Hz @ J
        else:
            Hm = hessian(lambda vv: batch_loss(vv, w, X[ids], Y[ids]))(v)
        u = u - lr * Hm @ u
    return res


@pytest.mark.parametrize("curvature", ["exact", "ggn"])
def test_removal_equals_dense_hessian_recursion(plain_run, curvature):
    run, model, _, ds, q, _ = plain_run
    got = scores(run, model, ds, q, (2, 5), "removal", curvature, eval_step=6).values
    want = dense_removal(run, model, ds, q, 2, 5, 6, ggn=curvature == "ggn")
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-8), (got - want).abs().max()
    assert want.abs().max() > 1e-3


def test_accrued_equals_difference_of_dense_recursions(plain_run):
    run, model, _, ds, q, _ = plain_run
    got = scores(run, model, ds, q, (3, 6), "accrued").values
    want = dense_removal(run, model, ds, q, 0, 6, 6) - dense_removal(run, model, ds, q, 0, 3, 3)
    assert torch.allclose(got, want, atol=1e-10, rtol=1e-8), (got - want).abs().max()


def test_recorded_layers_only_use_their_hessian_block(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path, PLAIN, layers=["2"], snapshot_every_n_steps=1,
                                     snapshot_scope="model")
    res = scores(run, model, ds, q, (1, 5), "removal", params="recorded")
    want = dense_removal(run, model, ds, q, 1, 5, 5, names=["2.weight", "2.bias"])
    assert torch.allclose(res.values, want, atol=1e-10, rtol=1e-8)
    assert any("held fixed" in n for n in res.approximations)
    full = scores(run, model, ds, q, (1, 5), "removal", params="model")
    assert full.meta["parameters"] > res.meta["parameters"]


# ---------------------------------------------------------------------- momentum, weight decay, replay
def weighted_retrain_derivative(init, ds, q, order, opt_kw, sample, t1, t2, te, eps=1e-5):
    """d f_q(w_te) / d(removed fraction of `sample` in [t1, t2)), by central differences of retraining."""
    def f(e):
        m = make_model()
        m.load_state_dict(init)
        w = lambda t, ids: 1.0 - e * ((ids == sample) & (t1 <= t) & (t < t2)).to(DT)  # noqa: E731
        train(m, ds, order[:te], opt_kw, weights=w)
        return F.cross_entropy(m(q[0]), q[1], reduction="none").detach()
    return (f(eps) - f(-eps)) / (2 * eps)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_and_weight_decay_adjoint_matches_retraining_derivative(tmp_path, nesterov):
    kw = {**MOMENTUM, "dampening": 0.0} if nesterov else MOMENTUM
    kw = {**kw, "nesterov": nesterov}
    run, model, init, ds, q, order = record(tmp_path, kw, checkpoint_every_n_steps=4)
    res = scores(run, model, ds, q, (2, 6), "removal", eval_step=7)
    assert "replayed from the checkpoint at step 0" in res.meta["trajectory"]
    present = np.flatnonzero(res.present.numpy())[:4]
    for i in present:
        want = weighted_retrain_derivative(init, ds, q, order, kw, int(res.train_ids[i]), 2, 6, 7)
        assert torch.allclose(res.values[i], want, rtol=1e-6, atol=1e-9), (i, res.values[i], want)


def test_replay_from_checkpoint_equals_snapshots(momentum_run):
    run, model, _, ds, q, _ = momentum_run
    for mode in ("removal", "accrued"):
        a = scores(run, model, ds, q, (4, 7), mode, source="snapshots")
        b = scores(run, model, ds, q, (4, 7), mode, source="replay")
        assert "snapshots" in a.meta["trajectory"] and "checkpoint" in b.meta["trajectory"]
        assert torch.allclose(a.values, b.values, atol=1e-12, rtol=1e-9)
        assert max(r for _, r in b.meta["replay_checks"]) < 1e-12  # replayed w_t == snapshots


@pytest.mark.parametrize("which, vectors, where", [("momentum_run", 2, "on disk"), ("plain_run", 6, "in memory")])
def test_segmented_replay_equals_one_pass(request, which, vectors, where):
    run, model, _, ds, q, _ = request.getfixturevalue(which)
    a = scores(run, model, ds, q, (1, 8), "accrued", source="replay")
    nbytes = sum(p.numel() for p in model.parameters()) * 8
    b = scores(run, model, ds, q, (1, 8), "accrued", source="replay", max_memory=vectors * nbytes)
    assert "segments of" in b.meta["trajectory"] and where in b.meta["trajectory"], b.meta["trajectory"]
    assert torch.allclose(a.values, b.values, atol=1e-13, rtol=1e-10)


# ---------------------------------------------------------------------- against retraining
def test_removal_and_accrued_correlate_with_retraining(tmp_path):
    kw = {"lr": 0.1}
    run, model, init, ds, q, order = record(tmp_path, kw, checkpoint_every_n_steps=100)
    t1, t2 = 3, 6
    ids = list(range(0, N, 2))

    def retrain_loss(drop, lo, hi):
        m = make_model()
        m.load_state_dict(init)
        w = None if drop is None else (lambda t, b: 1.0 - ((b == drop) & (lo <= t) & (t < hi)).to(DT))
        train(m, ds, order[:hi], kw, weights=w)
        return F.cross_entropy(m(q[0]), q[1], reduction="none").detach()

    base2, base1 = retrain_loss(None, 0, t2), retrain_loss(None, 0, t1)
    rem_truth = torch.stack([retrain_loss(i, t1, t2) - base2 for i in ids])
    acc_truth = torch.stack([(retrain_loss(i, 0, t2) - base2) - (retrain_loss(i, 0, t1) - base1) for i in ids])
    rem = scores(run, model, ds, q, (t1, t2), "removal").values[ids]
    acc = scores(run, model, ds, q, (t1, t2), "accrued").values[ids]
    for est, truth in ((rem, rem_truth), (acc, acc_truth)):
        for j in range(truth.shape[1]):
            r = np.corrcoef(est[:, j].numpy(), truth[:, j].numpy())[0, 1]
            assert r > 0.99, r


# ---------------------------------------------------------------------- the public entry point
def test_dit_dispatches_exact_and_lists_of_windows(plain_run):
    run, model, _, ds, q, _ = plain_run
    res = dit(run, windows=[(0, 3), (3, 6)], mode="accrued", curvature="exact", model=model, dataset=ds,
              queries=q, loss_fn=loss_fn, progress=False)
    assert [r.window for r in res] == [(0, 3), (3, 6)]
    assert res[1].method == "dit_accrued" and res[1].curvature == "exact"
    one = scores(run, model, ds, q, (3, 6), "accrued")
    assert torch.allclose(res[1].values.double(), one.values, rtol=1e-5, atol=1e-7)
    assert res[1].meta["recording_check"]["relative_error"] < 1e-10


# ---------------------------------------------------------------------- errors
def test_window_without_parameters_names_what_to_record(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path, PLAIN, snapshot_windows=[(4, 6)], checkpoint_every_n_steps=None)
    with pytest.raises(MissingDataError, match="snapshot_windows=\\[\\(1, 7\\)\\].*checkpoint_every_n_steps"):
        scores(run, model, ds, q, (1, 6), "removal", eval_step=6)
    ok = scores(run, model, ds, q, (4, 5), "removal", eval_step=5)  # snapshots 4 and 5 exist
    assert "snapshots" in ok.meta["trajectory"]


def test_an_optimizer_without_an_exact_form_cannot_be_replayed(tmp_path):
    ds, q = make_data()
    model = make_model()
    rec = GradientRecorder(str(tmp_path / "r"), model, projection="none", checkpoint_every_n_steps=1)
    X, Y = ds.tensors
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    for ids in batch_order(1):
        rec.begin_micro_batch(ids)
        loss_fn(model, (X[ids], Y[ids])).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    with pytest.raises(MissingDataError, match="RMSprop.*cannot be replayed"):
        scores(open_run(tmp_path / "r"), model, ds, q, (1, 3), "removal")


def test_mismatched_dataset_model_and_missing_queries_fail_clearly(plain_run):
    run, model, _, ds, q, _ = plain_run
    short = TensorDataset(*(t[:N // 2] for t in ds.tensors))
    with pytest.raises(ConfigurationError, match="dataset has 24 items"):
        scores(run, model, short, q, (1, 3), "removal")
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    shuffled = TensorDataset(*(t[perm] for t in ds.tensors))
    with pytest.raises(ConfigurationError, match="differ from the recorded ones"):
        scores(run, model, shuffled, q, (1, 3), "removal")
    with pytest.raises(ConfigurationError, match="does not match the run.*'0'"):
        scores(run, make_model(hidden=7), ds, q, (1, 3), "removal")
    with pytest.raises(ConfigurationError, match="pass queries="):
        dit(run, window=(1, 3), curvature="exact", model=model, dataset=ds, loss_fn=loss_fn)
    with pytest.raises(ConfigurationError, match="full-parameter-space"):
        scores(run, model, ds, None, (1, 3), "removal", query_grads=torch.zeros(3, run.dim - 1))


def test_full_space_query_gradients_stand_in_for_queries(plain_run):
    run, model, _, ds, q, _ = plain_run
    m = make_model()
    m.load_state_dict(run.load_parameters(5))
    rows = []
    for j in range(len(q[0])):
        g = torch.autograd.grad(loss_fn(m, (q[0][j:j + 1], q[1][j:j + 1])), list(m.parameters()))
        rows.append(torch.cat([x.flatten() for x in g]))
    given = scores(run, model, ds, None, (2, 5), "removal", query_grads=torch.stack(rows))
    computed = scores(run, model, ds, q, (2, 5), "removal")
    assert torch.allclose(given.values, computed.values, atol=1e-12, rtol=1e-9)
    assert any("supplied by the caller" in n for n in given.approximations)


def test_lightning_module_with_its_training_step_and_callback_checkpoints(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader

    from influence_hooks.record.callback import InfluenceCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.log("loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.5, weight_decay=1e-3)

    ds, q = make_data()
    module = Module()
    cb = InfluenceCallback(str(tmp_path / "run"), projection=32, queries=q, query_every_n_steps=1,
                           checkpoint_every_n_steps=4)
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(ds, batch_size=B, shuffle=True))
    run = open_run(tmp_path / "run")
    modes = [m.training for m in module.modules()]
    res = dit(run, (5, 7), mode="accrued", curvature="exact", model=module, dataset=ds, queries=q,
              progress=False, dtype=DT)  # loss: the module's own training_step
    assert "replayed from the checkpoint at step 0" in res.meta["trajectory"]  # accrued starts at step 0
    assert res.meta["recording_check"]["relative_error"] < 1e-3  # projected, stored as float16
    explicit = dit(run, (5, 7), mode="accrued", curvature="exact", model=module, dataset=ds, queries=q,
                   loss_fn=loss_fn, progress=False, dtype=DT)
    assert torch.allclose(res.values, explicit.values, atol=1e-12)
    assert [m.training for m in module.modules()] == modes  # computed in eval mode, modes restored
