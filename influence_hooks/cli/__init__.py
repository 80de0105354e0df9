"""`influence-hooks`: the command line.

One module per area adds its subcommands (`add_commands(subparsers)`): run.py (info, verify),
aggregate.py (tracin, dit, dvemb, self-influence), report.py (compare), validate.py (validate),
demo.py (demo, fit).
They import only argparse and influence_hooks.windows at module level and load torch, Lightning
and matplotlib inside the commands, so `influence-hooks --help` answers at once. Under torchrun
the aggregation commands split their work over the processes (launch.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import InfluenceHooksError


def build_parser() -> argparse.ArgumentParser:
    from . import aggregate, demo, report, run, validate

    parser = argparse.ArgumentParser(
        prog="influence-hooks",
        description="Which training samples shaped this model, and when did they matter?")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in (run, aggregate, report, validate, demo):
        area.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:  # LightningCLI parses its own arguments
        from .demo import run_lightning_cli
        return run_lightning_cli(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "distributed", False):
            from .launch import join_launched_group

            join_launched_group(args)
        return int(args.func(args) or 0)
    except InfluenceHooksError as e:
        print(f"influence-hooks {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
