"""The ground truth: the recorded training retrained with samples left out, many models at once.

A `Group` is a set of models retrained together over one window [t1, t2): all start from the run's
checkpoint at or before t1 (replayed, nothing left out, up to t1), then each member drops its own
samples from the batches of [t1, t2) and all train on to the evaluation step t_e, where their query
losses are taken. Member 0, the base, drops nothing: it is the recorded run itself, retrained.

Each step follows the library's removal convention, applied through per-sample weights c in {0, 1}:
    L_t(w) = w_t sum_{i in B_t} c_i l_i(w)      (w_t the recorded update weight, 1/|B_t| for a mean
                                                loss: a removed sample's term goes, |B_t| stays)
with the batch B_t rebuilt from the recorded sample ids (dataset[i]), the recorded learning rate,
and the recorded optimizer's update (`OptimizerForm.step`, elementwise, so one call updates every
member along the leading model axis). The gradients of all members come from one vmap over models
of grad(L_t), itself a vmap over the samples of the batch (`LossFunctions.sample_losses`).

Reproduction is checked, not assumed: the base member's per-sample gradients at the start are
compared with the recorded rows, its query gradients with the recorded ones at the start and the
evaluation step, its parameters with every checkpoint or snapshot it passes, and its batch losses
with the recorded ones (when the training loop passed them to end_step). A mismatch raises
`ReproductionError` naming the likely causes (check='warn' records it and goes on).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ..batches import cast_batch
from ..errors import InfluenceHooksError, MissingDataError, short_list
from ..storage.reader import Run
from ..windows import Window
from ..aggregate.fullspace.checks import CHECK_TOLERANCE, layer_param_names, project_like_run
from ..aggregate.fullspace.model_fn import LossFunctions, Params
from ..aggregate.fullspace.optimizers import OptimizerForm
from .sources import TrainingSetup


BATCH_CACHE_BYTES = 256 << 20


class ReproductionError(InfluenceHooksError):
    """Retraining with nothing left out does not reproduce the recorded run."""


@dataclass
class Group:
    """Models retrained together over `window`, compared at `eval_step`. drops: per member besides
    the base, the sample ids it leaves out of the window's batches."""

    name: str
    window: Window
    eval_step: int
    drops: list[np.ndarray]

    @property
    def members(self) -> int:
        return 1 + len(self.drops)


@dataclass
class Check:
    """One comparison of the retrained base against the recording."""

    step: int
    what: str
    relative_error: float
    tolerance: float
    scope: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.relative_error <= self.tolerance)

    def describe(self) -> str:
        return (f"step {self.step}: {self.what} reproduced to {self.relative_error:.1e} "
                f"(tolerance {self.tolerance:.0e}){'' if self.ok else ' FAILED'}")


@dataclass
class GroupResult:
    """Query losses at the evaluation step: base [Q] and members [M, Q] (float64)."""

    group: Group
    start: int
    base: np.ndarray
    members: np.ndarray
    checks: list[Check] = field(default_factory=list)
    model_steps: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (deterministic and vmap-able), their modes restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def default_tolerance(dtype: torch.dtype) -> float:
    return 1000.0 * torch.finfo(dtype).eps


class Retrainer:
    """Retrains groups of counterfactual models from the run's checkpoints (see the module docstring).

    qsel: the positions of the compared queries among the recorded ones. model_chunk: members
    retrained at once (None: as many as fit in about 1 GiB). bar: a tqdm bar advanced by one per
    model-step.
    """

    def __init__(self, run: Run, setup: TrainingSetup, form: OptimizerForm, *, qsel: np.ndarray,
                 device: Any = None, model_chunk: int | None = None, tolerance: float | None = None,
                 check: str = "raise", bar: Any = None):
        self.run, self.setup, self.form = run, setup, form
        model = setup.model
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        first = dict(model.named_parameters())[self.names[0]]
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = _training_dtype(run, first.dtype)
        self.tolerance = float(tolerance) if tolerance is not None else default_tolerance(self.dtype)
        self.check_mode = check
        self.bar = bar
        self.qsel = np.asarray(qsel, np.int64)
        self.qbatch = cast_batch(tree_map(lambda x: x[torch.as_tensor(self.qsel)] if isinstance(x, Tensor) else x,
                                          setup.queries), self.dtype, self.device)
        self.lf = LossFunctions(model, setup.loss_fn, setup.query_loss_fn)
        vector_bytes = sum(p.numel() for n, p in model.named_parameters() if n in set(self.names)) \
            * torch.finfo(self.dtype).bits // 8
        self.model_chunk = model_chunk or max(1, min(256, (1 << 30) // max(8 * vector_bytes, 1)))
        self.n_ids = int(run.sample_ids.max()) + 1 if len(run.sample_ids) else 0
        self._grad = vmap(grad(self._weighted_loss, has_aux=True), in_dims=(0, None, None, 0, None))
        self._qloss = vmap(self._query_losses, in_dims=(0, None))
        self._batches: dict[int, tuple[np.ndarray, Any]] = {}
        self._cached_bytes = 0
        self._recorded = set(run.steps.tolist())
        self.model_steps = 0

    # ------------------------------------------------------------------ the functions
    def _weighted_loss(self, p: Params, fixed: Params, batch: Any, c: Tensor, weight: float) -> tuple[Tensor, Tensor]:
        loss = (self.lf.sample_losses(p, fixed, batch) * c).sum() * weight
        return loss, loss.detach()

    def _query_losses(self, p: Params, fixed: Params) -> Tensor:
        return self.lf.sample_losses(p, fixed, self.qbatch, query=True)

    def batch(self, t: int) -> tuple[np.ndarray, Any]:
        """(sample ids, the collated batch) of step t. Batches are kept (up to BATCH_CACHE_BYTES) while
        a group is retrained, as its chunks of models go over the same steps again."""
        if t in self._batches:
            return self._batches[t]
        ids = self.run.step_sample_ids(t)
        out = (ids, cast_batch(self.setup.collate_fn([self.setup.dataset[int(i)] for i in ids]), self.dtype,
                               self.device))
        size = sum(x.numel() * x.element_size() for x in tree_flatten(out[1])[0] if isinstance(x, Tensor))
        if self._cached_bytes + size <= BATCH_CACHE_BYTES:
            self._batches[t] = out
            self._cached_bytes += size
        return out

    # ------------------------------------------------------------------ starting points
    def start_of(self, t1: int) -> tuple[int, str]:
        """(step, 'checkpoint' | 'snapshot'): the latest saved state at or before t1 to retrain from."""
        cands = [(int(t), "checkpoint") for t in self.run.checkpoint_steps if t <= t1]
        if self.form.stateless:
            cands += [(int(t), "snapshot") for t in self.run.snapshot_steps
                      if t <= t1 and set(self.names) <= self.run.parameter_names(int(t), "snapshot")]
        if not cands:
            ck = self.run.checkpoint_steps
            raise MissingDataError(
                f"validate retrains from a checkpoint at or before each window's start, and {self.run.path} has "
                + (f"none at or before step {t1} (checkpoints at {short_list(ck)})" if len(ck) else "no checkpoints")
                + ". Record them: checkpoint_every_n_steps=N on InfluenceCallback / GradientRecorder (the "
                "whole model and the optimizer state every N steps; N = the steps of an epoch is a good choice).")
        return max(cands, key=lambda c: (c[0], c[1] == "checkpoint"))

    def load_start(self, step: int, kind: str) -> tuple[Params, Any, Params]:
        """(parameters [1, *shape] each, optimizer state, fixed tensors: buffers and frozen parameters)."""
        vals = self.run.load_parameters(step, kind)
        missing = [n for n in self.names if n not in vals]
        if missing:
            raise ReproductionError(f"the {kind} at step {step} lacks parameter(s) {missing[:5]}: the model does "
                                    "not match the run (pass the model that was trained).")
        model = self.setup.model
        P = {n: vals[n].to(device=self.device, dtype=self.dtype)[None] for n in self.names}
        fixed = {}
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in set(self.names):
                continue
            v = vals.get(n, t.detach())
            fixed[n] = v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
        saved = None
        if kind == "checkpoint" and not self.form.stateless:
            saved = {n: {k: v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                         for k, v in st.items()}
                     for n, st in self.run.load_optimizer_state(step).items()}
        state = self.form.init_state({n: v[0] for n, v in P.items()}, saved)
        return P, state, fixed

    # ------------------------------------------------------------------ one step
    def step(self, t: int, P: Params, state: Any, fixed: Params, keep: Tensor) -> tuple[Params, Any, Tensor]:
        """Update every member (leading axis of P) by step t; keep [k, B]: per-sample weights c."""
        i = self.run.step_position(t)
        ids, batch = self.batch(t)
        G, losses = self._grad(P, fixed, batch, keep, float(self.run.update_weights[i]))
        if not bool(self.run.skipped[i]):
            with torch.no_grad():
                P, state = self.form.step(P, state, G, float(self.run.lrs[i]))
        self.model_steps += keep.shape[0]
        if self.bar is not None:
            self.bar.update(keep.shape[0])
        return P, state, losses

    def time_steps(self, t: int, k: int, repeats: int = 3) -> float:
        """Seconds per step of k models retrained from the start point of step t, reading and
        collating the batches as a retraining does (after a warm-up step), for the time estimate."""
        start, kind = self.start_of(t)
        steps = [s for s in range(start, start + repeats + 1) if s in self._recorded]
        P, state, fixed = self.load_start(start, kind)
        P = {n: v.expand(k, *v.shape[1:]).clone() for n, v in P.items()}
        counted, bar = self.model_steps, self.bar
        self.bar = None
        try:
            with eval_mode(self.setup.model):
                t0 = time.perf_counter()
                for j, s in enumerate(steps):
                    if j == 1:  # the first step warms up
                        t0 = time.perf_counter()
                    keep = torch.ones(k, len(self.run.step_sample_ids(s)), dtype=self.dtype, device=self.device)
                    P, state, _ = self.step(s, P, state, fixed, keep)
                dt = (time.perf_counter() - t0) / max(len(steps) - 1, 1)
        finally:
            self.model_steps, self.bar = counted, bar
            self._batches.clear()
            self._cached_bytes = 0
        return dt

    def time_hvp(self, t: int, directions: int) -> float:
        """Seconds of one Hessian-vector product with `directions` directions at step t's batch (what
        exact curvature spends per step and query), for the time estimate."""
        start, kind = self.start_of(t)
        P, _, fixed = self.load_start(start, kind)
        p = {n: v[0] for n, v in P.items()}
        V = {n: torch.randn(directions, *v.shape, dtype=v.dtype, device=v.device) for n, v in p.items()}
        batch = self.batch(start)[1]
        with eval_mode(self.setup.model):
            self.lf.hvp_and_gv(p, fixed, batch, 1.0, V)
            t0 = time.perf_counter()
            self.lf.hvp_and_gv(p, fixed, batch, 1.0, V)
            return time.perf_counter() - t0

    # ------------------------------------------------------------------ a group
    def run_group(self, g: Group) -> GroupResult:
        t0 = time.perf_counter()
        steps0 = self.model_steps
        t1, t2 = g.window
        te = g.eval_step
        start, kind = self.start_of(t1)
        missing = [t for t in range(start, te) if t not in self._recorded]
        if missing:
            raise MissingDataError(f"retraining steps {start}..{te - 1} needs each step's batch, but steps "
                                   f"{short_list(missing)} are not in the recording.")
        refs = self._references(start, te)
        checks: list[Check] = []
        with eval_mode(self.setup.model):
            P, state, fixed = self.load_start(start, kind)
            checks.append(self._check_gradients(start, P, fixed))
            qc = self._check_query_gradients(start, P, fixed)  # the queries are the recorded ones
            if qc is not None:
                checks.append(qc)
            base_losses: dict[int, float] = {}
            for t in range(start, t1):  # replay, nothing left out
                B = len(self.batch(t)[0])
                P, state, loss = self.step(t, P, state, fixed, torch.ones(1, B, dtype=self.dtype, device=self.device))
                base_losses[t] = float(loss[0])
                if t + 1 in refs:
                    checks.append(self._check_params(t + 1, refs[t + 1], P))
            at_t1 = (P, state)
            members: list[np.ndarray | None] = [None, *g.drops]
            losses = []
            for c0 in range(0, len(members), self.model_chunk):
                chunk = members[c0:c0 + self.model_chunk]
                k = len(chunk)
                P = {n: v.expand(k, *v.shape[1:]).clone() for n, v in at_t1[0].items()}
                state = _clone(at_t1[1])
                dropped = torch.zeros(k, self.n_ids, dtype=torch.bool, device=self.device)
                for j, d in enumerate(chunk):
                    if d is not None and len(d):
                        dropped[j, torch.as_tensor(np.asarray(d, np.int64), device=self.device)] = True
                for t in range(t1, te):
                    ids = torch.as_tensor(self.batch(t)[0], device=self.device)
                    keep = ((~dropped[:, ids]).to(self.dtype) if t < t2
                            else torch.ones(k, len(ids), dtype=self.dtype, device=self.device))
                    P, state, loss = self.step(t, P, state, fixed, keep)
                    if c0 == 0:
                        base_losses[t] = float(loss[0])
                        if t + 1 in refs:
                            checks.append(self._check_params(t + 1, refs[t + 1], P))
                with torch.no_grad():
                    losses.append(self._qloss(P, fixed).to(torch.float64).cpu())
                if c0 == 0 and te not in refs:
                    qc = self._check_query_gradients(te, P, fixed)
                    if qc is not None:
                        checks.append(qc)
            lc = self._check_losses(base_losses)
            if lc is not None:
                checks.append(lc)
        self._batches.clear()
        self._cached_bytes = 0
        L = torch.cat(losses).numpy()
        return GroupResult(group=g, start=start, base=L[0], members=L[1:], checks=checks,
                           model_steps=self.model_steps - steps0, seconds=time.perf_counter() - t0)

    # ------------------------------------------------------------------ reproduction checks
    def _references(self, start: int, te: int) -> dict[int, tuple[str, set[str]]]:
        """{step: (kind, parameter names)} of the checkpoints and snapshots in (start, te]."""
        out: dict[int, tuple[str, set[str]]] = {}
        for kind, steps in (("snapshot", self.run.snapshot_steps), ("checkpoint", self.run.checkpoint_steps)):
            for s in steps:
                if start < int(s) <= te:
                    names = set(self.run.parameter_names(int(s), kind)) & set(self.names)
                    if names:
                        out[int(s)] = (kind, names)
        return out

    def _check_params(self, step: int, ref: tuple[str, set[str]], P: Params) -> Check:
        kind, names = ref
        saved = self.run.load_parameters(step, kind)
        num = den = 0.0
        for n in names:
            s = saved[n].to(device=self.device, dtype=torch.float64)
            num += float((P[n][0].to(torch.float64) - s).pow(2).sum())
            den += float(s.pow(2).sum())
        err = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        return self._judge(Check(step, f"parameters (recorded {kind})", err, self.tolerance))

    def _check_losses(self, base: dict[int, float]) -> Check | None:
        """The base's batch loss at each step against the loss recorded there (end_step(loss=...)),
        where one was recorded for a step of one micro-batch."""
        errs, last = [], 0
        for t, ours in base.items():
            i = self.run.step_position(t)
            rec = float(self.run.losses[i])
            if math.isfinite(rec) and int(self.run.micro_batches[i]) == 1:
                errs.append(abs(ours - rec) / max(abs(rec), 1e-30))
                last = t
        if not errs:
            return None
        return self._judge(Check(last, f"recorded batch losses of {len(errs)} steps (the largest error)",
                                 max(errs), self.tolerance))

    def _check_gradients(self, step: int, P: Params, fixed: Params, n_max: int = 8) -> Check:
        """The base's per-sample gradients at `step` against the recorded rows, projected like the run."""
        if bool(self.run.nonfinite[self.run.step_position(step)]):
            return Check(step, "recorded per-sample gradients (not compared: the step is flagged non-finite)",
                         0.0, CHECK_TOLERANCE)
        ids, batch = self.batch(step)
        n = min(n_max, len(ids))
        sub = tree_map(lambda x: x[:n] if isinstance(x, Tensor) else x, batch)
        layer_names = [x for x in layer_param_names(self.run) if x in P]
        diff = {x: P[x][0] for x in layer_names}
        rest = {**fixed, **{x: v[0] for x, v in P.items() if x not in diff}}
        g = self.lf.per_sample_grads(diff, rest, sub)
        ours, mask = project_like_run(self.run, self.setup.model, g, n)
        rec = next(self.run.iter_steps((step, step + 1), dtype=torch.float64, skip_nonfinite=False))
        pos = {int(s): j for j, s in enumerate(rec.sample_ids.numpy())}
        theirs = rec.grads[[pos[int(s)] for s in ids[:n]]][:, mask]
        err = float((ours[:, mask] - theirs).norm() / theirs.norm().clamp_min(1e-300))
        return self._judge(Check(step, f"recorded per-sample gradients of {n} samples ({self.run.manifest.get('storage_dtype')}"
                                       " storage)", err, CHECK_TOLERANCE))

    def _check_query_gradients(self, step: int, P: Params, fixed: Params) -> Check | None:
        """The base's query gradients at `step` against the recorded ones (when recorded there)."""
        if step not in set(self.run.query_steps.tolist()):
            return None
        layer_names = [x for x in layer_param_names(self.run) if x in P]
        diff = {x: P[x][0] for x in layer_names}
        rest = {**fixed, **{x: v[0] for x, v in P.items() if x not in diff}}
        g = self.lf.per_sample_grads(diff, rest, self.qbatch, query=True)
        ours, mask = project_like_run(self.run, self.setup.model, g, len(self.qsel))
        theirs = self.run.query_gradients(step, dtype=torch.float64)[torch.as_tensor(self.qsel)][:, mask]
        err = float((ours[:, mask] - theirs).norm() / theirs.norm().clamp_min(1e-300))
        return self._judge(Check(step, "recorded query gradients", err, CHECK_TOLERANCE))

    def _judge(self, c: Check) -> Check:
        if c.ok:
            return c
        msg = reproduction_failure(c, self.form, self.dtype, self.setup.model)
        if self.check_mode == "raise":
            raise ReproductionError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return c


def reproduction_failure(c: Check, form: OptimizerForm, dtype: torch.dtype, model: nn.Module) -> str:
    """Why retraining with nothing left out differs from the recording, and what to do."""
    dropout = [f"{n or 'model'} ({type(m).__name__}, p={m.p:g})" for n, m in model.named_modules()
               if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    norms = [f"{n or 'model'} ({type(m).__name__})" for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    found = []
    if dropout:
        found.append(f"this model has dropout, which retraining cannot replay (its random masks): {', '.join(dropout[:4])}")
    if norms:
        found.append(f"this model has batch norm, which mixes the samples of a batch in train mode: {', '.join(norms[:4])}")
    if "query" in c.what:
        found.insert(0, "the queries or query_loss_fn may not be the recorded ones (pass the queries given to "
                        "the recording, in the same order, and the same query loss)")
    return (
        f"retraining with nothing left out does not reproduce the recorded run: {c.describe()}. validate "
        f"replays every recorded step from the recorded sample ids (dataset[i]), learning rates and update "
        f"weights with the run's {form.describe()} in {str(dtype).replace('torch.', '')}, the model in eval mode. "
        + (" ".join(f"Found: {f}." for f in found) + " " if found else "")
        + "Common causes: dropout active during training; batch norm in train mode; a dataset whose items "
        "change between reads (random augmentation, a nondeterministic loader) or that is not indexed like the "
        "train loader's sampler; a loss_fn other than the training loss (e.g. a regularizer added once per "
        "batch); AMP or another reduced precision; gradient clipping; an unequal split into micro-batches. "
        "Fix the cause and record again, or pass check='warn' to go on with a ground truth that is not the "
        "recorded trajectory.")


def _training_dtype(run: Run, model_dtype: torch.dtype) -> torch.dtype:
    name = run.manifest.get("parameter_dtype")
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else model_dtype


def _clone(state: Any) -> Any:
    return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, state)
