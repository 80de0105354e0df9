"""How a recorded row enters the parameter update: the step size of the recorded-gradient estimators.

SGD form: step t moves the parameters by -eta_t w_t sum_i g_t(i), so every column of a row gets
the factor eta_t w_t (Run.coef_of).

Adam form, for runs trained with Adam or AdamW: the recorder stores, per step and recorded layer,
the step size a_{t,l} Adam applied to that step's gradient (record/optim.py, adam_step_sizes: a
squared-gradient-weighted mean over the layer of eta_t / (sqrt(v_hat) + eps), counting the
gradient's life in the first moment). Dropping sample i then moves layer l by about
+a_{t,l} w_t g_{t,l}(i): the update is A_t w_t g with A_t = diag(a_{t, layer of column}). A
per-layer scalar commutes with the random projection; Adam's per-coordinate step sizes would not.
Left out: the per-coordinate spread of the step sizes, the sample's effect through the second
moment, and Adam's curvature terms; dit(curvature='exact') linearizes Adam itself.

What changes in the estimators: a score term (eta_t w_t) g . u becomes w_t g . (A_t u); the
curvature recursion U <- U - eta_t H_t U becomes U <- U - H_t A_t U; data value embeddings
emb = w_t (I - M) A_t g. `StepSizes` hands out the factors: `row_coef` (eta_t w_t, or w_t) and
`column_scale` (None, or the diagonal of A_t), and `products` multiplies rows by query directions
in either form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError
from ..storage.reader import Run
from .rows import step_segments

FORMS = ("auto", "adam", "sgd")
ADAM_NOTE = ("Adam form: each layer's gradients weighted by the step size Adam applied to that layer at that step "
             "(a squared-gradient-weighted mean of eta_t / (sqrt(v_hat) + eps), recorded in training) instead of "
             "the learning rate; Adam's per-coordinate step sizes, the sample's effect through the second moment "
             "and Adam's own curvature are left out (dit(curvature='exact') linearizes Adam)")


class StepSizes:
    """The step size of each step's rows and columns, in the SGD or the Adam form.

    form: 'auto', 'adam' (an error without Adam's recorded step sizes) or 'sgd'. 'auto' is the
    Adam form where the run recorded Adam's step sizes and `curvature` is False; with curvature
    (dit fisher, dvemb) it is the SGD form: on the fidelity benchmark the Adam form with Fisher
    curvature fell behind on the early windows (README, "Benchmarks")."""

    def __init__(self, run: Run, form: str = "auto", curvature: bool = False):
        if form not in FORMS:
            raise ConfigurationError(f"step_size must be one of {FORMS}, got {form!r}")
        sizes = run.table.layer_lrs
        recorded = sizes is not None and bool(np.isfinite(sizes).any())
        if form == "adam" and not recorded:
            raise ConfigurationError(
                f"step_size='adam' needs the per-layer step sizes Adam applied, which {run.path} does not hold: it "
                "was not trained with torch.optim.Adam/AdamW, or was recorded by an older influence_hooks. Use "
                "step_size='sgd' (the recorded learning rate), or record the run again.")
        self.adam = recorded and (form == "adam" or (form == "auto" and not curvature))
        self.recorded = recorded
        self.missing = 0
        self.form = "adam" if self.adam else "sgd"
        self._run = run
        self._cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        if self.adam:
            self._offsets = [(l.offset, l.offset + l.dim) for l in run.layers]
            # a step without them (recorded by an older version, or non-finite): the lr, and a note
            known = np.isfinite(sizes)
            self.missing = int((~known.all(axis=1)).sum())
            self._sizes = np.where(known, sizes, run.table.lrs[:, None])

    @property
    def note(self) -> str | None:
        if self.adam:
            if self.missing:
                return (f"{ADAM_NOTE}; {self.missing} step(s) of the run have no recorded step sizes and use the "
                        "learning rate instead")
            return ADAM_NOTE
        if self.recorded:
            return ("the SGD form with the recorded learning rate, which under Adam follows retraining poorly "
                    "(step_size='adam' uses the step sizes Adam applied, recorded in training; "
                    "dit(curvature='exact') linearizes Adam itself)")
        return None

    def row_coef_np(self, steps: np.ndarray) -> np.ndarray:
        """The factor of each row (steps [R]) outside the column scale, float64 on the host:
        eta_t w_t (Run.coef_of), or w_t (Adam form)."""
        if not self.adam:
            return self._run.coef_of(steps)
        return self._run.table.update_weights[np.searchsorted(self._run.steps, steps)]

    def row_coef(self, steps: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """row_coef_np as a tensor of like's dtype and device."""
        return torch.from_numpy(np.ascontiguousarray(self.row_coef_np(steps))).to(device=like.device, dtype=like.dtype)

    def products(self, rows: Any, steps: np.ndarray, a: int, b: int, u: torch.Tensor) -> torch.Tensor:
        """[b - a, Q]: rows a..b (a block's `BlockRows`, steps [R] its rows' steps) times u^T, in the
        Adam form times (A_t u)^T per step; one product for the whole range in the SGD form."""
        if not self.adam:
            return rows.matmul(a, b, u.T)
        return torch.cat([rows.matmul(a + c, a + d, (u * self.column_scale(int(steps[a + c]), u)).T)
                          for c, d in step_segments(steps[a:b])])

    def column_scale(self, step: int, like: torch.Tensor) -> torch.Tensor | None:
        """[K]: the diagonal of A_t for `step` (Adam form), else None."""
        if not self.adam:
            return None
        key = (int(step), like.dtype, like.device)
        col = self._cache.get(key)
        if col is None:
            if len(self._cache) > 64:
                self._cache.clear()
            i = self._run.step_position(int(step))
            row = self._sizes[i]
            col = torch.full((self._run.dim,), float(self._run.table.lrs[i]), dtype=torch.float64)  # columns of no layer
            for j, (a, b) in enumerate(self._offsets):
                col[a:b] = float(row[j])
            col = self._cache[key] = col.to(device=like.device, dtype=like.dtype)
        return col

    def scaled_rows(self, steps: np.ndarray, grads: torch.Tensor) -> torch.Tensor:
        """grads with each row's columns scaled by A_t of its step (Adam form), else grads itself."""
        if not self.adam:
            return grads
        out = torch.empty_like(grads)
        for a, b in step_segments(steps):
            torch.mul(grads[a:b], self.column_scale(int(steps[a]), grads), out=out[a:b])
        return out


def step_size_form(run: Run, form: Any, curvature: bool = False) -> StepSizes:
    """StepSizes of `run` for the estimators' step_size= argument (a StepSizes passes through);
    curvature: the estimator propagates through curvature (dit fisher, dvemb)."""
    if isinstance(form, StepSizes):
        return form
    return StepSizes(run, "auto" if form is None else str(form), curvature=curvature)
