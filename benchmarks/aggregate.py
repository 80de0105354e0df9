"""Throughput and memory of the aggregators on synthetic runs of realistic shape.

    python benchmarks/aggregate.py                   # 200k sample-steps, k=1024, 64 queries
    python benchmarks/aggregate.py --scaling         # and the scaling table (rows x k x queries)
    python benchmarks/aggregate.py --rows 20000      # quick check

Builds a run on disk with RunWriter (float16 storage unless --storage, batches of --batch,
--layers equal layer blocks, queries every --query-every steps and at T), then times each
aggregator end to end (reading and verifying the shards included) and compares it with the same
arithmetic done by plain float32 torch matmuls on tensors already in memory, in the same process:

    ratio = time(plain matmuls of the same shapes and FLOPs, in memory) / time(aggregator)

1.0 means reading, checking, converting, scattering and bookkeeping cost nothing; the target is
0.5 or better. Reference and aggregator runs alternate and each takes the best of --repeat, so
both see the same machine load. 'GEMM peak' is a single large square matmul's rate, for scale.
self-influence does 2K FLOPs per row, so it is bound by reading the shards; its reference is the
same row-wise dot product in memory.

Memory: 'peak MiB' is the largest resident set above the one before the call (Linux: VmHWM,
reset through /proc/self/clear_refs), measured on the aggregator's first run. The aggregators hold
[chunk_rows, K] buffers (and dvemb its M), so it should not grow with the number of rows; the
scores themselves are n_train x Q x 4 bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from influence_hooks.aggregate import dit, dvemb, self_influence, tracin
from influence_hooks.aggregate.rows import DEFAULT_CHUNK_ROWS, iter_row_blocks
from influence_hooks.storage import format as fmt
from influence_hooks.storage.reader import open_run
from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

AGGREGATORS = ("tracin", "dit fisher removal", "dvemb block-diagonal", "self_influence")


def build_run(path: Path, rows: int, dim: int, queries: int, batch: int, layers: int, query_every: int,
              epochs: int, seed: int, storage: str = "float16") -> None:
    steps = rows // batch
    n_train = max(batch, rows // epochs)
    per_epoch = max(1, steps // epochs)
    width = dim // layers
    entries = [{"name": f"layer{j}", "rule": "linear", "module_type": "Linear", "offset": j * width,
                "dim": width if j < layers - 1 else dim - j * width, "grad_dim": 4 * width,
                "param_shapes": {"weight": [2, 2 * width]}, "projection": {"kind": "gaussian"}}
               for j in range(layers)]
    manifest = {"dim": dim, "storage_dtype": storage, "layers": entries,
                "queries": {"ids": list(range(queries))}, "optimizer": {"name": "SGD", "is_plain_sgd": True},
                "projection_fingerprint": "bench", "partial_model": False}
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    w = RunWriter.create(path, manifest, options=WriterOptions(steps_per_shard=256))
    perm = rng.permutation(n_train)
    for t in range(steps):
        if t % query_every == 0:
            w.write_queries(t, torch.randn(queries, dim, generator=g) * 0.05)
        at = (t % per_epoch) * batch % max(n_train - batch, 1)
        ids = perm[at:at + batch]
        lr = 0.1 * (1 - 0.5 * t / steps)
        w.write_step(StepRecord(step=t, epoch=t // per_epoch, lr=lr, lr_groups=[lr], batch_size=batch,
                                update_weight=1.0 / batch, micro_batches=1, sample_ids=ids.astype(np.int64),
                                grads=torch.randn(batch, dim, generator=g) * 0.05))
    w.write_queries(steps, torch.randn(queries, dim, generator=g) * 0.05)
    w.close(final_step=steps)


def as_format_2(src: Path, dst: Path) -> None:
    """A copy of run `src` whose gradient rows are stored the way format 2 stored them: HDF5
    chunks of 2^18 values under fletcher32 (read through HDF5), without the format-3 sums."""
    shutil.copytree(src, dst)
    for p in sorted((dst / fmt.SHARD_DIR).glob("*.h5")):
        with h5py.File(p, "r+") as f:
            grads = f[fmt.ROWS_GRAD][()]
            del f[fmt.ROWS_GRAD], f[fmt.ROWS_GRAD_SUMS]
            f.create_dataset(fmt.ROWS_GRAD, data=grads, chunks=(max(1, (1 << 18) // grads.shape[1]), grads.shape[1]),
                             fletcher32=True)
            f.attrs["format_version"] = 2


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Largest resident set during fn() above the one before it, MiB (None where Linux's VmHWM
    cannot be reset)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        fn()
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def reference_jobs(R: int, K: int, Q: int, B: int, blocks: list[int], chunk: int) -> dict[str, Callable[[], None]]:
    """Plain torch on in-memory float32 tensors: the same GEMM shapes and FLOPs as each aggregator."""
    g = torch.randn(chunk, K)
    U = torch.randn(K, Q)
    nchunks, rest = divmod(R, chunk)
    steps = R // B

    def tr():
        for _ in range(nchunks):
            g @ U
        if rest:
            g[:rest] @ U

    def dt():
        Uc = U.clone()
        for s in range(steps):
            G = g[(s * B) % (chunk - B):][:B]
            GU = G @ Uc
            Uc.addmm_(G.T, GU, alpha=-1e-3)

    Ms = [torch.zeros(d, d) for d in blocks]

    def dv():
        for s in range(steps):
            G = g[(s * B) % (chunk - B):][:B]
            at = 0
            for d, M in zip(blocks, Ms):
                Gb = G[:, at:at + d]
                E = torch.addmm(Gb, Gb, M.T, alpha=-1.0)
                M.addmm_(E.T, Gb)
                at += d

    def si():
        for _ in range(nchunks):
            torch.linalg.vecdot(g, g)
        if rest:
            torch.linalg.vecdot(g[:rest], g[:rest])

    return dict(zip(AGGREGATORS, (tr, dt, dv, si)))


def flops(name: str, R: int, K: int, Q: int, blocks: list[int]) -> int:
    return {"tracin": 2 * R * K * Q, "dit fisher removal": 4 * R * K * Q,
            "dvemb block-diagonal": 4 * R * sum(d * d for d in blocks), "self_influence": 2 * R * K}[name]


def gemm_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = timed(lambda: a @ b, 3)
    return 2 * 2048 ** 3 / t


def measure(path: Path, root: Path, args: argparse.Namespace, only: list[str] | None, repeat: int
            ) -> tuple[dict[str, dict[str, float | None]], int, int, int, list[int]]:
    """{aggregator: time s, reference s, peak MiB} on the run at `path`, interleaved best of `repeat`."""
    out: dict[str, dict[str, float | None]] = {}
    with open_run(path) as run:
        R, K, Q, B = run.n_rows, run.dim, len(run.query_ids), args.batch
        blocks = [l.dim for l in run.layers]
        kw = dict(chunk_rows=args.chunk_rows, progress=False)
        jobs = {
            "tracin": lambda: tracin(run, **kw),
            "dit fisher removal": lambda: dit(run, eval_step="final", curvature="fisher", **kw),
            "dvemb block-diagonal": lambda: dvemb(run, path=root / "dvemb.h5", block_diagonal=True,
                                                  storage_dtype="float16", **kw).close(),
            "self_influence": lambda: self_influence(run, **kw),
        }
        refs = reference_jobs(R, K, Q, B, blocks, min(args.chunk_rows, R))
        for name, fn in jobs.items():
            if only and not any(o in name for o in only):
                continue
            mem = peak_mib(fn)
            t = r = float("inf")
            for _ in range(repeat):  # interleaved, so both see the same machine load
                r = min(r, timed(refs[name]))
                t = min(t, timed(fn))
            out[name] = {"t": t, "ref": r, "mem": mem}
    return out, R, K, Q, blocks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="sample-steps (rows) in the run")
    p.add_argument("--dim", type=int, default=1024, help="projected gradient dimension k")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=4, help="layer blocks (dvemb block-diagonal)")
    p.add_argument("--query-every", type=int, default=50)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--storage", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    p.add_argument("--dir", default=None, help="where to build the runs (default a temporary directory); "
                                               "runs already there are reused")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--only", nargs="*", default=None, help="aggregators to time (default all)")
    p.add_argument("--scaling", action="store_true",
                   help="also the scaling table: rows, k and queries varied one at a time around the default")
    p.add_argument("--scaling-repeat", type=int, default=2)
    args = p.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ih-bench-"))
    if args.threads:
        torch.set_num_threads(args.threads)

    def run_at(rows: int, dim: int, queries: int, storage: str = args.storage) -> Path:
        path = root / f"run-{rows}-{dim}-{queries}-{storage}"
        if not (path / "manifest.json").exists():
            t0 = time.perf_counter()
            build_run(path, rows, dim, queries, args.batch, args.layers, args.query_every, args.epochs, 0, storage)
            print(f"(built {path.name} in {time.perf_counter() - t0:.1f}s)")
        return path

    def load() -> str:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load()}")
    try:
        path = run_at(args.rows, args.dim, args.queries)
        old = root / (path.name + "-format2")
        if not old.exists():
            as_format_2(path, old)
        with open_run(path) as run, open_run(old) as run2:
            span = (0, run.final_step)
            t3 = timed(lambda: [None for _ in iter_row_blocks(run, span, chunk_rows=args.chunk_rows)], args.repeat)
            t2 = timed(lambda: [None for _ in iter_row_blocks(run2, span, chunk_rows=args.chunk_rows)], args.repeat)
            R = run.n_rows
        print(f"\nrun: {R} rows x k={args.dim} {args.storage}, {args.queries} queries, batch {args.batch}, "
              f"{args.layers} layers, chunk_rows {args.chunk_rows}")
        print(f"reading alone ({args.storage} shards -> float32 blocks, every byte verified): format 3 "
              f"{R / t3:,.0f} rows/s ({t3:.2f}s); the same rows as format 2 (fletcher32 in HDF5) {R / t2:,.0f} "
              f"rows/s ({t2:.2f}s)")
        peak = gemm_peak()
        print(f"GEMM peak (2048^3 matmul): {peak / 1e9:.1f} GFLOP/s; best of {args.repeat}, reference and "
              f"aggregator runs interleaved; load average {load()}\n")
        res, R, K, Q, blocks = measure(path, root, args, args.only, args.repeat)
        print("| aggregator | time s | rows/s | GFLOP/s | ref s | ratio | of GEMM peak | peak MiB |")
        print("|---|---|---|---|---|---|---|---|")
        for name, m in res.items():
            f = flops(name, R, K, Q, blocks)
            mem = "-" if m["mem"] is None else f"{m['mem']:.0f}"
            print(f"| {name} | {m['t']:.2f} | {R / m['t']:,.0f} | {f / m['t'] / 1e9:.1f} | {m['ref']:.2f} | "
                  f"{m['ref'] / m['t']:.2f} | {f / m['t'] / peak:.2f} | {mem} |")
        print(f"\n(load average after: {load()})")

        if args.scaling:
            r0, k0, q0 = args.rows, args.dim, args.queries
            shapes = [(r0 // 4, k0, q0), (r0, k0, q0), (r0 * 4, k0, q0),
                      (r0, k0 // 4, q0), (r0, k0 * 2, q0),
                      (r0, k0, q0 // 4), (r0, k0, q0 * 4)]
            print(f"\nScaling (best of {args.scaling_repeat}; ratio to the same-shape in-memory fp32 reference; "
                  f"peak MiB above the resident set before the call; load average {load()}):\n")
            print("| rows | k | queries | " + " | ".join(f"{a} s / ratio / MiB" for a in AGGREGATORS) + " |")
            print("|---|---|---|" + "---|" * len(AGGREGATORS))
            for rows, dim, queries in shapes:
                res, *_ = measure(run_at(rows, dim, queries), root, args, args.only, args.scaling_repeat)
                cells = []
                for name in AGGREGATORS:
                    m = res.get(name)
                    cells.append("-" if m is None else
                                 f"{m['t']:.2f} / {m['ref'] / m['t']:.2f} / "
                                 f"{'-' if m['mem'] is None else format(m['mem'], '.0f')}")
                print(f"| {rows:,} | {dim} | {queries} | " + " | ".join(cells) + " |", flush=True)
            print(f"\n(load average after: {load()})")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
