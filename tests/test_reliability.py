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
from influence_hooks.errors import (ConfigurationError, CorruptShardError, InfluenceHooksError, RunDirectoryError,
                                    SampleIdError, StorageError, UnsafeFileError)
from influence_hooks.record.callback import InfluenceCallback
from influence_hooks.record.options import RecordingConfig
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage import format as fmt
from influence_hooks.storage.files import h5_image, write_array, write_atomic
from influence_hooks.storage.jsonio import write_json_atomic
from influence_hooks.storage.writer import RunWriter

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
        options.update(queries=(X[:3], Y[:3]), query_loss_fn=CE, query_every_n_steps=1)
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
    assert "being recorded by pid" in losers[0]["message"] or "already holds a run" in losers[0]["message"]
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
