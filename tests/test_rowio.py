"""Gradient rows on disk (format 3): their checksum, bfloat16 storage, and older formats.

The checksum is checked against its written definition (Python integers, word by word) and against
the errors it must catch; every byte of a shard's gradient rows and of their sums is flipped in
turn and must fail the read. bfloat16 storage is checked against float32 storage of the same
training: the raw bits equal torch's rounding of the float32 values, and the scores agree within
bfloat16 precision. A run rewritten in format 2 (fletcher32 on the rows) reads the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks import dit, dvemb, open_run, self_influence, tracin
from influence_hooks.aggregate.rows import iter_row_blocks
from influence_hooks.errors import CorruptShardError
from influence_hooks.record.recorder import GradientRecorder
from influence_hooks.storage import checksum
from influence_hooks.storage import format as fmt

N = 40
_g = torch.Generator().manual_seed(5)
X = torch.randn(N, 6, generator=_g)
Y = torch.randint(0, 3, (N,), generator=_g)


def record(run_dir: Path, storage_dtype: str, steps: int = 12, **options) -> Path:
    """Plain SGD on batches of 5, queries at every step; the same training for every dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = GradientRecorder(run_dir, model, storage_dtype=storage_dtype, queries=(X[:4], Y[:4]),
                           query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), query_every_n_steps=1,
                           verbose=False, **options)
    for t in range(steps):
        ids = torch.arange(5 * t, 5 * t + 5) % N
        rec.begin_micro_batch(ids)
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.end_step(opt, step=t)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return run_dir


def shards(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / fmt.SHARD_DIR).iterdir() if fmt.parse_shard_name(p.name))


def all_rows(run) -> tuple[np.ndarray, torch.Tensor]:
    steps = list(run.iter_steps(dtype=torch.float64))
    return np.concatenate([b.sample_ids.numpy() for b in steps]), torch.cat([b.grads for b in steps])


# ---------------------------------------------------------------------- the checksum
def reference_sums(data: bytes, chunk_bytes: int) -> list[tuple[int, int]]:
    """The definition, word by word: per chunk, zero-padded little-endian uint64 words x_j,
    s1 = sum x_j, s2 = sum (j + 1) x_j, both mod 2^64."""
    out = []
    for a in range(0, len(data), chunk_bytes):
        b = data[a:a + chunk_bytes]
        b += bytes(-len(b) % 8)
        words = [int.from_bytes(b[i:i + 8], "little") for i in range(0, len(b), 8)]
        out.append((sum(words) % 2**64, sum((j + 1) * x for j, x in enumerate(words)) % 2**64))
    return out


@pytest.mark.parametrize("n_bytes,chunk_bytes", [(4096, 1024), (4100, 1024), (999, 24), (1000, 13), (7, 8),
                                                 (0, 8), (3 * 65408 + 5, 65408)])
def test_chunk_sums_follow_their_definition(n_bytes, chunk_bytes):
    data = np.random.default_rng(n_bytes).integers(0, 256, n_bytes, dtype=np.uint8)
    got = [tuple(int(v) for v in row) for row in checksum.chunk_sums(data, chunk_bytes)]
    assert got == reference_sums(data.tobytes(), chunk_bytes)


def test_any_change_within_16_bytes_and_any_swap_of_words_changes_the_sums():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    base = checksum.chunk_sums(data, 4096)
    for _ in range(3000):
        bad = data.copy()
        at = int(rng.integers(0, 4096 - 16))
        bad[at:at + 16] ^= rng.integers(0, 256, 16, dtype=np.uint8)
        if not np.array_equal(bad, data):
            assert not np.array_equal(checksum.chunk_sums(bad, 4096), base)
    words = data.view("<u8")
    for _ in range(3000):
        i, j = rng.choice(len(words), 2, replace=False)
        if words[i] != words[j]:
            bad = words.copy()
            bad[[i, j]] = bad[[j, i]]
            assert not np.array_equal(checksum.chunk_sums(bad.view(np.uint8), 4096), base)


@pytest.mark.parametrize("storage_dtype,projection", [("bfloat16", "none"), ("float16", 16)])
def test_every_flipped_byte_of_the_gradient_rows_or_their_sums_fails_the_read(tmp_path, monkeypatch,
                                                                              storage_dtype, projection):
    # many chunks in a small shard: of 186 bytes (not whole 64-bit words) and of 128 bytes
    monkeypatch.setattr(fmt, "ROW_CHUNK_BYTES", 128)
    run_dir = record(tmp_path / "run", storage_dtype, steps=3, projection=projection)
    shard = shards(run_dir)[0]
    with h5py.File(shard) as f:
        ds = f[fmt.ROWS_GRAD]
        assert ds.id.get_num_chunks() >= 3 and ds.attrs[fmt.ATTR_CHECKSUM] == checksum.NAME.encode()
        chunks = [ds.id.get_chunk_info(c) for c in range(ds.id.get_num_chunks())]
        row_bytes, n = ds.shape[1] * ds.dtype.itemsize, ds.shape[0]
        # every byte of row data (not the padding of the last chunk)
        rows = [c.byte_offset + k for c in chunks
                for k in range(min(c.size, (n - c.chunk_offset[0]) * row_bytes))]
        info = f[fmt.ROWS_GRAD_SUMS].id.get_chunk_info(0)
        sums = list(range(info.byte_offset, info.byte_offset + info.size))
    data = bytearray(shard.read_bytes())
    with open_run(run_dir) as run:
        expected = all_rows(run)[1]

    def flipped(pos: int, fh) -> None:
        fh.seek(pos)
        fh.write(bytes([data[pos] ^ 0x01]))
        fh.flush()

    def restored(pos: int, fh) -> None:
        fh.seek(pos)
        fh.write(bytes([data[pos]]))
        fh.flush()

    with open(shard, "r+b") as fh:
        with open_run(run_dir) as run:  # the rows are read from the file at every pass
            for pos in rows:
                flipped(pos, fh)
                with pytest.raises(CorruptShardError, match="damaged"):
                    all_rows(run)
                restored(pos, fh)
        for pos in sums:  # the sums are read when a shard is opened
            flipped(pos, fh)
            with open_run(run_dir) as run, pytest.raises(CorruptShardError, match="damaged"):
                all_rows(run)
            restored(pos, fh)
    with open_run(run_dir) as run:
        assert torch.equal(all_rows(run)[1], expected)


# ---------------------------------------------------------------------- bfloat16 storage
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtypes")
    return {dt: record(root / dt, dt, projection=16) for dt in ("float32", "bfloat16", "float16")}


def test_bfloat16_storage_keeps_torch_rounding_of_every_gradient(runs):
    with open_run(runs["float32"]) as r32, open_run(runs["bfloat16"]) as r16:
        assert r16.manifest["storage_dtype"] == "bfloat16" and r16.storage_dtype == torch.bfloat16
        ids32, g32 = all_rows(r32)
        ids16, g16 = all_rows(r16)
        assert np.array_equal(ids32, ids16)
        assert torch.equal(g16, g32.float().bfloat16().double())
        for t in (0, 5, int(r16.final_step)):
            u32, u16 = r32.query_gradients(t), r16.query_gradients(t, dtype=torch.float64)
            assert torch.equal(u16, u32.bfloat16().double())
        blocks = list(r16.iter_blocks(max_rows=7))
        assert all(b.grads.dtype == torch.bfloat16 for b in blocks)
        assert torch.equal(torch.cat([b.grads for b in blocks]).double(), g16)
        assert r16.verify() == [] and r16.info()["storage_dtype"] == "bfloat16"
    with h5py.File(shards(runs["bfloat16"])[0]) as f:  # the raw bits, named as bfloat16
        for name in (fmt.ROWS_GRAD, fmt.QUERY_GRAD):
            assert f[name].dtype == np.uint16 and f[name].attrs[fmt.ATTR_DTYPE] == b"bfloat16"


def _agree(a, b, tol):
    """Max-abs difference relative to the largest score."""
    a, b = a.values.double(), b.values.double()
    return float((a - b).abs().max() / b.abs().max()) < tol


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float16", 2e-3)])
def test_16_bit_storage_gives_the_scores_of_float32_storage_within_its_precision(runs, dtype, tol, tmp_path):
    with open_run(runs["float32"]) as ref, open_run(runs[dtype]) as run:
        kw = dict(progress=False, chunk_rows=8)
        assert _agree(tracin(run, **kw), tracin(ref, **kw), tol)
        assert _agree(self_influence(run, **kw), self_influence(ref, **kw), tol)
        assert _agree(dit(run, curvature="fisher", **kw), dit(ref, curvature="fisher", **kw), tol)
        u = ref.query_gradients(ref.final_step)
        e, e_ref = dvemb(run, path=tmp_path / "a.h5", **kw), dvemb(ref, path=tmp_path / "b.h5", **kw)
        assert _agree(e.scores(u, progress=False), e_ref.scores(u, progress=False), tol)
        e.close()
        e_ref.close()
    # and the 16 bits hold the values: the difference to float32 storage is the rounding, not more
    with open_run(runs["float32"]) as ref:
        assert not _agree(tracin(ref, progress=False), tracin(ref, progress=False, dtype=torch.float64), 0.0)


# ---------------------------------------------------------------------- older formats
def _as_format_2(run_dir: Path) -> None:
    """Rewrite a run the way format 2 stored it: the gradient rows under fletcher32, no sums."""
    for p in shards(run_dir):
        with h5py.File(p, "r") as f:
            datasets, attrs = {}, {}
            f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            attrs = dict(f.attrs)
        p.unlink()
        with h5py.File(p, "w", libver=fmt.H5_LIBVER) as f:
            f.attrs.update(attrs)
            f.attrs["format_version"] = 2
            for name, data in datasets.items():
                if name != fmt.ROWS_GRAD_SUMS:
                    f.create_dataset(name, data=data, chunks=True if data.ndim else None,
                                     fletcher32=bool(data.ndim))
    m = json.loads((run_dir / fmt.MANIFEST).read_text())
    m["format_version"] = 2
    (run_dir / fmt.MANIFEST).write_text(json.dumps(m))


def test_runs_of_format_2_read_the_same_and_their_checksums_still_count(tmp_path):
    run_dir = record(tmp_path / "run", "float16", projection=16)
    with open_run(run_dir) as run:
        rows, scores = all_rows(run), tracin(run, progress=False, chunk_rows=8)
    _as_format_2(run_dir)
    with open_run(run_dir) as run:
        assert run.manifest["format_version"] == 2 and run.verify() == []
        got = all_rows(run)
        assert np.array_equal(got[0], rows[0]) and torch.equal(got[1], rows[1])
        assert torch.equal(tracin(run, progress=False, chunk_rows=8).values, scores.values)
    shard = shards(run_dir)[0]
    with h5py.File(shard) as f:
        assert f[fmt.ROWS_GRAD].fletcher32 and fmt.ROWS_GRAD_SUMS not in f
        at = f[fmt.ROWS_GRAD].id.get_chunk_info(0).byte_offset + 3
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x10
    shard.write_bytes(bytes(data))
    with open_run(run_dir) as run, pytest.raises(CorruptShardError, match=shard.name):
        tracin(run, progress=False)


def test_gradient_rows_without_any_checksum_in_a_shard_of_format_2_or_later_are_refused(tmp_path):
    run_dir = record(tmp_path / "run", "float16", steps=3, projection=16)
    shard = shards(run_dir)[0]
    with h5py.File(shard, "r") as f:
        datasets = {}
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = dict(f.attrs)
    shard.unlink()
    with h5py.File(shard, "w", libver=fmt.H5_LIBVER) as f:  # as if someone rewrote it without checksums
        f.attrs.update(attrs)
        for name, data in datasets.items():
            f.create_dataset(name, data=data)
    with open_run(run_dir) as run, pytest.raises(CorruptShardError, match="no checksum"):
        tracin(run, progress=False)


# ---------------------------------------------------------------------- streaming
def test_streamed_blocks_hold_every_row_once_in_step_order_either_way(runs):
    with open_run(runs["float16"]) as run:
        ids, rows = all_rows(run)
        steps = np.repeat(run.steps, run.batch_sizes_recorded)
        for reverse in (False, True):
            for prefetch in (False, True):
                got = [(b.steps.copy(), b.sample_ids.clone(), b.grads.double().clone())
                       for b in iter_row_blocks(run, (0, run.final_step), reverse=reverse, chunk_rows=12,
                                                prefetch=prefetch)]
                order = np.argsort(-steps, kind="stable") if reverse else np.arange(len(steps))
                assert np.array_equal(np.concatenate([g[0] for g in got]), steps[order])
                assert np.array_equal(torch.cat([g[1] for g in got]).numpy(), ids[order])
                assert torch.equal(torch.cat([g[2] for g in got]), rows[order])


def test_sample_rows_by_table_and_by_search_agree_with_a_dictionary():
    """Dense ids take a lookup table, sparse ones a binary search; both map ids to rows as a dict does."""
    import types

    from influence_hooks.aggregate.rows import SampleRows

    rng = np.random.default_rng(0)
    for all_ids in (np.arange(50), np.sort(rng.choice(10**9, 50, replace=False))):
        run = types.SimpleNamespace(sample_ids=all_ids)
        seen = torch.from_numpy(rng.choice(all_ids, 200))
        for subset in (None, all_ids[::3]):
            rows_of = SampleRows(run, subset, torch.device("cpu"))
            assert (rows_of._lut is not None) == (all_ids[-1] < 1000)
            pos, keep = rows_of.rows(seen)
            table = {int(i): r for r, i in enumerate(rows_of.ids)}
            expect_keep = torch.tensor([int(i) in table for i in seen])
            assert (keep is None and bool(expect_keep.all())) or torch.equal(keep, expect_keep)
            got = pos if keep is None else pos[keep]
            assert got.tolist() == [table[int(i)] for i in seen if int(i) in table]


def test_query_gradients_near_are_those_of_each_step(tmp_path):
    from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

    manifest = {"dim": 2, "storage_dtype": "float32", "run_id": "near", "queries": {"ids": [0, 1]},
                "layers": [{"name": "fc", "rule": "linear", "module_type": "Linear", "offset": 0, "dim": 2,
                            "grad_dim": 2, "param_shapes": [["weight", [1, 2]]], "projection": {"kind": "none"}}]}
    w = RunWriter.create(tmp_path, manifest, options=WriterOptions(steps_per_shard=3))
    for t in range(7):
        w.write_queries(t, torch.full((2, 2), float(t)))
        w.write_step(StepRecord(step=t, epoch=0, lr=0.1, lr_groups=[0.1], batch_size=1, update_weight=1.0,
                                micro_batches=1, sample_ids=np.array([t]), grads=torch.ones(1, 2)))
    w.close(final_step=7)
    run = open_run(tmp_path)
    for t in range(7):
        near = run.query_gradients_near(t)
        assert t in near and len(near) == (3 if t < 6 else 1)  # shards of steps 0-2, 3-5, 6
        for s, u in near.items():
            assert torch.equal(u, run.query_gradients(s))


def test_products_of_tiles_on_worker_threads_equal_those_of_the_converted_rows(runs, monkeypatch):
    """reduce_row_blocks with two workers, products converted tile by tile (tiles smaller than a
    step and crossing shard boundaries), commits in block order: the same as one converted block."""
    from influence_hooks.aggregate import rows as R

    monkeypatch.setattr(R, "TILE_ROWS", 7)
    with open_run(runs["float32"]) as run:
        ids, rows = all_rows(run)
        rhs = torch.randn(run.dim, 3, dtype=torch.float64)
        expected = rows @ rhs
        got, order = [], []

        def compute(blk):
            a = blk.rows.matmul(0, len(blk.steps), rhs.float()).double()
            b = blk.rows.matmul(3, len(blk.steps) - 2, rhs.float()).double()  # any row range
            return a, b

        def commit(blk, out):
            got.append(out)
            order.append(blk.steps.copy())

        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            R.reduce_row_blocks(run, [(0, run.final_step)], compute, commit, chunk_rows=12, dtype=torch.float32,
                                workers=2)
        finally:
            torch.set_num_threads(threads)
        assert np.array_equal(np.concatenate(order), np.repeat(run.steps, run.batch_sizes_recorded))
        torch.testing.assert_close(torch.cat([a for a, _ in got]), expected, rtol=1e-5, atol=1e-5)
        at = 0
        for (a, b), st in zip(got, order):
            torch.testing.assert_close(b, expected[at + 3:at + len(st) - 2], rtol=1e-5, atol=1e-5)
            at += len(st)
