"""Tiny recorded runs for tests: a small model trained with plain SGD in float64, exact per-sample
gradients from torch.func at every w_t, written with RunWriter (projection 'none').

`record_run(path, ...)` trains, records and returns a `Recorded` holding everything in memory too
(per-step ids, gradients, coefficients, query gradients, parameters), so tests can compare the
aggregators against brute-force loops and retrain with samples removed (`retrain`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from influence_hooks.storage.writer import RunWriter, StepRecord, WriterOptions

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------- model
class TinyModel:
    """A softmax regression ('logreg') or a 2-layer tanh MLP ('mlp') as a functional model."""

    def __init__(self, kind: str = "mlp", d_in: int = 5, hidden: int = 6, n_classes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        if kind == "mlp":
            self.module = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(),
                                              torch.nn.Linear(hidden, n_classes)).double()
            self.layers = {"fc1": ["0.weight", "0.bias"], "fc2": ["2.weight", "2.bias"]}
        elif kind == "logreg":
            self.module = torch.nn.Sequential(torch.nn.Linear(d_in, n_classes)).double()
            self.layers = {"fc": ["0.weight", "0.bias"]}
        else:
            raise ValueError(kind)
        with torch.no_grad():
            for p in self.module.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        self.names = [n for names in self.layers.values() for n in names]
        self.kind = kind

    def init_params(self) -> Params:
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of one sample (x [d], y [])."""
        out = functional_call(self.module, params, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None])

    def flat(self, grads: Params) -> torch.Tensor:
        """Concatenate per-sample gradient dicts ([B, *shape] each) into rows [B, K] in layer order."""
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.names], dim=1)

    def per_sample_grads(self, params: Params, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """g(i) = grad l_i(params) for every row of X: [B, K]."""
        return self.flat(vmap(grad(self.loss), in_dims=(None, 0, 0))(params, X, Y))

    def layer_entries(self) -> list[dict]:
        entries, off = [], 0
        for lname, pnames in self.layers.items():
            shapes = {n: list(dict(self.module.named_parameters())[n].shape) for n in pnames}
            dim = int(sum(np.prod(s) for s in shapes.values()))
            entries.append({"name": lname, "rule": "linear", "module_type": "Linear", "offset": off, "dim": dim,
                            "grad_dim": dim, "param_shapes": shapes, "projection": {"kind": "none"}})
            off += dim
        return entries

    @property
    def dim(self) -> int:
        return sum(e["dim"] for e in self.layer_entries())


def make_data(n_train: int, n_query: int, d_in: int = 5, n_classes: int = 3, seed: int = 0):
    """Gaussian class clusters with some label noise: (X [n, d], y [n], Xq [q, d], yq [q])."""
    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(n_classes, d_in, generator=g, dtype=torch.float64) * 1.5

    def draw(n):
        y = torch.randint(0, n_classes, (n,), generator=g)
        x = centers[y] + torch.randn(n, d_in, generator=g, dtype=torch.float64)
        return x, y

    X, y = draw(n_train)
    flip = torch.rand(n_train, generator=g) < 0.1
    y[flip] = (y[flip] + 1) % n_classes
    Xq, yq = draw(n_query)
    return X, y, Xq, yq


def batch_schedule(n_train: int, batch: int, epochs: int, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """[(epoch, sample ids of the batch)] per step; a shuffled order per epoch, last batch smaller."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(epochs):
        perm = rng.permutation(n_train)
        out += [(e, perm[i:i + batch]) for i in range(0, n_train, batch)]
    return out


def train(model: TinyModel, X, y, schedule, lrs, weight: Callable[[int, np.ndarray], np.ndarray] | None = None
          ) -> list[Params]:
    """Plain SGD on the mean loss: w_{t+1} = w_t - lr_t (1/|B_t|) sum_i a_i g_t(i), a_i = weight(t, ids)
    (1 by default; 0 removes a sample from that step and keeps the denominator |B_t|).
    Returns [w_0, ..., w_T]."""
    params = model.init_params()
    out = [params]

    def batch_loss(p, xb, yb, a):
        return (a * vmap(model.loss, in_dims=(None, 0, 0))(p, xb, yb)).sum() / len(yb)

    for t, (_, ids) in enumerate(schedule):
        a = torch.ones(len(ids), dtype=torch.float64) if weight is None else torch.as_tensor(weight(t, ids), dtype=torch.float64)
        gb = grad(batch_loss)(params, X[ids], y[ids], a)
        step = torch.cat([gb[n].reshape(-1) for n in model.names])
        flat = torch.cat([params[n].reshape(-1) for n in model.names]) - lrs[t] * step
        params, at = {}, 0
        for n in model.names:
            shape = model.module.get_parameter(n).shape
            k = int(np.prod(shape))
            params[n] = flat[at:at + k].reshape(shape)
            at += k
        out.append(params)
    return out


# ---------------------------------------------------------------------- recording
@dataclass
class Recorded:
    path: Path
    model: TinyModel
    X: torch.Tensor
    y: torch.Tensor
    Xq: torch.Tensor
    yq: torch.Tensor
    schedule: list[tuple[int, np.ndarray]]
    lrs: np.ndarray
    params: list[Params]
    steps: list[dict] = field(default_factory=list)   # step, epoch, lr, coef, ids [B], grads [B, K]
    queries: dict[int, np.ndarray] = field(default_factory=dict)  # step -> u_q(step) [Q, K]
    all_query_grads: dict[int, np.ndarray] = field(default_factory=dict)  # every step 0..T
    layer_slices: list[slice] = field(default_factory=list)

    @property
    def T(self) -> int:
        return len(self.schedule)

    def query_losses(self, params: Params) -> np.ndarray:
        return np.array([float(self.model.loss(params, self.Xq[q], self.yq[q])) for q in range(len(self.Xq))])


def record_run(path: str | Path, *, kind: str = "mlp", n_train: int = 22, n_query: int = 3, batch: int = 6,
               epochs: int = 6, lr: float = 0.3, query_every: int = 1, query_from: int = 0, seed: int = 0,
               duplicate_query: bool = False, steps_per_shard: int = 5, complete: bool = True,
               nan_step: int | None = None, record_queries: bool = True, extra_manifest: dict | None = None) -> Recorded:
    """Train a tiny model with plain SGD (lr decaying linearly to lr/2), record it in `path`.

    Queries are recorded at steps t >= query_from with (t - query_from) % query_every == 0, and at T
    (if complete). duplicate_query: the training sample 0 becomes a copy of query point 0.
    complete=False leaves the run unfinished; record_queries=False records none. nan_step: that
    step's recorded gradients are NaN (flagged by the writer; its entry in `steps` gets skipped=True).
    """
    model = TinyModel(kind, seed=seed)
    X, y, Xq, yq = make_data(n_train, n_query, seed=seed)
    if duplicate_query:
        X[0], y[0] = Xq[0], yq[0]
    schedule = batch_schedule(n_train, batch, epochs, seed)
    T = len(schedule)
    lrs = lr * (1 - 0.5 * np.arange(T) / T)
    params = train(model, X, y, schedule, lrs)
    rec = Recorded(Path(path), model, X, y, Xq, yq, schedule, lrs, params)
    off = 0
    for e in model.layer_entries():
        rec.layer_slices.append(slice(off, off + e["dim"]))
        off += e["dim"]
    manifest = {"dim": model.dim, "storage_dtype": "float64", "layers": model.layer_entries(),
                "queries": {"ids": [100 + q for q in range(n_query)]},
                "optimizer": {"name": "SGD", "is_plain_sgd": True}, "projection_fingerprint": "none",
                "partial_model": False, **(extra_manifest or {})}
    w = RunWriter.create(path, manifest, options=WriterOptions(steps_per_shard=steps_per_shard))
    for t in range(T + 1):
        u = model.per_sample_grads(params[t], Xq, yq)
        rec.all_query_grads[t] = u.numpy()
        due = t >= query_from and (t - query_from) % query_every == 0 and t < T
        if record_queries and (due or (t == T and complete)):
            rec.queries[t] = u.numpy()
            w.write_queries(t, u)
        if t == T:
            break
        epoch, ids = schedule[t]
        G = model.per_sample_grads(params[t], X[ids], y[ids])
        rec.steps.append({"step": t, "epoch": epoch, "lr": float(lrs[t]), "coef": float(lrs[t]) / len(ids),
                          "ids": np.asarray(ids), "grads": G.numpy(), "skipped": t == nan_step})
        if t == nan_step:
            G = torch.full_like(G, float("nan"))
        w.write_step(StepRecord(step=t, epoch=epoch, lr=float(lrs[t]), lr_groups=[float(lrs[t])],
                                batch_size=len(ids), update_weight=1.0 / len(ids), micro_batches=1,
                                sample_ids=np.asarray(ids, np.int64), grads=G, loss=0.0))
    if complete:
        w.close(final_step=T)
    else:
        w.flush()
        w.abort()
    return rec


def retrain(rec: Recorded, weight: Callable[[int, np.ndarray], np.ndarray]) -> list[Params]:
    """Retrain from the same init with the same batches and learning rates, weights per sample."""
    return train(rec.model, rec.X, rec.y, rec.schedule, rec.lrs, weight)


def retrain_query_losses(rec: Recorded, weights: list[Callable[[int, np.ndarray], np.ndarray]],
                         at_steps: list[int]) -> dict[int, np.ndarray]:
    """Retrain C counterfactual models at once (vmapped over copies of the parameters), each with
    its own per-sample weights, same init, batches and learning rates as `rec`.

    Returns {step: [C, Q] query losses f_q(w'_step)} for every step in at_steps.
    """
    model, C = rec.model, len(weights)

    def batch_loss(p, xb, yb, a):
        return (a * vmap(model.loss, in_dims=(None, 0, 0))(p, xb, yb)).sum() / len(yb)

    def query_losses(p):
        return vmap(model.loss, in_dims=(None, 0, 0))(p, rec.Xq, rec.yq)

    step_grad = vmap(grad(batch_loss), in_dims=(0, None, None, 0))
    params = {n: p[None].repeat(C, *([1] * p.dim())) for n, p in model.init_params().items()}
    out = {}
    for t, (_, ids) in enumerate(rec.schedule):
        if t in at_steps:
            out[t] = vmap(query_losses)(params).numpy()
        a = torch.as_tensor(np.stack([w(t, ids) for w in weights]), dtype=torch.float64)
        g = step_grad(params, rec.X[ids], rec.y[ids], a)
        params = {n: params[n] - rec.lrs[t] * g[n] for n in params}
    if rec.T in at_steps:
        out[rec.T] = vmap(query_losses)(params).numpy()
    return out


def drop(sample: int, t1: int, t2: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Per-sample weights that remove `sample` from the steps of [t1, t2)."""
    return lambda t, ids: np.where((ids == sample) & (t1 <= t) & (t < t2), 0.0, 1.0)
