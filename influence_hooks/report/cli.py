"""Command-line subcommands of the reports: `compare`, `demo` and `fit` (LightningCLI).

    influence-hooks compare RUN --epochs each [--method dit] [--corrupted auto|FILE] [--out DIR]
    influence-hooks compare RUN --windows 0:100,100:200,200:300
    influence-hooks demo [--out DIR]
    influence-hooks fit --config configs/digits.yaml      # LightningCLI: train and record a run

`add_commands(subparsers)` adds them; each sets `func(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..aggregate.cli import parse_epochs, parse_windows
from ..errors import ConfigurationError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommands `compare`, `demo` and `fit`."""
    p = subparsers.add_parser(
        "compare", help="compare per-sample influence across windows of training; writes a report",
        description="Per-sample influence in each window, Spearman correlations between windows, time "
                    "patterns, top proponents/opponents, and (with known-corrupted samples) detection "
                    "quality per window; written as report.md with PNG plots, CSV and HDF5.")
    p.add_argument("run", metavar="RUN", help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--windows", default=None, metavar="T1:T2,...", type=parse_windows,
                   help="chronological half-open step windows, e.g. 0:100,100:200,200:300")
    g.add_argument("--epochs", default=None, metavar="each|E,E1:E2,...", type=parse_epochs,
                   help="'each' (default: one window per epoch) or a comma list of epochs E / ranges E1:E2")
    p.add_argument("--method", choices=("dit", "tracin", "dvemb"), default="dit",
                   help="estimator of the per-window influence (default dit)")
    p.add_argument("--mode", choices=("removal", "accrued"), default="removal",
                   help="DIT notion: removal (query at each window end) or accrued (default removal)")
    p.add_argument("--curvature", default="fisher", help="DIT curvature: fisher (default) or none")
    p.add_argument("--query", default="mean",
                   help="'mean' (the query set's mean loss, default), a query position, or positions a,b,c")
    p.add_argument("--corrupted", default="auto", metavar="auto|none|FILE",
                   help="known-corrupted samples for detection quality: 'auto' (the ids stored in the run's "
                        "metadata, as the demo stores them; default), 'none', or a file of sample ids "
                        "(text: ids separated by commas/whitespace; .npy: ids or a bool mask over the run's "
                        "sorted sample ids)")
    p.add_argument("--detection", default="dit,tracin,self_influence",
                   help="scores evaluated for detection (comma list of dit, dit_removal, dit_accrued, "
                        "tracin, self_influence, dvemb)")
    p.add_argument("--no-whole-run", action="store_true", help="skip the whole-run column")
    p.add_argument("--top-k", type=int, default=10, help="proponents/opponents listed per window")
    p.add_argument("--precision-k", type=int, default=None,
                   help="k of precision@k (default: the number of corrupted samples)")
    p.add_argument("--tau", type=float, default=1.0, help="significance threshold of the time patterns, "
                   "in units of the window's RMS influence (default 1)")
    p.add_argument("--concentration", type=float, default=0.7,
                   help="share of influence mass in one half that makes a sample early-/late-important")
    p.add_argument("--out", default=None, help="report directory (default RUN/report)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    from .demo import DEFAULTS
    p = subparsers.add_parser(
        "demo", help="train a small model on noisy digits, record it, and write the window report",
        description="Trains an MLP on scikit-learn's digits with 10% flipped labels while recording, "
                    "computes per-epoch influence and writes a report (under 5 minutes on a CPU).")
    p.add_argument("--out", default="influence_demo", help="output directory (default ./influence_demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    quick = p.add_argument_group("smaller or different runs (for quick checks)")
    quick.add_argument("--epochs", type=int, default=None, help=f"epochs (default {DEFAULTS['epochs']})")
    quick.add_argument("--n-train", dest="n_train", type=int, default=None,
                       help="training samples (default: all 1497 not held out)")
    quick.add_argument("--n-queries", dest="n_queries", type=int, default=None,
                       help=f"validation queries (default {DEFAULTS['n_queries']})")
    quick.add_argument("--label-noise", dest="label_noise", type=float, default=None,
                       help=f"fraction of flipped training labels (default {DEFAULTS['label_noise']})")
    quick.add_argument("--lr", type=float, default=None, help=f"SGD learning rate (default {DEFAULTS['lr']})")
    quick.add_argument("--seed", type=int, default=None, help=f"seed (default {DEFAULTS['seed']})")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser(
        "fit", help="LightningCLI: train and record, e.g. fit --config configs/digits.yaml",
        description="Runs LightningCLI's fit with the remaining arguments (see fit --help).",
        add_help=False, prefix_chars="+")  # '+': every '-'/'--' argument belongs to LightningCLI
    p.add_argument("lightning_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: run_lightning_cli(args.lightning_args))


# ---------------------------------------------------------------------- compare
def parse_query(text: str) -> Any:
    if text == "mean":
        return "mean"
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigurationError(f"--query takes 'mean', a query position or a comma list of them, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def read_corrupted(spec: str) -> Any:
    """'auto' / 'none' / a file of ids (text or .npy; a .npy bool array is taken as a mask)."""
    if spec in ("auto", "none"):
        return None if spec == "none" else "auto"
    path = Path(spec)
    if not path.is_file():
        raise ConfigurationError(f"--corrupted: no file {spec!r} (give 'auto', 'none' or a file of sample ids)")
    if path.suffix == ".npy":
        return np.load(path)
    text = "\n".join(l.split("#", 1)[0] for l in path.read_text().splitlines())
    try:
        return np.array([int(t) for t in text.replace(",", " ").split()], np.int64)
    except ValueError:
        raise ConfigurationError(f"--corrupted {spec}: expected integer sample ids separated by commas or "
                                 "whitespace") from None


def cmd_compare(args: argparse.Namespace) -> int:
    from ..storage.reader import open_run
    from .compare import PatternRules, compare_windows

    run = open_run(args.run)
    kw: dict[str, Any] = {}
    if args.windows:
        kw["windows"] = args.windows
    elif args.epochs:
        kw["epochs"] = args.epochs
    cmp = compare_windows(
        run, method=args.method, mode=args.mode, curvature=args.curvature, query=parse_query(args.query),
        corrupted=read_corrupted(args.corrupted),
        detection_methods=tuple(m.strip() for m in args.detection.split(",") if m.strip()),
        whole_run=not args.no_whole_run, top_k=args.top_k, precision_k=args.precision_k,
        rules=PatternRules(tau=args.tau, concentration=args.concentration), progress=not args.quiet, **kw)
    out = Path(args.out) if args.out else Path(args.run) / "report"
    report = cmp.write_report(out)
    print(cmp.summary())
    if cmp.corrupted is None and args.corrupted == "auto":
        print("  (no corrupted ids in the run's metadata: pass --corrupted FILE for detection quality)")
    print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULTS, demo

    settings = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    demo(args.out, progress=not args.quiet, **settings)
    return 0


# ---------------------------------------------------------------------- fit
def run_lightning_cli(argv: Sequence[str]) -> int:
    """LightningCLI's `fit` with argv (e.g. ['--config', 'configs/digits.yaml']).

    Model, data and callbacks come from the config by class_path (see configs/*.yaml); with
    influence_hooks.InfluenceCallback the run directory it names is recorded.
    """
    from lightning.pytorch.cli import LightningCLI

    argv = list(argv)
    if argv[:1] == ["fit"]:
        argv = argv[1:]
    # LightningCLI reads sys.argv (passing args= as well makes it warn), so it gets ours
    saved = sys.argv
    sys.argv = ["influence-hooks", "fit", *argv]
    try:
        LightningCLI(save_config_kwargs={"overwrite": True})
    finally:
        sys.argv = saved
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """These subcommands alone (the full CLI is influence_hooks.cli.main)."""
    parser = argparse.ArgumentParser(prog="influence-hooks")
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
