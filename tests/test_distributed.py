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
