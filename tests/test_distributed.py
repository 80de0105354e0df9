"""Recording and aggregating with several processes (torch.distributed, gloo on the CPU).

Recording runs tests/_ddp_lightning.py as real Lightning DDP training in subprocesses: two processes
with batch b must record the same run, to every aggregator, as one process with batch 2b over the
same data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from influence_hooks import dit, open_run, self_influence, tracin
from influence_hooks.errors import ConfigurationError

SCRIPT = Path(__file__).with_name("_ddp_lightning.py")
ROOT = Path(__file__).parents[1]


def train(run_dir: Path, strategy: str, devices: int, batch: int, *extra: str, check: bool = True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run_dir), strategy, str(devices), str(batch), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    train(base / "ddp" / "run", "ddp", 2, 6)
    train(base / "one" / "run", "single", 1, 12)
    return open_run(base / "ddp" / "run"), open_run(base / "one" / "run")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_ddp_recording_equals_one_process_over_the_same_global_batches(runs):
    ddp, one = runs
    assert ddp.complete and one.complete
    assert ddp.manifest["world_size"] == 2 and sorted(ddp.rank_states) == [0, 1]
    assert ddp.steps.tolist() == one.steps.tolist() == list(range(8))
    np.testing.assert_array_equal(ddp.batch_sizes, one.batch_sizes)
    np.testing.assert_allclose(ddp.update_weights, one.update_weights, rtol=1e-15)  # 1/(2 * 6) = 1/12
    np.testing.assert_allclose(ddp.lrs, one.lrs)
    for s in ddp.steps:
        assert sorted(ddp.step_sample_ids(int(s))) == sorted(one.step_sample_ids(int(s)))
    # every sample of every epoch once
    ids = np.concatenate([ddp.step_sample_ids(int(s)) for s in ddp.steps])
    assert sorted(ids.tolist()) == sorted(list(range(48)) * 2)
    # what every rank shares is written once, by rank 0
    assert ddp.query_steps.tolist() == one.query_steps.tolist()
    assert ddp.snapshot_steps.tolist() == one.snapshot_steps.tolist()
    shards = [p.name for p in (ddp.path / "shards").iterdir()]
    assert any(n.startswith("grads-r001") for n in shards)


def test_ddp_scores_equal_one_process_scores(runs):
    ddp, one = runs
    f64 = dict(dtype=torch.float64, progress=False)
    assert rel(tracin(ddp, **f64).values, tracin(one, **f64).values) < 1e-8
    assert rel(self_influence(ddp, **f64).values, self_influence(one, **f64).values) < 1e-8
    for mode in ("removal", "accrued"):
        a = dit(ddp, window=(2, 6), mode=mode, curvature="fisher", **f64)
        b = dit(one, window=(2, 6), mode=mode, curvature="fisher", **f64)
        assert rel(a.values, b.values) < 1e-8


def test_ddp_spawn_records_the_same_run(tmp_path, runs):
    _, one = runs
    train(tmp_path / "run", "ddp_spawn", 2, 6)
    spawned = open_run(tmp_path / "run")
    assert spawned.complete and spawned.steps.tolist() == one.steps.tolist()
    f64 = dict(dtype=torch.float64, progress=False)
    assert rel(tracin(spawned, **f64).values, tracin(one, **f64).values) < 1e-8


def test_sharded_strategies_are_refused_with_what_is_supported():
    from influence_hooks.record.distributed import refuse_sharded

    class FSDPStrategy:  # Lightning's class, by name: nothing is imported to recognise it
        pass

    class DeepSpeedStrategy:
        pass

    for strategy in (FSDPStrategy(), DeepSpeedStrategy()):
        with pytest.raises(ConfigurationError, match="shards of each parameter.*Supported: one process"):
            refuse_sharded(strategy)
    refuse_sharded(object())  # DDP and single-device strategies pass


# ---------------------------------------------------------------------- aggregation
def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from helpers_runs import record_run
    from test_exact import PLAIN, record

    base = tmp_path_factory.mktemp("agg")
    rec = record_run(base / "run")
    record(base / "exact", PLAIN, snapshot_every_n_steps=1, snapshot_scope="model")
    return base, rec.path, base / "exact" / "run"


def test_every_aggregator_with_two_processes_equals_one_process(recorded):
    import h5py

    from dist_cases import cases

    base, run_dir, exact_dir = recorded
    out = base / "dist.h5"
    proc = torchrun(str(Path(__file__).with_name("_dist_aggregate.py")), str(run_dir), str(exact_dir), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    one = cases(str(run_dir), str(exact_dir), group=None, dvemb_dir=base)
    with h5py.File(out, "r") as f:
        names = set()
        f.visititems(lambda name, obj: names.add(name) if isinstance(obj, h5py.Dataset) else None)
        assert names == set(one)
        for name, expected in one.items():
            got = torch.from_numpy(f[name][()])
            assert got.shape == expected.shape, name
            # compare_windows computes in float32, every other case in float64: sums in another order
            assert rel(got, expected) < (1e-5 if name.startswith("compare") else 1e-10), name


def test_the_command_line_under_torchrun_splits_the_work_and_rank_0_writes(recorded, tmp_path):
    from influence_hooks.aggregate.results import InfluenceScores

    _, run_dir, _ = recorded
    target = tmp_path / "scores.h5"
    proc = torchrun("-m", "influence_hooks.cli", "dit", str(run_dir), "--window", "4:20", "--mode", "accrued",
                    "--dtype", "float64", "--quiet", "--out", str(target))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("InfluenceScores: dit_accrued") == 1  # rank 0 alone prints
    one = dit(open_run(run_dir), window=(4, 20), mode="accrued", dtype=torch.float64, progress=False)
    assert rel(InfluenceScores.load(target).values, one.values) < 1e-10


def test_a_killed_rank_leaves_every_finished_shard_readable_and_verify_says_where_it_stopped(tmp_path):
    from influence_hooks.cli import main as cli

    run_dir = tmp_path / "run"
    proc = train(run_dir, "ddp", 2, 6, "--kill-rank", "1", "--kill-at", "5", check=False)
    assert proc.returncode != 0  # rank 1 was killed; rank 0's next collective timed out
    run = open_run(run_dir)
    assert not run.complete
    progress = {p["rank"]: p for p in run.rank_progress()}
    assert progress[1]["last_step"] == 3 and not progress[1]["complete"]  # steps 4.. of rank 1 were never finished
    assert progress[0]["last_step"] >= 3
    for b in run.iter_steps(dtype=torch.float64):  # every finished shard reads in full
        assert torch.isfinite(b.grads).all()
    partial = run.partial_steps()
    assert all(s >= 4 for s in partial)  # steps only rank 0 finished: half of their global batch
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["verify", str(run_dir)])
    text = out.getvalue()
    assert code == 0, text  # interrupted, not damaged
    assert "rank 1 stopped after step 3" in text and "incomplete" in text


def test_a_torchrun_loop_with_distributed_data_parallel_records_the_same_run(tmp_path, runs):
    _, one = runs
    proc = torchrun(str(Path(__file__).with_name("_ddp_torchrun.py")), str(tmp_path / "run"), "6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = open_run(tmp_path / "run")
    assert run.complete and run.world_size == 2 and run.steps.tolist() == one.steps.tolist()
    np.testing.assert_allclose(run.update_weights, one.update_weights, rtol=1e-15)
    f64 = dict(dtype=torch.float64, progress=False)
    assert rel(tracin(run, **f64).values, tracin(one, **f64).values) < 1e-8
    a = dit(run, window=(2, 6), curvature="fisher", **f64)
    assert rel(a.values, dit(one, window=(2, 6), curvature="fisher", **f64).values) < 1e-8


def test_resuming_with_another_number_of_processes_is_refused(runs):
    from influence_hooks.storage.writer import RunWriter

    ddp, _ = runs
    now = {k: ddp.manifest[k] for k in ("dim", "projection_fingerprint", "storage_dtype", "loss_reduction")}
    RunWriter.check_resume(ddp.path, ddp.run_id, {**now, "world_size": 2})  # the same: fine
    with pytest.raises(ConfigurationError, match="world_size: recorded 2, now 1.*number of processes"):
        RunWriter.check_resume(ddp.path, ddp.run_id, {**now, "world_size": 1})
