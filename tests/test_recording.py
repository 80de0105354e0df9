"""GradientRecorder in hand-written training loops.

Specification (README, "Conventions and limits"): the row recorded for sample i at optimizer step t is
g_t(i) = grad l_i(w_t), the gradient of the sample's OWN loss at the parameters before the
update -- whatever the loss reduction, gradient accumulation or loss scaling -- or, projected,
P g_t(i) with the layer's fixed projection P. Every check differentiates each sample's loss with
torch.func at parameters copied from the training loop (conftest.func_per_sample_grads).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_rows_close, func_per_sample_grads, read_steps
from influence_hooks.errors import ConfigurationError
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage import format as fmt
from influence_hooks.storage.reader import open_run

N_DATA = 24


def mlp(dtype=torch.float64, seed=0, dropout: float | None = None) -> nn.Sequential:
    torch.manual_seed(seed)
    mid = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), *mid, nn.Linear(7, 3)).to(dtype)


def tabular(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_DATA, 5, generator=g, dtype=dtype), torch.randint(0, 3, (N_DATA,), generator=g)


def ce_sample(call, x, y):
    """One sample's own loss (a batch of one, so mean and sum agree)."""
    return F.cross_entropy(call(x), y)


def batches_of(sizes, seed=2):
    """Sample ids for each micro-batch: consecutive slices of a stream of random permutations."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.cat([torch.randperm(N_DATA, generator=g) for _ in range(sum(sizes) // N_DATA + 1)])
    return list(torch.split(stream[:sum(sizes)], list(sizes)))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def linear_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------- exact rows
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_rows_equal_each_samples_own_gradient_at_w_t(tmp_path, reduction):
    model, (X, Y) = mlp(), tabular()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float64",
                           loss_reduction=reduction)
    expected = {}
    for t, ids in enumerate(batches_of([5, 5, 5, 4])):
        expected[t] = (ids, func_per_sample_grads(model, ce_sample, (X[ids], Y[ids]), ["0", "2"]))
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids], reduction=reduction).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == [0, 1, 2, 3] and run.complete
        for b in run.iter_steps(dtype=torch.float64):
            ids, g = expected[b.step]
            assert b.sample_ids.tolist() == ids.tolist()
            assert_rows_close(b.grads, g)
            assert b.update_weight == pytest.approx(1 / len(ids) if reduction == "mean" else 1.0)
            assert b.lr == 0.1


def test_rows_of_uneven_batches_over_many_shards_are_each_samples_own_gradient(tmp_path):
    # the writer keeps one row store from shard to shard and grows it when a batch does not fit:
    # batches that grow, shrink and grow again within and across shards (2 steps per shard)
    model, (X, Y) = mlp(), tabular()
    _, expected = _train_sgd_and_reference(tmp_path / "run", model, X, Y, sizes=(3, 7, 2, 6, 1, 4, 1),
                                           projection="none", steps_per_shard=2)
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == list(range(7))
        assert len(list((tmp_path / "run" / fmt.SHARD_DIR).glob("*.h5"))) == 4
        for b in run.iter_steps(dtype=torch.float64):
            ids, g = expected[b.step]
            assert b.sample_ids.tolist() == ids.tolist()
            assert_rows_close(b.grads, g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_rows_are_each_samples_own_gradient(tmp_path, reduction):
    # three micro-batches of different sizes per step, each micro-batch loss divided by 3
    model, (X, Y) = mlp(), tabular()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float64",
                           loss_reduction=reduction)
    micro = batches_of([4, 3, 5] * 3)
    expected = {}
    for t in range(3):
        parts = micro[3 * t: 3 * t + 3]
        ids = torch.cat(parts)
        expected[t] = (ids, func_per_sample_grads(model, ce_sample, (X[ids], Y[ids]), ["0", "2"]))
        for p in parts:
            rec.begin_micro_batch(p)
            (F.cross_entropy(model(X[p]), Y[p], reduction=reduction) / 3).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.micro_batches.tolist() == [3, 3, 3]
        for b in run.iter_steps(dtype=torch.float64):
            ids, g = expected[b.step]
            assert b.sample_ids.tolist() == ids.tolist()
            assert_rows_close(b.grads, g)


@pytest.mark.parametrize("reduction,micro,divided", [
    ("mean", 1, True), ("sum", 1, True), ("mean", 3, True), ("sum", 3, True),
    ("mean", 2, False), ("sum", 2, False)])
def test_update_weight_reproduces_the_sgd_update(tmp_path, reduction, micro, divided):
    # plain SGD: w_{t+1} - w_t = -lr * update_weight * sum_i g_t(i), with every parameter recorded
    model, (X, Y) = mlp(), tabular()
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float64",
                           loss_reduction=reduction, loss_divided_by_micro_batches=divided)
    ids_all = batches_of([4] * (3 * micro))
    deltas = []
    for t in range(3):
        before = flat_params(model)
        for p in ids_all[micro * t: micro * (t + 1)]:
            rec.begin_micro_batch(p)
            loss = F.cross_entropy(model(X[p]), Y[p], reduction=reduction)
            (loss / micro if divided else loss).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
        deltas.append(flat_params(model) - before)
    rec.finish()
    with open_run(tmp_path / "run") as run:
        for b in run.iter_steps(dtype=torch.float64):
            predicted = -b.lr * b.update_weight * b.grads.sum(0)
            assert_rows_close(predicted, deltas[b.step])


class SeqModel(nn.Module):
    """Token ids [N, T] -> Embedding(padding_idx) -> LayerNorm -> GPT-2 Conv1D -> Linear, positions summed."""

    def __init__(self, vocab=11, d=6, classes=3):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.mix = Conv1D(d, d)  # (nf, nx)
        nn.init.normal_(self.mix.weight, std=0.5)
        nn.init.normal_(self.mix.bias, std=0.5)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        return self.head(torch.tanh(self.mix(h))).sum(1)


class SmallCNN(nn.Module):
    """[N, 2, 6, 6] -> Conv2d(stride 2, padding 1) -> Conv1d(padding 2) over the 9 positions -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv1 = nn.Conv1d(3, 4, 3, padding=2)
        self.head = nn.Linear(4 * 11, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(x)).flatten(2)  # [N, 3, 9]
        return self.head(torch.tanh(self.conv1(h)).flatten(1))


def seq_data():
    pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 11, (N_DATA, 7), generator=g)
    ids[::2, -3:] = 0  # padding at the end of every other sequence
    return SeqModel, ids, torch.randint(0, 3, (N_DATA,), generator=g)


def cnn_data():
    g = torch.Generator().manual_seed(4)
    return SmallCNN, torch.randn(N_DATA, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N_DATA,), generator=g)


def _train_sgd_and_reference(run_dir, model, X, Y, sizes=(5, 5, 5), **options):
    """Train plain SGD on batches of `sizes`, recording; return (recorder, reference rows at w_t)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(run_dir, model, storage_dtype="float64", **options)
    layers = [l.name for l in rec.layers]
    expected = {}
    for t, ids in enumerate(batches_of(sizes)):
        expected[t] = (ids, func_per_sample_grads(model, ce_sample, (X[ids], Y[ids]), layers))
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return rec, expected


@pytest.mark.parametrize("make", [seq_data, cnn_data], ids=["embedding_layernorm_gpt2conv1d_linear", "conv2d_conv1d"])
def test_exact_rows_of_sequence_and_conv_layers_equal_torch_func(tmp_path, make):
    cls, X, Y = make()
    torch.manual_seed(0)
    model = cls().double()
    rec, expected = _train_sgd_and_reference(tmp_path / "run", model, X, Y, projection="none")
    expected_layers = ["emb", "norm", "mix", "head"] if cls is SeqModel else ["conv2", "conv1", "head"]
    assert [l.name for l in rec.layers] == expected_layers  # every layer type is recorded
    got = read_steps(tmp_path / "run")
    assert sorted(got) == [0, 1, 2]
    for t, (ids, rows) in got.items():
        assert ids.tolist() == expected[t][0].tolist()
        assert_rows_close(rows, expected[t][1])


@pytest.mark.parametrize("make", [seq_data, cnn_data], ids=["embedding_layernorm_gpt2conv1d_linear", "conv2d_conv1d"])
def test_projected_columns_equal_dense_projection_of_exact_gradient(tmp_path, make):
    # default projection=int: Kronecker for Linear/Conv/Embedding/Conv1D, dense Gaussian for LayerNorm
    cls, X, Y = make()
    torch.manual_seed(0)
    model = cls().double()
    rec, expected = _train_sgd_and_reference(tmp_path / "run", model, X, Y, projection=40)
    kinds = {l.name: l.spec.kind for l in rec.layers}
    assert "kronecker" in kinds.values()
    assert all(l.spec.out_dim < l.spec.grad_dim for l in rec.layers if l.spec.kind == "kronecker")
    P = torch.block_diag(*[l.projector.dense_matrix(torch.float64) for l in rec.layers])
    assert P.shape[0] == rec.dim
    got = read_steps(tmp_path / "run")
    for t, (ids, rows) in got.items():
        assert ids.tolist() == expected[t][0].tolist()
        assert_rows_close(rows, expected[t][1] @ P.T)


def test_recorded_lr_is_that_of_the_recorded_layers_group_at_each_step(tmp_path):
    model, (X, Y) = mlp(), tabular()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                           {"params": model[2].parameters(), "lr": 0.2}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rec = GradientRecorder(tmp_path / "run", model, layers=["2"], projection="none", storage_dtype="float64")
    deltas = []
    for ids in batches_of([4, 4, 4]):
        before = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
        sched.step()
        deltas.append(torch.cat([p.detach().reshape(-1) for p in model[2].parameters()]) - before)
    rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.lrs.tolist() == pytest.approx([0.2, 0.1, 0.05])
        for b in run.iter_steps(dtype=torch.float64):  # the lr is the one that moved these layers
            assert_rows_close(-b.lr * b.update_weight * b.grads.sum(0), deltas[b.step])
        shard = sorted((tmp_path / "run" / fmt.SHARD_DIR).glob("*.h5"))[0]
    with h5py.File(shard, "r") as f:
        lr_groups = f[fmt.STEPS]["lr_groups"][()]
    np.testing.assert_allclose(lr_groups, [[0.05, 0.2], [0.025, 0.1], [0.0125, 0.05]])


def test_recorded_layers_in_groups_with_different_lrs_warn(tmp_path):
    # one lr is recorded per step, so layers of another group would be weighted by the wrong lr
    model, (X, Y) = mlp(), tabular()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                           {"params": model[2].parameters(), "lr": 0.2}])
    rec = GradientRecorder(tmp_path / "run", model, projection="none")
    rec.begin_micro_batch([0, 1])
    F.cross_entropy(model(X[:2]), Y[:2]).backward()
    with pytest.warns(RuntimeWarning, match=r"different learning rates \[0.05, 0.2\].*single param group"):
        rec.end_step(opt)
    rec.finish()


# ---------------------------------------------------------------------------- queries
def test_query_gradients_equal_torch_func_at_w_t_and_at_w_T(tmp_path):
    model, (X, Y) = mlp(dropout=0.3), tabular()
    Xq, Yq = tabular(seed=9)
    Xq, Yq = Xq[:3], Yq[:3]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float64",
                           queries=(Xq, Yq), query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           query_every_n_steps=1)
    layers = linear_layers(model)

    def query_reference():  # query loss at the current parameters, deterministic (eval mode)
        model.eval()
        try:
            return func_per_sample_grads(model, ce_sample, (Xq, Yq), layers)
        finally:
            model.train()

    expected = {}
    for t, ids in enumerate(batches_of([4, 4, 4])):
        expected[t] = query_reference()
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    expected[3] = query_reference()
    rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.final_step == 3
        assert run.query_steps.tolist() == [0, 1, 2, 3]
        assert run.query_ids.tolist() == [0, 1, 2]
        for t, g in expected.items():
            assert_rows_close(run.query_gradients(t, dtype=torch.float64), g)


def _train_with_dropout(run_dir=None, steps=6) -> tuple[torch.Tensor, list]:
    """Same seed, same loop; batches and dropout masks come from the global RNG, so any change to
    the RNG state by the recorder would change the trajectory."""
    model, (X, Y) = mlp(dropout=0.3), tabular()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = None
    if run_dir is not None:
        Xq, Yq = tabular(seed=9)
        # the query loss draws random numbers (as augmentation would); the recorder must restore the RNG
        rec = GradientRecorder(run_dir, model, projection=16, queries=(Xq[:3], Yq[:3]),
                               query_loss_fn=lambda m, b: F.cross_entropy(m(b[0] + 0 * torch.randn_like(b[0])), b[1]),
                               query_every_n_steps=1, snapshot_every_n_steps=2, checkpoint_every_n_steps=3)
    side_effects = []
    for _ in range(steps):
        ids = torch.randperm(N_DATA)[:6]
        if rec:
            rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        if rec:
            grads, rng = [p.grad.clone() for p in model.parameters()], torch.get_rng_state()
            rec.end_step(opt)
            side_effects.append((
                all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters())),
                torch.equal(rng, torch.get_rng_state()),
                all(m.training for m in model.modules())))
        opt.step()
        opt.zero_grad()
    if rec:
        rec.finish()
    return flat_params(model), side_effects


def test_recording_with_queries_leaves_grad_rng_and_trajectory_unchanged(tmp_path):
    plain, _ = _train_with_dropout()
    recorded, side_effects = _train_with_dropout(tmp_path / "run")
    assert side_effects and all(all(s) for s in side_effects), side_effects  # .grad, RNG, train mode
    assert torch.equal(plain, recorded)
    with open_run(tmp_path / "run") as run:
        assert run.query_steps.tolist() == list(range(7)) and run.steps.tolist() == list(range(6))


# ---------------------------------------------------------------------------- mixed precision
def test_grad_scaler_recorded_gradients_are_unscaled(tmp_path):
    model, (X, Y) = mlp(), tabular()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float64")
    expected = {}
    for t, ids in enumerate(batches_of([5, 5, 5])):
        expected[t] = func_per_sample_grads(model, ce_sample, (X[ids], Y[ids]), ["0", "2"])
        rec.begin_micro_batch(ids)
        scaler.scale(F.cross_entropy(model(X[ids]), Y[ids])).backward()
        rec.end_step(opt, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    rec.finish()
    got = read_steps(tmp_path / "run")
    assert sorted(got) == [0, 1, 2]
    for t, (_, rows) in got.items():
        assert_rows_close(rows, expected[t])


def _row_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (actual.double() - expected.double()).norm(dim=1) / expected.double().norm(dim=1)


@pytest.mark.parametrize("mode", ["bf16_autocast", "bf16_parameters"])
def test_bf16_recorded_gradients_are_close_to_fp32_and_finite(tmp_path, mode):
    model, (X, Y) = mlp(torch.float32), tabular(torch.float32)
    if mode == "bf16_parameters":
        model = model.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", storage_dtype="float32")
    reference = mlp(torch.float32)
    expected = {}
    for t, ids in enumerate(batches_of([5, 5, 5])):
        reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        x = X[ids].to(next(model.parameters()).dtype)  # bf16 inputs for bf16 parameters
        expected[t] = func_per_sample_grads(reference, ce_sample, (x.float(), Y[ids]), ["0", "2"])
        rec.begin_micro_batch(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
            loss = F.cross_entropy(model(x), Y[ids])
        loss.backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    got = read_steps(tmp_path / "run")
    assert sorted(got) == [0, 1, 2]
    for t, (_, rows) in got.items():
        assert torch.isfinite(rows).all()
        err = _row_rel_err(rows, expected[t])
        assert err.max() < 2e-2, err


def test_bf16_parameter_snapshots_hold_the_exact_parameters_of_each_step(tmp_path):
    # numpy has no bfloat16: the files hold float32, which represents every bfloat16 value exactly
    model, (X, Y) = mlp(torch.float32), tabular(torch.float32)
    model = model.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", snapshot_every_n_steps=1)
    before = {}
    for t, ids in enumerate(batches_of([5, 5, 5])):
        before[t] = {k: v.detach().clone() for k, v in model.named_parameters()}
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids].to(torch.bfloat16)), Y[ids]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    with open_run(tmp_path / "run") as run:
        for t, params in before.items():
            got = run.load_parameters(t)
            assert set(got) == set(params)
            for name, p in params.items():
                assert got[name].dtype == torch.float32 and torch.equal(got[name].to(torch.bfloat16), p)


# ---------------------------------------------------------------------------- layer selection
class EncoderHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 6))
        self.head = nn.Sequential(nn.Sequential(nn.Linear(6, 3)))  # a container of a container

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


@pytest.mark.parametrize("options,expected", [
    ({}, ["encoder.0", "encoder.1", "encoder.2", "head.0.0"]),
    ({"layers": ["encoder.*"]}, ["encoder.0", "encoder.1", "encoder.2"]),
    ({"layers": "head"}, ["head.0.0"]),
    ({"layers": ["encoder.*", "head"], "exclude": ["encoder.1"]}, ["encoder.0", "encoder.2", "head.0.0"]),
    ({"layer_types": [nn.LayerNorm]}, ["encoder.1"]),
    ({"layer_types": ["Linear"], "exclude": ["head.*"]}, ["encoder.0", "encoder.2"]),
], ids=["default_every_supported_layer", "glob", "container_expands", "exclude", "type", "type_by_name"])
def test_layer_selection_records_exactly_the_selected_layers(tmp_path, options, expected):
    torch.manual_seed(0)
    model = EncoderHead().double()
    X, Y = torch.randn(N_DATA, 4, dtype=torch.float64), torch.randint(0, 3, (N_DATA,))
    rec, ref = _train_sgd_and_reference(tmp_path / "run", model, X, Y, projection="none", **options)
    assert [l.name for l in rec.layers] == expected
    with open_run(tmp_path / "run") as run:
        assert [l.name for l in run.layers] == expected
    for t, (ids, rows) in read_steps(tmp_path / "run").items():
        assert_rows_close(rows, ref[t][1])  # the reference differentiates exactly `expected`
        assert rows.shape[1] == sum(model.get_submodule(n).weight.numel() + model.get_submodule(n).bias.numel()
                                    for n in expected)


class CalledFunctionally(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)  # used through F.linear: its hooks never run

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.out.weight, self.out.bias)


def test_selected_layer_never_called_as_a_module_fails_at_the_first_step(tmp_path):
    model = CalledFunctionally()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none")
    rec.begin_micro_batch([0, 1])
    F.cross_entropy(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    with pytest.raises(ConfigurationError, match=r"\['out'\].*exclude"):
        rec.end_step(opt)
    rec.abort()


# ---------------------------------------------------------------------------- modules called 0 or 2 times
class SharedLayer(nn.Module):
    """`fc` is applied twice in one forward pass (shared weights), `extra` only when asked."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.extra = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)
        self.use_extra = True

    def forward(self, x):
        h = torch.tanh(self.fc(torch.tanh(self.fc(x))))
        if self.use_extra:
            h = h + torch.tanh(self.extra(h))
        return self.head(h)


@pytest.mark.parametrize("projection", ["none", 24])
def test_a_module_called_twice_records_the_sum_of_its_calls_and_an_unused_one_zeros(tmp_path, projection):
    # two micro-batches per step: `extra` takes part in the first only, so the second's rows hold
    # zeros in its columns, which is its true per-sample gradient there
    torch.manual_seed(0)
    model = SharedLayer().double()
    X, Y = tabular()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection=projection, storage_dtype="float64")
    layers = [l.name for l in rec.layers]
    assert layers == ["fc", "extra", "head"]
    expected = {}
    for t, (first, second) in enumerate(zip(*[iter(batches_of([4, 4] * 3))] * 2)):
        micro = ((first, True), (second, False))
        parts = []
        for ids, use_extra in micro:  # the reference first: the recorder's hooks would see it
            model.use_extra = use_extra
            parts.append(func_per_sample_grads(model, ce_sample, (X[ids], Y[ids]), layers))
        expected[t] = torch.cat(parts)
        for ids, use_extra in micro:
            model.use_extra = use_extra
            rec.begin_micro_batch(ids)
            (F.cross_entropy(model(X[ids]), Y[ids]) / 2).backward()
        model.use_extra = True
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    P = torch.block_diag(*[l.projector.dense_matrix(torch.float64) for l in rec.layers])
    extra = rec.layers[1]
    got = read_steps(tmp_path / "run")
    assert sorted(got) == [0, 1, 2]
    for t, (_, rows) in got.items():
        assert_rows_close(rows, expected[t] @ P.T)
        assert (rows[4:, extra.offset:extra.offset + extra.spec.out_dim] == 0).all()
        assert (rows[:4, extra.offset:extra.offset + extra.spec.out_dim] != 0).any()


def test_end_step_reads_nothing_from_a_record_the_writer_already_took(tmp_path, monkeypatch):
    # the writer thread moves a step's rows into its shard as soon as it gets the record; here it
    # gets every record at once and finishes with it before end_step returns (the worst timing)
    from influence_hooks.storage.writer import RunWriter

    handed = RunWriter.write_step

    def write_and_wait(self, record):
        handed(self, record)
        self.drain()
        assert record.grads is None  # taken and moved by the writer thread

    monkeypatch.setattr(RunWriter, "write_step", write_and_wait)
    model, (X, Y) = mlp(), tabular()
    rec, expected = _train_sgd_and_reference(tmp_path / "run", model, X, Y, projection="none",
                                             queue_size=1)
    assert rec.stats.rows == 15 and rec.stats.bytes == 15 * rec.plan["dim"] * 8
    with open_run(tmp_path / "run") as run:
        for b in run.iter_steps(dtype=torch.float64):
            assert_rows_close(b.grads, expected[b.step][1])
