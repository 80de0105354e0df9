"""Trains a small MLP with a GradientRecorder (2 steps per shard, with queries and snapshots)
until it is killed. Run by test_robustness.py as `python _train_until_killed.py RUN_DIR`."""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks.record.recorder import GradientRecorder

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
X, Y = torch.randn(64, 5), torch.randint(0, 3, (64,))
rec = GradientRecorder(sys.argv[1], model, projection=16, steps_per_shard=2, queries=(X[:3], Y[:3]),
                       query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]), query_every_n_steps=3,
                       snapshot_every_n_steps=4)
for t in range(1_000_000):
    ids = torch.randperm(64)[:8]  # each sample at most once per batch, as a DataLoader draws them
    rec.begin_micro_batch(ids)
    F.cross_entropy(model(X[ids]), Y[ids]).backward()
    rec.end_step(opt, epoch=t // 8)
    opt.step()
    opt.zero_grad()
    time.sleep(0.01)
