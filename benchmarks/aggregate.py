"""Throughput of the aggregators on a synthetic run of realistic shape.

    python benchmarks/aggregate.py                 # 200k sample-steps, k=1024, 64 queries (a few minutes, 2 cores)
    python benchmarks/aggregate.py --rows 20000    # quick check

Builds a run on disk with RunWriter (float16 storage, batches of --batch, --layers equal layer
blocks, queries every --query-every steps and at T), then times each aggregator end to end
(reading the shards included) and compares it with the same arithmetic done by plain torch
matmuls on tensors already in memory, in the same process:

    ratio = time(plain matmuls of the same shapes and FLOPs, in memory) / time(aggregator)

1.0 means reading, scattering and bookkeeping cost nothing; the target is 0.5 or better.
'GEMM peak' is a single large square matmul's rate, for scale. self-influence does 2K FLOPs per
row, so it is bound by reading the shards; its reference is the same row-wise dot product in memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from influence_hooks.aggregate import dit, dvemb, self_influence, tracin
from influence_hooks.aggregate.rows import DEFAULT_CHUNK_ROWS, iter_row_blocks
from influence_hooks.storage.reader import open_run
from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions


def build_run(path: Path, rows: int, dim: int, queries: int, batch: int, layers: int, query_every: int,
              epochs: int, seed: int) -> None:
    steps = rows // batch
    n_train = max(batch, rows // epochs)
    per_epoch = max(1, steps // epochs)
    width = dim // layers
    entries = [{"name": f"layer{j}", "rule": "linear", "module_type": "Linear", "offset": j * width,
                "dim": width if j < layers - 1 else dim - j * width, "grad_dim": 4 * width,
                "param_shapes": {"weight": [2, 2 * width]}, "projection": {"kind": "gaussian"}}
               for j in range(layers)]
    manifest = {"dim": dim, "storage_dtype": "float16", "layers": entries,
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


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


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

    return {"tracin": tr, "dit fisher removal": dt, "dvemb block-diagonal": dv, "self_influence": si}


def gemm_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = timed(lambda: a @ b, 3)
    return 2 * 2048 ** 3 / t


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="sample-steps (rows) in the run")
    p.add_argument("--dim", type=int, default=1024, help="projected gradient dimension k")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layers", type=int, default=4, help="layer blocks (dvemb block-diagonal)")
    p.add_argument("--query-every", type=int, default=50)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's choice)")
    p.add_argument("--dir", default=None, help="where to build the run (default a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--repeat", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--only", nargs="*", default=None, help="aggregators to time (default all)")
    args = p.parse_args(argv)

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ih-bench-"))
    path = root / "run"
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load}")
    t0 = time.perf_counter()
    if not (path / "manifest.json").exists():
        build_run(path, args.rows, args.dim, args.queries, args.batch, args.layers, args.query_every, args.epochs, 0)
    print(f"run: {args.rows} rows x k={args.dim} float16, {args.queries} queries, batch {args.batch}, "
          f"{args.layers} layers, built in {time.perf_counter() - t0:.1f}s at {path}")
    try:
        with open_run(path) as run:
            R, K, Q, B = run.n_rows, run.dim, args.queries, args.batch
            blocks = [l.dim for l in run.layers]
            kw = dict(chunk_rows=args.chunk_rows, progress=False)
            read = timed(lambda: [None for _ in iter_row_blocks(run, (0, run.final_step), chunk_rows=args.chunk_rows)],
                         args.repeat)
            print(f"reading alone (float16 shards -> float32 blocks): {R / read:,.0f} rows/s ({read:.2f}s)")
            T = run.final_step
            jobs = {
                "tracin": (lambda: tracin(run, **kw), 2 * R * K * Q),
                "dit fisher removal": (lambda: dit(run, eval_step="final", curvature="fisher", **kw), 4 * R * K * Q),
                "dvemb block-diagonal": (lambda: dvemb(run, path=root / "dvemb.h5", block_diagonal=True,
                                                       storage_dtype="float16", **kw).close(),
                                         4 * R * sum(d * d for d in blocks)),
                "self_influence": (lambda: self_influence(run, **kw), 2 * R * K),
            }
            if args.only:
                jobs = {k: v for k, v in jobs.items() if any(o in k for o in args.only)}
            refs = reference_jobs(R, K, Q, B, blocks, min(args.chunk_rows, R))
            peak = gemm_peak()
            print(f"GEMM peak (2048^3 matmul): {peak / 1e9:.1f} GFLOP/s; T = {T}; best of {args.repeat}, "
                  "reference and aggregator runs interleaved")
            print(f"{'aggregator':<22}{'time s':>8}{'rows/s':>12}{'GFLOP/s':>9}{'ref s':>8}{'ratio':>7}"
                  f"{'of peak':>9}")
            for name, (fn, flops) in jobs.items():
                t = r = float("inf")
                for _ in range(args.repeat):  # interleaved, so both see the same machine load
                    r = min(r, timed(refs[name], 1))
                    t = min(t, timed(fn, 1))
                print(f"{name:<22}{t:>8.2f}{R / t:>12,.0f}{flops / t / 1e9:>9.1f}{r:>8.2f}"
                      f"{r / t:>7.2f}{flops / t / peak:>9.2f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
