"""Subcommand of the reports: `compare`.

    influence-hooks compare RUN --epochs each [--method dit] [--corrupted auto|FILE] [--out DIR]
    influence-hooks compare RUN --windows 0:100,100:200,200:300

--corrupted auto reads the known-corrupted sample ids stored in the run's manifest, under
metadata["data"]["corrupted_ids"] (what a DataModule's influence_metadata() returns, as the
demo's do) or metadata["corrupted_ids"] (InfluenceCallback(metadata={"corrupted_ids": [...]})).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .aggregate import add_skip_corrupt, on_corrupt, parse_epochs, parse_windows, recorded_curvature


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommand `compare`."""
    p = subparsers.add_parser(
        "compare", help="compare per-sample influence across windows of training; writes a report",
        description="Per-sample influence in each window, Spearman correlations between windows, time "
                    "patterns, top proponents/opponents, and (with known-corrupted samples) detection "
                    "quality per window; written as report.md with PNG plots, CSV and HDF5.")
    p.add_argument("run", metavar="RUN", help="run directory")
    add_skip_corrupt(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--windows", default=None, metavar="T1:T2,...", type=parse_windows,
                   help="chronological half-open step windows, e.g. 0:100,100:200,200:300")
    g.add_argument("--epochs", default=None, metavar="each|E,E1:E2,...", type=parse_epochs,
                   help="'each' (default: one window per epoch) or a comma list of epochs E / ranges E1:E2")
    p.add_argument("--method", choices=("dit", "tracin", "dvemb"), default="dit",
                   help="estimator of the per-window influence (default dit)")
    p.add_argument("--mode", choices=("removal", "accrued"), default=None,
                   help="--method dit only (an error with another method): removal (query at each window "
                        "end; default) or accrued")
    p.add_argument("--curvature", default=None,
                   help="DIT curvature, for --method dit and the DIT detection scores: fisher (default) or "
                        "none (exact / ggn: Python only); an error where nothing DIT is computed")
    p.add_argument("--query", default="mean",
                   help="'mean' (the query set's mean loss, default), a query position, or positions a,b,c")
    p.add_argument("--corrupted", default="auto", metavar="auto|none|FILE",
                   help="known-corrupted samples for detection quality: 'auto' (default: the ids in the run's "
                        "manifest under metadata.data.corrupted_ids, as a DataModule's influence_metadata() "
                        "stores them, or metadata.corrupted_ids, as InfluenceCallback(metadata={'corrupted_ids': "
                        "[...]}) does; no detection if there are none), 'none', or a file of sample ids "
                        "(text: ids separated by commas/whitespace; .npy: ids or a bool mask over the run's "
                        "sorted sample ids)")
    p.add_argument("--detection", default="dit,tracin,self_influence",
                   help="scores evaluated for detection (comma list of dit, dit_removal, dit_accrued, "
                        "tracin, self_influence, dvemb)")
    p.add_argument("--no-whole-run", action="store_true", help="skip the whole-run column")
    p.add_argument("--top-k", type=int, default=10, help="proponents/opponents listed per window")
    p.add_argument("--precision-k", type=int, default=None,
                   help="k of precision@k (default: the number of corrupted samples)")
    p.add_argument("--tau", type=float, default=1.0, help="threshold of the time patterns: a window counts "
                   "for a sample when |influence| >= tau x the window's RMS influence (default 1; a "
                   "threshold on size, not a statistical test)")
    p.add_argument("--concentration", type=float, default=0.7,
                   help="share of influence mass in one half that makes a sample early-/late-important")
    p.add_argument("--out", default=None, help="report directory (default RUN/report)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a report already in the report directory (refused otherwise)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare, distributed=True)


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
    from ..report import PatternRules, compare_windows
    from ..storage.reader import open_run

    if args.curvature is not None:
        recorded_curvature(args.curvature)
    out = Path(args.out) if args.out else Path(args.run) / "report"
    if (out / "report.md").exists() and not args.overwrite:
        raise ConfigurationError(f"{out} already holds a report (report.md); pass --overwrite to replace it, "
                                 "or --out DIR to write elsewhere.")
    run = open_run(args.run, on_corrupt=on_corrupt(args))
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
        rules=PatternRules(tau=args.tau, concentration=args.concentration), progress=not args.quiet,
        group=getattr(args, "group", None), **kw)
    if getattr(args, "rank", 0) != 0:  # under torchrun every rank has the comparison; one writes it
        return 0
    report = cmp.write_report(out)
    print(cmp.summary())
    if cmp.corrupted is None and args.corrupted == "auto":
        print("  (no corrupted ids in the run's metadata: pass --corrupted FILE for detection quality)")
    print(f"report: {report}")
    return 0
