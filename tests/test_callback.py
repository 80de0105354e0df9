"""InfluenceCallback in real Lightning Trainer runs (CPU, float64, plain SGD).

The end-to-end check of sample-id tracking: with exact float64 gradients and a snapshot of the
whole model at every step, the rows recorded at step t for ids I must equal the torch.func
gradients of dataset samples I at the snapshot w_t. A wrong id, a shifted batch or a stale row
from a superseded run would not.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from _tiny_lightning import TinyClassifier, make_trainer
from conftest import assert_rows_close, func_per_sample_grads
from influence_hooks.record.callback import InfluenceCallback
from influence_hooks.errors import ConfigurationError, RunDirectoryError
from influence_hooks.record.ids import IndexedDataset
from influence_hooks.storage.reader import open_run

# Lightning's own noise
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated", "ignore:Be aware that when using `ckpt_path`")

N, BATCH = 20, 4
LAYERS = ["net.0", "net.2"]
EXACT = dict(projection="none", storage_dtype="float64", snapshot_every_n_steps=1, snapshot_scope="model")

g = torch.Generator().manual_seed(7)
X = torch.randn(N, 5, generator=g, dtype=torch.float64)
Y = torch.randint(0, 3, (N,), generator=g)


def ce_sample(call, x, y):
    return F.cross_entropy(call(x), y)


class DictDataset(Dataset):
    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"idx": i, "x": X[i], "y": Y[i]}


def loader(dataset=None, **kw):
    return DataLoader(dataset if dataset is not None else TensorDataset(X, Y), batch_size=BATCH,
                      shuffle=True, **kw)


def check_run(run_dir, module, *, epochs: int, steps_per_epoch: int, lr: float = 0.1) -> None:
    """Contiguous steps, every epoch a permutation of the dataset, rows = torch.func at w_t."""
    with open_run(run_dir) as run:
        assert run.complete
        total = epochs * steps_per_epoch
        assert run.steps.tolist() == list(range(total))
        assert run.final_step == total
        assert run.epochs.tolist() == np.repeat(np.arange(epochs), steps_per_epoch).tolist()
        assert [l.name for l in run.layers] == LAYERS
        per_epoch: dict[int, list[int]] = {}
        for b in run.iter_steps(dtype=torch.float64):
            ids = b.sample_ids
            per_epoch.setdefault(b.epoch, []).extend(ids.tolist())
            w_t = run.load_parameters(b.step)
            assert_rows_close(b.grads, func_per_sample_grads(module, ce_sample, (X[ids], Y[ids]), LAYERS, w_t))
            # plain SGD: w_{t+1} - w_t = -lr * update_weight * sum_i g_t(i) (every parameter is recorded)
            w_next = run.load_parameters(b.step + 1)
            delta = torch.cat([(w_next[n] - w_t[n]).reshape(-1) for n, _ in module.named_parameters()])
            assert b.lr == lr
            assert_rows_close(-b.lr * b.update_weight * b.grads.sum(0), delta)
        assert sorted(per_epoch) == list(range(epochs))
        for e, ids in per_epoch.items():
            assert sorted(ids) == list(range(N)), f"epoch {e}: ids are not a permutation of the dataset"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_run_records_each_samples_gradient_under_its_dataset_index(tmp_path, num_workers):
    module = TinyClassifier()
    cb = InfluenceCallback(tmp_path / "run", steps_per_shard=4, **EXACT)
    epochs = 3 if num_workers == 0 else 2
    make_trainer([cb], epochs, tmp_path).fit(module, loader(num_workers=num_workers))
    check_run(tmp_path / "run", module, epochs=epochs, steps_per_epoch=N // BATCH)


def test_gradient_accumulation_with_a_partial_last_accumulation(tmp_path):
    # 5 batches per epoch with accumulate_grad_batches=2: steps of 2, 2 and 1 micro-batches; Lightning
    # divides every micro-batch loss by 2, also in the last step of the epoch
    module = TinyClassifier()
    cb = InfluenceCallback(tmp_path / "run", **EXACT)
    make_trainer([cb], 2, tmp_path, accumulate_grad_batches=2).fit(module, loader())
    check_run(tmp_path / "run", module, epochs=2, steps_per_epoch=3)
    with open_run(tmp_path / "run") as run:
        assert run.batch_sizes.tolist() == [8, 8, 4] * 2


def test_indexed_dataset_ids_come_from_the_batch(tmp_path):
    module = TinyClassifier()
    cb = InfluenceCallback(tmp_path / "run", **EXACT)
    make_trainer([cb], 2, tmp_path).fit(module, loader(IndexedDataset(TensorDataset(X, Y))))
    check_run(tmp_path / "run", module, epochs=2, steps_per_epoch=N // BATCH)


def test_explicit_sample_ids_callable(tmp_path):
    module = TinyClassifier()
    cb = InfluenceCallback(tmp_path / "run", sample_ids=lambda batch, batch_idx: batch["idx"], **EXACT)
    make_trainer([cb], 2, tmp_path).fit(module, loader(DictDataset()))
    check_run(tmp_path / "run", module, epochs=2, steps_per_epoch=N // BATCH)


def test_query_gradients_recorded_on_schedule_at_w_t(tmp_path):
    # every 4 steps, the first and last step of each epoch, and the final step T = 15
    module = TinyClassifier()
    query_ids = [0, 3, 7]
    cb = InfluenceCallback(tmp_path / "run", queries=Subset(TensorDataset(X, Y), query_ids),
                           query_every_n_steps=4, **EXACT)
    make_trainer([cb], 3, tmp_path).fit(module, loader())
    every_4, firsts, lasts = {0, 4, 8, 12}, {0, 5, 10}, {4, 9, 14}
    with open_run(tmp_path / "run") as run:
        assert run.query_steps.tolist() == sorted(every_4 | firsts | lasts | {15})
        assert run.query_ids.tolist() == query_ids
        for t in run.query_steps:
            expected = func_per_sample_grads(module, ce_sample, (X[query_ids], Y[query_ids]), LAYERS,
                                             run.load_parameters(int(t)))
            assert_rows_close(run.query_gradients(int(t), dtype=torch.float64), expected)


def test_resume_from_checkpoint_continues_the_run_without_missing_or_duplicated_steps(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    # shards of 3 steps, so the resume point (step 10) falls inside a shard of the first run
    options = dict(steps_per_shard=3, **EXACT)
    make_trainer([InfluenceCallback(run_dir, **options), ckpt], 3, tmp_path,
                 enable_checkpointing=True).fit(TinyClassifier(), loader())
    epoch_1 = tmp_path / "ckpt" / "epoch=1-step=10.ckpt"
    assert epoch_1.exists()
    module = TinyClassifier(seed=5)  # weights come from the checkpoint
    make_trainer([InfluenceCallback(run_dir, **options)], 5, tmp_path).fit(module, loader(), ckpt_path=epoch_1)
    check_run(run_dir, module, epochs=5, steps_per_epoch=N // BATCH)


def test_resuming_into_a_directory_that_holds_another_run_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    make_trainer([InfluenceCallback(tmp_path / "a"), ckpt], 1, tmp_path,
                 enable_checkpointing=True).fit(TinyClassifier(), loader())
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    make_trainer([InfluenceCallback(tmp_path / "b")], 1, tmp_path).fit(TinyClassifier(), loader())
    with open_run(tmp_path / "b") as run:
        other_id, other_steps = run.run_id, run.steps.tolist()

    # a different directory, holding another run
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        make_trainer([InfluenceCallback(tmp_path / "b")], 2, tmp_path).fit(
            TinyClassifier(), loader(), ckpt_path=checkpoint)
    # the checkpoint's own directory, since replaced by another run
    make_trainer([InfluenceCallback(tmp_path / "a", overwrite=True)], 1, tmp_path).fit(TinyClassifier(), loader())
    with pytest.raises(RunDirectoryError, match="belongs to run"):
        make_trainer([InfluenceCallback(tmp_path / "a")], 2, tmp_path).fit(
            TinyClassifier(), loader(), ckpt_path=checkpoint)

    with open_run(tmp_path / "b") as run:  # the other run is untouched
        assert (run.run_id, run.steps.tolist(), run.complete) == (other_id, other_steps, True)
    with open_run(tmp_path / "a") as run:
        assert run.complete and run.steps.tolist() == list(range(5))


class _QueryDataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return loader()

    def query_dataset(self):
        return Subset(TensorDataset(X, Y), [1, 2])

    def influence_metadata(self):
        return {"corrupted_ids": [4]}


def test_queries_from_the_data_module_equal_queries_given_directly(tmp_path):
    module = TinyClassifier()
    cb = InfluenceCallback(tmp_path / "run", queries_from="query_dataset", **EXACT)
    make_trainer([cb], 1, tmp_path).fit(module, datamodule=_QueryDataModule())
    with open_run(tmp_path / "run") as run:
        assert run.query_ids.tolist() == [1, 2]
        assert run.manifest["metadata"]["data"] == {"corrupted_ids": [4]}
        t = int(run.query_steps[-1])
        expected = func_per_sample_grads(module, ce_sample, (X[[1, 2]], Y[[1, 2]]), LAYERS,
                                         {n: p.detach() for n, p in module.named_parameters()})
        assert_rows_close(run.query_gradients(t, dtype=torch.float64), expected)


def test_queries_from_a_missing_name_or_together_with_queries_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="queries= or queries_from="):
        InfluenceCallback(tmp_path / "a", queries=(X, Y), queries_from="query_dataset")
    cb = InfluenceCallback(tmp_path / "b", queries_from="no_such_method", **EXACT)
    with pytest.raises(ConfigurationError, match="no_such_method"):
        make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), datamodule=_QueryDataModule())


def test_state_key_names_the_resolved_directory_and_is_resolved_once(tmp_path, monkeypatch):
    import os

    (tmp_path / "runs").mkdir()
    os.symlink(tmp_path / "runs", tmp_path / "link")
    keys = {InfluenceCallback(str(p)).state_key
            for p in (tmp_path / "runs" / "r", tmp_path / "runs" / "x" / ".." / "r", tmp_path / "link" / "r")}
    assert len(keys) == 1 and repr(os.path.realpath(tmp_path / "runs" / "r")) in next(iter(keys))
    assert InfluenceCallback(str(tmp_path / "runs" / "other")).state_key not in keys

    cb = InfluenceCallback(str(tmp_path / "runs" / "r"))
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: calls.append(p) or real(p))
    assert {cb.state_key for _ in range(6)} == keys  # Lightning asks at every hook call
    assert len(calls) == 1
    cb.run_dir = str(tmp_path / "runs" / "other")  # a changed directory is resolved again
    assert cb.state_key not in keys
