"""Window comparison: each piece checked against an independent computation.

Correlations against scipy.stats.spearmanr, AUROC and precision@k against brute-force counting,
the time patterns on hand-made scores, and compare_windows' per-window scores against TracIn
summed by hand from the gradients the tiny recorded run keeps in memory.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from influence_hooks.windows import epoch_windows, resolve
import scipy.stats
import torch

from influence_hooks.cli.aggregate import parse_epochs, parse_windows
from influence_hooks.errors import ConfigurationError
from influence_hooks.report import PatternRules, WindowComparison, classify_patterns, compare_windows
from influence_hooks.cli import main as report_main
from influence_hooks.cli.report import read_corrupted
from influence_hooks.report.patterns import EARLY, FLIPPING, HARMFUL, HELPFUL, LATE, NEGLIGIBLE, PATTERNS
from influence_hooks.report.stats import detection_quality, spearman_matrix
from influence_hooks.report.render import findings
from influence_hooks.storage.reader import open_run

from helpers_runs import record_run

CORRUPTED = [1, 4, 7, 11, 15]


# ---------------------------------------------------------------------- statistics
def test_spearman_matrix_matches_scipy_pairwise_over_shared_samples():
    rng = np.random.default_rng(0)
    n, W = 60, 4
    base = rng.normal(size=n)
    scores = np.stack([base + s * rng.normal(size=n) for s in (0.1, 0.5, 1.0, 3.0)], 1)
    scores[:10, 2] = np.round(scores[:10, 2])  # ties
    present = rng.random((n, W)) > 0.15
    got = spearman_matrix(scores, present)
    for a, b in itertools.product(range(W), repeat=2):
        both = present[:, a] & present[:, b]
        want = 1.0 if a == b else scipy.stats.spearmanr(scores[both, a], scores[both, b]).statistic
        assert got[a, b] == pytest.approx(want, abs=1e-6)
    assert np.all(got <= 1) and np.all(got >= -1)


def test_spearman_matrix_is_nan_for_a_constant_window():
    s = np.stack([np.arange(10.0), np.zeros(10)], 1)
    assert np.isnan(spearman_matrix(s)[0, 1])


def brute_auroc(score, bad):
    pos, neg = score[bad], score[~bad]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])  # large scores must not saturate a sigmoid
def test_detection_auroc_and_precision_at_k_match_brute_force(scale):
    rng = np.random.default_rng(1)
    n = 80
    bad = np.zeros(n, bool)
    bad[rng.choice(n, 12, replace=False)] = True
    score = (rng.normal(size=n) + 1.2 * bad) * scale
    score[:6] = score[6]  # a tie across the classes
    for k in (5, 12, 30):
        auroc, prec = detection_quality(score, bad, k)
        assert auroc == pytest.approx(brute_auroc(score, bad), abs=1e-6)  # torchmetrics: float32
        top = np.argsort(-score, kind="stable")[:k]
        ranked = np.sort(score)[::-1]
        if ranked[k - 1] > ranked[k]:  # no tie at the cut, so the top k are well defined
            assert prec == pytest.approx(bad[top].mean())


def test_detection_precision_at_k_without_ties():
    score = np.array([9.0, 8, 7, 6, 5, 4, 3, 2])
    bad = np.array([1, 0, 1, 0, 0, 0, 0, 1], bool)
    auroc, prec = detection_quality(score, bad, 3)
    assert prec == pytest.approx(2 / 3)
    assert auroc == pytest.approx(brute_auroc(score, bad))


def test_detection_is_nan_without_both_classes():
    assert all(np.isnan(detection_quality(np.arange(5.0), np.zeros(5, bool), 2)))


# ---------------------------------------------------------------------- patterns
def test_time_patterns_on_hand_made_scores():
    # 4 windows: early half = windows 0-1, late half = windows 2-3; global scale keeps it readable
    rows = {
        HELPFUL: [2.0, 2.0, 2.0, 2.0],
        HARMFUL: [-2.0, -1.5, -2.0, -2.5],
        EARLY: [4.0, 3.0, 0.1, 0.0],
        LATE: [0.0, -0.2, -3.0, -4.0],          # late and harmful is still late-important
        FLIPPING: [3.0, 1.0, -1.0, -3.0],
        NEGLIGIBLE: [0.1, -0.2, 0.05, 0.0],
    }
    scores = np.array(list(rows.values()))
    scale = np.sqrt((scores ** 2).mean())
    got = classify_patterns(scores, rules=PatternRules(tau=0.3, concentration=0.7, scale="global"))
    assert list(got) == list(rows), (got, scale)


def test_time_patterns_rules_in_units_of_the_scale():
    # the same profile is negligible or not depending on tau relative to the RMS
    scores = np.array([[1.0, 1.0], [0.2, 0.2], [1.0, -1.0]])
    loose = classify_patterns(scores, rules=PatternRules(tau=0.1, scale="global"))
    strict = classify_patterns(scores, rules=PatternRules(tau=5.0, scale="global"))
    assert list(loose) == [HELPFUL, HELPFUL, FLIPPING]
    assert list(strict) == [NEGLIGIBLE] * 3
    # scaling every score leaves the patterns alone
    assert list(classify_patterns(scores * 1e6, rules=PatternRules(tau=0.1, scale="global"))) == list(loose)


def test_window_scale_compares_each_window_with_its_own_typical_sample():
    # window 1 is 100x smaller for everyone; per-window scaling removes that common decay
    rng = np.random.default_rng(2)
    s = np.abs(rng.normal(size=(50, 2))) + 0.5
    s[:, 1] *= 0.01
    assert (classify_patterns(s, rules=PatternRules(tau=0.5, scale="global")) == EARLY).mean() > 0.9
    assert (classify_patterns(s, rules=PatternRules(tau=0.5, scale="window")) == EARLY).mean() < 0.5


def test_pattern_rules_are_validated():
    with pytest.raises(ConfigurationError):
        PatternRules(tau=0)
    with pytest.raises(ConfigurationError):
        PatternRules(concentration=0.4)
    with pytest.raises(ConfigurationError):
        PatternRules(scale="median")


# ---------------------------------------------------------------------- compare_windows on a real run
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "run"
    rec = record_run(path, n_train=22, n_query=3, batch=6, epochs=6, query_every=1,
                     extra_manifest={"metadata": {"data": {"corrupted_ids": CORRUPTED}}})
    return rec, open_run(path)


def close(got, want):
    """Equal up to the aggregators' float32 arithmetic."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def tracin_by_hand(rec, t1, t2):
    """Mean over queries of sum_{t in [t1, t2)} coef_t g_t(i) . u_q(t), from the in-memory run."""
    out = np.zeros(len(rec.X))
    for st in rec.steps:
        if t1 <= st["step"] < t2:
            u = rec.all_query_grads[st["step"]].mean(0)
            out[st["ids"]] += st["coef"] * st["grads"] @ u
    return out


def test_compare_windows_scores_correlations_and_top_lists(recorded):
    rec, run = recorded
    cmp = compare_windows(run, epochs="each", method="tracin", corrupted=None, progress=False, top_k=4)
    wins = epoch_windows(run.table)
    assert cmp.windows == wins and cmp.labels == [f"epoch {e}" for e in range(len(wins))]
    for w, (t1, t2) in enumerate(wins):
        close(cmp.scores[:, w], tracin_by_hand(rec, t1, t2))
    close(cmp.whole_run, tracin_by_hand(rec, 0, rec.T))
    for a, b in itertools.combinations(range(len(wins)), 2):
        want = scipy.stats.spearmanr(cmp.scores[:, a], cmp.scores[:, b]).statistic
        assert cmp.correlation[a, b] == pytest.approx(want, abs=1e-6)
    for w in range(len(wins)):
        col = cmp.scores[:, w]
        ids, vals = cmp.top[w]["proponents"]
        pos = np.flatnonzero(col > 0)
        want = pos[np.argsort(-col[pos], kind="stable")][:4]
        np.testing.assert_array_equal(ids, cmp.train_ids[want])
        ids, _ = cmp.top[w]["opponents"]
        neg = np.flatnonzero(col < 0)
        np.testing.assert_array_equal(ids, cmp.train_ids[neg[np.argsort(col[neg], kind="stable")][:4]])
    assert list(cmp.patterns) == list(classify_patterns(cmp.scores, cmp.present, cmp.rules))
    assert sum(cmp.counts().values()) == len(cmp.train_ids)
    assert cmp.detection == [] and cmp.corrupted is None


def test_compare_windows_one_query_is_that_querys_column(recorded):
    rec, run = recorded
    cmp = compare_windows(run, windows=[(0, 6), (6, 14), (14, 24)], method="dit", mode="removal",
                          curvature="none", query=1, whole_run=False, progress=False)
    for w, (t1, t2) in enumerate(cmp.windows):
        u = rec.all_query_grads[t2][1]  # removal without curvature: u_q(t2) . sum coef g
        want = np.zeros(len(rec.X))
        for st in rec.steps:
            if t1 <= st["step"] < t2:
                want[st["ids"]] += st["coef"] * st["grads"] @ u
        close(cmp.scores[:, w], want)
    assert cmp.labels == ["steps 0-6", "steps 6-14", "steps 14-24"]
    assert cmp.whole_run is None
    whole = compare_windows(run, windows=[(0, 8), (8, 24)], method="tracin", progress=False)
    assert whole.labels == ["epochs 0-1", "epochs 2-5"]


def test_detection_uses_minus_influence_and_plus_self_influence(recorded):
    rec, run = recorded
    cmp = compare_windows(run, epochs="each", method="dit", corrupted="auto",
                          detection_methods=("tracin", "self_influence"), progress=False)
    bad = np.isin(cmp.train_ids, CORRUPTED)
    np.testing.assert_array_equal(cmp.corrupted, bad)
    labels = cmp.labels + ["whole run"]
    assert {r["method"] for r in cmp.detection} == {"dit_removal", "tracin", "self_influence"}
    for r in cmp.detection:
        w = labels.index(r["window"])
        res = cmp.results[r["method"]][w]
        vals = res.values.double().numpy()
        vals = vals if r["method"] == "self_influence" else -vals.mean(1)
        p = res.present.numpy()
        assert r["auroc"] == pytest.approx(brute_auroc(vals[p], bad[p]), abs=1e-6)
        k = len(CORRUPTED)
        top = np.argsort(-vals[p], kind="stable")[:k]
        assert r["precision_at_k"] == pytest.approx(bad[p][top].mean())
        assert r["k"] == k
    # the same mask given as ids or as a boolean array
    by_ids = compare_windows(run, epochs="each", corrupted=np.array(CORRUPTED), detection_methods=(),
                             progress=False)
    by_mask = compare_windows(run, epochs="each", corrupted=bad, detection_methods=(), progress=False)
    assert by_ids.detection == by_mask.detection
    assert [f.claim for f in findings(cmp)][-1].startswith("The late")


def test_comparison_round_trips_through_hdf5_and_writes_a_report(recorded, tmp_path):
    _, run = recorded
    cmp = compare_windows(run, epochs="each", corrupted="auto", progress=False)
    report = cmp.write_report(tmp_path / "rep", title="tiny")
    for name in ("report.md", "comparison.h5", "correlation.png", "trajectories.png", "detection.png",
                 "influence_by_window.csv", "correlation.csv", "patterns.csv", "top_samples.csv", "detection.csv"):
        assert (tmp_path / "rep" / name).stat().st_size > 0, name
    text = report.read_text()
    for png in ("correlation.png", "trajectories.png", "detection.png"):
        assert f"]({png})" in text
    back = WindowComparison.load(tmp_path / "rep" / "comparison.h5")
    for name in ("scores", "present", "correlation", "whole_run", "whole_run_correlation", "z", "corrupted"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cmp, name))
    assert list(back.patterns) == list(cmp.patterns)
    assert back.detection == cmp.detection and back.labels == cmp.labels
    for a, b in zip(back.top, cmp.top):
        np.testing.assert_array_equal(a["proponents"][0], b["proponents"][0])
    csv = (tmp_path / "rep" / "correlation.csv").read_text().splitlines()
    assert len(csv) == len(cmp.labels) + 2  # header + windows + whole run


def test_compare_windows_rejects_bad_input(recorded):
    _, run = recorded
    with pytest.raises(ConfigurationError):
        compare_windows(run, windows=[(8, 16), (0, 8)], progress=False)
    with pytest.raises(ConfigurationError):
        compare_windows(run, windows=[(0, 8)], progress=False)
    with pytest.raises(ConfigurationError):
        compare_windows(run, method="influence", progress=False)
    with pytest.raises(ConfigurationError):
        compare_windows(run, corrupted=np.zeros(3, bool), progress=False)


# ---------------------------------------------------------------------- command line
def test_cli_parsers(tmp_path):
    assert parse_epochs("each") == "each"
    assert parse_epochs("0, 2:4") == [0, (2, 4)]
    assert parse_windows("0:8,8:16") == [(0, 8), (8, 16)]
    f = tmp_path / "bad.txt"
    f.write_text("# flipped\n3, 5\n8\n")
    np.testing.assert_array_equal(read_corrupted(str(f)), [3, 5, 8])
    assert read_corrupted("auto") == "auto" and read_corrupted("none") is None
    with pytest.raises(ConfigurationError):
        read_corrupted(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("option, value, forms", [
    ("--epochs", "each,3", "'each' alone"), ("--epochs", "0:1:2", "E1:E2"), ("--windows", "0-8", "T1:T2")])
def test_cli_compare_malformed_windows_or_epochs_are_usage_errors(tmp_path, capsys, option, value, forms):
    with pytest.raises(SystemExit) as exc:
        report_main(["compare", str(tmp_path), option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {value!r}: expected" in err and forms in err


def test_cli_compare_writes_the_report(recorded, tmp_path, capsys):
    _, run = recorded
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, CORRUPTED)))
    code = report_main(["compare", str(run.path), "--windows", "0:8,8:16,16:24", "--method", "tracin",
                        "--corrupted", str(ids), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "report:" in out and "AUROC" in out
    back = WindowComparison.load(tmp_path / "out" / "comparison.h5")
    assert back.windows == [(0, 8), (8, 16), (16, 24)] and back.method == "tracin"
    assert set(PATTERNS) >= set(back.patterns)


def test_compare_windows_with_data_value_embeddings_matches_removal_at_the_end(recorded, tmp_path):
    # DVEmb scores removal from each window evaluated at T: dit(eval_step='final') by another road
    from influence_hooks.aggregate import dit

    _, run = recorded
    cmp = compare_windows(run, epochs="each", method="dvemb", dvemb_path=tmp_path / "emb.h5", progress=False)
    for w, win in enumerate(cmp.windows):
        want = dit(run, window=win, mode="removal", curvature="fisher", eval_step="final", progress=False)
        close(cmp.scores[:, w], want.mean_over_queries().values.double().numpy())


def test_compare_windows_on_an_interrupted_run_ends_the_last_window_at_its_last_query(tmp_path):
    import torch.nn.functional as F
    from torch import nn

    from influence_hooks import GradientRecorder, open_run

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = GradientRecorder(tmp_path / "run", model, projection="none", queries=(x[:5], y[:5]),
                           query_loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    for epoch in range(3):
        for k in range(3):
            ids = torch.arange(8 * k, 8 * k + 8)
            rec.begin_micro_batch(ids)
            F.cross_entropy(model(x[ids]), y[ids]).backward()
            rec.end_step(opt, epoch=epoch, epoch_end=k == 2)
            opt.step()
            opt.zero_grad()
    rec.close(complete=False)  # interrupted: no query gradients at the end of training
    run = open_run(tmp_path / "run")
    assert not run.complete and 9 not in run.query_steps
    with pytest.warns(RuntimeWarning, match="ends at step 8"):
        cmp = compare_windows(run, epochs="each", progress=False, detection_methods=())
    assert cmp.windows[-1] == (6, 8)
    assert np.all(np.abs(np.asarray(cmp.correlation)) <= 1 + 1e-6)
