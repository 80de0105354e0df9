"""What a newcomer meets first (issue 11): names that match, a summary of what is recorded, the
recording's figures in Lightning's logs, new queries after training, results as tables, a CLI
that says what it does, and a report whose numbers carry their base and their uncertainty.

Each behaviour is checked against something computed independently: the gradients recorded
during training, byte counts from the run's own sizes, brute-force AUROC, known distributions.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from conftest import assert_rows_close
from influence_hooks import GradientRecorder, InfluenceCallback, open_run, query_gradients
from influence_hooks.errors import ConfigurationError

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")

def tiny_gpt2(n_layer: int = 2, tie: bool = True) -> nn.Module:
    import transformers  # in the [test] extra: a missing one fails these tests rather than skipping them

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=n_layer, n_head=2,
                                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


class Wrapped(nn.Module):
    """A model held as an attribute, as a LightningModule holds it: module names start 'model.'."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def lm_loss(model, batch):
    return model(batch, labels=batch).loss


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3)).double()


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def train(rec: GradientRecorder, model: nn.Module, X, Y, steps: int = 6, batch: int = 4, lr: float = 0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(3)
    for t in range(steps):
        ids = torch.randperm(len(X), generator=g)[:batch]
        rec.begin_micro_batch(ids)
        ce(model, (X[ids], Y[ids])).backward()
        rec.end_step(opt, epoch=t // 3)
        opt.step()
        opt.zero_grad()
    rec.finish()


def data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


# ---------------------------------------------------------------------- names
def test_an_exclude_glob_that_matches_no_module_is_an_error_naming_the_real_path(tmp_path):
    model = Wrapped(tiny_gpt2())
    with pytest.raises(ConfigurationError) as e:
        GradientRecorder(tmp_path / "run", model, exclude=["lm_head"], verbose=False)
    msg = str(e.value)
    assert "exclude pattern 'lm_head' matches no module" in msg and "Did you mean ['model.lm_head']" in msg


def test_a_layers_glob_that_matches_nothing_suggests_the_full_path(tmp_path):
    with pytest.raises(ConfigurationError, match=r"Did you mean \['model.lm_head'\]"):
        GradientRecorder(tmp_path / "run", Wrapped(tiny_gpt2()), layers=["lm_head"], verbose=False)


def test_an_exclude_glob_matching_only_unrecorded_modules_warns_and_names_them(tmp_path):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    with pytest.warns(RuntimeWarning, match=r"'2' matches \['2'\], but none of them is recorded anyway"):
        rec = GradientRecorder(tmp_path / "run", model, layers=["0"], exclude=["2"], verbose=False)
    assert [l.name for l in rec.layers] == ["0"]


def test_tied_weights_warning_names_the_module_paths_and_its_suggestion_works(tmp_path):
    model = Wrapped(tiny_gpt2())
    with pytest.warns(RuntimeWarning, match="tie") as caught:
        GradientRecorder(tmp_path / "a", model, verbose=False)
    msg = next(str(w.message) for w in caught if "tie" in str(w.message))
    assert "model.transformer.wte.weight is model.lm_head.weight" in msg
    assert "exclude=['model.lm_head']" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following the advice silences it
        rec = GradientRecorder(tmp_path / "b", model, exclude=["model.lm_head"], verbose=False)
    names = [l.name for l in rec.layers]
    assert "model.transformer.wte" in names and "model.lm_head" not in names


# ---------------------------------------------------------------------- the start summary
def test_start_summary_lists_layers_dims_bytes_and_run_path(tmp_path, capsys, caplog):
    model = tiny_gpt2()
    x = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="tie"):  # wte/lm_head: the default selection keeps both
        rec = GradientRecorder(tmp_path / "run", model, queries=x[:2], query_loss_fn=lm_loss)  # projection=1024
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    caplog.set_level(logging.INFO, logger="influence_hooks")
    with pytest.warns(RuntimeWarning, match="not recording"):  # wpe: batch-shared input
        rec.begin_micro_batch(torch.arange(4))
        lm_loss(model, x[:4]).backward()
        rec.end_step(opt)
    rec.finish()
    text = capsys.readouterr().err
    with open_run(tmp_path / "run") as run:
        layers = run.layers
        K = run.dim
    # wpe was left out at the first gradient, and the 15 other layers share the 1024 dims: the five
    # LayerNorms keep their 64 exactly, the ten others share the rest, 70 each (7 x 10)
    dims = [l.dim for l in layers]
    assert len(layers) == 15 and K == sum(dims) == 1020 and "transformer.wpe" not in [l.name for l in layers]
    assert f"recording 15 layers of GPT2LMHeadModel into {tmp_path / 'run'}" in text
    for l in layers:
        assert any(line.split()[:1] == [l.name] and line.split()[3] == str(l.dim) for line in text.splitlines()), l.name
    assert "transformer.h.0.attn.c_attn  Conv1D            3,168        70  kronecker 7 x 10" in text
    assert "left out: transformer.wpe" in text
    assert f"per step: 4 samples x 1,020 dims x 2 bytes = {4 * 1020 * 2 / 1024:.1f} KiB" in text
    assert rec.plan["dims"] == dims and rec.plan["bytes_per_step"] == 4 * 1020 * 2
    assert rec.plan["bytes_per_query_step"] == 2 * 1020 * 2
    assert text.strip() in caplog.text  # the same text goes to the "influence_hooks" logger


def train_lm(rec: GradientRecorder, model: nn.Module, tokens: torch.Tensor, steps, **plan) -> GradientRecorder:
    """SGD steps `steps` on batches of 4 sequences (step t: tokens[4t:4t+4]), the dropout masks
    seeded by the step; plan: plan_start's arguments (e.g. a resume)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec.plan_start(**plan)
    for t in steps:
        torch.manual_seed(t)
        rec.begin_micro_batch(torch.arange(4 * t, 4 * t + 4))
        lm_loss(model, tokens[4 * t:4 * t + 4]).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return rec


@pytest.mark.parametrize("checkpointing", [None, "reentrant"])
def test_a_layer_left_out_at_the_first_step_gives_its_share_to_the_others(tmp_path, checkpointing):
    # wpe sees a position input shared by the batch: it is left out at the first gradient, before
    # anything is computed, and the projection is shared among the other layers, so the run is the
    # one that exclude=["transformer.wpe"] records, row for row. With reentrant activation
    # checkpointing the blocks' hooks are registered during the backward pass, after the re-plan.
    x = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))

    def record(run_dir, **options):
        model = tiny_gpt2()
        if checkpointing:
            model.config.use_cache = False
            if hasattr(model, "activation_checkpointing_enable"):  # newer transformers
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_lm(GradientRecorder(run_dir, model, verbose=False, **options), model, x, range(2))
        with open_run(run_dir) as run:
            rows = [b.grads for b in run.iter_steps()]
            return run.manifest["layers"], rows, [str(w.message) for w in caught]

    auto_layers, auto_rows, said = record(tmp_path / "auto")
    excluded_layers, excluded_rows, _ = record(tmp_path / "excluded", exclude=["transformer.wpe"])
    assert any("not recording ['transformer.wpe']" in m for m in said)
    assert auto_layers == excluded_layers and sum(l["dim"] for l in auto_layers) == 1020
    assert len(auto_rows) == 2 and all(torch.equal(a, b) for a, b in zip(auto_rows, excluded_rows))


@pytest.mark.parametrize("first_planned", ["without wpe", "with wpe"])
def test_a_run_with_a_layer_left_out_resumes_with_its_own_projection(tmp_path, monkeypatch, first_planned):
    # "with wpe": recorded as before the re-planning (wpe dropped at the end of the first step, its
    # share unused); a resume must continue either run with the projection it has
    x = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied weights, wpe
        with monkeypatch.context() as m:
            if first_planned == "with wpe":
                m.setattr(GradientRecorder, "_leave_out_broadcast", lambda self: None)
            model = tiny_gpt2()
            first = train_lm(GradientRecorder(tmp_path / "run", model, verbose=False), model, x, [0, 1])
        with open_run(tmp_path / "run") as run:
            dim = run.dim
        model = tiny_gpt2()
        again = train_lm(GradientRecorder(tmp_path / "run", model, verbose=False), model, x, [1, 2],
                         resume_run_id=first.run_id, resume_step=1)
    assert dim == (1020 if first_planned == "without wpe" else 960)
    with open_run(tmp_path / "run") as run:
        assert run.dim == dim and run.steps.tolist() == [0, 1, 2] and run.complete
        assert "transformer.wpe" not in [l.name for l in run.layers]
    assert again.dim == dim


def test_start_summary_is_only_logged_when_not_verbose(tmp_path, capsys, caplog):
    X, Y = data()
    caplog.set_level(logging.INFO, logger="influence_hooks")
    model = mlp()
    train(GradientRecorder(tmp_path / "run", model, verbose=False), model, X, Y, steps=1)
    assert "influence_hooks" not in capsys.readouterr().err
    assert "recording 3 layers of Sequential" in caplog.text


# ---------------------------------------------------------------------- Lightning's logger
def test_callback_logs_the_plan_and_the_recordings_figures_to_lightning(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from _tiny_lightning import TinyClassifier

    X, Y = data(20)
    cb = InfluenceCallback(str(tmp_path / "run"), queries=(X[:3], Y[:3]), verbose=False)
    logger = CSVLogger(str(tmp_path / "logs"), name="", version="")
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=1, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TinyClassifier(), DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True))
    hp = yaml.safe_load((tmp_path / "logs" / "hparams.yaml").read_text())
    import csv
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    with open_run(tmp_path / "run") as run:
        n_rows = sum(len(b.sample_ids) for b in run.iter_steps())
        n_query_rows = len(run.query_steps) * len(run.query_ids)
        itemsize = np.dtype(run.manifest["storage_dtype"]).itemsize
        assert hp["influence_hooks/run_dir"] == str(tmp_path / "run")
        assert hp["influence_hooks/layers"] == [l.name for l in run.layers]
        assert hp["influence_hooks/dims"] == [l.dim for l in run.layers]
        assert hp["influence_hooks/bytes_per_step"] == 4 * run.dim * itemsize
        dim = run.dim
    per_step = [r for r in rows if r.get("influence/rows")]
    assert [float(r["influence/steps"]) for r in per_step[:-1]] == list(range(1, 11))  # every step logged
    final = per_step[-1]  # after training: the end-of-training queries included
    assert float(final["influence/rows"]) == n_rows == 40
    assert float(final["influence/query_rows"]) == n_query_rows
    assert float(final["influence/mb_written"]) == pytest.approx((n_rows + n_query_rows) * dim * itemsize / 2**20)
    assert float(final["influence/hook_s"]) > 0 and float(final["influence/queue_wait_s"]) >= 0
    assert float(per_step[-2]["influence/hook_s"]) <= float(final["influence/hook_s"])
    # the writer thread's CPU time, its final shard included (written when training ends)
    assert 0 <= float(per_step[-2]["influence/writer_cpu_s"]) <= float(final["influence/writer_cpu_s"])
    assert float(final["influence/writer_cpu_s"]) > 0


def test_callback_logs_the_running_figures_at_the_steps_its_loggers_write(tmp_path):
    # pl_module.log costs Lightning about a millisecond per metric, so the figures are logged only
    # at the steps the loggers write; they are running totals, so nothing is lost
    import csv

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from _tiny_lightning import TinyClassifier

    X, Y = data(20)
    cb = InfluenceCallback(str(tmp_path / "run"), verbose=False)
    logger = CSVLogger(str(tmp_path / "logs"), name="", version="")
    logged = []
    module = TinyClassifier()
    real_log_dict = module.log_dict
    module.log_dict = lambda metrics, **kw: (logged.append(metrics["influence/steps"]), real_log_dict(metrics, **kw))
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=logger, log_every_n_steps=3, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True))
    assert logged == [3.0, 6.0, 9.0]  # 10 steps, logged at every third
    rows = [r for r in csv.DictReader(open(tmp_path / "logs" / "metrics.csv")) if r.get("influence/steps")]
    assert [float(r["influence/steps"]) for r in rows] == [3.0, 6.0, 9.0, 10.0]  # and the final figures
    assert [int(r["step"]) for r in rows[:3]] == [2, 5, 8]


# ---------------------------------------------------------------------- new queries after training
@pytest.mark.parametrize("projection", [16, "none"])
def test_query_gradients_after_training_equal_the_ones_recorded_at_the_end(tmp_path, projection):
    X, Y = data()
    model = mlp()
    xq, yq = X[:5] + 0.3, Y[:5]
    rec = GradientRecorder(tmp_path / "run", model, projection=projection, storage_dtype="float64",
                           queries=(xq, yq), query_loss_fn=ce, verbose=False)
    train(rec, model, X, Y)
    run = open_run(tmp_path / "run")
    if projection != "none":
        assert {l.projection["kind"] for l in run.layers} == {"kronecker", "gaussian"}
    recorded = run.query_gradients(run.final_step, dtype=torch.float64)
    new = query_gradients(model, run, (xq, yq), ce)
    assert new.shape == (5, run.dim)
    assert_rows_close(new, recorded, rel=1e-12)
    # a Dataset works as well, and the run may be given by its path
    ds = TensorDataset(xq, yq)
    assert_rows_close(query_gradients(model, tmp_path / "run", ds, ce), recorded, rel=1e-12)
    # one new query alone is row q of the batch: each row is that query's own loss gradient
    assert_rows_close(query_gradients(model, run, (xq[2:3], yq[2:3]), ce), recorded[2:3], rel=1e-12)
    # and it scores against data value embeddings like the recorded ones
    from influence_hooks import dvemb
    emb = dvemb(run, path=tmp_path / "emb.h5", progress=False, dtype=torch.float64)
    a = emb.scores(new, progress=False, dtype=torch.float64).values
    b = emb.scores(recorded, progress=False, dtype=torch.float64).values
    torch.testing.assert_close(a, b)
    emb.close()


def test_query_gradients_with_a_lightning_module_use_its_training_step(tmp_path):
    import lightning.pytorch as pl

    from _tiny_lightning import TinyClassifier

    X, Y = data(20)
    queries = Subset(TensorDataset(X, Y), [3, 5, 8])
    cb = InfluenceCallback(str(tmp_path / "run"), queries=queries, projection=8, storage_dtype="float64",
                           verbose=False)
    module = TinyClassifier()
    pl.Trainer(max_epochs=1, callbacks=[cb], logger=False, accelerator="cpu", enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(
        module, DataLoader(TensorDataset(X, Y), batch_size=4))
    with open_run(tmp_path / "run") as run:
        assert_rows_close(query_gradients(module, run, queries),
                          run.query_gradients(run.final_step, dtype=torch.float64), rel=1e-12)


def test_query_gradients_refuse_a_model_that_is_not_the_recorded_one(tmp_path):
    X, Y = data()
    model = mlp()
    train(GradientRecorder(tmp_path / "run", model, projection=16, verbose=False), model, X, Y, steps=2)
    wider = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    with pytest.raises(ConfigurationError, match=r"layer '0' is a Linear with trainable parameters.*not the model"):
        query_gradients(wider, tmp_path / "run", (X[:2], Y[:2]), ce)
    with pytest.raises(ConfigurationError, match="has no module of that name.*LightningModule"):
        query_gradients(Wrapped(model), tmp_path / "run", (X[:2], Y[:2]), ce)
    with pytest.raises(ConfigurationError, match="loss_fn"):
        query_gradients(model, tmp_path / "run", (X[:2], Y[:2]))


# ---------------------------------------------------------------------- results as tables and samples
def scores_fixture():
    from influence_hooks import InfluenceScores

    values = torch.tensor([[0.5, -1.0], [2.0, 0.0], [-3.0, 1.5], [0.0, 0.0]], dtype=torch.float64)
    return InfluenceScores(values=values, train_ids=np.array([10, 11, 12, 13]),
                           present=torch.tensor([True, True, True, False]), query_ids=np.array([7, 9]),
                           method="tracin", window=(0, 5), approximations=["projection"])


def test_scores_to_pandas_wide_and_long_hold_every_value():
    import pandas as pd  # in the [test] extra
    s = scores_fixture()
    df = s.to_pandas()
    assert list(df.columns) == ["present", "query_7", "query_9"] and df.index.name == "train_id"
    assert df.loc[12, "query_7"] == -3.0 and df.loc[11, "query_9"] == 0.0 and not df.loc[13, "present"]
    np.testing.assert_array_equal(df[["query_7", "query_9"]].to_numpy(), s.values.numpy())
    assert df.attrs["method"] == "tracin" and df.attrs["window"] == (0, 5)
    long = s.to_pandas(long=True)
    assert len(long) == 8 and list(long.columns) == ["train_id", "query_id", "value", "present"]
    for r in long.itertuples():
        i, q = [10, 11, 12, 13].index(r.train_id), [7, 9].index(r.query_id)
        assert r.value == s.values[i, q] and r.present == bool(s.present[i])
    per_sample = s.mean_over_queries().to_pandas()
    assert list(per_sample.columns) == ["present", "value"]
    np.testing.assert_allclose(per_sample["value"].to_numpy(), s.values.mean(1).numpy())
    assert isinstance(df, pd.DataFrame)


def test_scores_to_pandas_without_pandas_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "influence-hooks\[pandas\]"'):
        scores_fixture().to_pandas()


def test_top_k_returns_the_samples_themselves_given_the_dataset():
    s = scores_fixture()
    ds = TensorDataset(torch.arange(20.0)[:, None] * 10, torch.arange(20))
    ids, vals, samples = s.top_k(0, 2, dataset=ds)
    assert ids.tolist() == [11, 10] and vals.tolist() == [2.0, 0.5]
    assert [int(x[1]) for x in samples] == [11, 10] and float(samples[0][0]) == 110.0
    ids, vals, samples = s.top_k(0, 5, opponents=True, dataset=ds)
    assert ids.tolist() == [12] and int(samples[0][1]) == 12
    assert len(s.top_k(0, 2)) == 2  # without a dataset: (ids, values) as before
    with pytest.raises(ConfigurationError, match="sample ids up to 13, but the dataset has 5 items"):
        s.top_k(0, 2, dataset=Subset(ds, range(5)))


# ---------------------------------------------------------------------- sharing the projection budget
def test_split_dims_shares_in_proportion_to_the_chosen_weight_and_caps_at_layer_size():
    from influence_hooks.capture.select import split_dims

    # sqrt weights 100 : 10 : 50 of a budget of 160, no cap binds
    assert split_dims([10_000, 100, 2_500], 160, "sqrt") == [100, 10, 50]
    # sqrt 4 : 100 of 500 would give the small layer 19 > 16: capped at its size, the rest goes on
    assert split_dims([16, 10_000], 500, "sqrt") == [16, 484]
    # linear 4 : 10000 of 100: the small layer's share rounds down, but every layer keeps one dim
    assert split_dims([4, 10_000], 100, "linear") == [1, 99]
    assert split_dims([40, 10_000], 1000, "equal") == [40, 960]
    assert split_dims([10_000, 100, 2_500], 160, "equal") == [54, 53, 53]
    assert sum(split_dims([7, 300, 5000, 12], 200, "sqrt")) == 200
    with pytest.raises(ConfigurationError, match="allocation must be one of"):
        split_dims([5], 3, "log")


def test_projection_allocation_option_sets_the_recorded_dims(tmp_path):
    model = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Tanh(), nn.Linear(128, 10))
    rec = GradientRecorder(tmp_path / "run", model, projection=300, projection_allocation="sqrt",
                           projection_kind="gaussian", verbose=False)
    sizes = [64 * 128 + 128, 256, 1290]
    want = np.sqrt(sizes) / np.sqrt(sizes).sum() * 300
    assert np.abs(np.array([l.spec.out_dim for l in rec.layers]) - want).max() < 1
    with pytest.raises(ConfigurationError, match="projection_allocation must be one of"):
        GradientRecorder(tmp_path / "run2", model, projection_allocation="size")


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from helpers_runs import record_run

    path = tmp_path_factory.mktemp("cli") / "run"
    record_run(path, n_train=22, n_query=3, batch=6, epochs=4, query_every=1,
               extra_manifest={"metadata": {"corrupted_ids": [1, 4, 7, 11]}})
    return path


def cli(args, capsys):
    from influence_hooks.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("extra, says", [
    (["--method", "tracin", "--mode", "accrued"], "mode='accrued' applies to method='dit' only"),
    (["--method", "dvemb", "--curvature", "none", "--detection", "tracin"],
     "curvature='none' applies to DIT, and nothing here computes DIT")])
def test_compare_refuses_dit_options_that_nothing_would_use(cli_run, tmp_path, capsys, extra, says):
    code, _, err = cli(["compare", cli_run, "--epochs", "each", "--out", tmp_path / "r", "--quiet", *extra], capsys)
    assert code == 2 and says in err
    assert not (tmp_path / "r").exists()


def test_compare_windows_refuses_a_mode_for_another_method_in_python_too(cli_run):
    from influence_hooks.report import compare_windows

    with open_run(cli_run) as run, pytest.raises(ConfigurationError, match="dit_accrued"):
        compare_windows(run, method="tracin", mode="accrued", progress=False)


def test_tracin_on_the_command_line_has_no_mode(cli_run, capsys):
    from influence_hooks.cli import main

    with pytest.raises(SystemExit) as e:
        main(["tracin", str(cli_run), "--mode", "accrued"])
    assert e.value.code == 2 and "unrecognized arguments: --mode accrued" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["dit", "--window", "0:4"], ["compare", "--epochs", "each"]])
@pytest.mark.parametrize("curvature", ["exact", "ggn"])
def test_full_space_curvature_on_the_command_line_says_it_is_python_only(cli_run, capsys, command, curvature):
    code, _, err = cli([command[0], cli_run, *command[1:], "--curvature", curvature, "--quiet"], capsys)
    assert code == 2 and f"--curvature {curvature}" in err and "Python only" in err
    assert f"curvature={curvature!r}, model=model, dataset=train_ds" in err


def test_bare_csv_and_out_names_are_written_next_to_the_run(cli_run, tmp_path, capsys, monkeypatch):
    from influence_hooks import InfluenceScores, dit

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, _ = cli(["dit", cli_run, "--window", "0:4", "--csv", "s.csv", "--out", "s.h5", "--quiet"], capsys)
    assert code == 0 and f"wrote {cli_run / 's.csv'}" in out and f"wrote {cli_run / 's.h5'}" in out
    assert not list(elsewhere.iterdir())
    with open_run(cli_run) as run:
        want = dit(run, window=(0, 4), curvature="fisher", progress=False)
    np.testing.assert_array_equal(InfluenceScores.load(cli_run / "s.h5").values.numpy(), want.values.numpy())
    lines = (cli_run / "s.csv").read_text().splitlines()
    assert len(lines) == 1 + want.n_train
    # a path with a directory part is taken as given
    code, out, _ = cli(["dit", cli_run, "--window", "0:4", "--csv", "./here.csv", "--quiet"], capsys)
    assert code == 0 and (elsewhere / "here.csv").is_file() and not (cli_run / "here.csv").exists()


def test_compare_reads_corrupted_ids_from_metadata_and_refuses_to_overwrite_a_report(cli_run, tmp_path, capsys):
    from influence_hooks.report import WindowComparison

    out_dir = tmp_path / "rep"
    code, out, _ = cli(["compare", cli_run, "--epochs", "each", "--out", out_dir, "--quiet"], capsys)
    assert code == 0 and "detection of 4 corrupted samples" in out
    cmp = WindowComparison.load(out_dir / "comparison.h5")
    np.testing.assert_array_equal(cmp.corrupted, np.isin(cmp.train_ids, [1, 4, 7, 11]))
    before = (out_dir / "report.md").read_text()
    code, _, err = cli(["compare", cli_run, "--windows", "0:4,4:8", "--out", out_dir, "--quiet"], capsys)
    assert code == 2 and "already holds a report" in err and "--overwrite" in err
    assert (out_dir / "report.md").read_text() == before
    code, _, _ = cli(["compare", cli_run, "--windows", "0:4,4:8", "--out", out_dir, "--overwrite", "--quiet"], capsys)
    assert code == 0 and (out_dir / "report.md").read_text() != before


def test_compare_help_documents_where_corrupted_auto_looks(capsys):
    from influence_hooks.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "metadata.data.corrupted_ids" in text and "metadata.corrupted_ids" in text


# ---------------------------------------------------------------------- the report: uncertainty
def brute_weighted_auroc(score, bad, w):
    num = sum(w[i] * w[j] * ((score[i] > score[j]) + 0.5 * (score[i] == score[j]))
              for i in range(len(score)) for j in range(len(score)) if bad[i] and not bad[j])
    return num / (w[bad].sum() * w[~bad].sum())


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auroc_matches_brute_force_counting(ties):
    from influence_hooks.report.stats import weighted_auroc

    rng = np.random.default_rng(4)
    n = 60
    bad = rng.random(n) < 0.3
    score = rng.normal(size=n) + bad
    if ties:
        score = np.round(score * 2) / 2
    w = rng.integers(0, 4, size=(3, n))
    got = weighted_auroc(score, bad, np.vstack([np.ones(n, int), w]))
    assert got[0] == pytest.approx(brute_weighted_auroc(score, bad, np.ones(n)))
    for b in range(3):
        assert got[b + 1] == pytest.approx(brute_weighted_auroc(score, bad, w[b]))


def test_bootstrap_interval_of_an_auroc_difference_covers_the_known_value():
    from scipy.stats import norm

    from influence_hooks.report.stats import auroc_difference

    # corrupted ~ N(1, 1), clean ~ N(0, 1): AUROC = Phi(1 / sqrt 2); a score of pure noise: 0.5
    truth = norm.cdf(1 / np.sqrt(2)) - 0.5
    covered, widths = [], {}
    for n in (300, 1200):
        for rep in range(30 if n == 300 else 8):
            rng = np.random.default_rng(100 * n + rep)
            bad = rng.random(n) < 0.3
            d = auroc_difference(rng.normal(size=n) + bad, rng.normal(size=n), bad, n_boot=400, seed=rep)
            assert d.low <= d.value <= d.high
            widths.setdefault(n, []).append(d.high - d.low)
            if n == 300:
                covered.append(d.low <= truth <= d.high)
    assert np.mean(covered) >= 0.85  # nominal 95%
    # the interval shrinks like 1/sqrt(n): four times the samples, about half the width
    assert 0.35 < np.mean(widths[1200]) / np.mean(widths[300]) < 0.65


def test_bootstrap_verdicts_holds_does_not_hold_and_within_noise():
    from influence_hooks.report.stats import auroc_difference

    rng = np.random.default_rng(0)
    bad = rng.random(400) < 0.2
    good_score, noise = bad + 0.3 * rng.normal(size=400), rng.normal(size=400)
    assert auroc_difference(good_score, noise, bad).verdict == "holds"
    assert auroc_difference(noise, good_score, bad).verdict == "does not hold"
    same = auroc_difference(good_score, good_score, bad)
    assert (same.value, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "within noise")
    assert auroc_difference(noise, noise, np.zeros(400, bool)).verdict == "cannot be judged"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    from helpers_runs import record_run
    from influence_hooks.report import compare_windows

    path = tmp_path_factory.mktemp("report") / "run"
    record_run(path, n_train=40, n_query=3, batch=8, epochs=4, query_every=1)
    with open_run(path) as run:
        return compare_windows(run, epochs="each", method="dit", corrupted=np.arange(0, 40, 5), progress=False)


def test_the_late_window_finding_says_within_noise_when_the_difference_is_smaller_than_its_uncertainty(comparison):
    import copy

    from influence_hooks.report.render import findings

    cmp = copy.deepcopy(comparison)
    m, W = "tracin", cmp.n_windows
    rng = np.random.default_rng(0)
    whole = cmp.corruption_scores[m][:, W]
    # late window = whole run + a little noise: equal AUROC up to noise
    cmp.corruption_scores[m][:, W - 1] = whole + 1e-3 * whole.std() * rng.normal(size=len(whole))
    cmp.corruption_present[m][:, W - 1] = True
    f = next(f for f in findings(cmp) if "(TracIn)" in f.claim)
    assert f.verdict == "within noise" and f.holds is None
    assert "95% bootstrap interval [" in f.evidence and "(1000 resamples)" in f.evidence
    lo, hi = (float(v) for v in f.evidence.split("interval [")[1].split("]")[0].split(", "))
    assert lo <= 0 <= hi
    # a late window that ranks every corrupted sample first: holds
    cmp.corruption_scores[m][:, W - 1] = cmp.corrupted.astype(float)
    assert next(f for f in findings(cmp) if "(TracIn)" in f.claim).verdict == "holds"


# ---------------------------------------------------------------------- the report: shares and plots
def test_every_share_in_the_report_names_its_base(comparison, tmp_path):
    from influence_hooks.report.patterns import NEGLIGIBLE, PATTERNS
    from influence_hooks.report.render import findings

    cmp = comparison
    text = cmp.write_report(tmp_path / "r").read_text()
    n = len(cmp.patterns)
    active = int((cmp.patterns != NEGLIGIBLE).sum())
    assert f"| pattern | samples | share of all {n} | corrupted among them |" in text
    for p in PATTERNS:
        sel = cmp.patterns == p
        if sel.any():
            c = int(cmp.corrupted[sel].sum())
            assert f"| {p} | {int(sel.sum())} | {100 * sel.mean():.1f}% | {c} ({100 * c / sel.sum():.0f}% of {int(sel.sum())}) |" in text
    first = findings(cmp)[0].evidence
    assert f"Of the {n} samples, {active} have influence above the threshold" in first
    assert "significant" not in text.lower()
    assert "a threshold on the size of its influence relative to the typical sample, not a statistical test" in text


def test_trajectory_panels_share_one_scale_and_detection_panels_each_have_a_legend(comparison):
    from influence_hooks.report.plots import detection_figure, method_name, trajectories_figure

    fig = trajectories_figure(comparison)
    axes = fig.axes
    assert len(axes) == 6 and {ax.get_yscale() for ax in axes} == {"symlog"}
    assert len({ax.get_ylim() for ax in axes}) == 1
    det = detection_figure(comparison)
    names = {method_name(m) for m in comparison.detection_table()}
    for ax in det.axes[:2]:
        legend = ax.get_legend()
        assert legend is not None and names <= {t.get_text() for t in legend.get_texts()}
        # each method's markers sit at its own x offset: equal values cannot hide each other
        xs = [tuple(l.get_xdata()) for l in ax.get_lines() if l.get_label() in names]
        assert len(xs) == len(names) and len(set(xs)) == len(xs)


# ---------------------------------------------------------------------- the README's transformers section
def readme_block(heading: str) -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]


def test_readme_transformers_section_runs_as_written(tmp_path, monkeypatch, capsys):
    code = readme_block("transformers models")
    assert "GPT2LMHeadModel(config)" in code and "tracin(" in code and 'curvature="fisher"' in code
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "README.md (transformers models)", "exec"), ns)
    ours = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not [m for m in ours if "tie" in m or "not recording" in m], ours  # the excludes work
    run = ns["run"]
    assert run.complete and len(run.steps) == 16
    names = [l.name for l in run.layers]
    assert "lm_head" not in names and "transformer.wpe" not in names and "transformer.wte" in names
    assert ns["s"].values.shape == (64, 4) and ns["d"].window == (8, 16)
    assert ns["u"].shape == (2, run.dim)
    # the new-query function reproduces the queries recorded at the end (float16 storage)
    again = query_gradients(ns["model"], run, ns["queries"], ns["lm_loss"])
    assert_rows_close(again, run.query_gradients(run.final_step, dtype=torch.float64), rel=2e-3)
    assert "recording 14 layers of GPT2LMHeadModel into runs/gpt2" in capsys.readouterr().err
