"""The aggregators against independent brute-force computations (README, "Which samples mattered, and when").

Runs are tiny (a 2-layer MLP, float64, plain SGD, exact per-sample gradients from torch.func,
projection 'none'), so every estimator can be written as explicit loops over steps and samples
with dense K x K matrices, and compared to 1e-8.
"""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import pytest
import torch

from helpers_runs import record_run
from influence_hooks.aggregate import (CurvatureOperator, DataValueEmbeddings, InfluenceScores, dit, dvemb,
                                       self_influence, tracin)
from influence_hooks.cli import aggregate as agg_cli
from influence_hooks.errors import (ConfigurationError, InfluenceHooksError,
                                    MissingDataError, ProjectionMismatchError, RunDirectoryError, WindowError)
from influence_hooks.storage.reader import open_run

F64 = dict(dtype=torch.float64, progress=False, chunk_rows=9)  # small blocks: many block boundaries
TOL = 1e-8


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """22 samples, batches of 6 (last one 4), 6 epochs = 24 steps, queries at every step and T."""
    return record_run(tmp_path_factory.mktemp("agg") / "run")


@pytest.fixture(scope="module")
def run(rec):
    with open_run(rec.path) as r:
        yield r


@pytest.fixture(scope="module")
def rec_cp(tmp_path_factory):
    """Queries only every 5 steps from step 2 on (2, 7, 12, ...), and at T."""
    return record_run(tmp_path_factory.mktemp("agg_cp") / "run", query_every=5, query_from=2)


# ---------------------------------------------------------------------- brute force
def row(ids_all, i):
    return int(np.searchsorted(ids_all, i))


def brute_tracin(rec, ids_all, t1, t2, query_of_step):
    Q = len(rec.Xq)
    S = np.zeros((len(ids_all), Q))
    for st in rec.steps:
        if t1 <= st["step"] < t2 and not st["skipped"]:
            u = query_of_step(st["step"])
            for i, g in zip(st["ids"], st["grads"]):
                for q in range(Q):
                    S[row(ids_all, i), q] += st["coef"] * float(g @ u[q])
    return S


def brute_self_influence(rec, ids_all, t1, t2):
    S = np.zeros(len(ids_all))
    for st in rec.steps:
        if t1 <= st["step"] < t2:
            for i, g in zip(st["ids"], st["grads"]):
                S[row(ids_all, i)] += st["coef"] * float(g @ g)
    return S


def fisher_matrix(st):
    """Dense empirical Fisher of the batch: (1/|B|) sum g g^T."""
    K = st["grads"].shape[1]
    H = np.zeros((K, K))
    for g in st["grads"]:
        H += np.outer(g, g)
    return H / len(st["ids"])


def brute_removal(rec, ids_all, t1, t2, te, curvature):
    """u <- u_q(te); for t = te-1 .. t1: score if t < t2; u <- u - lr H_t u."""
    U = rec.all_query_grads[te].T.copy()  # [K, Q]
    S = np.zeros((len(ids_all), U.shape[1]))
    for t in range(te - 1, t1 - 1, -1):
        st = rec.steps[t]
        if t < t2:
            for i, g in zip(st["ids"], st["grads"]):
                S[row(ids_all, i)] += st["coef"] * (g @ U)
        if curvature == "fisher":
            U = U - st["lr"] * fisher_matrix(st) @ U
    return S


def brute_dvemb(rec, blocks=None):
    """{(step, sample): emb_t(i)} with dense M (masked to blocks if block-diagonal)."""
    K = rec.steps[0]["grads"].shape[1]
    mask = np.ones((K, K))
    if blocks is not None:
        mask = np.zeros((K, K))
        for s in blocks:
            mask[s, s] = 1
    M = np.zeros((K, K))
    emb = {}
    for st in reversed(rec.steps):
        step_embs = [st["coef"] * (np.eye(K) - M) @ g for g in st["grads"]]
        for i, e, g in zip(st["ids"], step_embs, st["grads"]):
            emb[(st["step"], int(i))] = e
            M = M + mask * np.outer(e, g)
    return emb


def assert_close(a, b, tol=TOL):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.max(np.abs(a - b), initial=0.0) <= tol * max(1.0, np.max(np.abs(b), initial=0.0)), np.max(np.abs(a - b))


# ---------------------------------------------------------------------- TracIn / self-influence
def test_tracin_with_every_step_queries_matches_bruteforce(rec, run):
    for w in [(0, 24), (5, 17), (23, 24)]:
        s = tracin(run, window=w, **F64)
        assert_close(s.to_numpy(), brute_tracin(rec, run.sample_ids, *w, lambda t: rec.queries[t]))
        assert s.method == "tracin" and not s.meta["tracincp"]
        assert not any("TracInCP" in n for n in s.approximations)
        assert list(s.query_ids) == [100, 101, 102] and s.window == w


def test_tracincp_uses_latest_earlier_query_step_and_says_so(rec_cp):
    with open_run(rec_cp.path) as run:
        assert list(run.query_steps[:3]) == [2, 7, 12]
        s = tracin(run, window=(2, 24), **F64)
        latest = lambda t: rec_cp.queries[max(q for q in rec_cp.queries if q <= t)]  # noqa: E731
        assert_close(s.to_numpy(), brute_tracin(rec_cp, run.sample_ids, 2, 24, latest))
        assert s.meta["tracincp"] and any("TracInCP" in n for n in s.approximations)


def test_tracin_before_first_query_step_errors_or_uses_first(rec_cp):
    with open_run(rec_cp.path) as run:
        with pytest.raises(MissingDataError, match="before the first recorded query step 2"):
            tracin(run, window=(0, 10), **F64)
        s = tracin(run, window=(0, 10), before_first_query="use_first", **F64)
        first_or_latest = lambda t: rec_cp.queries[max([q for q in rec_cp.queries if q <= t] or [2])]  # noqa: E731
        assert_close(s.to_numpy(), brute_tracin(rec_cp, run.sample_ids, 0, 10, first_or_latest))
        assert any("before the first recorded query step" in n for n in s.approximations)


def test_self_influence_matches_bruteforce(rec, run):
    si = self_influence(run, window=(3, 19), **F64)
    assert si.values.shape == (22,) and si.query_ids is None
    assert_close(si.to_numpy(), brute_self_influence(rec, run.sample_ids, 3, 19))
    assert (si.to_numpy() >= 0).all()


# ---------------------------------------------------------------------- DIT
@pytest.mark.parametrize("curvature", ["none", "fisher"])
@pytest.mark.parametrize("window,eval_step,te", [((8, 16), None, 16), ((8, 16), 20, 20), ((0, 12), "final", 24),
                                                  ((20, 24), None, 24)])
def test_dit_removal_matches_backward_recursion(rec, run, curvature, window, eval_step, te):
    d = dit(run, window=window, mode="removal", curvature=curvature, eval_step=eval_step, **F64)
    assert_close(d.to_numpy(), brute_removal(rec, run.sample_ids, *window, te, curvature))
    assert d.eval_step == te and d.curvature == curvature and d.method == "dit_removal"
    assert any(("Fisher" in n) == (curvature == "fisher") for n in d.approximations) or curvature == "none"


@pytest.mark.parametrize("curvature", ["none", "fisher"])
def test_dit_accrued_is_difference_of_prefix_removals(rec, run, curvature):
    ids = run.sample_ids
    a = dit(run, window=(10, 18), mode="accrued", curvature=curvature, **F64)
    expect = brute_removal(rec, ids, 0, 18, 18, curvature) - brute_removal(rec, ids, 0, 10, 10, curvature)
    assert_close(a.to_numpy(), expect)
    assert a.eval_step == 18 and a.method == "dit_accrued"
    # from the first step the second term vanishes: accrued == removal of the prefix
    a0 = dit(run, window=(0, 9), mode="accrued", curvature=curvature, **F64)
    assert_close(a0.to_numpy(), brute_removal(rec, ids, 0, 9, 9, curvature))


def test_dit_fisher_final_equals_dvemb(run):
    d = dit(run, window=(6, 18), curvature="fisher", eval_step="final", **F64)
    with dvemb(run, block_diagonal=False, **F64) as e:
        s = e.scores(run.query_gradients(run.final_step, dtype=torch.float64), window=(6, 18), **F64)
    assert_close(s.to_numpy(), d.to_numpy())


def test_dit_accepts_a_curvature_operator_object(rec, run):
    class DenseFisher(CurvatureOperator):
        name = "dense-fisher"

        def apply(self, batch, U, *, GU=None):
            G = batch.grads
            H = sum(torch.outer(g, g) for g in G) * batch.update_weight
            return H @ U

    d = dit(run, window=(8, 16), curvature=DenseFisher(), **F64)
    assert_close(d.to_numpy(), brute_removal(rec, run.sample_ids, 8, 16, 16, "fisher"))
    assert d.curvature == "dense-fisher"


def test_dit_query_grads_override_stands_in_for_u_at_eval_step(rec, run):
    u = torch.tensor(rec.all_query_grads[16])
    d = dit(run, window=(8, 16), query_grads=u, query_ids=[7, 8, 9], projection_fingerprint="none", **F64)
    assert_close(d.to_numpy(), brute_removal(rec, run.sample_ids, 8, 16, 16, "fisher"))
    assert list(d.query_ids) == [7, 8, 9]


# ---------------------------------------------------------------------- DVEmb
@pytest.mark.parametrize("block_diagonal", [False, True])
def test_dvemb_embeddings_match_bruteforce(rec, run, tmp_path, block_diagonal):
    brute = brute_dvemb(rec, rec.layer_slices if block_diagonal else None)
    with dvemb(run, path=tmp_path / "e.h5", block_diagonal=block_diagonal, **F64) as e:
        assert e.block_diagonal == block_diagonal
        assert len(e.blocks) == (2 if block_diagonal else 1)
        for w in [(0, 24), (4, 13)]:
            ids, E = e.embeddings(window=w, dtype=torch.float64)
            for i, emb in zip(ids, E.numpy()):
                expect = sum(v for (t, j), v in brute.items() if j == i and w[0] <= t < w[1])
                assert_close(emb, expect)
            u = run.query_gradients(run.final_step, dtype=torch.float64)
            s = e.scores(u, window=w, **F64)
            S = np.zeros((len(run.sample_ids), 3))
            for (t, i), v in brute.items():
                if w[0] <= t < w[1]:
                    S[row(run.sample_ids, i)] += v @ u.numpy().T
            assert_close(s.to_numpy(), S)
            assert s.eval_step == run.final_step


def test_dvemb_auto_block_diagonal_follows_memory_budget(run, tmp_path):
    K = run.dim
    with dvemb(run, path=tmp_path / "a.h5", memory_budget_mb=K * K * 8 / 2**20 * 1.01, **F64) as e:
        assert not e.block_diagonal
    with dvemb(run, path=tmp_path / "b.h5", memory_budget_mb=K * K * 8 / 2**20 * 0.99, **F64) as e:
        assert e.block_diagonal
        assert any("block-diagonal" in n for n in e.approximations)
    with pytest.raises(ConfigurationError, match="memory_budget_mb"):
        dvemb(run, path=tmp_path / "c.h5", block_diagonal=True, memory_budget_mb=1e-6, **F64)


def test_dvemb_checks_the_memory_budget_of_a_single_layer_run(tmp_path):
    # one layer: no per-layer blocks to fall back to, so a K x K M over the budget must be refused
    one = record_run(tmp_path / "logreg", kind="logreg", epochs=1)
    with open_run(one.path) as r:
        need_mb = r.dim * r.dim * 8 / 2**20
        for bd in (None, True, False):
            with pytest.raises(ConfigurationError, match=r"needs .* MB .*memory_budget_mb=.*projection.*fewer layers"):
                dvemb(r, path=tmp_path / "e.h5", block_diagonal=bd, memory_budget_mb=need_mb * 0.99, **F64)
        assert not (tmp_path / "e.h5").exists()
        with dvemb(r, path=tmp_path / "e.h5", memory_budget_mb=need_mb * 1.01, **F64) as e:
            assert not e.block_diagonal


def test_dvemb_full_M_over_budget_is_refused_and_names_block_diagonal(run, tmp_path):
    with pytest.raises(ConfigurationError, match="block_diagonal=True"):
        dvemb(run, path=tmp_path / "e.h5", block_diagonal=False, memory_budget_mb=1e-6, **F64)


def test_dvemb_default_storage_keeps_small_lr_scores_precise(tmp_path):
    # lr/|B| ~ 1e-4: float16 embeddings would be mostly subnormal and the scores off by ~6e-4
    small = record_run(tmp_path / "run", lr=1e-3, epochs=2, extra_manifest={"storage_dtype": "float16"})
    with open_run(small.path) as r:
        # brute force from the stored (float16) gradients, so only the embedding storage differs
        steps = [(b.coef, b.sample_ids.numpy(), b.grads.numpy()) for b in r.iter_steps(dtype=torch.float64)]
        K = r.dim
        M, S = np.zeros((K, K)), np.zeros((len(r.sample_ids), 3))
        u = r.query_gradients(r.final_step, dtype=torch.float64)
        for coef, ids, G in reversed(steps):
            E = [coef * (np.eye(K) - M) @ g for g in G]  # all with M of the later steps
            for i, e, g in zip(ids, E, G):
                S[row(r.sample_ids, i)] += e @ u.numpy().T
                M += np.outer(e, g)
        assert np.median(np.abs(np.concatenate([c * G for c, _, G in steps]))) < 6.1e-5  # fp16 subnormals
        with dvemb(r, path=tmp_path / "e.h5", block_diagonal=False, **F64) as emb:
            got = emb.scores(u, **F64).to_numpy()
        with h5py.File(tmp_path / "e.h5", "r") as f:
            assert f["rows/emb"].dtype == np.float32
        row_err = np.abs(got - S).max(axis=1) / np.abs(S).max(axis=1)
        assert row_err.max() < 1e-6  # ~4e-8 here; float16 storage gives ~6e-4


def test_dvemb_reopens_from_file_and_stores_a_window_only(rec, run, tmp_path):
    brute = brute_dvemb(rec)
    dvemb(run, path=tmp_path / "w.h5", window=(10, 20), **F64).close()
    with pytest.raises(RunDirectoryError, match="pass it yourself"):  # the path inside the file is not trusted
        DataValueEmbeddings.load(tmp_path / "w.h5")
    with DataValueEmbeddings.load(tmp_path / "w.h5", run=run) as e:
        assert e.window == (10, 20)
        ids, E = e.embeddings(window=(12, 15), dtype=torch.float64)
        for i, emb in zip(ids, E.numpy()):
            assert_close(emb, sum(v for (t, j), v in brute.items() if j == i and 12 <= t < 15))
        with pytest.raises(WindowError, match="outside the steps with stored embeddings"):
            e.embeddings(window=(0, 12))


def test_dvemb_default_file_is_in_the_run_directory(run):
    with dvemb(run, **F64) as e:
        assert e.path == run.path / "dvemb.h5"
        assert "full M" in repr(e)


# ---------------------------------------------------------------------- windows
def test_many_windows_in_one_pass_equal_separate_calls(run):
    wins = [(0, 8), (4, 12), (16, 24)]
    for fn, kw in [(tracin, {}), (self_influence, {}), (dit, {"curvature": "fisher"}),
                   (dit, {"curvature": "none", "eval_step": 24}), (dit, {"mode": "accrued"})]:
        many = fn(run, windows=wins, **kw, **F64)
        assert isinstance(many, list) and len(many) == 3
        for w, r in zip(wins, many):
            single = fn(run, window=w, **kw, **F64)
            assert r.window == w
            assert_close(r.to_numpy(), single.to_numpy(), 1e-12)
            assert torch.equal(r.present, single.present)
    with dvemb(run, **F64) as e:
        u = run.query_gradients(run.final_step, dtype=torch.float64)
        for w, r in zip(wins, e.scores(u, windows=wins, **F64)):
            assert_close(r.to_numpy(), e.scores(u, window=w, **F64).to_numpy(), 1e-12)


def test_epoch_windows(rec, run):
    steps_of = lambda e: [t for t, (ep, _) in enumerate(rec.schedule) if ep == e]  # noqa: E731
    e13 = (steps_of(1)[0], steps_of(2)[-1] + 1)
    s = tracin(run, epochs=(1, 3), **F64)
    assert s.window == e13
    assert_close(s.to_numpy(), tracin(run, window=e13, **F64).to_numpy(), 1e-12)
    many = dit(run, epochs=[2, (3, 5)], curvature="fisher", **F64)
    assert [r.window for r in many] == [(steps_of(2)[0], steps_of(2)[-1] + 1), (steps_of(3)[0], steps_of(4)[-1] + 1)]
    each = self_influence(run, epochs="each", **F64)
    assert len(each) == 6
    assert_close(sum(r.to_numpy() for r in each), self_influence(run, **F64).to_numpy(), 1e-12)


# ---------------------------------------------------------------------- the result type
def test_present_marks_samples_seen_in_the_window(rec, run):
    s = tracin(run, window=(0, 2), **F64)
    seen = set(rec.schedule[0][1]) | set(rec.schedule[1][1])
    assert set(s.train_ids[s.present.numpy()]) == seen
    assert len(s.train_ids) == 22  # every sample of the run, aligned across windows
    assert (s.to_numpy()[~s.present.numpy()] == 0).all()


def test_top_k_proponents_and_opponents(run):
    s = tracin(run, window=(0, 24), **F64)
    col = s.to_numpy()[:, 1]
    ids, vals = s.top_k(1, 4)
    order = np.argsort(-col)[:4]
    assert list(ids) == list(s.train_ids[order]) and np.allclose(vals, col[order]) and (vals > 0).all()
    ids, vals = s.top_k(1, 4, opponents=True)
    order = np.argsort(col)[:4]
    assert list(ids) == list(s.train_ids[order]) and (vals < 0).all()
    # only present samples, only the asked sign
    few = tracin(run, window=(0, 1), **F64)
    ids, vals = few.top_k(0, 100)
    assert len(ids) == int(((few.to_numpy()[:, 0] > 0) & few.present.numpy()).sum())
    assert set(ids) <= set(few.train_ids[few.present.numpy()])


def test_save_load_round_trip_and_csv(run, tmp_path):
    s = dit(run, window=(8, 16), curvature="fisher", eval_step=20, **F64)
    s.save(tmp_path / "s.h5")
    t = InfluenceScores.load(tmp_path / "s.h5")
    assert torch.equal(t.values, s.values) and torch.equal(t.present, s.present)
    assert (t.train_ids == s.train_ids).all() and (t.query_ids == s.query_ids).all()
    assert (t.method, t.window, t.eval_step, t.curvature, t.run_id) == (s.method, s.window, 20, "fisher", run.run_id)
    assert t.approximations == s.approximations and t.meta == s.meta
    s.to_csv(tmp_path / "s.csv")
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "train_id,present,query_100,query_101,query_102"
    back = np.array([[float(x) for x in line.split(",")] for line in lines[1:]])
    assert (back[:, 0] == s.train_ids).all() and (back[:, 1] == s.present.numpy()).all()
    assert np.array_equal(back[:, 2:], s.to_numpy())
    m = s.mean_over_queries()
    assert m.values.shape == (22,) and np.allclose(m.to_numpy(), s.to_numpy().mean(1))
    m.save(tmp_path / "m.h5")
    assert InfluenceScores.load(tmp_path / "m.h5").query_ids is None
    assert "dit_removal" in repr(s) and "query 100" in s.summary() and "proponents" in s.summary()


# ---------------------------------------------------------------------- robustness and errors
def test_nonfinite_steps_are_skipped_and_noted(tmp_path):
    with pytest.warns(RuntimeWarning, match="NaN"):
        rec = record_run(tmp_path / "run", epochs=2, nan_step=3)
    with open_run(rec.path) as run:
        s = tracin(run, **F64)
        assert_close(s.to_numpy(), brute_tracin(rec, run.sample_ids, 0, 8, lambda t: rec.queries[t]))
        assert any("non-finite" in n for n in s.approximations)


def test_incomplete_run_still_aggregates(tmp_path):
    rec = record_run(tmp_path / "run", epochs=2, complete=False)
    with open_run(rec.path) as run:
        assert not run.complete
        s = dit(run, window=(2, 6), curvature="fisher", **F64)
        assert_close(s.to_numpy(), brute_removal(rec, run.sample_ids, 2, 6, 6, "fisher"))
        assert any("incomplete" in n for n in s.approximations)
        with pytest.raises(MissingDataError, match="u_q\\(8\\)"):
            dit(run, window=(2, 6), eval_step="final", **F64)
        with dvemb(run, **F64) as e:
            assert e.final_step == 8 and any("incomplete" in n for n in e.approximations)


def test_window_errors(run):
    with pytest.raises(WindowError, match="empty"):
        tracin(run, window=(5, 5), **F64)
    with pytest.raises(WindowError, match="outside"):
        dit(run, window=(100, 200), **F64)
    with pytest.raises(WindowError, match="epochs"):
        self_influence(run, epochs=(40, 42), **F64)
    with pytest.raises(WindowError, match="windows="):
        tracin(run, window=[(0, 4), (4, 8)], **F64)
    with pytest.raises(WindowError, match="empty list"):
        tracin(run, windows=[], **F64)
    with pytest.raises(WindowError, match="not several"):
        tracin(run, window=(0, 4), epochs=(0, 1), **F64)
    with pytest.raises(WindowError, match="before the window end"):
        dit(run, window=(8, 16), eval_step=12, **F64)


def test_missing_query_errors(rec_cp, tmp_path):
    with open_run(rec_cp.path) as run:
        with pytest.raises(MissingDataError, match=r"u_q\(16\).*nearest later one is 17"):
            dit(run, window=(8, 16), **F64)
        with pytest.raises(MissingDataError, match=r"u_q\(10\)"):
            dit(run, window=(10, 17), mode="accrued", **F64)
    rec = record_run(tmp_path / "noq", epochs=1, record_queries=False)
    with open_run(rec.path) as run:
        assert not run.has_queries
        for fn in (tracin, dit):
            with pytest.raises(MissingDataError, match="needs query gradients.*has none"):
                fn(run, **F64)
        assert self_influence(run, **F64).values.shape == (run.sample_ids.size,)


def test_projection_mismatch_errors(run):
    with dvemb(run, **F64) as e:
        u = run.query_gradients(run.final_step, dtype=torch.float64)
        with pytest.raises(ProjectionMismatchError, match=f"expected \\[Q, {run.dim}\\]"):
            e.scores(u[:, :-1], **F64)
        with pytest.raises(ProjectionMismatchError, match="projection"):
            e.scores(u, projection_fingerprint="gaussian-k512-seed3", **F64)
    with pytest.raises(ProjectionMismatchError):
        dit(run, window=(8, 16), query_grads=torch.zeros(2, run.dim + 1), **F64)
    assert issubclass(ProjectionMismatchError, InfluenceHooksError)


def test_bad_method_options(run):
    with pytest.raises(ConfigurationError, match="mode"):
        dit(run, mode="leave-one-out", **F64)
    with pytest.raises(ConfigurationError, match="unknown curvature"):
        dit(run, curvature="kfac", **F64)
    with pytest.raises(ConfigurationError, match="eval_step"):
        dit(run, window=(4, 8), mode="accrued", eval_step=12, **F64)
    with pytest.raises(ConfigurationError, match="only for curvature='exact'"):
        dit(run, window=(4, 8), model=torch.nn.Linear(2, 2), **F64)


@pytest.mark.parametrize("curvature", ["exact", "ggn"])
def test_exact_curvature_without_model_and_dataset_says_what_it_needs(run, curvature):
    for given in ({}, {"model": torch.nn.Linear(2, 2)}):
        with pytest.raises(ConfigurationError, match="model=.*dataset=.*snapshots or checkpoints"):
            dit(run, window=(4, 8), curvature=curvature, **given, **F64)


def test_exact_curvature_dispatches_to_the_full_space_backend(run, monkeypatch):
    import influence_hooks.aggregate.fullspace as fullspace

    calls = []
    monkeypatch.setattr(fullspace, "exact_dit", lambda *a, **kw: calls.append((a, kw)) or ["from-backend"])
    out = dit(run, window=(4, 8), mode="accrued", curvature="exact", model="M", dataset="D", loss_fn="L", **F64)
    assert out == "from-backend"
    (args, kw), = calls
    run_, plan, curvature = args
    assert run_ is run and plan.mode == "accrued" and plan.windows == [(4, 8)] and curvature.name == "exact"
    assert [(t.start, t.end, t.eval_step) for t in plan.tasks] == [(0, 4, 4), (0, 8, 8)]
    assert kw["model"] == "M" and kw["dataset"] == "D" and kw["loss_fn"] == "L" and kw["dtype"] == torch.float64


# ---------------------------------------------------------------------- command line
def _cli(argv):
    parser = argparse.ArgumentParser()
    agg_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_subcommands(run, tmp_path, capsys):
    p = str(run.path)
    assert _cli(["tracin", p, "--window", "0:12", "--quiet", "--dtype", "float64", "--out", str(tmp_path / "t.h5"),
                 "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "tracin, steps [0, 12)" in out and "proponents" in out and "opponents" in out
    t = InfluenceScores.load(tmp_path / "t.h5")
    assert_close(t.to_numpy(), tracin(run, window=(0, 12), **F64).to_numpy())
    assert (tmp_path / "t.csv").exists()

    assert _cli(["dit", p, "--window", "0:8,8:16", "--window", "16:24", "--mode", "removal", "--curvature", "fisher",
                 "--eval-step", "final", "--quiet", "--dtype", "float64", "--out", str(tmp_path / "d.h5")]) == 0
    for w in [(0, 8), (8, 16), (16, 24)]:
        d = InfluenceScores.load(tmp_path / f"d-{w[0]}-{w[1]}.h5")
        assert_close(d.to_numpy(), dit(run, window=w, eval_step="final", **F64).to_numpy())

    assert _cli(["self-influence", p, "--epochs", "1:3", "--quiet"]) == 0
    assert "self_influence" in capsys.readouterr().out

    assert _cli(["dvemb", p, "--block-diagonal", "true", "--emb-path", str(tmp_path / "e.h5"), "--quiet",
                 "--dtype", "float64", "--window", "4:12", "--csv", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr().out
    assert "DataValueEmbeddings" in out and "dvemb, steps [4, 12)" in out
    assert (tmp_path / "e.csv").exists()

    with pytest.raises(SystemExit):
        _cli(["tracin", p, "--window", "0-12"])
    assert "T1:T2" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, forms", [
    ("--epochs", "each,3", "'each' alone"), ("--epochs", "1:2:3", "E1:E2"), ("--epochs", "x", "E1:E2"),
    ("--window", "0:12,5", "T1:T2"), ("--window", ",", "T1:T2")])
def test_cli_malformed_window_or_epochs_is_a_usage_error_naming_the_forms(run, capsys, option, value, forms):
    with pytest.raises(SystemExit) as exc:
        _cli(["tracin", str(run.path), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value!r}: expected" in err and forms in err and "Traceback" not in err


def test_cli_window_and_epoch_forms_become_aggregator_arguments():
    p = argparse.ArgumentParser()
    agg_cli.add_commands(p.add_subparsers(dest="command", required=True))

    def parsed(*argv):
        return agg_cli.window_args(p.parse_args(["tracin", "RUN", *argv]))

    assert parsed() == {}
    assert parsed("--window", "0:12") == {"window": (0, 12)}
    assert parsed("--window", "0:8, 8:16", "--window", "16:24") == {"windows": [(0, 8), (8, 16), (16, 24)]}
    assert parsed("--epochs", "each") == {"epochs": "each"}
    assert parsed("--epochs", "3") == {"epochs": 3}
    assert parsed("--epochs", "1:3") == {"epochs": (1, 3)}
    assert parsed("--epochs", "0,2:4") == {"epochs": [0, (2, 4)]}
    with pytest.raises(ConfigurationError, match="'each' alone"):
        parsed("--epochs", "each", "--epochs", "3")


def test_prefetched_blocks_equal_inline_blocks_and_stop_cleanly(run):
    from influence_hooks.aggregate.rows import iter_row_blocks
    kw = dict(chunk_rows=7, dtype=torch.float64)
    inline = [(b.steps.copy(), b.sample_ids.clone(), b.coef.copy(), b.grads.clone())
              for b in iter_row_blocks(run, (0, 24), reverse=True, prefetch=False, **kw)]
    ahead = [(b.steps.copy(), b.sample_ids.clone(), b.coef.copy(), b.grads.clone())
             for b in iter_row_blocks(run, (0, 24), reverse=True, prefetch=True, **kw)]
    assert len(inline) == len(ahead) > 3
    for x, y in zip(inline, ahead):
        assert (x[0] == y[0]).all() and torch.equal(x[1], y[1]) and (x[2] == y[2]).all() and torch.equal(x[3], y[3])
    it = iter_row_blocks(run, (0, 24), prefetch=True, **kw)
    next(it)
    it.close()  # an abandoned pass stops its reader thread
    import threading
    assert not any(t.name == "influence-hooks-prefetch" and t.is_alive() for t in threading.enumerate())
