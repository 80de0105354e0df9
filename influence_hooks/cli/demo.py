"""Subcommands that train: `demo` (the digits demo) and `fit` (LightningCLI with a config).

    influence-hooks demo [--out DIR]
    influence-hooks fit --config configs/digits.yaml
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..demo.settings import DEFAULTS

SHRINKING = ("epochs", "n_train", "n_queries", "label_noise", "lr", "seed")  # settings with a flag


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommands `demo` and `fit`."""
    p = subparsers.add_parser(
        "demo", help="train a small model on noisy digits, record it, and write the window report",
        description="Trains an MLP on scikit-learn's digits with 10% flipped labels while recording, "
                    "computes per-epoch influence and writes a report (well under a minute on a CPU).")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.run import demo

    settings = {k: getattr(args, k) for k in SHRINKING if getattr(args, k, None) is not None}
    demo(args.out, progress=not args.quiet, **settings)
    return 0


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
