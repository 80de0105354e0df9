"""What exact curvature costs per step, relative to a training step.

    python benchmarks/exact_cost.py [--hidden 1024] [--steps 20] [--queries 1,8] [--device cpu]

Trains an MLP (784-h-h-10, float32, SGD with momentum) on random data for `steps` steps with a
checkpoint at step 0 and no snapshots, then times dit(curvature='exact' / 'ggn', mode='removal')
over the whole run, where the parameters are replayed from the checkpoint. Prints seconds per
training step, per replayed step and per backward step for each number of queries.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from influence_hooks.aggregate import dit  # noqa: E402
from influence_hooks.record.recorder import GradientRecorder  # noqa: E402
from influence_hooks.storage.reader import open_run  # noqa: E402


def loss_fn(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--queries", default="1,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    h = args.hidden
    model = nn.Sequential(nn.Linear(784, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10)).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n = args.batch * args.steps
    ds = TensorDataset(torch.randn(n, 784, device=dev), torch.randint(0, 10, (n,), device=dev))
    qmax = max(int(q) for q in args.queries.split(","))
    queries = (torch.randn(qmax, 784, device=dev), torch.randint(0, 10, (qmax,), device=dev))
    with tempfile.TemporaryDirectory() as tmp:
        rec = GradientRecorder(tmp + "/run", model, projection=256, checkpoint_every_n_steps=10 ** 9)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        X, Y = ds.tensors
        t0 = time.perf_counter()
        for t in range(args.steps):
            ids = torch.arange(t * args.batch, (t + 1) * args.batch)
            rec.begin_micro_batch(ids)
            loss_fn(model, (X[ids], Y[ids])).backward()
            rec.end_step(opt)
            opt.step()
            opt.zero_grad()
        rec.finish()
        rec_s = (time.perf_counter() - t0) / args.steps
        plain = copy.deepcopy(model)
        popt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
        for t in range(args.steps + 2):  # two warm-up steps
            if t == 2:
                t0 = time.perf_counter()
            ids = torch.arange((t % args.steps) * args.batch, (t % args.steps + 1) * args.batch)
            loss_fn(plain, (X[ids], Y[ids])).backward()
            popt.step()
            popt.zero_grad()
        _sync(dev)
        train_s = (time.perf_counter() - t0) / args.steps
        run = open_run(tmp + "/run")
        dit(run, window=(0, 2), eval_step=2, mode="removal", curvature="exact", model=model, dataset=ds,
            queries=(queries[0][:1], queries[1][:1]), loss_fn=loss_fn, progress=False)  # warm-up
        print(f"MLP {n_params / 1e6:.2f}M parameters, batch {args.batch}, {args.steps} steps, {dev}, "
              f"{torch.get_num_threads()} threads; training step {train_s * 1e3:.1f} ms "
              f"({rec_s * 1e3:.1f} ms while recording, first step included)")
        for curv in ("exact", "ggn"):
            for q in map(int, args.queries.split(",")):
                qb = (queries[0][:q], queries[1][:q])
                t0 = time.perf_counter()
                res = dit(run, window=(0, args.steps), mode="removal", curvature=curv, model=model, dataset=ds,
                          queries=qb, loss_fn=loss_fn, progress=False)
                _sync(dev)
                total = time.perf_counter() - t0
                print(f"  {curv:5s} Q={q:2d}: {total:.2f} s for {args.steps} steps, {total / args.steps * 1e3:.0f} ms "
                      f"per step = {total / args.steps / train_s:.1f} training steps "
                      f"({res.meta['trajectory'].split(' with ')[0]})")


if __name__ == "__main__":
    main()
