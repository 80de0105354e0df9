"""A recording in a process of its own, for tests that need a second process (the lock), a crash
(kill -9) or a full disk (where a crash inside HDF5 must not take pytest down with it).

    python _record_process.py MODE RUN_DIR [ARGS as JSON]

MODE
    hold     record `steps` steps and flush them (flush=true) or keep them buffered, touch
             args["ready"], wait until args["release"] exists, then finish. Prints nothing.
    race     wait until the wall clock reaches args["start_at"], record `steps` steps and finish.
    fill     record until the disk is full (at most `steps` steps), optionally with snapshots and
             checkpoints every step.
`race` and `fill` print one JSON line: {"ok": ..., "error": type, "message": ..., "steps": n}.
"""

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks.errors import InfluenceHooksError
from influence_hooks.record.recorder import GradientRecorder

mode, run_dir = sys.argv[1], sys.argv[2]
args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
torch.manual_seed(args.get("seed", 0))
width = args.get("width", 7)
model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
X, Y = torch.randn(64, 5), torch.randint(0, 3, (64,))
options = dict(projection=args.get("projection", 16), steps_per_shard=args.get("steps_per_shard", 2))
if args.get("params"):
    options.update(snapshot_every_n_steps=1, snapshot_scope="model", checkpoint_every_n_steps=1)
rec = GradientRecorder(run_dir, model, queries=(X[:3], Y[:3]), query_every_n_steps=1,
                       query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), **options)


def step(t: int) -> None:
    ids = torch.arange(8 * t, 8 * t + 8) % 64
    rec.begin_micro_batch(ids)
    F.cross_entropy(model(X[ids]), Y[ids]).backward()
    rec.end_step(opt)
    opt.step()
    opt.zero_grad()


def report(**kw) -> None:
    print(json.dumps(kw), flush=True)


if mode == "hold":
    for t in range(args.get("steps", 1)):
        step(t)
    if args.get("flush", True):
        rec.flush()
    Path(args["ready"]).touch()
    deadline = time.monotonic() + args.get("timeout", 120)
    while not Path(args["release"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    rec.finish()
elif mode == "race":
    time.sleep(max(0.0, args["start_at"] - time.time()))
    try:
        for t in range(args.get("steps", 6)):
            step(t)
        rec.finish()
        report(ok=True, run_id=rec.run_id)
    except InfluenceHooksError as e:
        rec.abort()
        report(ok=False, error=type(e).__name__, message=str(e))
elif mode == "fill":
    t = 0
    try:
        for t in range(args.get("steps", 100000)):
            step(t)
        rec.finish()
        report(ok=True, steps=t + 1)
    except InfluenceHooksError as e:
        rec.abort()
        report(ok=False, error=type(e).__name__, message=str(e), steps=t)
else:
    raise SystemExit(f"unknown mode {mode}")
