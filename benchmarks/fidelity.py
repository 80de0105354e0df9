"""Fidelity of influence estimators against retraining, on trajectories nobody tuned for.

    python benchmarks/fidelity.py            # a few minutes on a 2-core CPU
    python benchmarks/fidelity.py --quick    # a smoke run (well under a minute)

Data: sklearn's bundled digits (8x8 images, 10 classes), a random subset for training and a few
held-out images as queries. Models, float64, plain SGD with a constant learning rate: a logistic
regression, an MLP (64-32-10, tanh) and a small CNN (two 3x3 convolutions, tanh, a linear head).
Each model is trained once per recording, from the same initialization and batch order, so the
three recordings share one trajectory: exact per-sample gradients (projection 'none', with a
parameter snapshot at every step) and random projections to k = 1024 and k = 256 (stored as
float32, so only the projection differs; --storage float16 / bfloat16 shows what 16-bit storage adds).

Ground truth, per training sample of a random subset (README, "Conventions and limits"): the
same training, with the sample's term dropped from the steps of the window and the denominator
|B_t| kept, started from the actual parameters at the window start; all samples of the subset
are retrained at once (vmap over models). Three notions, per window (early, middle and late
quarter of the epochs, and the whole run):
  R@t2: window-removal influence evaluated at the window end (t_e = t2);
  R@T:  window-removal influence evaluated at the end of training (t_e = T; dvemb's notion);
  A:    accrued influence R([0, t2), t2) - R([0, t1), t1).
For the late window and the whole run R@T = R@t2, and for the whole run A = R: those columns
are shown once. Each cell is Pearson / Spearman correlation with the ground truth over the
subset, averaged over the queries.

Methods: ours (tracin; dit with curvature none / fisher on the recorded gradients; dvemb; dit
with curvature ggn / exact, which recompute everything in full parameter space from the model,
the dataset and the snapshots), and peers on the same trajectory: Captum's TracInCP (every step
of the window as a checkpoint, its learning rate eta_t/|B_t|) and dattri's DVEmbAttributor
(fed the per-step batches at the snapshot parameters). Times are seconds of attribution for all
columns of a row (training and recording excluded).

The last row of each table is not an estimator but a limit: the derivative of the retraining
itself in each sample's weight (a central difference of the same vmapped retraining, computed
without the library), extrapolated to removal. Any first-order estimate, dit exact included,
approximates this derivative; where it falls short of retraining, removing the sample is not
linear and no first-order method can do better.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from influence_hooks.aggregate import dit, dvemb, tracin  # noqa: E402
from influence_hooks.record.recorder import GradientRecorder  # noqa: E402
from influence_hooks.storage.reader import Run, open_run  # noqa: E402

DT = torch.float64
BATCH = 32


# ---------------------------------------------------------------------- problem
@dataclass
class Problem:
    name: str
    build: Callable[[], nn.Module]
    lr: float
    image: bool = False
    optimizer: str = "sgd"  # 'sgd' (constant lr) or 'adamw' (lr warmed up, then decaying linearly to half)
    warmup: int = 0  # steps of linear warmup (AdamW)

    def lr_at(self, t: int, T: int) -> float:
        if self.optimizer == "sgd":
            return self.lr
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        return self.lr * (1 - 0.5 * (t - self.warmup) / (T - self.warmup))

    def describe(self, T: int) -> str:
        if self.optimizer == "sgd":
            return f"SGD lr {self.lr}"
        warm = f"linear warmup over {self.warmup} steps, then " if self.warmup else "no warmup, "
        return (f"AdamW lr {self.lr} ({warm}decaying linearly to {self.lr / 2:g}), weight decay "
                f"{ADAMW['weight_decay']}, betas {ADAMW['betas']}")


ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def build_logreg() -> nn.Module:
    return nn.Linear(64, 10)


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def build_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.Tanh(), nn.Conv2d(16, 16, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(64, 10))


PROBLEMS = {
    "logreg": Problem("logistic regression (650 params)", build_logreg, lr=0.5),
    "mlp": Problem("MLP 64-32-10 (2,410 params)", build_mlp, lr=0.3),
    "cnn": Problem("CNN 2 conv + linear (3,130 params)", build_cnn, lr=0.2, image=True),
    # AdamW as it is usually run: a warmup of two epochs (24 steps), then a linear decay
    "mlp-adamw": Problem("MLP 64-32-10 (2,410 params)", build_mlp, lr=1e-2, optimizer="adamw", warmup=24),
    "cnn-adamw": Problem("CNN 2 conv + linear (3,130 params)", build_cnn, lr=1e-2, image=True, optimizer="adamw",
                         warmup=24),
    # and without warmup, where Adam's first steps (the sign of the gradient) defeat any first-order estimate
    "mlp-adamw-nowarmup": Problem("MLP 64-32-10 (2,410 params)", build_mlp, lr=1e-2, optimizer="adamw"),
    "cnn-adamw-nowarmup": Problem("CNN 2 conv + linear (3,130 params)", build_cnn, lr=1e-2, image=True,
                                  optimizer="adamw"),
}


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def load_digits_data(n_train: int, n_query: int, seed: int):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=DT) / 16.0
    X = X - X.mean(0)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=g)
    tr, q = perm[:n_train], perm[n_train:n_train + n_query]
    return X[tr], y[tr], X[q], y[q]


def batch_order(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        p = torch.randperm(n, generator=g)
        out += [p[b:b + BATCH] for b in range(0, n - BATCH + 1, BATCH)]
    return out


# ---------------------------------------------------------------------- recording
def record(path: str, prob: Problem, init: dict, ds: TensorDataset, queries, order, steps_per_epoch: int,
           projection: Any, storage: str = "float32") -> tuple[Run, nn.Module]:
    model = prob.build().to(DT)
    model.load_state_dict(init)
    exact = projection == "none"
    rec = GradientRecorder(path, model, projection=projection, storage_dtype="float64" if exact else storage,
                           queries=queries, query_loss_fn=loss_fn, query_every_n_steps=1,
                           snapshot_every_n_steps=1 if exact else None, snapshot_scope="model", overwrite=True)
    X, Y = ds.tensors
    opt = (torch.optim.SGD(model.parameters(), lr=prob.lr) if prob.optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=prob.lr, **ADAMW))
    for t, ids in enumerate(order):
        for g in opt.param_groups:
            g["lr"] = prob.lr_at(t, len(order))
        rec.begin_micro_batch(ids)
        loss_fn(model, (X[ids], Y[ids])).backward()
        rec.end_step(opt, epoch=t // steps_per_epoch)
        opt.step()
        opt.zero_grad()
    rec.finish()
    return open_run(path), model


# ---------------------------------------------------------------------- ground truth
class Retrainer:
    """Functional training of many models at once (vmap over a leading model axis), with
    torch.optim's SGD or AdamW update written out here, independent of the library."""

    def __init__(self, model: nn.Module, ds: TensorDataset, queries, order, prob: Problem):
        self.model, self.order, self.prob = model, order, prob
        self.X, self.Y = ds.tensors
        self.Xq, self.Yq = queries

        def batch_loss(w, x, y, c):
            losses = F.cross_entropy(functional_call(self.model, w, (x,)), y, reduction="none")
            return (losses * c).sum() / len(y)  # the removed sample's term dropped, |B_t| kept

        self.step_grad = vmap(grad(batch_loss), in_dims=(0, None, None, 0))
        self.query_loss = vmap(lambda w: F.cross_entropy(functional_call(self.model, w, (self.Xq,)), self.Yq,
                                                         reduction="none"))

    def update(self, W: dict, state: dict, G: dict, t: int) -> tuple[dict, dict]:
        lr = self.prob.lr_at(t, len(self.order))
        if self.prob.optimizer == "sgd":
            return {n: W[n] - lr * G[n] for n in W}, state
        b1, b2 = ADAMW["betas"]
        k = state["k"] + 1
        m = {n: b1 * state["m"][n] + (1 - b1) * G[n] for n in W}
        v = {n: b2 * state["v"][n] + (1 - b2) * G[n] * G[n] for n in W}
        W = {n: W[n] * (1 - lr * ADAMW["weight_decay"])
             - (lr / (1 - b1 ** k)) * m[n] / (torch.sqrt(v[n] / (1 - b2 ** k)) + ADAMW["eps"]) for n in W}
        return W, {"k": k, "m": m, "v": v}

    def fresh_state(self, W: dict) -> dict:
        return {"k": 0, "m": {n: torch.zeros_like(v) for n, v in W.items()},
                "v": {n: torch.zeros_like(v) for n, v in W.items()}}

    def run(self, W: dict, state: dict, t_from: int, t_to: int, removed: torch.Tensor, window: tuple[int, int],
            evals: set[int], keep: set[int] = frozenset(), weight: float = 1.0
            ) -> tuple[dict[int, torch.Tensor], dict[int, tuple]]:
        """Train models W (leading axis: one per entry of `removed`, -1 = nothing removed) over steps
        [t_from, t_to); return query losses [M, Q] at steps in `evals` and (parameters, optimizer
        state) at `keep`. Inside `window` the removed sample's loss term is scaled by 1 - weight
        (weight 1: removed)."""
        f, kept = {}, {}
        for t in range(t_from, t_to + 1):
            if t in evals:
                f[t] = self.query_loss(W)
            if t in keep:
                kept[t] = ({n: v.clone() for n, v in W.items()}, copy.deepcopy(state))
            if t == t_to:
                break
            ids = self.order[t]
            c = torch.ones(len(removed), len(ids), dtype=DT)
            if window[0] <= t < window[1]:
                c = c - weight * (ids[None, :] == removed[:, None]).to(DT)
            W, state = self.update(W, state, self.step_grad(W, self.X[ids], self.Y[ids], c), t)
        return f, kept


def ground_truth(model: nn.Module, init: dict, ds, queries, order, prob: Problem, subset: np.ndarray,
                 wins: dict[str, tuple[int, int]], weight: float = 1.0) -> dict[tuple[str, str], torch.Tensor]:
    """{(notion, window name): [M, Q]} for notions 'R@t2', 'R@T', 'A': the change of the query losses
    when each sample's loss term is removed (weight 1), or scaled by 1 - weight, at the window's steps."""
    T = len(order)
    rt = Retrainer(model, ds, queries, order, prob)
    removed = torch.cat([torch.tensor([-1]), torch.as_tensor(subset)])  # member 0: actual training
    params = {n: v.to(DT) for n, v in init.items() if n in dict(model.named_parameters())}
    W0 = {n: v.unsqueeze(0).repeat(len(removed), *([1] * v.dim())).clone() for n, v in params.items()}
    bounds = {0, T} | {t for w in wins.values() for t in w}
    # removal from every step; member 0 (nothing removed) is the actual trajectory
    f_all, kept = rt.run(W0, rt.fresh_state(W0), 0, T, removed, (0, T), bounds, keep=bounds, weight=weight)
    delta = {t: f_all[t][1:] - f_all[t][:1] for t in bounds}  # R([0, t), t)
    truth = {}
    for name, (t1, t2) in wins.items():
        truth[("A", name)] = delta[t2] - delta[t1]
        # window removal: restart every member from the actual state at t1, drop the sample in [t1, t2) only
        W1, st1 = kept[t1]
        actual = lambda v: v[:1].repeat(len(removed), *([1] * (v.dim() - 1)))  # noqa: E731
        Wt1 = {n: actual(v) for n, v in W1.items()}
        if prob.optimizer != "sgd":
            st1 = {"k": st1["k"], "m": {n: actual(v) for n, v in st1["m"].items()},
                   "v": {n: actual(v) for n, v in st1["v"].items()}}
        f, _ = rt.run(Wt1, st1, t1, T, removed, (t1, t2), {t2, T}, weight=weight)
        truth[("R@t2", name)] = f[t2][1:] - f[t2][:1]
        truth[("R@T", name)] = f[T][1:] - f[T][:1]
    return truth


# ---------------------------------------------------------------------- peers
def captum_tracincp(model, ds, subset, queries, snaps: Run, steps: np.ndarray, coef: dict[int, float]):
    from captum.influence import TracInCP

    def load(m, path):
        t = int(str(path).split(":")[1])
        m.load_state_dict(snaps.load_parameters(t))
        return coef[t]

    train = TensorDataset(*(x[torch.as_tensor(subset)] for x in ds.tensors))
    m = copy.deepcopy(model)
    tc = TracInCP(m, train, checkpoints=[f"step:{int(t)}" for t in steps], checkpoints_load_func=load,
                  loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=len(subset),
                  sample_wise_grads_per_batch=False)
    return tc.influence(queries).T  # [M, Q]


class DattriDVEmb:
    """dattri's DVEmbAttributor fed the recorded trajectory: each step's batch at the snapshot w_t."""

    def __init__(self, model, ds, order, snaps: Run, steps_per_epoch: int, image: bool):
        from dattri.algorithm.dvemb import DVEmbAttributor
        from dattri.task import AttributionTask
        self.m = copy.deepcopy(model)
        m = self.m

        def f(params, data):
            x, y = data
            return F.cross_entropy(functional_call(m, params, (x.unsqueeze(0),)), y.unsqueeze(0))

        task = AttributionTask(loss_func=f, model=m, checkpoints=m.state_dict())
        self.att = DVEmbAttributor(task, proj_dim=None, factorization_type="none")
        X, Y = ds.tensors
        for t, ids in enumerate(order):
            m.load_state_dict(snaps.load_parameters(t))
            self.att.cache_gradients(t // steps_per_epoch, (X[ids], Y[ids]), ids, float(snaps.lrs[t]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.att.cache()
        m.load_state_dict(snaps.load_parameters(len(order)))

    def scores(self, queries, subset, epochs: range) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(TensorDataset(*queries), batch_size=len(queries[0]))
        return sum(self.att.attribute(loader, epoch=e, train_data_indices=list(map(int, subset))) for e in epochs)


# ---------------------------------------------------------------------- scoring
def corr(est: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr
    ps, ss = [], []
    for q in range(truth.shape[1]):
        e, t = est[:, q].double().numpy(), truth[:, q].double().numpy()
        if np.std(e) == 0 or np.std(t) == 0:
            ps.append(float("nan"))
            ss.append(float("nan"))
            continue
        ps.append(pearsonr(e, t)[0])
        ss.append(spearmanr(e, t)[0])
    return float(np.mean(ps)), float(np.mean(ss))


COLUMNS = [("R@t2", "early"), ("R@t2", "middle"), ("R@t2", "late"), ("R@t2", "whole"),
           ("R@T", "early"), ("R@T", "middle"), ("A", "early"), ("A", "middle"), ("A", "late")]


@dataclass
class Row:
    method: str
    grads: str
    cells: dict = field(default_factory=dict)  # column -> [M, Q] estimate (None: not defined)
    seconds: float = 0.0
    note: str = ""


def timed(row: Row, fn: Callable[[], Any]) -> Any:
    t = time.perf_counter()
    out = fn()
    row.seconds += time.perf_counter() - t
    return out


def first_order_limit(model: nn.Module, init: dict, ds, queries, order, prob: Problem, subset: np.ndarray,
                      wins: dict[str, tuple[int, int]], h: float = 1e-4) -> Row:
    """The derivative of the retraining itself in each sample's weight (a central difference, in
    float64), extrapolated to removal: what any first-order estimate, dit exact included, can reach.
    Computed without the library; where it falls short of 1, removing the sample is not linear."""
    row = Row("derivative of retraining", "retraining",
              note=f"central difference in the sample's weight (h = {h:g}): the first-order limit")
    plus = timed(row, lambda: ground_truth(model, init, ds, queries, order, prob, subset, wins, weight=h))
    minus = timed(row, lambda: ground_truth(model, init, ds, queries, order, prob, subset, wins, weight=-h))
    row.cells = {c: (plus[c] - minus[c]) / (2 * h) for c in COLUMNS}
    return row


def ours(runs: dict[str, Run], wins: dict[str, tuple[int, int]], subset, model, ds, queries, tmp: str,
         steps_per_epoch: int) -> list[Row]:
    names = list(wins)
    wl = [wins[n] for n in names]
    early_mid = [wins["early"], wins["middle"]]
    wnames3 = ["early", "middle", "late"]
    base = dict(train_ids=subset, dtype=DT, progress=False)
    rows = []
    for tag, run in runs.items():
        # an Adam run: the Adam form (the default there) and, below it, the SGD form for comparison
        forms = ["adam", "sgd"] if run.table.layer_lrs is not None else ["sgd"]
        for form in forms:
            label = "" if len(forms) == 1 else f" ({form} form)"
            common = dict(base, step_size=form)
            r = Row("tracin" + label, tag)
            res = timed(r, lambda: tracin(run, windows=wl, **common))
            for n, s in zip(names, res):
                for notion in ("R@t2", "R@T", "A"):
                    r.cells[(notion, n)] = s.values
            rows.append(r)
            for curv in ("none", "fisher"):
                r = Row(f"dit {curv}" + label, tag)
                res = timed(r, lambda: dit(run, windows=wl, mode="removal", curvature=curv, **common))
                r.cells.update({("R@t2", n): s.values for n, s in zip(names, res)})
                res = timed(r, lambda: dit(run, windows=early_mid, mode="removal", eval_step="final",
                                           curvature=curv, **common))
                r.cells.update({("R@T", n): s.values for n, s in zip(["early", "middle"], res)})
                res = timed(r, lambda: dit(run, windows=[wins[n] for n in wnames3], mode="accrued", curvature=curv,
                                           **common))
                r.cells.update({("A", n): s.values for n, s in zip(wnames3, res)})
                rows.append(r)
            r = Row("dvemb" + label, tag, note="R@T only")
            emb = timed(r, lambda: dvemb(run, path=os.path.join(tmp, f"dvemb_{tag}_{form}.h5"), progress=False,
                                         dtype=DT, block_diagonal=False, step_size=form))
            u = run.query_gradients(run.final_step, dtype=DT)
            res = timed(r, lambda: emb.scores(u, windows=wl, **base))
            emb.close()
            for n, s in zip(names, res):
                r.cells[("R@T", n)] = s.values
                if wins[n][1] == run.final_step:
                    r.cells[("R@t2", n)] = s.values
            rows.append(r)
    common = base
    run = runs["exact"]
    for curv in ("ggn", "exact"):
        r = Row(f"dit {curv}", "full space")
        kw = dict(curvature=curv, model=model, dataset=ds, queries=queries, loss_fn=loss_fn, **common)
        res = timed(r, lambda: dit(run, windows=wl, mode="removal", **kw))
        r.cells.update({("R@t2", n): s.values for n, s in zip(names, res)})
        res = timed(r, lambda: dit(run, windows=early_mid, mode="removal", eval_step="final", **kw))
        r.cells.update({("R@T", n): s.values for n, s in zip(["early", "middle"], res)})
        res = timed(r, lambda: dit(run, windows=[wins[n] for n in wnames3], mode="accrued", **kw))
        r.cells.update({("A", n): s.values for n, s in zip(wnames3, res)})
        r.note = res[0].meta["trajectory"].split(" with ")[0].replace("parameters w_t for steps", "w_t,")
        rows.append(r)
    return rows


def peers(run: Run, wins, subset, model, ds, queries, order, steps_per_epoch: int) -> list[Row]:
    rows = []
    r = Row("Captum TracInCP", "full (captum)")
    try:
        coef = {int(t): float(run.lrs[i]) / BATCH for i, t in enumerate(run.steps)}
        for n, (t1, t2) in wins.items():
            s = timed(r, lambda: captum_tracincp(model, ds, subset, queries, run, np.arange(t1, t2), coef))
            for notion in ("R@t2", "R@T", "A"):
                r.cells[(notion, n)] = s.detach()
        r.note = "every step of the window as checkpoint"
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        r.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
    rows.append(r)
    r = Row("dattri DVEmbAttributor", "full (dattri)", note="R@T only")
    try:
        att = timed(r, lambda: DattriDVEmb(model, ds, order, run, steps_per_epoch, False))
        for n, (t1, t2) in wins.items():
            ep = range(t1 // steps_per_epoch, t2 // steps_per_epoch)
            s = timed(r, lambda: att.scores(queries, subset, ep)).detach()
            r.cells[("R@T", n)] = s
            if t2 == run.final_step:
                r.cells[("R@t2", n)] = s
    except Exception as e:  # noqa: BLE001
        r.note = f"failed: {type(e).__name__}: {str(e)[:80]}"
    rows.append(r)
    return rows


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: fewer steps, samples and queries")
    ap.add_argument("--models", default=",".join(PROBLEMS))
    ap.add_argument("--samples", type=int, default=None, help="training samples scored against retraining")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.md"))
    ap.add_argument("--storage", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="storage dtype of the projected recordings (the exact one is float64)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (4 if args.quick else 8)
    n_train = args.n_train or (192 if args.quick else 384)
    M = args.samples or (16 if args.quick else 48)
    Q = args.queries or (3 if args.quick else 8)
    spe = n_train // BATCH
    qe = max(1, epochs // 4)
    mid = (epochs - qe) // 2
    wins = {"early": (0, qe * spe), "middle": (mid * spe, (mid + qe) * spe),
            "late": ((epochs - qe) * spe, epochs * spe), "whole": (0, epochs * spe)}
    X, Y, Xq, Yq = load_digits_data(n_train, Q, args.seed)
    rng = np.random.default_rng(args.seed)
    subset = np.sort(rng.choice(n_train, size=M, replace=False))
    t_all = time.perf_counter()
    sections = []
    for key in args.models.split(","):
        prob = PROBLEMS[key]
        torch.manual_seed(args.seed)
        model = prob.build().to(DT)
        init = copy.deepcopy(model.state_dict())
        xs, xq = (X.view(-1, 1, 8, 8), Xq.view(-1, 1, 8, 8)) if prob.image else (X, Xq)
        ds, queries = TensorDataset(xs, Y), (xq, Yq)
        order = batch_order(n_train, epochs, args.seed + 1)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            runs, trained = {}, None
            for tag, proj in (("exact", "none"), ("k=1024", 1024), ("k=256", 256)):
                runs[tag], m = record(os.path.join(tmp, tag), prob, init, ds, queries, order, spe, proj, args.storage)
                trained = trained or m
            projected = {tag: run.dim for tag, run in runs.items()}
            t_rec = time.perf_counter() - t0
            t0 = time.perf_counter()
            truth = ground_truth(prob.build().to(DT), init, ds, queries, order, prob, subset, wins)
            t_truth = time.perf_counter() - t0
            rows = ours(runs, wins, subset, trained, ds, queries, tmp, spe)
            rows += peers(runs["exact"], wins, subset, trained, ds, queries, order, spe)
            rows.append(first_order_limit(prob.build().to(DT), init, ds, queries, order, prob, subset, wins))
            for r in rows:
                if r.grads.startswith("k=") and projected[r.grads] == projected["exact"]:
                    r.note = (r.note + "; " if r.note else "") + f"k >= p: exact ({projected[r.grads]} dims)"
            sections.append(render(prob, key, rows, truth, wins, t_rec, t_truth, M, Q, len(order), projected))
            print(sections[-1], flush=True)
    text = header(args, epochs, n_train, M, Q, wins) + "\n".join(sections) + footer(time.perf_counter() - t_all)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not args.quick or args.out != ap.get_default("out"):
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 0


def render(prob, key, rows, truth, wins, t_rec, t_truth, M, Q, T, projected) -> str:
    head = ["method", "gradients"] + [f"{n} {w}" for n, w in COLUMNS] + ["time (s)", "note"]
    lines = [f"### {prob.name}, {prob.describe(T)}, {T} steps", "",
             f"Recorded dims: {', '.join(f'{k}: {v}' for k, v in projected.items())}. Recording (3 runs) "
             f"{t_rec:.1f} s; ground truth ({M} samples, {Q} queries, vmapped retraining) {t_truth:.1f} s.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lows = []
    for r in rows:
        vals = {c: corr(r.cells[c], truth[c]) for c in COLUMNS if r.cells.get(c) is not None}
        cells = [f"{vals[c][0]:.3f} / {vals[c][1]:.3f}" if c in vals else "—" for c in COLUMNS]
        lines.append(f"| {r.method} | {r.grads} | " + " | ".join(cells) + f" | {r.seconds:.2f} | {r.note} |")
        if vals and (r.grads in ("exact", "full space", "retraining")):
            lows.append(f"{r.method} ({r.grads}) {min(v[0] for v in vals.values()):.3f} / "
                        f"{min(v[1] for v in vals.values()):.3f}")
    lines += ["", "Lowest Pearson / Spearman over the columns it estimates: " + "; ".join(lows) + "."]
    return "\n".join(lines) + "\n"


def header(args, epochs, n_train, M, Q, wins) -> str:
    w = ", ".join(f"{k} [{a}, {b})" for k, (a, b) in wins.items())
    return (
        "# Fidelity against retraining\n\n"
        f"Generated by `python benchmarks/fidelity.py{' --quick' if args.quick else ''}` "
        f"(torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s)). "
        f"Digits: {n_train} training images, batch {BATCH}, {epochs} epochs; windows (steps): {w}; projected "
        f"gradients stored as {args.storage}. "
        f"Each cell: Pearson / Spearman against retraining over {M} random training samples, averaged over "
        f"{Q} held-out queries. R@t2: window removal evaluated at the window end; R@T: evaluated at the end of "
        "training; A: accrued influence. For the late window and the whole run R@T equals R@t2, and A "
        "over the whole run equals R@t2 whole, so those columns are not repeated. '—': the method does "
        "not estimate that notion. tracin and Captum's TracInCP estimate no particular notion; the same "
        "scores are compared with each.\n\n")


def footer(seconds: float) -> str:
    return f"\nTotal wall time {seconds:.0f} s.\n"


if __name__ == "__main__":
    sys.exit(main())
