"""Failures: a killed process, bad input, broken files, a full disk, NaN gradients.

Each failure must raise the library's own error type with a message that names the problem and
the fix, and must not lose what was already recorded: every finished shard stays readable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from _tiny_lightning import TinyClassifier, make_trainer
from influence_hooks.record.callback import InfluenceCallback
from influence_hooks.capture import UnsupportedModuleError
from influence_hooks.errors import (
    ConfigurationError,
    CorruptShardError,
    NonFiniteGradientError,
    RunDirectoryError,
    SampleIdError,
)
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage import format as fmt
from influence_hooks.storage.reader import open_run

# Lightning's own noise
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")

N = 24
_g = torch.Generator().manual_seed(11)
X = torch.randn(N, 5, generator=_g)
Y = torch.randint(0, 3, (N,), generator=_g)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def train(rec: GradientRecorder, model: nn.Module, steps: int, *, poison: int | None = None) -> None:
    """Plain SGD on batches of 4; at step `poison` the inputs are NaN and the update is skipped
    (as a GradScaler skips an overflowing step)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(steps):
        ids = torch.arange(4 * t, 4 * t + 4) % N
        x = X[ids] * float("nan") if t == poison else X[ids]
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(x), Y[ids]).backward()
        rec.end_step(opt)
        if t != poison:
            opt.step()
        opt.zero_grad()


def shard_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / fmt.SHARD_DIR).iterdir() if fmt.parse_shard_name(p.name))


def record(run_dir: Path, steps: int, **options) -> GradientRecorder:
    rec = GradientRecorder(run_dir, mlp(), projection=8, **options)
    train(rec, rec.model, steps)
    rec.finish()
    return rec


# ---------------------------------------------------------------------------- crash
def test_kill_9_mid_training_leaves_every_finished_shard_readable(tmp_path):
    run_dir = tmp_path / "run"
    script = Path(__file__).with_name("_train_until_killed.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if (run_dir / fmt.SHARD_DIR).is_dir() and len(shard_files(run_dir)) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    # a half-written shard, as a crash during a write leaves it
    (run_dir / fmt.SHARD_DIR / (fmt.shard_name(0, 999) + fmt.TMP_SUFFIX)).write_bytes(b"\x89HDF\r\n" + b"\0" * 100)

    with open_run(run_dir) as run:
        assert not run.complete
        n = len(run.steps)
        assert n >= 6 and run.steps.tolist() == list(range(n))  # 2 steps per shard, no gap
        rows = 0
        for b in run.iter_steps():
            assert b.grads.shape == (8, run.dim) and torch.isfinite(b.grads).all()
            assert ((b.sample_ids >= 0) & (b.sample_ids < 64)).all()
            rows += len(b.grads)
        assert rows == 8 * n
        assert all(run.query_gradients(int(s)).shape == (3, run.dim) for s in run.query_steps)
        assert all(run.load_parameters(int(s)) for s in run.snapshot_steps)
        problems = run.verify()
    assert len(problems) == 1 and "incomplete" in problems[0], problems


# ---------------------------------------------------------------------------- run directory
def test_directory_holding_another_run_is_refused_and_the_old_run_kept(tmp_path):
    run_dir = tmp_path / "run"
    old = record(run_dir, 3)
    rec = GradientRecorder(run_dir, mlp(), projection=8)
    with pytest.raises(RunDirectoryError) as err:
        train(rec, rec.model, 2)
    rec.abort()
    msg = str(err.value)
    assert "already holds a run" in msg and old.run_id in msg
    assert "new directory" in msg and "overwrite=True" in msg
    with open_run(run_dir) as run:
        assert (run.run_id, run.steps.tolist(), run.complete) == (old.run_id, [0, 1, 2], True)


def test_non_empty_directory_without_a_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    rec = GradientRecorder(tmp_path, mlp(), projection=8)
    with pytest.raises(RunDirectoryError, match=r"not empty \(notes.txt.*overwrite=True"):
        train(rec, rec.model, 1)
    rec.abort()
    assert (tmp_path / "notes.txt").read_text() == "precious"


# ---------------------------------------------------------------------------- broken shards
def test_truncated_shard_is_named_and_skipping_it_keeps_the_others(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 6, steps_per_shard=2)
    shards = shard_files(run_dir)
    assert len(shards) == 3
    broken = shards[1]
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)

    with pytest.raises(CorruptShardError) as err:
        open_run(run_dir)
    assert broken.name in str(err.value) and "on_corrupt='skip'" in str(err.value)

    with pytest.warns(RuntimeWarning, match=broken.name):
        run = open_run(run_dir, on_corrupt="skip")
    with run:
        assert run.steps.tolist() == [0, 1, 4, 5]
        assert [b.step for b in run.iter_steps()] == [0, 1, 4, 5]
        assert all(torch.isfinite(b.grads).all() for b in run.iter_steps())
        assert any(broken.name in p for p in run.verify())


@pytest.mark.parametrize("dataset", [fmt.ROWS_GRAD, fmt.ROWS_SAMPLE_ID, fmt.QUERY_GRAD])
def test_skipping_leaves_out_a_shard_with_any_damaged_dataset(tmp_path, dataset):
    # the gradient rows (most of a shard's bytes), the sample ids or the query gradients: with
    # on_corrupt='skip' the damage is found when the run is opened, not half way through an aggregation
    from influence_hooks import InfluenceScores
    from influence_hooks.aggregate import tracin
    from influence_hooks.cli import main

    run_dir = tmp_path / "run"
    record(run_dir, 6, steps_per_shard=2, queries=(X[:3], Y[:3]), query_every_n_steps=1,
           query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    broken = shard_files(run_dir)[1]
    with h5py.File(broken) as f:
        at = f[dataset].id.get_chunk_info(0).byte_offset + 5
    with open(broken, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))
    with open_run(run_dir) as run, pytest.raises(CorruptShardError) as err:
        tracin(run, progress=False)
    assert broken.name in str(err.value) and "on_corrupt='skip'" in str(err.value)

    with pytest.warns(RuntimeWarning, match=f"skipping unreadable shard .*{broken.name}"):
        run = open_run(run_dir, on_corrupt="skip")
    with run:
        assert run.steps.tolist() == [0, 1, 4, 5] and [p.name for p, _ in run.skipped_shards] == [broken.name]
        got = tracin(run, progress=False)
    assert any("unreadable shard(s) left out" in n for n in got.approximations)
    # the same from the command line
    with pytest.warns(RuntimeWarning, match="skipping unreadable shard"):
        assert main(["tracin", str(run_dir), "--skip-corrupt", "--quiet", "--out", str(tmp_path / "ti.h5")]) == 0
    assert torch.equal(InfluenceScores.load(tmp_path / "ti.h5").values, got.values)
    # the same as the run with the damaged shard moved out of it
    broken.rename(tmp_path / broken.name)
    with pytest.warns(RuntimeWarning, match="missing"), open_run(run_dir) as run:
        want = tracin(run, progress=False)
    assert torch.equal(got.values, want.values) and np.array_equal(got.train_ids, want.train_ids)


# ---------------------------------------------------------------------------- layer selection
class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.bn = nn.BatchNorm1d(7)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.bn(self.encoder(x)))


@pytest.mark.parametrize("options, says", [
    ({"layers": ["decoder.*"]}, ["'decoder.*'", "encoder.0", "head"]),  # the module names there are
    ({"layer_types": ["Linaer"]}, ["'Linaer'", "'Linear'", "'BatchNorm1d'"]),  # the types there are
], ids=["pattern", "type"])
def test_a_selection_matching_nothing_fails_at_construction_naming_what_there_is(tmp_path, options, says):
    with pytest.raises(ConfigurationError) as err:
        GradientRecorder(tmp_path / "run", WithBatchNorm(), **options)
    assert all(s in str(err.value) for s in says), str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options", [{"layers": ["bn"]}, {"layer_types": [nn.BatchNorm1d]}], ids=["name", "type"])
def test_selecting_batchnorm_raises_unsupported_module_error(tmp_path, options):
    with pytest.raises(UnsupportedModuleError) as err:
        GradientRecorder(tmp_path / "run", WithBatchNorm(), **options)
    msg = str(err.value)
    assert "'bn'" in msg and "BatchNorm" in msg and "LayerNorm" in msg and "freeze" in msg


def test_default_selection_leaves_out_unsupported_layers(tmp_path):
    rec = GradientRecorder(tmp_path / "run", WithBatchNorm())
    assert [l.name for l in rec.layers] == ["encoder.0", "head"]
    rec.close()


# ---------------------------------------------------------------------------- NaN / inf
def test_nonfinite_gradients_warn_and_the_step_is_flagged_and_skipped(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, on_nonfinite="warn")
    with pytest.warns(RuntimeWarning, match="step 2: per-sample gradients contain NaN"):
        train(rec, rec.model, 5, poison=2)
        rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.complete
        assert run.nonfinite.tolist() == [False, False, True, False, False]
        assert [b.step for b in run.iter_steps()] == [0, 1, 3, 4]
        assert all(torch.isfinite(b.grads).all() for b in run.iter_steps())
        flagged = [b for b in run.iter_steps(skip_nonfinite=False) if b.step == 2]
        assert len(flagged) == 1 and not torch.isfinite(flagged[0].grads).all()
        assert [int(b.steps[0]) for b in run.iter_blocks(max_rows=4)] == [0, 1, 3, 4]


@pytest.mark.parametrize("poison", [1, 3], ids=["middle_step", "last_step"])
def test_nonfinite_gradients_raise_and_earlier_steps_stay_on_disk(tmp_path, poison):
    # with the NaN in the last step the error can only surface while the run is being closed
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, on_nonfinite="raise")
    with pytest.raises(NonFiniteGradientError) as err:
        train(rec, rec.model, 4, poison=poison)
        rec.finish()
    rec.abort()
    assert f"step {poison}" in str(err.value) and "on_nonfinite='warn'" in str(err.value)
    with open_run(tmp_path / "run") as run:
        assert not run.complete
        assert run.steps.tolist() == list(range(poison))
        assert all(torch.isfinite(b.grads).all() for b in run.iter_steps())


# A full disk is tested on a real full file system in test_reliability.py.


# ---------------------------------------------------------------------------- sample ids
class Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(N):
            yield torch.randn(5, generator=g, dtype=torch.float64), torch.randint(0, 3, (), generator=g)


def test_iterable_dataset_without_sample_ids_fails_at_the_first_step(tmp_path):
    cb = InfluenceCallback(tmp_path / "run")
    with pytest.raises(SampleIdError) as err:
        make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), DataLoader(Stream(), batch_size=4))
    msg = str(err.value)
    assert "IndexedDataset" in msg and "sample_ids=" in msg


def test_recorder_needs_integer_ids_before_each_forward_pass(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8)
    opt = torch.optim.SGD(rec.model.parameters(), lr=0.1)
    with pytest.raises(SampleIdError, match="begin_micro_batch"):
        rec.end_step(opt)
    with pytest.raises(SampleIdError, match="integers"):
        rec.begin_micro_batch(torch.tensor([0.5, 1.5]))
    with pytest.raises(SampleIdError, match="1-D"):
        rec.begin_micro_batch(torch.zeros(2, 2, dtype=torch.long))
    rec.abort()


def test_wrong_number_of_ids_for_a_batch_keeps_earlier_steps(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, steps_per_shard=1)
    train(rec, rec.model, 2)
    opt = torch.optim.SGD(rec.model.parameters(), lr=0.1)
    rec.begin_micro_batch([0, 1, 2])  # the batch has 4 samples
    F.cross_entropy(rec.model(X[:4]), Y[:4]).backward()
    with pytest.raises(SampleIdError) as err:
        rec.end_step(opt)
    rec.abort()
    assert "4 samples" in str(err.value) and "3 sample ids" in str(err.value)
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == [0, 1] and not run.complete


class DictDataset(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"idx": i, "x": X[i].double(), "y": Y[i]}


def test_sample_ids_callable_returning_too_few_ids_fails_and_keeps_earlier_steps(tmp_path):
    def ids(batch, batch_idx):
        return batch["idx"][:-1] if batch_idx == 2 else batch["idx"]

    cb = InfluenceCallback(tmp_path / "run", sample_ids=ids, steps_per_shard=1)
    with pytest.raises(SampleIdError, match="3 sample ids"):
        make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), DataLoader(DictDataset(), batch_size=4))
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == [0, 1] and not run.complete
        assert np.concatenate([b.sample_ids.numpy() for b in run.iter_steps()]).tolist() == list(range(8))


# ---------------------------------------------------------------------------- review fixes
class TwoBranches(nn.Module):
    """A recorded branch and an unrecorded one whose gradient alone overflows under loss scaling."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.recorded = nn.Linear(5, 3)
        self.other = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.recorded(x) + self.other


def test_steps_an_amp_grad_scaler_skips_are_flagged_and_left_out(tmp_path):
    model = TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    rec = GradientRecorder(tmp_path / "run", model, layers=["recorded"], projection="none")
    applied = []
    for t in range(3):
        ids = torch.arange(4 * t, 4 * t + 4)
        rec.begin_micro_batch(ids)
        loss = F.cross_entropy(model(X[ids]), Y[ids])
        if t == 1:  # only the unrecorded parameter's gradient overflows: recorded rows stay finite
            loss = loss + 3e38 * model.other.sum()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        before = model.recorded.weight.detach().clone()
        rec.end_step(opt, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        applied.append(not torch.equal(before, model.recorded.weight))
    rec.finish()
    assert applied == [True, False, True]
    run = open_run(tmp_path / "run")
    assert run.skipped.tolist() == [False, True, False] and not run.nonfinite.any()
    assert [b.step for b in run.iter_steps()] == [0, 2]
    assert run.info()["skipped_steps"] == [1]


def test_a_grad_scaler_that_has_not_unscaled_gives_a_warning(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    rec = GradientRecorder(tmp_path / "run", model, projection=8)
    rec.begin_micro_batch(torch.arange(4))
    scaler.scale(F.cross_entropy(model(X[:4]), Y[:4])).backward()
    with pytest.warns(RuntimeWarning, match=r"scaler.unscale_\(optimizer\) before end_step"):
        rec.end_step(opt, grad_scaler=scaler)
    rec.finish()


def test_save_checkpoint_after_fit_keeps_working(tmp_path):
    cb = InfluenceCallback(tmp_path / "run", projection=8)
    trainer = make_trainer([cb], 1, tmp_path)
    trainer.fit(TinyClassifier(), DataLoader(list(zip(X.double(), Y)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    state = torch.load(tmp_path / "after.ckpt", weights_only=True)["callbacks"]
    assert any(v.get("run_id") == open_run(tmp_path / "run").run_id for v in state.values())


def test_resuming_with_other_recording_settings_is_refused_and_changes_nothing(tmp_path):
    rec = record(tmp_path / "run", 3)
    run_id = rec.run_id
    rank_file = tmp_path / "run" / fmt.rank_file_name(0)
    before = rank_file.read_text()
    other = GradientRecorder(tmp_path / "run", mlp(), projection=8, seed=123)
    other.plan_start(resume_run_id=run_id, resume_step=2)
    other.begin_micro_batch(torch.arange(4))
    F.cross_entropy(other.model(X[:4]), Y[:4]).backward()
    with pytest.raises(ConfigurationError, match="projection_fingerprint"):
        other.end_step(torch.optim.SGD(other.model.parameters(), lr=0.1), step=2)
    assert rank_file.read_text() == before
    assert open_run(tmp_path / "run").steps.tolist() == [0, 1, 2]


def test_resume_drops_parameter_files_of_the_abandoned_steps(tmp_path):
    rec = record(tmp_path / "run", 5, snapshot_every_n_steps=1)
    assert open_run(tmp_path / "run").snapshot_steps.tolist() == [0, 1, 2, 3, 4, 5]
    again = GradientRecorder(tmp_path / "run", mlp(), projection=8, snapshot_every_n_steps=1)
    again.plan_start(resume_run_id=rec.run_id, resume_step=2)
    opt = torch.optim.SGD(again.model.parameters(), lr=0.1)
    for t in (2, 3):
        again.begin_micro_batch(torch.arange(4))
        F.cross_entropy(again.model(X[:4]), Y[:4]).backward()
        again.end_step(opt, step=t)
        opt.step()
        opt.zero_grad()
    again.finish()
    run = open_run(tmp_path / "run")
    assert run.steps.tolist() == [0, 1, 2, 3] and run.final_step == 4
    assert run.snapshot_steps.tolist() == [0, 1, 2, 3, 4]


def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path):
    from influence_hooks.storage.index import MAX_OPEN_FILES

    record(tmp_path / "run", 40, steps_per_shard=1)
    run = open_run(tmp_path / "run")
    assert len(shard_files(tmp_path / "run")) >= 40
    steps = [b.step for b in run.iter_steps()] + [int(s) for b in run.iter_blocks(max_rows=8) for s in b.steps]
    assert steps == list(range(40)) + [s for s in range(40) for _ in range(4)]
    assert len(run._pool) <= MAX_OPEN_FILES


def test_exclude_naming_a_container_leaves_out_everything_inside_it(tmp_path):
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7)), nn.Linear(7, 3))
    rec = GradientRecorder(tmp_path / "run", model, exclude=["0"])
    assert [l.name for l in rec.layers] == ["1"]
    with pytest.raises(ConfigurationError, match=r"exclude pattern 'nothing\*' matches no module"):
        GradientRecorder(tmp_path / "run2", model, exclude=["nothing*"])


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.att(x, x, x)[0].sum(1))


def test_default_selection_does_not_enter_modules_that_cannot_be_hooked(tmp_path):
    model = WithAttention()
    rec = GradientRecorder(tmp_path / "run", model, projection="none")
    assert [l.name for l in rec.layers] == ["head"]  # not att.out_proj, which MHA calls functionally
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec.begin_micro_batch(torch.arange(2))
    model(torch.randn(2, 5, 4)).sum().backward()
    rec.end_step(opt)  # the first step validates the selection: no error
    rec.finish()


def test_a_model_with_batchnorm_gets_a_warning_that_samples_are_mixed(tmp_path):
    with pytest.warns(RuntimeWarning, match="BatchNorm layers"):
        GradientRecorder(tmp_path / "run", WithBatchNorm(), projection=8)


def test_storage_defaults_to_float32_when_no_layer_is_actually_projected(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=10_000)  # every layer below its share
    train(rec, rec.model, 2)
    rec.finish()
    assert all(l.spec.kind == "none" for l in rec.layers)
    assert open_run(tmp_path / "run").manifest["storage_dtype"] == "float32"
    rec = record(tmp_path / "run2", 2)
    assert open_run(tmp_path / "run2").manifest["storage_dtype"] == "float16"


def test_cli_verify_separates_an_interrupted_run_from_a_damaged_one(tmp_path, capsys):
    from influence_hooks.cli import main

    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, steps_per_shard=1)
    train(rec, rec.model, 3)
    rec.close(complete=False)  # interrupted, but every shard is whole
    assert main(["verify", str(tmp_path / "run")]) == 0
    assert "NOTE  the run is incomplete" in capsys.readouterr().out
    last = shard_files(tmp_path / "run")[-1]
    last.write_bytes(last.read_bytes()[:100])  # now damaged
    assert main(["verify", str(tmp_path / "run")]) == 1
    assert "PROBLEM" in capsys.readouterr().out


def test_micro_batches_of_unequal_size_warn_that_the_step_weight_is_approximate(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection=8)
    for ids in (torch.arange(4), torch.arange(4, 6)):
        rec.begin_micro_batch(ids)
        (F.cross_entropy(model(X[ids]), Y[ids]) / 2).backward()
    with pytest.warns(RuntimeWarning, match=r"unequal size \[4, 2\]"):
        rec.end_step(opt)
    rec.finish()
