"""validate: influence methods against actual retraining (influence_hooks.validation).

Tiny float64 MLPs trained by hand with torch.optim.SGD and recorded with checkpoints. Every check
is against a computation written here, independent of validate's retraining: the recorded
checkpoints themselves, a brute-force retraining from the initial weights with a real
torch.optim.SGD and the full-batch loss, and scipy's correlations for the statistics.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import TensorDataset

from influence_hooks.cli import main as cli_main
from influence_hooks.errors import ConfigurationError, MissingDataError
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage.reader import open_run
from influence_hooks.validation import ReproductionError, validate
from influence_hooks.validation.lds import agreement, lds, subset_predictions

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, D, H, K, B, EPOCHS = 40, 5, 6, 3, 8, 4          # 5 steps per epoch, 20 steps
WINDOWS = [(0, 5), (7, 13), (15, 20)]               # (7, 13) starts between checkpoints: a replay from 5
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUIET = dict(progress=False, verbose=False)


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def make_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=DT)
    Y = torch.randint(0, K, (N,), generator=g)
    Xq, Yq = torch.randn(4, D, generator=g, dtype=DT), torch.randint(0, K, (4,), generator=g)
    return TensorDataset(X, Y), (Xq, Yq)


def make_model(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(D, H), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(H, K)]
    return nn.Sequential(*layers).to(DT)


def batch_order(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [p[b:b + B] for _ in range(EPOCHS) for p in [torch.randperm(N, generator=g)] for b in range(0, N, B)]


def record(path, opt_cls=torch.optim.SGD, opt_kw=None, *, dropout=0.0, checkpoints=5, precision=None):
    """Train with the real optimizer while GradientRecorder records (exact gradients, checkpoints)."""
    ds, q = make_data()
    model = make_model(dropout)
    init = copy.deepcopy(model.state_dict())
    rec = GradientRecorder(str(path), model, projection="none", storage_dtype="float64", queries=q,
                           query_loss_fn=loss_fn, query_every_n_steps=1, checkpoint_every_n_steps=checkpoints,
                           precision=precision)
    opt = opt_cls(model.parameters(), **(opt_kw or {"lr": 0.5}))
    X, Y = ds.tensors
    order = batch_order()
    model.train()
    for t, ids in enumerate(order):
        rec.begin_micro_batch(ids)
        loss = loss_fn(model, (X[ids], Y[ids]))
        loss.backward()
        rec.end_step(opt, epoch=t // (N // B), loss=loss.detach())
        opt.step()
        opt.zero_grad()
    rec.finish()
    return open_run(path), model, init, ds, q, order


def brute_force(init, ds, q, order, opt_kw, dropped, window, eval_step):
    """Query losses [Q] at eval_step of a model retrained from the initial weights with the real
    torch.optim optimizer (SGD, or the class under opt_kw['cls']), the ids in `dropped` weighted 0
    in the steps of `window` (mean over |B_t|)."""
    model = make_model()
    model.load_state_dict(init)
    kw = dict(opt_kw)
    opt = kw.pop("cls", torch.optim.SGD)(model.parameters(), **kw)
    X, Y = ds.tensors
    drop = torch.zeros(N, dtype=torch.bool)
    drop[torch.as_tensor(np.asarray(dropped, np.int64))] = True
    for t, ids in enumerate(order[:eval_step]):
        c = torch.ones(len(ids), dtype=DT)
        if window[0] <= t < window[1]:
            c[drop[ids]] = 0.0
        (F.cross_entropy(model(X[ids]), Y[ids], reduction="none") * c).mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return F.cross_entropy(model(q[0]), q[1], reduction="none").numpy()


PLAIN = {"lr": 0.5}
MOMENTUM = {"lr": 0.2, "momentum": 0.9, "weight_decay": 0.01, "nesterov": True}
ADAMW = {"cls": torch.optim.AdamW, "lr": 0.02, "betas": (0.9, 0.99), "weight_decay": 0.05}


def _validated(path, opt_kw):
    kw = dict(opt_kw)
    run, model, init, ds, q, order = record(path, kw.pop("cls", torch.optim.SGD), kw)
    v = validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, windows=WINDOWS, samples=6,
                 lds="both", lds_subsets=6, methods=("tracin", "dit_fisher", "dit_exact", "dvemb"), out=None, **QUIET)
    return v, run, init, ds, q, order, opt_kw


@pytest.fixture(scope="module")
def plain_validated(tmp_path_factory):
    return _validated(tmp_path_factory.mktemp("plain") / "run", PLAIN)


@pytest.fixture(scope="module")
def momentum_validated(tmp_path_factory):
    return _validated(tmp_path_factory.mktemp("momentum") / "run", MOMENTUM)


@pytest.fixture(scope="module")
def adamw_validated(tmp_path_factory):
    return _validated(tmp_path_factory.mktemp("adamw") / "run", ADAMW)


@pytest.fixture(params=["plain", "momentum", "adamw"])
def validated(request):
    """validate on a plain-SGD run, a run with momentum, Nesterov and weight decay, and an AdamW run
    (replayed with its moments from the checkpoints)."""
    return request.getfixturevalue(f"{request.param}_validated")


# ---------------------------------------------------------------------- the ground truth
def test_retraining_with_nothing_left_out_reproduces_every_recorded_checkpoint(validated):
    v, run, *_ = validated
    assert v.reproduced
    passed = {c.step for c in v.checks if c.what.startswith("parameters")}
    # every checkpoint after a retraining's start and up to its end was compared (the whole-run LDS passes all)
    assert passed == {int(s) for s in run.checkpoint_steps if s > 0}
    assert v.reproduction_error < 1e-12  # float64: float tolerance
    assert any("per-sample gradients" in c.what for c in v.checks)
    losses = [c for c in v.checks if "batch losses" in c.what]  # the losses the training loop recorded
    assert losses and max(c.relative_error for c in losses) < 1e-12


def test_leave_one_out_truth_equals_brute_force_retraining(validated):
    v, run, init, ds, q, order, opt_kw = validated
    assert [s.window for s in v.windows] == WINDOWS
    for s in v.windows:
        base = brute_force(init, ds, q, order, opt_kw, [], s.window, s.eval_step)
        for i, sid in enumerate(s.sample_ids):
            want = brute_force(init, ds, q, order, opt_kw, [sid], s.window, s.eval_step) - base
            np.testing.assert_allclose(s.truth[i], want, rtol=1e-7, atol=1e-11)
        assert np.abs(s.truth).max() > 1e-5  # leaving a sample out does change the losses


def test_lds_truth_equals_brute_force_subset_retraining(validated):
    v, run, init, ds, q, order, opt_kw = validated
    for s in [v.windows[1], v.run_scope]:
        base = brute_force(init, ds, q, order, opt_kw, [], s.window, s.eval_step)
        for j in (0, len(s.subsets) - 1):
            want = brute_force(init, ds, q, order, opt_kw, s.subsets[j], s.window, s.eval_step) - base
            np.testing.assert_allclose(s.subset_change[j], want, rtol=1e-7, atol=1e-11)
    # a subset keeps half of the scope's samples: it drops the other half
    rs = v.run_scope
    assert all(len(d) == N // 2 for d in rs.subsets) and rs.window == (0, 20) and rs.eval_step == 20


def test_leave_one_out_samples_are_trained_on_in_their_window(validated):
    v, run, *_ = validated
    for s in v.windows:
        in_window = np.concatenate([run.step_sample_ids(t) for t in range(*s.window)])
        assert set(s.sample_ids.tolist()) <= set(in_window.tolist()) and len(set(s.sample_ids.tolist())) == 6


# ---------------------------------------------------------------------- the methods against it
def test_exact_curvature_follows_retraining(validated):
    v, run, *_ = validated
    # AdamW's first step is the sign of the gradient, which no first-order estimate follows closely
    # (README, "Adam and AdamW"); its first window here starts at step 0
    least = 0.95 if run.optimizer["name"] == "AdamW" else 0.99
    for s in v.windows:
        p, r = s.agreement()["dit_exact"]
        assert p > least and r > 0.9, (s.name, p, r)


def test_dvemb_is_compared_only_where_its_notion_applies(validated):
    v, run, *_ = validated
    for s in v.windows:
        if s.eval_step == run.final_step:
            assert "dvemb" in s.estimates
            # dvemb is dit fisher evaluated at the end of training (aggregate/dvemb.py)
            np.testing.assert_allclose(s.estimates["dvemb"], s.estimates["dit_fisher"], rtol=1e-4, atol=1e-7)
        else:
            assert "dvemb" not in s.estimates and "end of training" in s.reasons["dvemb"]
    assert "dvemb" in v.run_scope.lds()


def test_estimates_are_the_aggregators_scores_of_the_left_out_samples(validated):
    from influence_hooks.aggregate import tracin

    v, run, *_ = validated
    s = v.windows[1]
    t = tracin(run, window=s.window, progress=False, dtype=DT)
    pos = {int(i): k for k, i in enumerate(t.train_ids)}
    qpos = [int(np.flatnonzero(run.query_ids == q)[0]) for q in v.query_ids]
    want = t.values.numpy()[[pos[int(i)] for i in s.sample_ids]][:, qpos]
    np.testing.assert_allclose(s.estimates["tracin"], want, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------- the statistics
def test_agreement_is_the_mean_over_queries_of_scipy_correlations():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(20, 3))
    est = truth + rng.normal(size=(20, 3))
    est[:5, 0] = 1.0  # ties
    p, s = agreement(est, truth)
    assert p == pytest.approx(np.mean([pearsonr(est[:, q], truth[:, q])[0] for q in range(3)]), abs=1e-12)
    assert s == pytest.approx(np.mean([spearmanr(est[:, q], truth[:, q])[0] for q in range(3)]), abs=1e-12)


def test_lds_on_a_hand_made_example_equals_the_direct_formula():
    # 4 samples, 2 queries; scores follow our sign: f(without i) - f(with i)
    ids = np.array([10, 11, 12, 13])
    scores = np.array([[0.4, -0.1], [0.1, 0.3], [-0.2, 0.2], [0.05, -0.3]])
    dropped = [np.array([10, 11]), np.array([12, 13]), np.array([10, 13]), np.array([11, 12]), np.array([10, 12]),
               np.array([11, 13])]
    pred = subset_predictions(scores, ids, dropped)
    np.testing.assert_allclose(pred[0], scores[0] + scores[1])
    np.testing.assert_allclose(pred[4], scores[0] + scores[2])
    actual = np.array([[0.5, 0.1], [-0.1, 0.0], [0.6, -0.3], [-0.2, 0.6], [0.1, 0.2], [0.3, -0.1]])
    want = np.mean([spearmanr(pred[:, q], actual[:, q])[0] for q in range(2)])
    assert lds(pred, actual) == pytest.approx(want, abs=1e-12)
    # an additive model predicts the subsets' losses exactly: LDS 1 (TRAK's definition, our sign)
    assert lds(pred, pred + 0.7) == pytest.approx(1.0)


# ---------------------------------------------------------------------- what cannot be validated
def test_run_without_checkpoints_says_to_record_them(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run", checkpoints=None)
    with pytest.raises(MissingDataError, match="checkpoint_every_n_steps"):
        validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, out=None, **QUIET)


def test_an_optimizer_without_an_update_rule_is_refused(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run", torch.optim.Adagrad, {"lr": 0.1})
    with pytest.raises(ConfigurationError, match="Adagrad"):
        validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, out=None, **QUIET)


def test_amp_is_refused_before_any_retraining(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run", precision="16-mixed")
    with pytest.raises(ConfigurationError, match="AMP"):
        validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, out=None, **QUIET)


def test_dropout_makes_the_reproduction_check_fail_clearly(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run", dropout=0.5)
    with pytest.raises(ReproductionError, match="dropout"):
        validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, windows=[(5, 10)], samples=4,
                 lds="none", methods=("tracin",), out=None, **QUIET)


def test_a_dataset_in_another_order_makes_the_reproduction_check_fail(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run")
    X, Y = ds.tensors
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ReproductionError, match="indexed like the train loader"):
        validate(run, model=model, dataset=TensorDataset(X[perm], Y[perm]), queries=q, loss_fn=loss_fn,
                 windows=[(5, 10)], samples=4, lds="none", methods=("tracin",), out=None, **QUIET)


def test_queries_other_than_the_recorded_ones_are_caught_before_retraining(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run")
    flipped = (q[0].flip(0), q[1].flip(0))  # the same samples in another order
    with pytest.raises(ReproductionError, match="queries or query_loss_fn"):
        validate(run, model=model, dataset=ds, queries=flipped, loss_fn=loss_fn, windows=[(5, 10)], samples=4,
                 lds="none", methods=("tracin",), out=None, **QUIET)


def test_check_warn_goes_on_and_marks_the_result(tmp_path):
    run, model, _, ds, q, _ = record(tmp_path / "run", dropout=0.5)
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        v = validate(run, model=model, dataset=ds, queries=q, loss_fn=loss_fn, windows=[(5, 10)], samples=4,
                     lds="none", methods=("tracin",), check="warn", out=None, **QUIET)
    assert not v.reproduced


# ---------------------------------------------------------------------- budget, estimate, report
def test_the_budget_bounds_the_retraining_and_the_plan_says_what_it_cut(tmp_path, capsys):
    run, model, _, ds, q, _ = record(tmp_path / "run")
    kw = dict(model=model, dataset=ds, queries=q, loss_fn=loss_fn, methods=("tracin",), samples=20,
              lds_subsets=20, out=None, progress=False)
    v = validate(run, budget_steps=600, **kw)
    out = capsys.readouterr().out
    assert v.model_steps <= 600
    assert "about" in out.split("Retraining with nothing")[0]  # the estimate comes before the results
    assert any("budget" in n and "reduced" in n for n in v.notes)
    with pytest.raises(ConfigurationError, match="budget"):
        validate(run, budget_steps=20, **kw)
    try:  # a budget in seconds is met by the estimate from timing steps on this machine
        v = validate(run, budget_seconds=0.05, **kw)
        assert v.estimated_seconds["retraining"] <= 0.05
    except ConfigurationError as e:
        assert "budget" in str(e)


def test_eval_at_final_retrains_on_to_the_end_and_compares_dvemb(plain_validated):
    _, run, init, ds, q, order, opt_kw = plain_validated
    v = validate(run, model=make_model(), dataset=ds, queries=q, loss_fn=loss_fn, windows=[(7, 13)], samples=4,
                 lds="none", eval_at="final", methods=("dit_fisher", "dvemb"), out=None, **QUIET)
    s = v.windows[0]
    assert s.eval_step == 20 and set(s.estimates) == {"dit_fisher", "dvemb"}
    base = brute_force(init, ds, q, order, opt_kw, [], s.window, 20)
    for i, sid in enumerate(s.sample_ids):
        want = brute_force(init, ds, q, order, opt_kw, [sid], s.window, 20) - base
        np.testing.assert_allclose(s.truth[i], want, rtol=1e-7, atol=1e-11)


def test_report_is_written_next_to_the_run_without_pickle(plain_validated):
    v, run, *_ = plain_validated
    from influence_hooks.validation.report import write_report

    path = write_report(v, run.path / "validate")
    files = {p.name for p in path.parent.iterdir()}
    assert files == {"report.md", "scatter.png", "lds.png", "validation.json", "validation.h5"}
    text = path.read_text()
    assert "## Reproduction" in text and "dit exact" in text and "LDS whole run" in text
    data = json.loads((path.parent / "validation.json").read_text())
    assert data["reproduction"]["reproduced"] and len(data["scopes"]) == len(WINDOWS) + 1
    assert (path.parent / "scatter.png").read_bytes()[:4] == b"\x89PNG"


def test_validate_is_the_function_even_after_its_package_is_imported():
    import influence_hooks
    import influence_hooks.validation.lds  # noqa: F401

    assert callable(influence_hooks.validate) and influence_hooks.validate is validate


def test_cli_validates_a_run_trained_from_a_lightning_config(tmp_path, capsys):
    from influence_hooks.cli.demo import run_lightning_cli

    cfg = yaml.safe_load((CONFIGS / "digits.yaml").read_text())
    cb = cfg["trainer"]["callbacks"][0]["init_args"]
    cb.update(run_dir=str(tmp_path / "run"), checkpoint_every_n_steps=4, projection=256)
    cfg["trainer"].update(default_root_dir=str(tmp_path / "lightning"), max_epochs=3, enable_progress_bar=False)
    cfg["data"]["init_args"].update(n_train=128, n_queries=16)
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_lightning_cli(["--config", str(path)]) == 0
    code = cli_main(["validate", "--config", str(path), "--quiet", "--samples", "8", "--lds-subsets", "8",
                     "--queries", "4", "--methods", "tracin,dit_fisher", "--epochs", "0,2"])
    assert code == 0
    data = json.loads((tmp_path / "run" / "validate" / "validation.json").read_text())
    assert data["reproduction"]["reproduced"] and data["reproduction"]["max_parameter_error"] < 1e-4
    assert [s["window"] for s in data["scopes"]] == [[0, 4], [8, 12], [0, 12]]
    assert set(data["scopes"][-1]["lds"]) == {"tracin", "dit_fisher"}
    # a second validation does not replace the first one's report unless told to, and says so at once
    report = (tmp_path / "run" / "validate" / "report.md").read_text()
    capsys.readouterr()
    again = ["validate", "--config", str(path), "--quiet", "--samples", "4", "--lds", "none", "--queries", "2",
             "--methods", "tracin", "--epochs", "0"]
    assert cli_main(again) == 2
    assert "already holds a validation report" in capsys.readouterr().err
    assert (tmp_path / "run" / "validate" / "report.md").read_text() == report
    assert cli_main([*again, "--overwrite"]) == 0
    data = json.loads((tmp_path / "run" / "validate" / "validation.json").read_text())
    assert [s["window"] for s in data["scopes"]] == [[0, 4]]
