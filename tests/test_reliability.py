"""Reliability: no silent loss, no silent corruption, no reading outside the run (issue 14).

Every fault is real: two processes contending for a run directory, a full tmpfs, bytes flipped in
a shard on disk, HDF5 files crafted with external links, external storage and virtual datasets,
a killed process. Each test checks what the library does about it: a clear error of its own type
that names the problem and the fix, nothing already recorded lost, and nothing silently different.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from _tiny_lightning import TinyClassifier, make_trainer
from influence_hooks import dit, dvemb, open_run, tracin
from influence_hooks.aggregate import DataValueEmbeddings, InfluenceScores
from influence_hooks.cli import main
from influence_hooks.errors import (ConfigurationError, CorruptShardError, RunDirectoryError,
                                    SampleIdError, StorageError, UnsafeFileError)
from influence_hooks.record.callback import InfluenceCallback
from influence_hooks.record.options import RecordingConfig
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage import format as fmt
from influence_hooks.storage.files import h5_image, write_array, write_atomic
from influence_hooks.storage.jsonio import write_json_atomic
from influence_hooks.storage.writer import SMALL_ID_CHECK, RunWriter, StepRecord, check_sample_ids

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated", "ignore:Be aware that when using `ckpt_path`")

HERE = Path(__file__).parent
N = 32
_g = torch.Generator().manual_seed(3)
X = torch.randn(N, 5, generator=_g)
Y = torch.randint(0, 3, (N,), generator=_g)
CE = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731


def mlp(width: int = 7) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))


def train(rec: GradientRecorder, steps: int, *, start: int = 0, ids_of=None, nan_at: int | None = None,
          apply_nan: bool = False) -> None:
    """Plain SGD on batches of 4 distinct samples. At step `nan_at` the inputs are NaN; the update
    is then skipped unless apply_nan (which makes the weights NaN from there on)."""
    model = rec.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(start, start + steps):
        ids = ids_of(t) if ids_of else torch.arange(4 * t, 4 * t + 4) % N
        x = X[ids] * float("nan") if t == nan_at else X[ids]
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(x), Y[ids]).backward()
        rec.end_step(opt, step=t)
        if t != nan_at or apply_nan:
            opt.step()
        opt.zero_grad()


def record(run_dir: Path, steps: int, *, queries: bool = True, **options) -> GradientRecorder:
    options.setdefault("projection", 8)
    if queries:
        options.update(queries=(X[:3], Y[:3]), query_loss_fn=CE)
        options.setdefault("query_every_n_steps", 1)
    rec = GradientRecorder(run_dir, mlp(), **options)
    train(rec, steps)
    rec.finish()
    return rec


def shards(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / fmt.SHARD_DIR).iterdir() if fmt.parse_shard_name(p.name))


def subprocess_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))


def start_recording(mode: str, run_dir: Path, **args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "_record_process.py"), mode, str(run_dir), json.dumps(args)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the recording process did not get ready"
        time.sleep(0.02)


def scores_equal(a: InfluenceScores, b: InfluenceScores) -> bool:
    return (np.array_equal(a.train_ids, b.train_ids)
            and torch.equal(torch.nan_to_num(a.values, 1e300), torch.nan_to_num(b.values, 1e300)))


@contextlib.contextmanager
def tmpfs(size: str, *, read_only: bool = False):
    """A real, small file system of its own (tmpfs), mounted for the test and removed after it."""
    where = Path(tempfile.mkdtemp(prefix="ih-tmpfs-"))
    opts = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"needs permission to mount a small tmpfs (a real full / read-only file system): "
                    f"{done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


def fill_up(where: Path, leave: int = 0) -> Path:
    """Fill the file system at `where` until only about `leave` bytes are free (0: completely)."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        free = shutil.disk_usage(where).free - leave
        try:
            while free > 0:
                n = f.write(b"\0" * min(free, 1 << 20))
                free -= n
            f.flush()
            os.fsync(f.fileno())
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


# ====================================================================== 1. a second writer
def test_a_second_writer_is_refused_naming_the_process_that_holds_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_recording("hold", run_dir, steps=2, ready=str(tmp_path / "ready"), release=str(tmp_path / "go"))
    try:
        wait_for(tmp_path / "ready", proc)
        for options in ({}, {"overwrite": True}):
            rec = GradientRecorder(run_dir, mlp(), projection=8, **options)
            with pytest.raises(RunDirectoryError) as err:
                rec.plan_start()  # refused before training starts
            msg = str(err.value)
            assert f"pid {proc.pid}" in msg and "being recorded" in msg and "another directory" in msg
            with pytest.raises(RunDirectoryError, match=f"pid {proc.pid}"):
                RunWriter.create(run_dir, {"dim": 0, "storage_dtype": "float32", "layers": []}, overwrite=True)
        (tmp_path / "go").touch()
        assert proc.wait(120) == 0, proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with open_run(run_dir) as run:  # the first writer's run is whole
        assert run.complete and run.steps.tolist() == [0, 1] and run.verify() == []
    record(run_dir, 2, overwrite=True)  # once it is done, the directory is free again


def test_the_lock_of_a_killed_recording_is_released_by_the_kernel(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_recording("hold", run_dir, steps=3, ready=str(tmp_path / "ready"), release=str(tmp_path / "never"))
    try:
        wait_for(tmp_path / "ready", proc)
        with pytest.raises(RunDirectoryError, match=f"pid {proc.pid}"):
            RunWriter.check_new_run_dir(run_dir, overwrite=True)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.communicate()
    with open_run(run_dir) as run:  # what it finished stays readable
        assert not run.complete and run.steps.tolist() == [0, 1, 2]
    rec = record(run_dir, 2, overwrite=True)  # no stale lock
    assert open_run(run_dir).run_id == rec.run_id


@pytest.mark.parametrize("trial", range(2))
def test_two_trainings_started_together_leave_one_whole_run(tmp_path, trial):
    run_dir = tmp_path / "run"
    start_at = time.time() + 4.0  # both processes have imported torch by then
    procs = [start_recording("race", run_dir, start_at=start_at, steps=6, seed=s) for s in (1, 2)]
    results = []
    for p in procs:
        out, errs = p.communicate(timeout=180)
        assert p.returncode == 0, errs[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    winners = [r for r in results if r["ok"]]
    losers = [r for r in results if not r["ok"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert losers[0]["error"] == "RunDirectoryError"
    # "by pid N", or "by another process" when the winner holds the lock but has not written its pid yet
    assert "is being recorded by" in losers[0]["message"] or "already holds a run" in losers[0]["message"]
    with open_run(run_dir) as run:
        assert run.run_id == winners[0]["run_id"]
        assert run.complete and run.steps.tolist() == list(range(6)) and run.verify() == []


# ====================================================================== 2. a full disk
@pytest.mark.parametrize("what", ["shards", "shards_and_parameter_files", "wide_shards"])
def test_a_full_disk_is_a_storage_error_and_every_finished_file_stays_readable(what):
    args = {"shards": dict(projection=16), "shards_and_parameter_files": dict(projection=16, params=True, width=64),
            "wide_shards": dict(projection="none", width=256, steps_per_shard=3)}[what]
    with tmpfs("1m") as fs:
        run_dir = fs / "run"
        proc = start_recording("fill", run_dir, **args)
        out, errs = proc.communicate(timeout=300)
        # a crash inside HDF5 (SIGSEGV) would show here as a negative return code
        assert proc.returncode == 0, f"the recording process died ({proc.returncode}): {errs[-3000:]}"
        result = json.loads(out.strip().splitlines()[-1])
        assert not result["ok"] and result["error"] == "StorageError", result
        msg = result["message"]
        assert "disk full" in msg and "shard(s)" in msg and "stay readable" in msg and str(run_dir) in msg
        assert "Free space" in msg and "resume" in msg
        assert not [p for p in run_dir.rglob("*") if p.name.endswith(fmt.TMP_SUFFIX)]
        with open_run(run_dir) as run:
            assert not run.complete and run.gaps == []
            n = len(run.steps)
            assert n >= 2 and run.steps.tolist() == list(range(n))
            assert all(torch.isfinite(b.grads).all() for b in run.iter_steps())
            assert all(run.query_gradients(int(s)).shape[0] == 3 for s in run.query_steps)
            assert all(run.load_parameters(int(s)) for s in run.snapshot_steps)
            if what == "shards_and_parameter_files":
                assert len(run.snapshot_steps) >= 2 and len(run.checkpoint_steps) >= 2
            assert [p for p in run.verify() if "incomplete" not in p] == []


def test_manifest_rank_file_and_shard_writes_on_a_full_disk_fail_cleanly():
    manifest = {"dim": 4, "storage_dtype": "float32", "layers": [
        {"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 4, "grad_dim": 4,
         "param_shapes": [["weight", [1, 4]]], "projection": {"kind": "none"}}]}
    with tmpfs("1m") as fs:
        filler = fill_up(fs)
        with pytest.raises(StorageError, match="disk full: cannot start recording"):
            RunWriter.create(fs / "run", manifest)  # the manifest does not fit
        assert not [p for p in fs.rglob("*") if p.name.endswith(fmt.TMP_SUFFIX)]
        filler.unlink()
        w = RunWriter.create(fs / "run", manifest)  # nothing left behind blocks the retry
        w.close(final_step=0)
        rank_file = fs / "run" / fmt.rank_file_name(0)
        before = rank_file.read_bytes()
        filler = fill_up(fs)
        # the rank file and a shard, each straight into ENOSPC (past the free-space check)
        with pytest.raises(OSError) as err:
            write_json_atomic(rank_file, {"big": "x" * 100_000})
        assert err.value.errno == errno.ENOSPC and rank_file.read_bytes() == before
        image = h5_image(lambda f: write_array(f, "x", np.random.default_rng(0).standard_normal(100_000)))
        with pytest.raises(OSError) as err:
            write_atomic(fs / "run" / fmt.SHARD_DIR / fmt.shard_name(0, 0), image)
        assert err.value.errno == errno.ENOSPC
        assert not [p for p in fs.rglob("*") if p.name.endswith(fmt.TMP_SUFFIX)]
        filler.unlink()
        with open_run(fs / "run") as run:
            assert run.complete and run.verify() == []
        # a checkpoint larger than what is left, after a shard that fits
        shutil.rmtree(fs / "run")
        w = RunWriter.create(fs / "run", {**manifest, "dim": 4})
        fill_up(fs, leave=200_000)
        w.write_step(StepRecord(step=0, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=2, update_weight=0.5,
                                micro_batches=1, sample_ids=np.array([0, 1]), grads=torch.ones(2, 4)))
        w.flush()
        w.write_params("checkpoint", 1, {"w": torch.ones(100_000)})
        with pytest.raises(StorageError) as err:
            w.close(final_step=2)
        msg = str(err.value)
        assert "disk full while writing checkpoint-r000-s000000001.h5" in msg and "1 shard(s)" in msg
        assert not [p for p in fs.rglob("*") if p.name.endswith(fmt.TMP_SUFFIX)]
        with open_run(fs / "run") as run:
            assert not run.complete and run.steps.tolist() == [0] and run.checkpoint_steps.tolist() == []
            assert torch.equal(next(run.iter_steps(dtype=torch.float32)).grads, torch.ones(2, 4))


# ====================================================================== 3. missing shards
def test_a_deleted_middle_shard_is_reported_by_open_run_verify_info_and_the_aggregators(tmp_path, capsys):
    run_dir = tmp_path / "run"
    record(run_dir, 8, steps_per_shard=2)
    middle = shards(run_dir)[1]
    with h5py.File(middle, "r") as f:
        lost = f[fmt.STEPS]["step"][()].tolist()
    assert lost == [2, 3]
    middle.unlink()
    with pytest.warns(RuntimeWarning, match=r"1 finished shard\(s\) are missing .*steps \[2, 3\]"):
        run = open_run(run_dir)
    with run:
        assert [(g.kind, g.name, g.first_step, g.last_step) for g in run.gaps] == [("shard", middle.name, 2, 3)]
        assert run.steps.tolist() == [0, 1, 4, 5, 6, 7]
        assert any(middle.name in p and "missing" in p for p in run.verify())
        s = tracin(run, progress=False)  # its result says so
        assert any("not whole" in n and middle.name in n for n in s.approximations)
    assert main(["verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM  rank 0: shard {middle.name} is missing (steps 2..3)" in out
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "NOT WHOLE" in out and f"MISSING    rank 0: shard {middle.name} is missing (steps 2..3)" in out


def test_the_last_two_shards_deleted_are_reported_although_the_numbering_has_no_hole(tmp_path, capsys):
    run_dir = tmp_path / "run"
    record(run_dir, 8, steps_per_shard=2)
    files = shards(run_dir)
    with h5py.File(files[-2], "r") as f, h5py.File(files[-1], "r") as g:
        lost = f[fmt.STEPS]["step"][()].tolist() + g[fmt.STEPS]["step"][()].tolist()
    for p in files[-2:]:
        p.unlink()
    with pytest.warns(RuntimeWarning, match="2 finished shard"):
        run = open_run(run_dir)
    with run:
        assert {g.name for g in run.gaps} == {p.name for p in files[-2:]}
        assert sorted(s for g in run.gaps if g.first_step is not None
                      for s in range(g.first_step, g.last_step + 1)) == lost
        assert run.complete  # training did finish; the directory is what is not whole
    assert main(["verify", str(run_dir)]) == 1
    assert capsys.readouterr().out.count("is missing") == 2


def test_without_a_rank_file_a_hole_in_the_shard_numbering_is_still_reported(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 8, steps_per_shard=2)
    (run_dir / fmt.rank_file_name(0)).unlink()
    shards(run_dir)[2].unlink()
    with pytest.warns(RuntimeWarning) as warned:
        run = open_run(run_dir)
    assert any("rank file" in str(w.message) for w in warned)
    with run:
        assert [(g.name, g.first_step, g.last_step) for g in run.gaps] == [(fmt.shard_name(0, 2), 4, 5)]
        problems = run.verify(require_complete=False)
        assert any("rank file rank-000.json is missing" in p for p in problems)
        assert any(fmt.shard_name(0, 2) in p for p in problems)


def test_a_deleted_parameter_file_is_reported(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 4, steps_per_shard=2, snapshot_every_n_steps=1)
    victim = run_dir / fmt.PARAM_DIR / fmt.param_file_name("snapshot", 0, 2)
    victim.unlink()
    with pytest.warns(RuntimeWarning, match="parameter file"):
        run = open_run(run_dir)
    with run:
        assert [(g.kind, g.first_step) for g in run.gaps] == [("snapshot", 2)]
        assert any(victim.name in p for p in run.verify())


# ====================================================================== 4. checksums
def _flip(path: Path, offset: int, mask: int = 0x10) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def _data_offset(path: Path, dataset: str, row: int) -> int:
    """Byte offset in the file of row `row` of a chunked dataset."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        per_chunk = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row // per_chunk * per_chunk,) + (0,) * (ds.ndim - 1))
        return info.byte_offset + (row % per_chunk) * int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize


@pytest.mark.parametrize("dataset", [fmt.ROWS_GRAD, fmt.ROWS_SAMPLE_ID, fmt.QUERY_GRAD])
def test_a_flipped_byte_in_recorded_data_is_reported_and_never_changes_a_result(tmp_path, dataset):
    run_dir = tmp_path / "run"
    record(run_dir, 6, steps_per_shard=3, projection="none", storage_dtype="float32")
    with open_run(run_dir) as run:
        before = tracin(run, progress=False)
    victim = shards(run_dir)[1]
    _flip(victim, _data_offset(victim, dataset, 1) + 2)
    with open_run(run_dir) as run:  # the per-step tables are intact: the run opens
        problems = run.verify()
        assert len(problems) == 1 and victim.name in problems[0] and "damaged" in problems[0]
        with pytest.raises(CorruptShardError) as err:
            tracin(run, progress=False)
        msg = str(err.value)
        assert str(victim) in msg and "damaged" in msg and "influence-hooks verify" in msg
    assert main(["verify", str(run_dir)]) == 1
    assert before.values.isfinite().all()


def test_no_flipped_byte_anywhere_in_a_shard_changes_results_silently(tmp_path):
    """Flip one byte at a time at ~200 places across a whole shard (metadata, tables, data):
    reading either fails with the library's error, or gives exactly the original scores."""
    run_dir = tmp_path / "run"
    record(run_dir, 4, steps_per_shard=4, projection="none", storage_dtype="float32")
    script = HERE / "_flip_every_byte.py"
    done = subprocess.run([sys.executable, str(script), str(run_dir), "200"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    # each flip is read in a process of its own, so a crash inside HDF5 would be seen as one
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["silently_different"] == [], summary
    assert summary["crashed"] == [], summary
    assert summary["detected"] >= 0.5 * summary["flips"], summary  # most of a shard is checksummed data
    assert summary["detected"] + summary["unchanged"] == summary["flips"]


# ====================================================================== 5. superseded rows
def _resumed_run(run_dir: Path) -> tuple[str, np.ndarray]:
    """Steps 0..5 recorded, then a resume from step 3 re-records 3..5 with other sample ids.
    Returns the run id and the resumed step 3's ids."""
    rec = record(run_dir, 6, steps_per_shard=2)
    again = GradientRecorder(run_dir, mlp(), projection=8, steps_per_shard=2)
    again.plan_start(resume_run_id=rec.run_id, resume_step=3)
    train(again, 3, start=3, ids_of=lambda t: torch.arange(4) + 20 + t)
    again.finish()
    return rec.run_id, (torch.arange(4) + 23).numpy()


def test_a_lost_rank_file_after_a_resume_does_not_double_the_resumed_steps(tmp_path):
    run_dir = tmp_path / "run"
    _, resumed_ids = _resumed_run(run_dir)
    with open_run(run_dir) as run:
        expected = {t: run.step_sample_ids(t).tolist() for t in run.steps}
        assert run.steps.tolist() == list(range(6)) and run.verify() == []
    assert expected[3] == resumed_ids.tolist()
    (run_dir / fmt.rank_file_name(0)).unlink()
    with pytest.warns(RuntimeWarning, match="rank file rank-000.json is missing"):
        run = open_run(run_dir)
    with run:
        assert run.steps.tolist() == list(range(6))
        assert run.batch_sizes.tolist() == [4] * 6 and run.batch_sizes_recorded.tolist() == [4] * 6
        assert {t: run.step_sample_ids(t).tolist() for t in run.steps} == expected
        assert any("rank file" in p for p in run.verify(require_complete=False))


def test_verify_catches_a_step_held_twice_when_the_shards_do_not_say_their_segment(tmp_path):
    run_dir = tmp_path / "run"
    _, resumed_ids = _resumed_run(run_dir)
    (run_dir / fmt.rank_file_name(0)).unlink()
    for p in shards(run_dir):  # as format-1 shards: no segment in the shard
        with h5py.File(p, "r+") as f:
            for key in (fmt.SHARD_SEGMENT, fmt.SHARD_FROM_STEP):
                del f.attrs[key]
    with pytest.warns(RuntimeWarning, match="recorded in both"):
        run = open_run(run_dir)
    with run:
        problems = run.verify(require_complete=False)
        assert sum("recorded in both" in p for p in problems) == 3  # steps 3, 4, 5
        assert run.batch_sizes_recorded.tolist() == [4] * 6  # never merged as if from two ranks
        assert run.step_sample_ids(3).tolist() == resumed_ids.tolist()  # the later shard wins


# ====================================================================== 6. files that point elsewhere
def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "elsewhere" / "secret.h5"
    secret.parent.mkdir()
    with h5py.File(secret, "w") as f:
        f["data"] = np.arange(1000, dtype=np.int64)
    return secret


def _replace(path: Path, name: str, make) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        make(f, name)


@pytest.mark.parametrize("kind", ["external_link", "external_storage", "virtual_dataset"])
def test_a_shard_that_points_to_another_file_is_refused(tmp_path, kind):
    run_dir = tmp_path / "run"
    record(run_dir, 4, steps_per_shard=2)
    secret = _secret(tmp_path)
    victim = shards(run_dir)[0]
    with h5py.File(victim, "r") as f:
        n = len(f[fmt.ROWS_SAMPLE_ID])
    if kind == "external_link":
        make = lambda f, name: f.__setitem__(name, h5py.ExternalLink(str(secret), "/data"))  # noqa: E731
    elif kind == "external_storage":
        raw = tmp_path / "elsewhere" / "raw.bin"
        raw.write_bytes(np.arange(n, dtype=np.int64).tobytes())
        make = lambda f, name: f.create_dataset(name, shape=(n,), dtype=np.int64,  # noqa: E731
                                                external=[(str(raw), 0, n * 8)])
    else:
        def make(f, name):
            layout = h5py.VirtualLayout(shape=(n,), dtype=np.int64)
            layout[:] = h5py.VirtualSource(str(secret), "data", shape=(1000,))[:n]
            f.create_virtual_dataset(name, layout)
    _replace(victim, fmt.ROWS_SAMPLE_ID, make)
    with pytest.raises(UnsafeFileError) as err:
        open_run(run_dir)
    msg = str(err.value)
    assert str(victim) in msg and fmt.ROWS_SAMPLE_ID in msg and "self-contained" in msg
    assert {"external_link": "external link", "external_storage": "external file",
            "virtual_dataset": "virtual dataset"}[kind] in msg
    with pytest.warns(RuntimeWarning, match="skipping unreadable shard"):
        run = open_run(run_dir, on_corrupt="skip")
    with run:  # the rest of the run is still there
        assert run.steps.tolist() == [2, 3] and any(victim.name in p for p in run.verify())


def test_parameter_scores_and_embedding_files_that_point_elsewhere_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 4, steps_per_shard=2, snapshot_every_n_steps=2)
    secret = _secret(tmp_path)
    link = lambda f, name: f.__setitem__(name, h5py.ExternalLink(str(secret), "/data"))  # noqa: E731
    with open_run(run_dir) as run:
        snap = run.param_file(2)
        with h5py.File(snap, "r") as f:
            name = f"{fmt.PARAMS_GROUP}/{next(iter(f[fmt.PARAMS_GROUP]))}"
        _replace(snap, name, link)
        with pytest.raises(UnsafeFileError, match="external link"):
            run.load_parameters(2)
        assert any(snap.name in p for p in run.verify())
        scores = tracin(run, progress=False)
        scores.save(tmp_path / "scores.h5")
        _replace(tmp_path / "scores.h5", "train_ids", link)
        with pytest.raises(UnsafeFileError, match="external link"):
            InfluenceScores.load(tmp_path / "scores.h5")
        dvemb(run, progress=False).close()
        _replace(run_dir / "dvemb.h5", "rows/sample_id", link)
        with pytest.raises(UnsafeFileError, match="external link"):
            DataValueEmbeddings.load(run_dir / "dvemb.h5")


def test_embeddings_do_not_open_the_run_directory_the_file_names(tmp_path):
    run_dir, other_dir = tmp_path / "run", tmp_path / "other"
    record(run_dir, 4)
    record(other_dir, 4)
    with open_run(run_dir) as run:
        dvemb(run, path=tmp_path / "emb.h5", progress=False).close()
    with h5py.File(tmp_path / "emb.h5", "r+") as f:  # a file may name any directory
        f.attrs["run_path"] = str(other_dir.resolve())
    with pytest.raises(RunDirectoryError) as err:
        DataValueEmbeddings.load(tmp_path / "emb.h5")
    assert str(other_dir.resolve()) in str(err.value) and "run=open_run(" in str(err.value)
    with open_run(run_dir) as run, DataValueEmbeddings.load(tmp_path / "emb.h5", run=run) as e:
        assert e.run is run  # the run the user passes is the one used
    with open_run(other_dir) as other, pytest.raises(RunDirectoryError, match="belongs to run"):
        DataValueEmbeddings.load(tmp_path / "emb.h5", run=other)


# ====================================================================== 7. NaN
def test_nan_query_gradients_are_flagged_when_recorded_and_every_score_of_them_warns(tmp_path):
    xq = X[:3].clone()
    xq[1] = float("nan")  # query 1's loss is NaN at every step
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, queries=(xq, Y[:3]), query_loss_fn=CE,
                           query_ids=[10, 11, 12], query_every_n_steps=1, steps_per_shard=2)
    with pytest.warns(RuntimeWarning, match=r"step 0: the query gradients of 1 of 3 queries \(ids \[11\]\)"):
        train(rec, 4)
        rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.nonfinite_query_steps.tolist() == [0, 1, 2, 3, 4]
        assert run.query_nonfinite(2).tolist() == [False, True, False]
        assert "non-finite query gradients" in _info_text(tmp_path / "run")
        with pytest.warns(RuntimeWarning, match=r"dit\(mode='removal'\): query gradients flagged non-finite"):
            d = dit(run, window=(0, 2), progress=False)
        seen = d.values[d.present]
        assert torch.isfinite(seen[:, [0, 2]]).all() and not torch.isfinite(seen[:, 1]).any()
        assert any("flagged non-finite" in n and "[11]" in n for n in d.approximations)
        assert any("scores are NaN/inf" in n and "[11]" in n for n in d.approximations)
        with pytest.warns(RuntimeWarning, match="tracin: query gradients flagged"):
            tracin(run, progress=False)
        with dvemb(run, progress=False) as e:
            with pytest.warns(RuntimeWarning, match=r"DataValueEmbeddings.scores: the given query gradients of 1 of 3"):
                s = e.scores(run.query_gradients(run.final_step), progress=False)
            assert any("scores are NaN/inf" in n for n in s.approximations)


def _info_text(run_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "influence_hooks.cli", "info", str(run_dir)], env=subprocess_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_nan_training_gradients_with_on_nonfinite_warn_never_give_silent_nan_dit_scores(tmp_path):
    # the optimizer applies the NaN update: every later weight, gradient and query gradient is NaN
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, queries=(X[:3], Y[:3]), query_loss_fn=CE,
                           query_every_n_steps=1, steps_per_shard=2, on_nonfinite="warn")
    with pytest.warns(RuntimeWarning, match="per-sample gradients contain NaN"):
        train(rec, 6, nan_at=3, apply_nan=True)
        rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.nonfinite.tolist() == [False, False, False, True, True, True]
        assert run.nonfinite_query_steps.tolist() == [4, 5, 6]
        for kw in ({"window": (0, 6)}, {"window": (0, 3), "eval_step": "final"}, {"window": (0, 6), "mode": "accrued"}):
            with pytest.warns(RuntimeWarning) as warned:
                d = dit(run, progress=False, **kw)
            text = " ".join(str(w.message) for w in warned)
            assert "non-finite" in text and "dit(" in text, kw
            if not torch.isfinite(d.values).all():
                assert any("scores are NaN/inf" in n for n in d.approximations), kw
        # before the NaN update everything is finite, and the skipped step is still said
        d = dit(run, window=(0, 3), progress=False)
        assert torch.isfinite(d.values).all()
        with pytest.warns(RuntimeWarning, match=r"1 step\(s\) with non-finite gradients skipped: \[3\]"):
            dit(run, window=(0, 4), eval_step=4, progress=False)


# ====================================================================== 8. the first step
def test_queries_of_the_wrong_shape_fail_clearly_and_the_retry_needs_no_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    rec = GradientRecorder(run_dir, mlp(), projection=8, queries=(X[:3, :4], Y[:3]), query_loss_fn=CE)
    with pytest.raises(ConfigurationError) as err:
        train(rec, 1)
    rec.abort()
    msg = str(err.value)
    assert "computing the query gradients at step 0 failed" in msg and "mat1 and mat2" in msg
    assert "queries=" in msg and "can be used again" in msg
    assert isinstance(err.value.__cause__, RuntimeError)
    assert not (run_dir / fmt.MANIFEST).exists()
    record(run_dir, 2)  # the retry, with correct queries, needs no overwrite=True


def test_lightning_queries_of_the_wrong_shape_fail_clearly_and_the_retry_needs_no_overwrite(tmp_path):
    data = DataLoader(list(zip(X.double(), Y)), batch_size=4)
    cb = InfluenceCallback(tmp_path / "run", queries=(X[:2, :3].double(), Y[:2]), projection=8)
    with pytest.raises(ConfigurationError, match="computing the query gradients at step 0 failed"):
        make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), data)
    cb = InfluenceCallback(tmp_path / "run", queries=(X[:2].double(), Y[:2]), projection=8)
    make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), data)
    with open_run(tmp_path / "run") as run:
        assert run.complete and len(run.steps) == N // 4


def test_a_run_killed_before_it_finished_anything_may_be_reused(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_recording("hold", run_dir, steps=1, flush=False, steps_per_shard=100,
                           ready=str(tmp_path / "ready"), release=str(tmp_path / "never"))
    try:
        wait_for(tmp_path / "ready", proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.communicate()
    assert (run_dir / fmt.MANIFEST).exists() and shards(run_dir) == []  # a run with no finished step
    rec = record(run_dir, 2)  # reused without overwrite=True
    with open_run(run_dir) as run:
        assert run.run_id == rec.run_id and run.complete


# ====================================================================== 9. resuming
def _fit_with_checkpoints(run_dir: str, root: Path) -> Path:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1)
    make_trainer([InfluenceCallback(run_dir, projection=8, steps_per_shard=3), ckpt], 2, root,
                 enable_checkpointing=True).fit(TinyClassifier(), DataLoader(list(zip(X.double(), Y)), batch_size=4))
    return root / "ckpt" / "epoch=0-step=8.ckpt"


def test_a_resume_does_not_depend_on_how_the_run_directory_is_spelled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = _fit_with_checkpoints("runs/exp", tmp_path)  # relative
    spelled = str(tmp_path / "runs" / ".." / "runs" / "exp")  # absolute, and another way round
    make_trainer([InfluenceCallback(spelled, projection=8, steps_per_shard=3)], 3, tmp_path).fit(
        TinyClassifier(), DataLoader(list(zip(X.double(), Y)), batch_size=4), ckpt_path=checkpoint)
    with open_run(tmp_path / "runs" / "exp") as run:
        assert run.complete and run.steps.tolist() == list(range(24)) and run.final_step == 24
        assert run.batch_sizes_recorded.tolist() == [4] * 24 and run.verify() == []


def test_a_resume_into_a_missing_directory_says_that_a_new_run_starts(tmp_path):
    checkpoint = _fit_with_checkpoints(str(tmp_path / "run"), tmp_path)
    shutil.rmtree(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match=r"holds no run .* a NEW run starts there at step 8"):
        make_trainer([InfluenceCallback(tmp_path / "run", projection=8)], 3, tmp_path).fit(
            TinyClassifier(), DataLoader(list(zip(X.double(), Y)), batch_size=4), ckpt_path=checkpoint)
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == list(range(8, 24))
        assert run.manifest["resumed_from"]["step"] == 8


def test_a_new_run_that_starts_after_step_0_says_so(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8)
    with pytest.warns(RuntimeWarning, match=r"a new run starts in .* at step 5: steps 0..4 are not in it"):
        train(rec, 2, start=5)
    rec.finish()


# ====================================================================== 10. stray shards
def test_stray_shards_without_a_manifest_are_refused_and_kept_and_overwrite_deletes_them(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 8, steps_per_shard=2)
    (run_dir / fmt.MANIFEST).unlink()
    (run_dir / fmt.rank_file_name(0)).unlink()
    before = {p.name: p.read_bytes() for p in shards(run_dir)}
    rec = GradientRecorder(run_dir, mlp(), projection=8, steps_per_shard=2)
    with pytest.raises(RunDirectoryError) as err:
        rec.plan_start()
    msg = str(err.value)
    assert f"{len(before)} shard or parameter file(s)" in msg and "no manifest.json" in msg
    assert "Move them" in msg and "overwrite=True" in msg
    assert {p.name: p.read_bytes() for p in shards(run_dir)} == before  # untouched
    new = record(run_dir, 2, steps_per_shard=2, overwrite=True)
    with open_run(run_dir) as run:  # nothing of the old run is left to mix in
        assert run.run_id == new.run_id and run.steps.tolist() == [0, 1] and run.verify() == []
        assert len(shards(run_dir)) == 2  # one shard of steps, one of the final queries


# ====================================================================== 11. the manifest's schema
@pytest.mark.parametrize("damage, key", [
    (lambda m: m.pop("dim"), "'dim'"),
    (lambda m: m.update(dim="12"), "'dim'"),
    (lambda m: m.update(dim=13), "'dim'"),
    (lambda m: m["layers"][0].pop("offset"), "'offset'"),
    (lambda m: m["layers"][1].update(offset=3), "layers[1].offset"),
    (lambda m: m["layers"][0].update(param_shapes=5), "layers[0].param_shapes"),
    (lambda m: m.update(storage_dtype="float8"), "'storage_dtype'"),
    (lambda m: m.update(queries={"ids": ["a"]}), "queries.ids"),
    (lambda m: m.update(run_id=7), "'run_id'"),
], ids=["no_dim", "dim_str", "dim_wrong", "no_offset", "offset_gap", "shapes_int", "dtype", "query_ids", "run_id"])
def test_a_malformed_manifest_is_refused_on_open_naming_the_key(tmp_path, damage, key, capsys):
    run_dir = tmp_path / "run"
    record(run_dir, 2, projection="none")
    m = json.loads((run_dir / fmt.MANIFEST).read_text())
    damage(m)
    (run_dir / fmt.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(RunDirectoryError) as err:
        open_run(run_dir)
    assert key in str(err.value) and "damaged" in str(err.value)
    assert main(["verify", str(run_dir)]) == 2
    assert key in capsys.readouterr().err


# ====================================================================== 12. smaller things
def test_a_shard_with_a_damaged_run_id_names_its_path_once_and_gives_the_right_advice(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir, 4, steps_per_shard=2)
    victim = shards(run_dir)[0]
    with h5py.File(victim, "r+") as f:
        del f.attrs["run_id"]
    with pytest.raises(CorruptShardError) as err:
        open_run(run_dir)
    msg = str(err.value)
    assert msg.count(str(victim)) == 1 and "no readable run_id" in msg and "damaged" in msg
    assert "on_corrupt='skip'" in msg
    with h5py.File(victim, "r+") as f:
        f.attrs["run_id"] = "0123456789abcdef"
    with pytest.raises(CorruptShardError) as err:
        open_run(run_dir)
    msg = str(err.value)
    assert msg.count(str(victim)) == 1 and "belongs to run 0123456789abcdef" in msg and "another recording" in msg


def test_the_dit_command_line_never_suggests_a_python_only_argument(tmp_path, capsys):
    record(tmp_path / "run", 6, query_every_n_steps=3)
    assert main(["dit", str(tmp_path / "run"), "--window", "0:4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "u_q(4)" in err and "--eval-step 6" in err and "query_grads" not in err


def test_a_read_only_directory_is_a_clear_error_before_training(tmp_path):
    with tmpfs("1m", read_only=True) as fs:
        rec = GradientRecorder(fs / "run", mlp(), projection=8)
        with pytest.raises(RunDirectoryError, match="read-only file system"):
            rec.plan_start()
        with pytest.raises(RunDirectoryError, match="cannot create the run directory"):
            train(rec, 1)  # without plan_start, the first step says the same
        rec.abort()
    with tmpfs("1m") as fs:  # a run recorded, then its file system made read-only
        record(fs / "run", 4)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with open_run(fs / "run") as run:  # reading needs nothing written
            assert run.complete and run.verify() == []
            with pytest.raises(RunDirectoryError, match="read-only file system.*Pass path="):
                dvemb(run, progress=False)
        again = GradientRecorder(fs / "run", mlp(), projection=8, overwrite=True)
        with pytest.raises(RunDirectoryError, match="read-only file system"):
            again.plan_start()


@pytest.mark.parametrize("projection", [0, -5, {"0": 0}, {"*": -1}, True, "1024"])
def test_a_projection_that_is_not_a_positive_number_of_dimensions_is_refused_at_construction(tmp_path, projection):
    with pytest.raises(ConfigurationError, match="projection"):
        RecordingConfig(projection=projection)
    with pytest.raises(ConfigurationError, match="projection"):
        GradientRecorder(tmp_path / "run", mlp(), projection=projection)
    assert not (tmp_path / "run").exists()


def test_an_empty_training_set_records_nothing_and_says_so(tmp_path):
    cb = InfluenceCallback(tmp_path / "run", projection=8)
    with pytest.warns(RuntimeWarning, match="without a single recorded step, so nothing was written"):
        make_trainer([cb], 1, tmp_path).fit(TinyClassifier(), DataLoader(list(zip(X.double(), Y))[:0], batch_size=4))
    assert not (tmp_path / "run" / fmt.MANIFEST).exists()


@pytest.mark.parametrize("bad_ids, match", [([0, 1, 1, 2], r"sample ids \[1\] occur more than once"),
                                            ([0, -3, 1, 2], r"negative sample ids \[-3\]")])
def test_repeated_or_negative_sample_ids_in_one_step_are_refused_and_earlier_steps_kept(tmp_path, bad_ids, match):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, steps_per_shard=1)
    train(rec, 2)
    with pytest.raises(SampleIdError, match=match):
        train(rec, 1, start=2, ids_of=lambda t: torch.tensor(bad_ids))
    rec.abort()
    with open_run(tmp_path / "run") as run:
        assert run.steps.tolist() == [0, 1] and run.verify(require_complete=False) == []


def test_repeated_sample_ids_are_accepted_when_the_sampler_draws_with_replacement(tmp_path):
    rec = GradientRecorder(tmp_path / "run", mlp(), projection=8, allow_repeated_ids=True)
    train(rec, 2, ids_of=lambda t: torch.tensor([5, 5, 6, 7]))
    rec.finish()
    with open_run(tmp_path / "run") as run:
        assert run.step_sample_ids(1).tolist() == [5, 5, 6, 7] and run.verify() == []


@pytest.mark.parametrize("n", [1, 64, SMALL_ID_CHECK, SMALL_ID_CHECK + 1, 4096])
def test_the_sample_id_check_agrees_with_a_brute_force_rule_on_both_of_its_paths(n):
    """Small batches are checked with a Python set, larger ones with a sort: both refuse what a
    brute-force rule refuses, with the same message."""
    rng = np.random.default_rng(n)
    valid = rng.permutation(10 * n)[:n]
    cases = [valid]
    if n > 1:
        repeated = valid.copy()
        repeated[-1] = repeated[0]
        negative = valid.copy()
        negative[n // 2] = -7
        cases += [repeated, negative]
    for ids in cases:
        for allow_repeated in (False, True):
            bad_negative = any(int(i) < 0 for i in ids)
            bad_repeat = not allow_repeated and len(set(ids.tolist())) < len(ids)
            if not (bad_negative or bad_repeat):
                check_sample_ids(ids, 3, allow_repeated=allow_repeated)
                continue
            match = r"step 3: negative sample ids \[-7\]" if bad_negative else rf"sample ids \[{ids[0]}\] occur more than once"
            with pytest.raises(SampleIdError, match=match):
                check_sample_ids(ids, 3, allow_repeated=allow_repeated)


def test_ids_on_the_writer_thread_are_checked_too(tmp_path):
    """What reaches the writer directly (ids from a GPU, or a RunWriter user) is checked there."""
    m = {"dim": 2, "storage_dtype": "float32", "layers": [
        {"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2, "grad_dim": 2,
         "param_shapes": [["weight", [1, 2]]], "projection": {"kind": "none"}}]}
    w = RunWriter.create(tmp_path / "run", m)
    w.write_step(StepRecord(step=0, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=2, update_weight=0.5,
                            micro_batches=1, sample_ids=np.array([3, 3]), grads=torch.zeros(2, 2)))
    with pytest.raises(SampleIdError, match=r"\[3\] occur more than once"):
        w.close(final_step=1)


# ====================================================================== format 1
def _as_format_1(run_dir: Path) -> None:
    """Rewrite a run the way format 1 stored it: plain HDF5 (no checksums), no segment in the
    shards, no list of finished files in the rank files, no query flags."""
    for p in shards(run_dir):
        with h5py.File(p, "r") as f:
            datasets = {}
            f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            attrs = {k: f.attrs[k] for k in ("run_id", "rank", "shard_index")}
        p.unlink()
        with h5py.File(p, "w") as f:
            f.attrs.update(format=fmt.FORMAT_NAME, format_version=1, run_id=attrs["run_id"].decode(),
                           rank=attrs["rank"], shard_index=attrs["shard_index"])
            for name, data in datasets.items():
                if name != fmt.QUERY_NONFINITE:
                    f.create_dataset(name, data=data)
    for p in run_dir.glob("rank-*.json"):
        state = json.loads(p.read_text())
        state["segments"] = [{"from_step": s["from_step"], "first_shard": s["first_shard"]} for s in state["segments"]]
        for key in (fmt.RANK_SHARDS, fmt.RANK_PARAMS):
            state.pop(key)
        p.write_text(json.dumps(state))
    m = json.loads((run_dir / fmt.MANIFEST).read_text())
    m["format_version"] = 1
    (run_dir / fmt.MANIFEST).write_text(json.dumps(m))


def test_runs_of_format_1_are_still_read_and_resumed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _resumed_run(run_dir)  # two segments: the resume from step 3 supersedes rows of the first
    with open_run(run_dir) as run:
        expected = {int(t): (run.step_sample_ids(t).tolist(), next(run.iter_steps((t, t + 1))).grads)
                    for t in run.steps}
        scores = tracin(run, progress=False)
    _as_format_1(run_dir)
    with open_run(run_dir) as run:
        assert run.manifest["format_version"] == 1 and run.gaps == [] and run.verify() == []
        got = {int(t): (run.step_sample_ids(t).tolist(), next(run.iter_steps((t, t + 1))).grads) for t in run.steps}
        assert got.keys() == expected.keys()
        assert all(got[t][0] == expected[t][0] and torch.equal(got[t][1], expected[t][1]) for t in got)
        assert scores_equal(tracin(run, progress=False), scores)
    assert main(["verify", str(run_dir)]) == 0
    assert "format-1 run: it has no checksums" in capsys.readouterr().out
    # a format-1 run resumed by this version: the rank file is completed from the shards
    again = GradientRecorder(run_dir, mlp(), projection=8, steps_per_shard=2)
    again.plan_start(resume_run_id=run.run_id, resume_step=5)
    train(again, 2, start=5, ids_of=lambda t: torch.arange(4) + t)
    again.finish()
    with open_run(run_dir) as run:
        assert run.steps.tolist() == list(range(7)) and run.batch_sizes_recorded.tolist() == [4] * 7
        assert run.step_sample_ids(3).tolist() == expected[3][0] and run.step_sample_ids(5).tolist() == [5, 6, 7, 8]
        assert run.verify() == []
