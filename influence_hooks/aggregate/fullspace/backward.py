"""The full-space backward pass shared by every task of a `TaskPlan` (see exact.py).

The columns of the adjoint (one entry per state tensor of the optimizer: A['w'] for the
parameters, more for momentum or Adam's moments) are the Q query directions of each active task,
side by side: [n_active * Q, *shape] per parameter. A task becomes active at its evaluation step
(with u_q(t_e) on w, zeros elsewhere) and is dropped after its lowest step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...errors import MissingDataError
from ...storage.reader import Run
from ..rows import SampleRows
from ..scores import ScoreAccumulator
from ..tasks import TaskPlan
from .checks import check_queries, check_recording
from .model_fn import LossFunctions, Params
from .optimizers import Adjoint, OptimizerForm
from .trajectory import ParameterTrajectory, Plan


@dataclass
class FullSpacePass:
    run: Run
    model: nn.Module
    lf: LossFunctions
    tasks: TaskPlan
    form: OptimizerForm
    products: Callable[..., tuple[Params, Tensor]]  # (diff, fixed, batch, weight, V) -> (H V, G V)
    diff_names: list[str]
    buffers: Params
    init: Params
    batch_of: Callable[[np.ndarray], Any]
    rows_of: SampleRows
    Q: int
    dtype: torch.dtype
    device: torch.device
    check: str
    qbatch: Any
    fixed_u: Params | None

    def run_pass(self, traj: ParameterTrajectory, plan: Plan, desc: str, progress: bool
                 ) -> tuple[ScoreAccumulator, dict[str, Any]]:
        run, tasks, Q, form = self.run, self.tasks.tasks, self.Q, self.form
        acc = self.tasks.accumulator(self.rows_of.n, Q, dtype=self.dtype, device=self.device)
        active: list[int] = []          # task indices, in column order
        A: Adjoint | None = None
        recorded = set(run.steps.tolist())
        check_info: dict[str, Any] = {}
        hi = plan.hi
        bar = tqdm(total=plan.hi - plan.lo, desc=desc, unit="step", disable=not progress, leave=False)
        with bar:
            for st in traj.reverse(plan):
                t, w = st.step, st.params
                diff = {n: w[n] for n in self.diff_names}
                fixed = {**self.buffers, **{n: v for n, v in self.init.items() if n not in w},
                         **{n: v for n, v in w.items() if n not in diff}}
                if t < hi:
                    bar.update(1)
                if t < hi and active:
                    if t not in recorded:
                        raise MissingDataError(f"step {t} is not in the recording: its batch is unknown.")
                    i = run.step_position(t)
                    lr, uw = float(run.lrs[i]), float(run.update_weights[i])
                    ids = run.step_sample_ids(t)
                    batch = self.batch_of(ids)
                    if self.check != "off" and "step" not in check_info:
                        check_info |= check_recording(run, self.model, self.lf, diff, fixed, batch, ids, t, self.check)
                    grad = self.lf.batch_grad(diff, fixed, batch, uw) if form.needs_state else None
                    P, ctx = form.direction(A, state=st.opt, grad=grad, params=diff, lr=lr, first=st.first)
                    HP, GP = self.products(diff, fixed, batch, uw, P)      # [A*Q, ...], [A*Q, B]
                    rows, keep = self.rows_of.rows(torch.as_tensor(ids, device=self.device))
                    for c, k in enumerate(active):
                        if t < tasks[k].end:
                            # removing i adds e_t = -w_t g_t(i) to the step's gradient: df = p . e_t
                            acc.update(k, rows, keep, GP[c * Q:(c + 1) * Q].T, alpha=-uw)
                    A = form.pull_back(A, P, HP, ctx)
                    done = [c for c, k in enumerate(active) if tasks[k].start == t]
                    if done:
                        A, active = _drop_columns(A, active, done, Q)
                starting = [k for k, task in enumerate(tasks) if task.eval_step == t]
                if starting:
                    u = self._query_grads(diff, fixed, t, check_info)
                    new = form.new_columns({n: u[n].repeat(len(starting), *([1] * (u[n].dim() - 1)))
                                            for n in self.diff_names})
                    A = new if A is None else {s: {n: torch.cat([A[s][n], new[s][n]]) for n in new[s]} for s in new}
                    active += starting
        return acc, check_info

    def _query_grads(self, diff: Params, fixed: Params, t: int, check_info: dict[str, Any]) -> Params:
        """u_q(t) = grad f_q(w_t): {name: [Q, *shape]}."""
        if self.qbatch is None:
            return self.fixed_u
        u = {n: v.detach() for n, v in self.lf.per_sample_grads(diff, fixed, self.qbatch, query=True).items()}
        if self.check != "off":
            check_queries(self.run, self.model, self.lf, diff, fixed, self.qbatch, self.Q, t, check_info)
        return u


def _drop_columns(A: Adjoint, active: list[int], done: list[int], Q: int) -> tuple[Adjoint | None, list[int]]:
    keep_c = [c for c in range(len(active)) if c not in done]
    if not keep_c:
        return None, []
    idx = torch.cat([torch.arange(c * Q, (c + 1) * Q) for c in keep_c]).to(next(iter(A["w"].values())).device)
    return ({s: {n: v.index_select(0, idx) for n, v in part.items()} for s, part in A.items()},
            [active[c] for c in keep_c])
