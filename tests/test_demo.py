"""The demo end to end (shrunken: 2 epochs, 300 training images) and the YAML configs through
LightningCLI: real training, real recording, a report whose numbers are sane."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest

from influence_hooks.windows import epoch_windows, resolve
import yaml

from influence_hooks.errors import ConfigurationError
from influence_hooks.demo.models import DigitsDataModule
from influence_hooks.report import WindowComparison
from influence_hooks.cli import main as report_main
from influence_hooks.cli.demo import run_lightning_cli
from influence_hooks.demo.run import demo
from influence_hooks.storage.reader import open_run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    result = demo(out, epochs=2, n_train=300, progress=False, verbose=False)
    return result, time.perf_counter() - t0


def test_shrunken_demo_runs_quickly_and_writes_every_file(small_demo):
    result, seconds = small_demo
    assert seconds < 60
    rep = result.report.parent
    for name in ("report.md", "comparison.h5", "correlation.png", "trajectories.png", "detection.png",
                 "influence_by_window.csv", "correlation.csv", "patterns.csv", "top_samples.csv", "detection.csv"):
        assert (rep / name).stat().st_size > 0, name
    text = result.report.read_text()
    assert "## Findings" in text and "flipped label" in text
    assert "## How faithful here" in text and result.validation.reproduced  # checked against retraining
    with open_run(result.run_dir) as run:
        assert run.complete and len(epoch_windows(run.table)) == 2
        assert len(run.sample_ids) == 300


def test_shrunken_demo_numbers_are_sane(small_demo):
    result, _ = small_demo
    cmp = WindowComparison.load(result.report.parent / "comparison.h5")
    full = cmp.full_correlation()
    assert np.all(np.isfinite(full)) and np.all(full >= -1 - 1e-9) and np.all(full <= 1 + 1e-9)
    np.testing.assert_allclose(np.diag(full), 1.0)
    # the corrupted mask is the data module's own flipped labels
    flipped = DigitsDataModule(n_train=300, seed=0).corrupted_mask()
    np.testing.assert_array_equal(cmp.corrupted, flipped[cmp.train_ids])
    assert cmp.corrupted.sum() == 30
    rows = list(csv.DictReader(open(result.report.parent / "detection.csv")))
    assert {r["method"] for r in rows} == {"dit_removal", "dit_accrued", "tracin", "self_influence"}
    for r in rows:
        assert 0.0 <= float(r["auroc"]) <= 1.0 and 0.0 <= float(r["precision_at_k"]) <= 1.0
    # early in training a flipped label pulls against the clean validation loss: DIT must see it
    table = cmp.detection_table()
    assert table["dit_removal"]["whole run"]["auroc"] > 0.7
    assert min(v["auroc"] for v in table["dit_removal"].values()) > 0.6
    assert sum(cmp.counts().values()) == 300
    assert len(result.findings) == 2 + 4  # patterns, correlation, one detection verdict per method


def test_cli_demo_accepts_the_shrinking_flags(tmp_path, capsys):
    code = report_main(["demo", "--out", str(tmp_path), "--epochs", "2", "--n-train", "200",
                        "--n-queries", "40", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"Report: {tmp_path / 'report' / 'report.md'}" in out and "AUROC" in out
    with open_run(tmp_path / "run") as run:
        assert len(run.sample_ids) == 200 and len(run.query_ids) == 40


def test_demo_needs_two_epochs_and_says_so_before_training(tmp_path):
    with pytest.raises(ConfigurationError, match="at least 2"):
        demo(tmp_path, epochs=1, verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ["digits.yaml", "shapes_cnn.yaml"])
def test_config_records_a_run_through_lightning_cli(config, tmp_path):
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    cb = cfg["trainer"]["callbacks"][0]
    assert cb["class_path"].startswith("influence_hooks.")
    cb["init_args"]["run_dir"] = str(tmp_path / "run")
    cfg["trainer"].update(default_root_dir=str(tmp_path / "lightning"), max_epochs=2,
                          limit_train_batches=6, enable_progress_bar=False)
    path = tmp_path / config
    path.write_text(yaml.safe_dump(cfg))
    assert run_lightning_cli(["--config", str(path)]) == 0
    with open_run(tmp_path / "run") as run:
        assert run.complete
        assert len(run.steps) == 12 and run.has_queries
        assert len(run.query_ids) == cfg["data"]["init_args"]["n_queries"]
        assert run.manifest["metadata"]["data"]["corrupted_ids"]
        assert run.optimizer["is_plain_sgd"]
