"""Subcommand `validate`: score the influence methods against retraining, with the LightningCLI
config the run was trained with.

    influence-hooks validate --config configs/digits.yaml                 # the run the config records
    influence-hooks validate runs/digits --config configs/digits.yaml --epochs 0,9 --budget-seconds 60
"""

from __future__ import annotations

import argparse

from ..errors import ConfigurationError
from .aggregate import parse_epochs, parse_windows, window_args

METHODS = "tracin,dit_none,dit_fisher,dit_exact,dvemb"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommand `validate`."""
    p = subparsers.add_parser(
        "validate", help="how far can the scores be trusted? compare each method with actual retraining",
        description="Retrains windows of a recorded run from its checkpoints, leaving training samples out "
                    "(one at a time, and random subsets for the linear datamodeling score), and reports how "
                    "well each method's scores agree. Needs a run recorded with checkpoint_every_n_steps and "
                    "the LightningCLI config it was trained with. Writes RUN/validate/report.md.")
    p.add_argument("run", metavar="RUN", nargs="?", default=None,
                   help="run directory (default: the InfluenceCallback's run_dir in the config)")
    p.add_argument("--config", required=True, help="the LightningCLI config the run was trained with")
    p.add_argument("--methods", default=METHODS,
                   help=f"comma list among tracin, dit_none, dit_fisher, dit_ggn, dit_exact, dvemb (default {METHODS})")
    p.add_argument("--window", action="append", default=None, metavar="T1:T2", type=parse_windows,
                   help="windows to retrain (default: an early, a middle and a late epoch)")
    p.add_argument("--epochs", action="append", default=None, metavar="E1:E2", type=parse_epochs,
                   help="epochs to retrain, as the aggregators take them")
    p.add_argument("--samples", type=int, default=64, help="samples left out one at a time per window (default 64)")
    p.add_argument("--eval-at", choices=("window_end", "final"), default="window_end",
                   help="compare query losses at the window end (default) or at the end of training")
    p.add_argument("--lds", choices=("both", "run", "windows", "none"), default="both",
                   help="linear datamodeling score over subsets of the whole run, of each window, both, or none")
    p.add_argument("--lds-subsets", type=int, default=50, help="random subsets per LDS scope (default 50)")
    p.add_argument("--lds-fraction", type=float, default=0.5, help="fraction of samples a subset keeps (default 0.5)")
    p.add_argument("--queries", type=int, default=32, help="queries compared, a random subset (default 32; 0: all)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-steps", type=int, default=None,
                        help="most retraining model-steps (one optimizer step of one model each)")
    budget.add_argument("--budget-seconds", type=float, default=None, help="most seconds of retraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", choices=("raise", "warn"), default="raise",
                   help="when retraining does not reproduce the run: stop (default) or go on with a warning")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest relative parameter error at a checkpoint (default 1000 x machine epsilon)")
    p.add_argument("--out", default="validate", help="report directory, relative to RUN (default RUN/validate)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in the report directory")
    p.add_argument("--device", default=None, help="e.g. cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; small models retrain fastest with 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    import torch

    from ..validation import validate
    from ..validation.api import report_dir
    from ..validation.sources import setup_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    wins = window_args(args)
    opts = {"windows": [wins["window"]] if "window" in wins else wins["windows"]} if (
        "window" in wins or "windows" in wins) else ({"epochs": wins["epochs"]} if "epochs" in wins else {})
    run, sources = setup_from_config(args.config, args.run)
    with run:
        out = report_dir(run.path, args.out)
        if (out / "report.md").exists() and not args.overwrite:  # checked before hours of retraining
            raise ConfigurationError(f"{out} already holds a validation report (report.md); pass --overwrite to "
                                     "replace it, or --out DIR to write elsewhere.")
        v = validate(run, **sources, out=args.out, methods=[m for m in args.methods.split(",") if m.strip()],
                     samples=args.samples, eval_at=args.eval_at, lds=args.lds, lds_subsets=args.lds_subsets,
                     lds_fraction=args.lds_fraction, n_queries=args.queries or None, budget_steps=args.budget_steps,
                     budget_seconds=args.budget_seconds, seed=args.seed, check=args.check, tolerance=args.tolerance,
                     device=args.device, progress=not args.quiet, **opts)
    return 0 if v.reproduced else 1
