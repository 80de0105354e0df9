"""Recording and aggregation with two processes (torch.distributed, gloo on the CPU).

    python benchmarks/distributed.py            # both parts (a few minutes on a 2-core CPU)
    python benchmarks/distributed.py --quick    # a smoke run

1. Recording under Lightning DDP: the median training-step time of 2 processes with the callback
   divided by 2 processes without it (alternating rounds, the same run of steps), for an MLP.
2. Aggregation of one synthetic run (benchmarks/aggregate.py's build_run) by 1 process and by 2
   (torchrun), each with one thread per process: seconds and speed-up for tracin, dit fisher,
   dvemb and self-influence; the results of both are checked equal.

On a 2-core machine two processes have one core each, so the point is that it works and what it
costs; on several GPUs the speed-up is what matters. Each figure is measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

WORKER = r'''
import json, sys, time, os
import torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
torch.set_num_threads(1)
from influence_hooks import open_run, tracin, dit, dvemb, self_influence
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo"); group = dist.group.WORLD
else:
    group = None
run = open_run({run!r})
out, times = {{}}, {{}}
jobs = {{
    "tracin": lambda: tracin(run, group=group, progress=False).values,
    "dit fisher": lambda: dit(run, window=(run.first_step, run.last_step + 1), curvature="fisher", group=group,
                              progress=False).values,
    "dvemb": lambda: dvemb(run, path={emb!r}, group=group, progress=False).scores(
        run.query_gradients(run.final_step), group=group, progress=False).values,
    "self-influence": lambda: self_influence(run, group=group, progress=False).values,
}}
for name, job in jobs.items():
    if group is not None: dist.barrier()
    t0 = time.perf_counter(); v = job(); times[name] = time.perf_counter() - t0
    out[name] = float(v.double().abs().sum())
if group is None or dist.get_rank() == 0:
    print(json.dumps({{"times": times, "checksums": out}}))
'''

RECORD = r'''
import json, sys, time, statistics
from pathlib import Path
import torch, lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
sys.path.insert(0, {root!r})
from influence_hooks import InfluenceCallback
torch.set_num_threads(1)

class Timer(L.Callback):
    def __init__(self): self.t = []
    def on_train_batch_start(self, *a): self._t0 = time.perf_counter()
    def on_train_batch_end(self, *a): self.t.append(time.perf_counter() - self._t0)

class M(L.LightningModule):
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    def training_step(self, b, i): return nn.functional.cross_entropy(self.net(b[0]), b[1])
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.01)

g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn({rows}, 256, generator=g), torch.randint(0, 10, ({rows},), generator=g))
timer = Timer()
cbs = [timer] + ([InfluenceCallback({run!r}, overwrite=True, verbose=False)] if {record} else [])
L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", callbacks=cbs, logger=False,
          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False).fit(
    M(), DataLoader(data, batch_size=64))
if int(__import__("os").environ.get("LOCAL_RANK", "0")) == 0:
    print("MEDIAN", statistics.median(timer.t[5:]))
'''


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def record_overhead(rounds: int, rows: int, tmp: Path) -> list[str]:
    medians: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for record in (False, True):  # alternating, so drifts of the machine hit both alike
            script = tmp / f"record_{record}.py"
            script.write_text(RECORD.format(root=str(ROOT), rows=rows, run=str(tmp / "rec" / "run"), record=record))
            proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True,
                                  timeout=900)
            line = [l for l in proc.stdout.splitlines() if l.startswith("MEDIAN")]
            if proc.returncode or not line:
                raise RuntimeError(proc.stderr[-3000:])
            medians[record].append(float(line[0].split()[1]))
    without, with_ = min(medians[False]), min(medians[True])
    return [f"recording under Lightning DDP, 2 processes x 1 thread, MLP 256-512-512-10, batch 64 per process, "
            f"projection 1024, {rounds} alternating rounds (best median step):",
            f"  step ms without {1e3 * without:.2f}, with the callback {1e3 * with_:.2f}, ratio {with_ / without:.3f}"]


def aggregation(rows: int, tmp: Path) -> list[str]:
    from aggregate import build_run

    run_dir = tmp / "agg" / "run"
    build_run(run_dir, rows=rows, dim=1024, queries=64, batch=64, layers=4, query_every=4, epochs=4, seed=0)
    results = {}
    for procs in (1, 2):
        script = tmp / f"agg_{procs}.py"
        script.write_text(WORKER.format(root=str(ROOT), here=str(HERE), run=str(run_dir),
                                        emb=str(tmp / f"dvemb_{procs}.h5")))
        cmd = ([sys.executable, str(script)] if procs == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)])
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not line:
            raise RuntimeError(proc.stderr[-3000:])
        results[procs] = json.loads(line[-1])
    out = [f"aggregation of a synthetic run: {rows} rows x 1024 dims (float16), 64 queries, 1 thread per process:",
           f"  {'method':<15}{'1 process (s)':>15}{'2 processes (s)':>17}{'speed-up':>10}   results equal"]
    for name, t1 in results[1]["times"].items():
        t2 = results[2]["times"][name]
        c1, c2 = results[1]["checksums"][name], results[2]["checksums"][name]
        same = abs(c1 - c2) <= 1e-4 * abs(c1)
        out.append(f"  {name:<15}{t1:>15.2f}{t2:>17.2f}{t1 / t2:>10.2f}   {'yes' if same else 'NO'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "distributed.md"))
    args = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines = [f"# benchmarks/distributed.py ({os.cpu_count()} CPUs, torch {torch.__version__}, load average "
                 f"{os.getloadavg()[0]:.1f} at the start)", "", "```"]
        lines += record_overhead(rounds=1 if args.quick else 3, rows=64 * (40 if args.quick else 200), tmp=tmp)
        lines += aggregation(rows=20_000 if args.quick else 200_000, tmp=tmp)
        lines += ["```", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
