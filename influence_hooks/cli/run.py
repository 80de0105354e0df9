"""Subcommands about a recorded run itself: `info` and `verify`."""

from __future__ import annotations

import argparse
import json
import warnings

from ..errors import short_list
from .aggregate import add_skip_corrupt, on_corrupt


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summary of a recorded run")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_skip_corrupt(p)
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("verify", help="read every file in full, checking its checksums, and report problems: "
                                      "damaged or missing files, disagreements between shards and rank files "
                                      "(exit 1 if any; an interrupted run is noted, not a problem)")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_verify)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from ..aggregate.notes import run_notes
    from ..storage.reader import open_run

    with warnings.catch_warnings():  # what open_run warns about is printed below
        warnings.simplefilter("ignore", RuntimeWarning)
        run = open_run(args.run, on_corrupt=on_corrupt(args))
    info = run.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    status = "complete" if info["complete"] else "INCOMPLETE (interrupted or still running)"
    if info["gaps"]:
        status += f", NOT WHOLE: {len(info['gaps'])} finished file(s) missing (see below)"
    rng = info["step_range"]
    print(f"run        {info['path']}  ({info['run_id']})")
    print(f"status     {status}")
    print(f"steps      {info['steps']}" + (f"  [{rng[0]}..{rng[1]}]" if rng else "")
          + (f"  epochs {info['epochs'][0]}..{info['epochs'][-1]}" if info["epochs"] else ""))
    print(f"samples    {info['samples']} distinct, {info['rows']} sample-steps")
    print(f"gradient   {info['dim']} dims stored as {info['storage_dtype']}")
    print(f"optimizer  {info['optimizer']}   precision {info['precision']}")
    print(f"queries    {info['queries']} queries at {info['query_steps']} steps")
    print(f"params     {info['snapshots']} snapshots, {info['checkpoints']} checkpoints")
    print(f"disk       {format_bytes(info['size_bytes'])} in {info['shards']} shards")
    if info["nonfinite_steps"]:
        print(f"non-finite {len(info['nonfinite_steps'])} flagged steps: {info['nonfinite_steps'][:10]}")
    if info["nonfinite_query_steps"]:
        print(f"non-finite query gradients flagged at {len(info['nonfinite_query_steps'])} steps: "
              f"{info['nonfinite_query_steps'][:10]}")
    if info["skipped_shards"]:
        print(f"skipped    {len(info['skipped_shards'])} unreadable shards: {info['skipped_shards']}")
    for gap in info["gaps"]:
        print(f"MISSING    {gap}")
    for problem in info["inconsistencies"]:
        print(f"PROBLEM    {problem}")
    print("layers")
    width = max(len(l["name"]) for l in info["layers"])
    for l in info["layers"]:
        print(f"  {l['name']:<{width}}  {l['rule']:<12} grad {l['grad_dim']:>9} -> {l['dim']:>6} ({l['projection']})")
    for note in run_notes(run):
        print(f"note       {note}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..storage.reader import Run

    with warnings.catch_warnings():  # every problem is printed below
        warnings.simplefilter("ignore", RuntimeWarning)
        run = Run(args.run, on_corrupt="skip", read_whole=False)  # verify() reads every file whole
    problems = run.verify(require_complete=False)
    for p in problems:
        print(f"PROBLEM  {p}")
    if not run.complete:  # interrupted is not damaged: what was written is checked above
        print("NOTE  the run is incomplete (training did not finish or was interrupted)")
        for p in run.rank_progress():
            if not p["complete"]:
                where = (f"stopped after step {p['last_step']}" if p["last_step"] is not None
                         else "stopped before finishing a shard")
                print(f"NOTE  rank {p['rank']} {where} ({p['shards']} finished shard(s))")
        partial = run.partial_steps()
        if len(partial):
            print(f"NOTE  step(s) {short_list(partial)} hold rows of fewer than the run's {run.world_size} ranks "
                  "(part of their global batch); aggregators use what there is and say so")
    if problems:
        print(f"{len(problems)} problem(s) in {args.run}")
        return 1
    sums = ("with matching checksums" if run.manifest.get("format_version", 1) >= 2
            else "(a format-1 run: it has no checksums)")
    print(f"OK  {args.run}: {len(run.steps)} steps, every shard and parameter file is there and reads in full {sums}")
    return 0
