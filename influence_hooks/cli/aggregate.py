"""Subcommands of the aggregators: tracin, dit, dvemb, self-influence.

`add_commands(subparsers)` adds them to an argparse parser; each sets `func`, which takes the
parsed namespace, prints a readable summary and returns an exit code.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from .. import windows as W
from ..errors import ConfigurationError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the subcommands `tracin`, `dit`, `dvemb` and `self-influence`."""
    p = _command(subparsers, "tracin", "TracIn scores of the recorded queries over a window.", _run_tracin)
    p.add_argument("--before-first-query", choices=("error", "use_first"), default="error",
                   help="steps before the first recorded query step: fail, or use that first step's queries")

    p = _command(subparsers, "dit", "Dynamic influence: window-removal or accrued influence.", _run_dit)
    p.add_argument("--mode", choices=("removal", "accrued"), default="removal")
    p.add_argument("--curvature", default="fisher",
                   help="none | fisher (default). exact / ggn recompute curvature from the model and the "
                        "training data, which a command line cannot take: Python only, dit(..., "
                        "curvature='exact', model=, dataset=, loss_fn=) (README, 'Exact curvature')")
    p.add_argument("--eval-step", default=None,
                   help="removal mode: step t_e where the query is evaluated (default: window end), or 'final'")

    p = _command(subparsers, "dvemb", "Data value embeddings; scores the queries at the end of training.",
                 _run_dvemb)
    p.add_argument("--block-diagonal", choices=("auto", "true", "false"), default="auto",
                   help="M per layer (true), full K x K (false), or full when it fits the memory budget")
    p.add_argument("--memory-budget-mb", type=float, default=1024.0)
    p.add_argument("--emb-path", default=None, help="embedding file (default RUN/dvemb.h5)")
    p.add_argument("--reuse", action="store_true", help="reuse an existing embedding file instead of recomputing")

    _command(subparsers, "self-influence", "Per-sample self-influence (flags mislabelled samples).",
             _run_self_influence)


def _command(subparsers: argparse._SubParsersAction, name: str, help: str,
             func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help, description=help)
    p.add_argument("run", metavar="RUN", help="run directory")
    add_skip_corrupt(p)
    p.add_argument("--window", action="append", default=None, metavar="T1:T2", type=parse_windows,
                   help="half-open step window; repeat it or give a comma list for many windows in one pass")
    p.add_argument("--epochs", action="append", default=None, metavar="E1:E2", type=parse_epochs,
                   help="epochs E1..E2-1 (or one epoch E, or 'each'); repeat or comma list for many")
    p.add_argument("--out", default=None,
                   help="save scores to this HDF5 file (one per window: name-T1-T2.h5). A bare file name is "
                        "written into the run directory; a path (./scores.h5, out/scores.h5) where it says")
    p.add_argument("--csv", default=None,
                   help="write scores as CSV (one per window: name-T1-T2.csv); a bare file name goes into the "
                        "run directory, a path (./scores.csv) where it says")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--step-size", choices=("auto", "adam", "sgd"), default="auto",
                   help="adam: on a run trained with Adam/AdamW, the per-layer step sizes Adam applied (recorded "
                        "in training); sgd: the learning rate; auto: adam for tracin, self-influence and dit without "
                        "curvature, sgd with curvature (dit fisher, dvemb)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per block read, which bounds memory (default 4096)")
    p.add_argument("--top", type=int, default=5, help="proponents/opponents shown per query")
    p.add_argument("--show-queries", type=int, default=3, help="queries shown in the summary")
    p.set_defaults(func=func, distributed=True)
    return p


# ---------------------------------------------------------------------- argument parsing
def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a windows parser: malformed text is a usage error naming the forms."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


parse_windows = _argparse_type(W.parse_windows_text)
parse_epochs = _argparse_type(W.parse_epochs_text)


def window_args(args: argparse.Namespace) -> dict[str, Any]:
    """The window keyword arguments for an aggregator from --window / --epochs (parsed, appended)."""
    return W.window_kwargs(args.window, args.epochs)


def add_skip_corrupt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out shards that cannot be read (every shard is read whole first, to check it); "
                        "the results name them")


def on_corrupt(args: argparse.Namespace) -> str:
    """open_run's on_corrupt for --skip-corrupt."""
    return "skip" if args.skip_corrupt else "raise"


def _common(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = dict(dtype=getattr(torch, args.dtype), device=args.device, progress=not args.quiet,
               group=getattr(args, "group", None), step_size=args.step_size)
    if args.chunk_rows is not None:
        out["chunk_rows"] = args.chunk_rows
    return out


def output_path(run_dir: str | os.PathLike, target: str) -> Path:
    """Where --out / --csv write: a bare file name ('scores.csv') goes into the run directory, next
    to what it was computed from; anything with a directory part ('./scores.csv', 'out/s.csv', an
    absolute path) is taken as given."""
    if os.sep in target or (os.altsep and os.altsep in target):
        return Path(target)
    return Path(run_dir) / target


def recorded_curvature(name: str) -> str:
    """The curvature of a command: one computed from the recording alone. 'exact' / 'ggn' need the
    model, the loss and the training data, which only the Python API can take."""
    from ..aggregate.curvature import CURVATURES, FullSpaceCurvature

    cls = CURVATURES.get(name)
    if cls is not None and issubclass(cls, FullSpaceCurvature):
        raise ConfigurationError(
            f"--curvature {name} recomputes the curvature from the model, the loss and the training "
            "samples along the window, which a command line cannot take: it is Python only, "
            f"dit(run, ..., curvature={name!r}, model=model, dataset=train_ds, loss_fn=...) (README, "
            "'Exact curvature'). From the recording alone the command line offers --curvature fisher or none.")
    if cls is None:
        raise ConfigurationError(f"unknown --curvature {name!r}; choose none or fisher.")
    return name


def _emit(args: argparse.Namespace, results: Any, run_dir: str | os.PathLike) -> int:
    if getattr(args, "rank", 0) != 0:  # under torchrun every rank has the results; one prints them
        return 0
    many = isinstance(results, list)
    for r in results if many else [results]:
        print(r.summary(k=args.top, max_queries=args.show_queries))
        print()
        for target, write in ((args.out, r.save), (args.csv, r.to_csv)):
            if target:
                path = output_path(run_dir, target)
                if many:
                    path = path.with_name(f"{path.stem}-{r.window[0]}-{r.window[1]}{path.suffix}")
                write(path)
                print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------- commands
def _open(args: argparse.Namespace) -> Any:
    from ..storage.reader import open_run

    return open_run(args.run, on_corrupt=on_corrupt(args))


def _run_tracin(args: argparse.Namespace) -> int:
    from ..aggregate import tracin

    with _open(args) as run:
        return _emit(args, tracin(run, **window_args(args), before_first_query=args.before_first_query,
                                  **_common(args)), run.path)


def _run_dit(args: argparse.Namespace) -> int:
    from ..aggregate import dit

    curvature = recorded_curvature(args.curvature)
    ev = args.eval_step
    if ev is not None and ev != "final":
        try:
            ev = int(ev)
        except ValueError:
            raise ConfigurationError(f"--eval-step is a step number or 'final', got {ev!r}") from None
    with _open(args) as run:
        return _emit(args, dit(run, **window_args(args), mode=args.mode, curvature=curvature,
                               eval_step=ev, **_common(args)), run.path)


def _run_self_influence(args: argparse.Namespace) -> int:
    from ..aggregate import self_influence

    with _open(args) as run:
        return _emit(args, self_influence(run, **window_args(args), **_common(args)), run.path)


def _run_dvemb(args: argparse.Namespace) -> int:
    from ..aggregate import DataValueEmbeddings, dvemb
    from ..aggregate.stepsize import StepSizes

    bd = {"auto": None, "true": True, "false": False}[args.block_diagonal]
    with _open(args) as run:
        path = Path(args.emb_path) if args.emb_path else None
        target = path or run.path / "dvemb.h5"
        if args.reuse and target.exists():
            emb = DataValueEmbeddings.load(target, run=run)
            wanted = StepSizes(run, args.step_size, curvature=True).form
            if emb.step_size != wanted:
                emb.close()
                raise ConfigurationError(
                    f"{target} holds embeddings in the {emb.step_size} form, but --step-size {args.step_size} asks "
                    f"for the {wanted} form: drop --reuse to compute them again (or pass --step-size {emb.step_size}).")
        else:
            emb = dvemb(run, path=path, block_diagonal=bd, memory_budget_mb=args.memory_budget_mb,
                        **_common(args))
        if getattr(args, "rank", 0) == 0:
            print(emb)
        with emb:
            T = run.final_step
            if T not in set(run.query_steps.tolist()):
                if getattr(args, "rank", 0) != 0:
                    return 0
                print(f"no query gradients recorded at the end of training (step {T}); score queries later in "
                      "Python: DataValueEmbeddings.load(path, run=run).scores(query_gradients(model, run, "
                      "queries, loss_fn)), with the trained model.")
                return 0
            scoring = {k: v for k, v in _common(args).items() if k != "step_size"}  # inside the embeddings
            return _emit(args, emb.scores(run.query_gradients(T), **window_args(args), **scoring), run.path)
