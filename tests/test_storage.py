"""Reader properties that estimators rely on: column layout and per-step metadata."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from influence_hooks import GradientRecorder, open_run
from influence_hooks.windows import epoch_windows, resolve


def _record(tmp_path, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none")
    for t in range(steps):
        ids = torch.arange(4) + 10 * t
        rec.begin_micro_batch(ids.flip(0))
        nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        rec.end_step(opt)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return model, open_run(tmp_path / "run")


def test_layer_param_shapes_follow_the_row_column_order(tmp_path):
    model, run = _record(tmp_path)
    for info, (name, module) in zip(run.layers, [("0", model[0]), ("2", model[2])]):
        assert info.name == name
        own = [(n, tuple(p.shape)) for n, p in module.named_parameters(recurse=False)]
        assert list(info.param_shapes.items()) == own  # weight before bias, as in each row
        assert info.grad_dim == sum(p.numel() for p in module.parameters(recurse=False))


def test_step_sample_ids_equal_the_ids_given_in_batch_order(tmp_path):
    _, run = _record(tmp_path)
    for t in range(3):
        expected = (torch.arange(4) + 10 * t).flip(0).tolist()
        assert run.step_sample_ids(t).tolist() == expected
        assert next(run.iter_steps((t, t + 1))).sample_ids.tolist() == expected


def test_reader_merges_the_shards_of_several_ranks_into_global_steps(tmp_path):
    import numpy as np

    from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

    manifest = {"dim": 2, "storage_dtype": "float64", "run_id": "two-ranks",
                "layers": [{"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2,
                            "grad_dim": 2, "param_shapes": [["weight", [1, 2]]],
                            "projection": {"kind": "none"}}]}
    writers = [RunWriter.create(tmp_path, manifest, rank=r, options=WriterOptions(steps_per_shard=2)) for r in (0, 1)]  # rank 0 first
    for t in range(3):
        for r, w in enumerate(writers):
            ids = np.array([10 * t + 2 * r, 10 * t + 2 * r + 1])
            w.write_step(StepRecord(step=t, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=2, update_weight=0.25,
                                    micro_batches=1, sample_ids=ids,
                                    grads=torch.tensor([[t, r], [t, r + 0.5]], dtype=torch.float64)))
    for w in writers:
        w.close(final_step=3)
    run = open_run(tmp_path)
    assert run.complete and run.steps.tolist() == [0, 1, 2]
    assert run.batch_sizes.tolist() == [4, 4, 4]
    for b in run.iter_steps(dtype=torch.float64):
        assert sorted(b.sample_ids.tolist()) == [10 * b.step + k for k in range(4)]
        assert sorted(b.grads[:, 1].tolist()) == [0.0, 0.5, 1.0, 1.5]


def test_a_window_reaching_past_the_recorded_steps_is_clipped_with_a_warning(tmp_path):
    import pytest

    _, run = _record(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"using \[0, 3\)"):
        assert resolve(run.table, (-5, 10)) == (0, 3)
    assert resolve(run.table, (1, 3)) == (1, 3)


def test_ranks_with_local_batches_of_other_sizes_are_noted_and_their_mean_weight_used(tmp_path):
    """Under DDP a rank with 3 samples weighs each 1/(2*3), one with 1 sample 1/(2*1)."""
    import numpy as np

    from influence_hooks import tracin
    from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

    manifest = {"dim": 2, "storage_dtype": "float64", "run_id": "uneven", "world_size": 2,
                "queries": {"ids": [0]},
                "layers": [{"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2,
                            "grad_dim": 2, "param_shapes": [["weight", [1, 2]]], "projection": {"kind": "none"}}]}
    writers = [RunWriter.create(tmp_path, manifest, rank=r, options=WriterOptions()) for r in (0, 1)]
    writers[0].write_queries(0, torch.ones(1, 2, dtype=torch.float64))
    sizes = [[3, 3], [3, 1]]  # step 0 even, step 1 uneven
    for t in range(2):
        for r, w in enumerate(writers):
            n = sizes[t][r]
            w.write_step(StepRecord(step=t, epoch=0, lr=1.0, lr_groups=[1.0], batch_size=n, update_weight=1 / (2 * n),
                                    micro_batches=1, sample_ids=np.arange(n) + 10 * r,
                                    grads=torch.ones(n, 2, dtype=torch.float64)))
    for w in writers:
        w.close(final_step=2)
    run = open_run(tmp_path)
    assert run.table.uneven.tolist() == [False, True]
    assert run.update_weights[0] == 1 / 6 and run.update_weights[1] == (3 / 6 + 1 / 2) / 4
    s = tracin(run, before_first_query="use_first", progress=False, dtype=torch.float64)
    assert any("local batches of other sizes" in n for n in s.approximations)


# ---------------------------------------------------------------------------- the writer's hand-off
def _one_layer_manifest(run_id: str) -> dict:
    return {"dim": 2, "storage_dtype": "float64", "run_id": run_id,
            "layers": [{"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2,
                        "grad_dim": 2, "param_shapes": [["weight", [1, 2]]], "projection": {"kind": "none"}}]}


def _step(t: int):
    import numpy as np

    from influence_hooks.storage.writer import StepRecord

    return StepRecord(step=t, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=1, update_weight=1.0, micro_batches=1,
                      sample_ids=np.array([t]), grads=torch.tensor([[t, -t]], dtype=torch.float64))


def test_at_most_queue_size_steps_wait_for_a_slow_writer_and_all_arrive_in_order(tmp_path):
    import threading

    from influence_hooks.storage.writer import RunWriter, WriterOptions

    gate, handled = threading.Event(), []
    w = RunWriter.create(tmp_path, _one_layer_manifest("slow"), options=WriterOptions(queue_size=3))
    real = w._write_step

    def slow(rec):
        gate.wait()
        handled.append(rec.step)
        real(rec)

    w._write_step = slow
    for t in range(3):  # fill every slot
        w.write_step(_step(t))
    blocked = threading.Thread(target=w.write_step, args=(_step(3),))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # a fourth step waits until the writer frees a slot
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    w.write_queries(4, torch.zeros(2, 2, dtype=torch.float64))
    for t in range(4, 40):
        w.write_step(_step(t))
    w.close(final_step=40)
    assert handled == list(range(40))
    with open_run(tmp_path) as run:
        assert run.steps.tolist() == list(range(40))
        assert run.query_steps.tolist() == [4]
        assert [b.grads[0, 0].item() for b in run.iter_steps()] == list(range(40))


def test_finiteness_check_agrees_with_an_element_wise_test():
    from influence_hooks.storage.files import all_finite, finite_rows, to_stored

    big = torch.finfo(torch.float64).max / 2
    cases = [torch.zeros(3, 4), torch.full((2, 2), big, dtype=torch.float64),  # the sum overflows, values don't
             torch.full((2, 2), 65504.0, dtype=torch.float16), torch.full((2, 2), -65504.0, dtype=torch.float16),
             torch.full((2, 3), 5.96e-8, dtype=torch.float16),  # subnormal
             torch.full((2, 2), -3.3e38, dtype=torch.bfloat16), torch.zeros(0, 4), torch.zeros(3, 0)]
    for bad in (float("nan"), float("inf"), -float("inf"), -float("nan")):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = torch.ones(5, 7, dtype=dtype)
            t[3, 2] = bad
            cases.append(t)
    mixed = torch.ones(2, 3, dtype=torch.float64)
    mixed[0, 0], mixed[1, 1] = float("inf"), -float("inf")  # their sum is NaN
    cases.append(mixed)
    for t in cases:
        name = str(t.dtype).replace("torch.", "")
        stored = to_stored(t, name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy RuntimeWarning: the writer may run with warnings as errors
            assert all_finite(stored, name) == bool(torch.isfinite(t).all()), t
        assert finite_rows(stored, name).tolist() == torch.isfinite(t).all(dim=1).tolist(), t


def test_a_shard_reaches_disk_as_soon_as_its_last_step_is_taken(tmp_path):
    """Steps are handed to the writer in batches, but the step that completes a shard goes at once,
    also after other hand-offs (queries) broke the batches' alignment: a crash loses the open shard only."""
    import time

    from influence_hooks.storage import format as fmt
    from influence_hooks.storage.writer import RunWriter, WriterOptions

    w = RunWriter.create(tmp_path, _one_layer_manifest("edge"), options=WriterOptions(steps_per_shard=3))

    def shards(expected: int) -> int:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            n = len(list((tmp_path / fmt.SHARD_DIR).glob("*.h5")))
            if n >= expected:
                return n
            time.sleep(0.01)
        return n

    w.write_step(_step(0))
    w.write_queries(1, torch.zeros(2, 2, dtype=torch.float64))  # hands the pending step over
    w.write_step(_step(1))
    time.sleep(0.3)
    assert shards(0) == 0  # two of three steps: nothing finished yet
    w.write_step(_step(2))
    assert shards(1) == 1
    for t in range(3, 6):
        w.write_step(_step(t))
    assert shards(2) == 2
    w.close(final_step=6)


def test_drain_waits_for_the_writer_and_keeps_the_shard_open(tmp_path):
    from influence_hooks.storage import format as fmt
    from influence_hooks.storage.writer import RunWriter, WriterOptions

    w = RunWriter.create(tmp_path, _one_layer_manifest("drain"), options=WriterOptions(steps_per_shard=100))
    for t in range(5):
        w.write_step(_step(t))
    w.drain()
    assert [r.step for r in w._buffer.steps] == list(range(5))  # taken in by the writer thread
    assert not list((tmp_path / fmt.SHARD_DIR).glob("*.h5"))  # no shard finished
    w.write_step(_step(5))
    w.close(final_step=6)
    with open_run(tmp_path) as run:
        assert run.steps.tolist() == list(range(6))


def test_a_reused_memory_file_builds_the_same_file_as_a_fresh_one(tmp_path):
    # the writer builds every shard of a run in one MemoryFile: a smaller file after a larger one
    # must not keep any of the larger file's bytes
    import h5py
    import numpy as np

    from influence_hooks.storage import files

    rng = np.random.default_rng(0)
    big, small = (rng.standard_normal((n, 96)).astype(np.float16) for n in (3000, 50))
    memory = files.MemoryFile()

    def fill(rows):
        return lambda f: files.write_checked_rows(f, "rows", "sums", rows)

    files.h5_image(fill(big), into=memory)
    reused = files.h5_image(fill(small), into=memory)
    assert b"".join(reused) == b"".join(files.h5_image(fill(small)))
    files.write_atomic(tmp_path / "small.h5", reused)
    with files.open_h5(tmp_path / "small.h5") as f:
        assert np.array_equal(f["rows"][:], small)
        assert isinstance(f, h5py.File)
    # as a file: reading past the end gives nothing and leaves the position where it was
    end = memory.seek(0, 2)
    memory.seek(end + 10)
    assert memory.read() == b"" and memory.tell() == end + 10
    with pytest.raises(ValueError):
        memory.seek(0, 7)


def test_placed_rows_are_written_from_their_array_and_read_back(tmp_path):
    # a shard's rows are placed: the image holds the metadata, the rows go to disk from the row
    # store; the pieces are the file's bytes in order, the same as with the rows copied in
    from influence_hooks.storage import checksum, files

    rows = np.random.default_rng(1).standard_normal((1001, 96)).astype(np.float16)  # a last partial chunk
    memory = files.MemoryFile()
    pieces = files.h5_image(lambda f: files.write_checked_rows(f, "rows", "sums", rows, place_in=memory),
                            into=memory)
    assert memory.placed and any(np.shares_memory(np.frombuffer(p, np.uint8), rows) for p in pieces)
    assert sum(len(p) for p in pieces) == memory.size
    assert memory.size - rows.nbytes < rows.nbytes // 10  # beyond the rows: metadata, the last chunk's padding
    files.write_atomic(tmp_path / "placed.h5", pieces)
    assert (tmp_path / "placed.h5").read_bytes() == bytes(memory.view())  # view() copies the rows in
    with files.open_h5(tmp_path / "placed.h5") as f:
        assert np.array_equal(f["rows"][:], rows)
        chunk_bytes = f["rows"].chunks[0] * 96 * 2
        assert np.array_equal(f["sums"][:], checksum.as_stored(checksum.chunk_sums(rows, chunk_bytes)))


def test_rows_that_cannot_be_placed_make_the_same_file(tmp_path, monkeypatch):
    # where HDF5 did not lay the chunks out back to back the rows go through HDF5: the file must
    # be the placed one byte for byte (the last chunk's padding zeros, not HDF5's buffer)
    from influence_hooks.storage import files

    rows = np.random.default_rng(2).standard_normal((1001, 96)).astype(np.float16)

    def build() -> bytes:
        memory = files.MemoryFile()
        return b"".join(files.h5_image(
            lambda f: files.write_checked_rows(f, "rows", "sums", rows, place_in=memory), into=memory))

    placed = build()
    monkeypatch.setattr(files.MemoryFile, "place", lambda self, *a: False)
    assert build() == placed
    (tmp_path / "unplaced.h5").write_bytes(build())
    with files.open_h5(tmp_path / "unplaced.h5") as f:
        assert np.array_equal(f["rows"][:], rows)


def test_a_write_into_a_placed_region_copies_it_in_first():
    # HDF5 never writes raw data it allocated early and does not fill; if it did, the file must
    # still hold the right bytes (and nothing may raise inside h5py's driver callbacks)
    from influence_hooks.storage import files

    memory = files.MemoryFile()
    memory.write(b"head")
    data = np.arange(10, dtype=np.uint8)
    assert memory.place(data, 6, 12)  # bytes 6..17: data, then two zeros
    assert not memory.place(data, 20, 12)  # one region only
    memory.seek(20)
    memory.write(b"tail")
    expected = b"head" + bytes(2) + data.tobytes() + bytes(2) + bytes(2) + b"tail"
    assert b"".join(memory.pieces()) == expected and memory.placed
    memory.seek(8)
    memory.write(b"XY")
    assert not memory.placed
    assert bytes(memory.view()) == expected[:8] + b"XY" + expected[10:]
    memory.clear()
    memory.write(b"x" * 8)
    assert not memory.place(data, 4, 12)  # something was written at or after the start


@pytest.mark.parametrize("rows", [[[2.0]], [2.0, -2.0], [[2.0, -2.0], [3.0, -3.0]]],
                         ids=["one_column", "one_dimensional", "more_rows_than_ids"])
def test_rows_of_the_wrong_shape_are_refused_and_earlier_steps_written(tmp_path, rows):
    # numpy would broadcast [1, 1] or [2] into a [1, 2] slot: the writer checks the shape itself
    from influence_hooks.errors import ConfigurationError
    from influence_hooks.storage.writer import RunWriter

    w = RunWriter.create(tmp_path, _one_layer_manifest("shape"))
    w.write_step(_step(0))
    w.write_step(_step(1))
    bad = _step(2)
    bad.grads = torch.tensor(rows, dtype=torch.float64)
    with pytest.raises(ConfigurationError, match=r"step 2: the gradient rows have shape .* needs \[1, 2\]"):
        w.write_step(bad)
        w.close(final_step=3)
    w.abort()
    with open_run(tmp_path) as run:
        assert run.steps.tolist() == [0, 1] and not run.complete
        assert [b.grads.tolist() for b in run.iter_steps(dtype=torch.float64)] == [[[0.0, 0.0]], [[1.0, -1.0]]]
