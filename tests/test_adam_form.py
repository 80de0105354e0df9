"""The Adam form of the recorded-gradient estimators (aggregate/stepsize.py): the per-layer step
sizes the recorder stores, checked against torch.optim.AdamW's own update, and every estimator
in that form against a dense brute-force computation from the same recorded rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks import dit, dvemb, open_run, self_influence, tracin
from influence_hooks.errors import ConfigurationError
from influence_hooks.record.optim import adam_step_sizes, momentum_spread
from influence_hooks.record.recorder import GradientRecorder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_momentum_spread_sums_the_bias_corrected_momentum_weights():
    b1 = 0.9
    for n in (1, 2, 5, 40):
        brute = sum((1 - b1) * b1**k / (1 - b1 ** (n + k)) for k in range(5000))
        assert momentum_spread(b1, n) == pytest.approx(brute, rel=1e-9)
    assert momentum_spread(b1, 1) > 2  # the first steps weigh a gradient several times
    assert momentum_spread(b1, 10_000) == pytest.approx(1.0, rel=1e-9)
    assert momentum_spread(0.0, 3) == 1.0
    from influence_hooks.record.optim import _spread  # fused/capturable Adam: the count is a device tensor

    for n in (1, 7, 300):
        assert float(_spread(0.9, torch.tensor(float(n), dtype=torch.float64))) == pytest.approx(momentum_spread(0.9, n))


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_the_first_step_size_is_what_adam_moves_per_unit_of_gradient(opt_cls):
    """At step 1 Adam moves each coordinate by lr g / (|g| + eps): the recorded step size is the
    squared-gradient-weighted mean of that ratio (times the momentum spread)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = opt_cls(model.parameters(), lr=0.05, eps=1e-3, weight_decay=0.0)
    F.cross_entropy(model(torch.randn(9, 4, dtype=torch.float64)), torch.randint(0, 3, (9,))).backward()

    class Layer:  # what adam_step_sizes reads of a recorded layer
        def __init__(self, module):
            self.module = module

    layers = [Layer(model[0]), Layer(model[2])]
    sizes = adam_step_sizes(opt, layers)
    grads = [[p.grad.clone() for p in l.module.parameters()] for l in layers]
    before = [[p.detach().clone() for p in l.module.parameters()] for l in layers]
    opt.step()
    for j, layer in enumerate(layers):
        moved = sum(((b - p.detach()) * g).sum() for p, b, g in zip(layer.module.parameters(), before[j], grads[j]))
        g2 = sum((g * g).sum() for g in grads[j])
        expected = moved / g2 * momentum_spread(0.9, 1)
        assert sizes[j].item() == pytest.approx(expected.item(), rel=1e-5)


def _adamw_run(path, steps=6, projection="none"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    X, Y = torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,))
    rec = GradientRecorder(path, model, projection=projection, storage_dtype="float64", overwrite=True,
                           queries=(X[:3], Y[:3]), query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           query_every_n_steps=1)
    for t in range(steps):
        ids = torch.arange(8) + 8 * t
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return open_run(path)


def _dense(run):
    """Per step: (ids, G [B, K], w_t, A_t [K]) and u_q(t) [Q, K], read back without the estimators."""
    cols = np.zeros(run.dim, np.int64)
    for j, layer in enumerate(run.layers):
        cols[layer.offset:layer.offset + layer.dim] = j
    steps = []
    for b in run.iter_steps(dtype=torch.float64):
        i = run.step_position(b.step)
        a = torch.from_numpy(run.table.layer_lrs[i][cols])
        steps.append((b.step, b.sample_ids.numpy(), b.grads, float(run.update_weights[i]), a))
    return steps


def test_recorded_estimators_in_the_adam_form_equal_a_dense_computation(tmp_path):
    run = _adamw_run(tmp_path / "run")
    assert run.table.layer_lrs is not None and np.isfinite(run.table.layer_lrs).all()
    steps = _dense(run)
    n, Q, T = len(run.sample_ids), 3, run.final_step
    pos = {int(s): k for k, s in enumerate(run.sample_ids)}

    trac = torch.zeros(n, Q, dtype=torch.float64)
    selfi = torch.zeros(n, dtype=torch.float64)
    for t, ids, G, w, a in steps:
        u = run.query_gradients(t, dtype=torch.float64)
        for r, i in enumerate(ids):
            trac[pos[int(i)]] += w * (u @ (a * G[r]))
            selfi[pos[int(i)]] += w * (G[r] @ (a * G[r]))
    got = tracin(run, progress=False, dtype=torch.float64)
    assert got.meta["step_size"] == "adam" and any("Adam form" in n for n in got.approximations)
    torch.testing.assert_close(got.values, trac, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(self_influence(run, progress=False, dtype=torch.float64).values, selfi,
                               rtol=1e-10, atol=1e-14)

    # removal at the end of training over [1, 5): u^T J_{T-1} ... J_{t+1} A_t w_t g_t(i), J = I - A H
    K = run.dim
    uT = run.query_gradients(T, dtype=torch.float64)
    for curvature in ("none", "fisher"):
        expected = torch.zeros(n, Q, dtype=torch.float64)
        V = uT.T.clone()  # [K, Q]: J_{T-1}^T ... applied so far
        for t, ids, G, w, a in reversed(steps):
            if 1 <= t < 5:
                for r, i in enumerate(ids):
                    expected[pos[int(i)]] += w * ((a * G[r]) @ V)
            if curvature == "fisher":
                H = w * G.T @ G
                V = (torch.eye(K, dtype=torch.float64) - torch.diag(a) @ H).T @ V
        got = dit(run, window=(1, 5), eval_step="final", curvature=curvature, progress=False, dtype=torch.float64,
                  step_size="adam")
        present = torch.from_numpy(np.isin(run.sample_ids, np.concatenate([s[1] for s in steps if 1 <= s[0] < 5])))
        torch.testing.assert_close(got.values[present], expected[present], rtol=1e-9, atol=1e-14)
        if curvature == "fisher":
            emb = dvemb(run, window=(1, 5), progress=False, dtype=torch.float64, path=tmp_path / "emb.h5",
                        step_size="adam")
            with emb:
                scores = emb.scores(uT, dtype=torch.float64, progress=False)
            torch.testing.assert_close(scores.values[present], expected[present], rtol=1e-9, atol=1e-14)

    # the SGD form on the same run is what it was: eta_t w_t, no column scale
    sgd = tracin(run, progress=False, dtype=torch.float64, step_size="sgd")
    plain = torch.zeros(n, Q, dtype=torch.float64)
    for t, ids, G, w, _a in steps:
        u = run.query_gradients(t, dtype=torch.float64)
        for r, i in enumerate(ids):
            plain[pos[int(i)]] += float(run.lrs[run.step_position(t)]) * w * (u @ G[r])
    torch.testing.assert_close(sgd.values, plain, rtol=1e-10, atol=1e-14)
    assert sgd.meta["step_size"] == "sgd" and any("SGD form" in n for n in sgd.approximations)


def test_projected_adam_runs_use_the_form_and_the_command_line_takes_it(tmp_path, capsys):
    from influence_hooks.cli import main as cli

    run = _adamw_run(tmp_path / "run", projection=8)
    assert run.table.layer_lrs.shape == (6, 2)
    assert dit(run, window=(0, 6), curvature="none", progress=False).meta["step_size"] == "adam"
    # with curvature, 'auto' is the SGD form (the Adam form measured worse there on early windows)
    auto = dit(run, window=(0, 6), curvature="fisher", progress=False)
    assert auto.meta["step_size"] == "sgd" and any("step_size='adam'" in n for n in auto.approximations)
    a = dit(run, window=(0, 6), curvature="fisher", progress=False, step_size="adam")
    b = dit(run, window=(0, 6), curvature="fisher", progress=False, step_size="sgd")
    assert not torch.allclose(a.values, b.values)
    target = tmp_path / "sgd.h5"
    assert cli(["dit", str(run.path), "--window", "0:6", "--step-size", "sgd", "--quiet", "--out", str(target)]) == 0
    from influence_hooks.aggregate.results import InfluenceScores

    torch.testing.assert_close(InfluenceScores.load(target).values, b.values)
    # embeddings computed in one form are not reused for the other
    assert cli(["dvemb", str(run.path), "--quiet", "--step-size", "adam"]) == 0
    from influence_hooks.aggregate import DataValueEmbeddings

    with DataValueEmbeddings.load(run.path / "dvemb.h5", run=run) as emb:
        assert emb.step_size == "adam"
    capsys.readouterr()
    assert cli(["dvemb", str(run.path), "--quiet", "--reuse"]) != 0  # 'auto' is the SGD form for dvemb
    assert "drop --reuse" in capsys.readouterr().err
    assert cli(["dvemb", str(run.path), "--quiet", "--reuse", "--step-size", "adam"]) == 0


def test_the_adam_form_is_refused_where_it_cannot_apply(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "sgd", model, projection="none", overwrite=True)
    for t in range(2):
        rec.begin_micro_batch(torch.arange(4) + 4 * t)
        F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    run = open_run(tmp_path / "sgd")
    assert run.table.layer_lrs is None
    with pytest.raises(ConfigurationError, match="step_size='sgd'"):
        self_influence(run, step_size="adam", progress=False)
    with pytest.raises(ConfigurationError, match="step_size must be one of"):
        self_influence(run, step_size="adamw", progress=False)
    assert self_influence(run, progress=False).meta.get("step_size", "sgd") == "sgd"
    with pytest.raises(ConfigurationError, match="full-space"):
        dit(run, curvature="exact", step_size="sgd", model=model)


def test_steps_without_recorded_step_sizes_use_the_learning_rate_and_say_so(tmp_path):
    from influence_hooks.aggregate.stepsize import StepSizes
    from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

    manifest = {"dim": 2, "storage_dtype": "float64", "run_id": "mixed",
                "layers": [{"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2,
                            "grad_dim": 2, "param_shapes": [["weight", [1, 2]]], "projection": {"kind": "none"}}]}
    w = RunWriter.create(tmp_path, manifest, options=WriterOptions(steps_per_shard=2))
    for t in range(4):  # steps 0 and 1 recorded without Adam's step sizes (an older version)
        w.write_step(StepRecord(step=t, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=1, update_weight=1.0,
                                micro_batches=1, sample_ids=np.array([t]), grads=torch.ones(1, 2, dtype=torch.float64),
                                layer_lr=None if t < 2 else torch.tensor([2.0])))
    w.close(final_step=4)
    run = open_run(tmp_path)
    assert np.isnan(run.table.layer_lrs[:2]).all() and (run.table.layer_lrs[2:] == 2.0).all()
    sizes = StepSizes(run, "adam")
    assert sizes.missing == 2 and "2 step(s) of the run have no recorded step sizes" in sizes.note
    s = self_influence(run, progress=False, dtype=torch.float64, step_size="adam")
    torch.testing.assert_close(s.values, torch.tensor([0.2, 0.2, 4.0, 4.0], dtype=torch.float64))  # |g|^2 * size


def test_a_custom_curvature_without_apply_is_refused_in_the_adam_form(tmp_path):
    from influence_hooks.aggregate.curvature import CurvatureOperator

    class PropagateOnly(CurvatureOperator):
        name = "propagate-only"

        def propagate(self, batch, U, lr, *, GU=None):
            U.mul_(0.5)

    run = _adamw_run(tmp_path / "run", projection=8)
    with pytest.raises(ConfigurationError, match="defines propagate\\(\\) only"):
        dit(run, window=(0, 6), curvature=PropagateOnly(), step_size="adam", progress=False)
    dit(run, window=(0, 6), curvature=PropagateOnly(), step_size="sgd", progress=False)


def test_step_sizes_with_parameters_at_different_step_counts_equal_a_per_coordinate_computation():
    """Parameters of one group can be at different Adam step counts (one got no gradient for a while),
    and some may have no state yet: the per-parameter path against the formula, coordinate by coordinate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.99), eps=1e-3)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(9, 4, dtype=torch.float64)), torch.randint(0, 3, (9,))).backward()
        opt.step()
        opt.zero_grad()
    opt.state[model[0].bias]["step"] = torch.tensor(1.0)  # behind the others
    del opt.state[model[2].bias]  # no state yet
    F.cross_entropy(model(torch.randn(9, 4, dtype=torch.float64)), torch.randint(0, 3, (9,))).backward()

    class Layer:
        def __init__(self, module):
            self.module = module

    got = adam_step_sizes(opt, [Layer(model[0]), Layer(model[2])])
    for j, module in enumerate((model[0], model[2])):
        num = den = 0.0
        for p in module.parameters():
            st = opt.state.get(p, {})
            n = float(st["step"]) + 1 if "step" in st else 1.0
            v = 0.01 * p.grad**2 + (0.99 * st["exp_avg_sq"] if "exp_avg_sq" in st else 0)
            size = 0.05 * momentum_spread(0.8, int(n)) / ((v / (1 - 0.99**n)).sqrt() + 1e-3)
            num += float((size * p.grad**2).sum())
            den += float((p.grad**2).sum())
        assert got[j].item() == pytest.approx(num / den, rel=1e-5)


def test_step_sizes_follow_changes_of_the_param_groups():
    """The parameter-to-group index is cached per optimizer: a group added later, or a parameter
    replaced inside a group, is seen at the next step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    class Layer:
        def __init__(self, module):
            self.module = module

    layers = [Layer(model[0]), Layer(model[2])]
    opt = torch.optim.AdamW(list(model[0].parameters()), lr=0.05)

    def sizes():
        opt.zero_grad()
        model.zero_grad()
        F.cross_entropy(model(torch.randn(9, 4)), torch.randint(0, 3, (9,))).backward()
        return adam_step_sizes(opt, layers)

    assert sizes()[1] == 0  # model[2] is not in the optimizer
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    assert sizes()[1] > 0
    opt.param_groups[1]["params"][0] = nn.Parameter(torch.zeros(3, 6))  # model[2].weight replaced
    got = sizes()
    opt2 = torch.optim.AdamW([{"params": list(model[0].parameters())}, {"params": [model[2].bias]}], lr=0.05)
    assert got[1].item() == pytest.approx(adam_step_sizes(opt2, layers)[1].item(), rel=1e-6)
