"""A WindowComparison on disk: CSV tables for reading, one HDF5 file that loads back whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..errors import ConfigurationError
from .patterns import PatternRules

if TYPE_CHECKING:
    from .compare import WindowComparison

WHOLE_RUN = "whole run"
COMPARISON_FORMAT = "influence_hooks.window_comparison"


def write_csv(cmp: "WindowComparison", directory: str | os.PathLike) -> list[Path]:
    """influence_by_window.csv, correlation.csv, patterns.csv, top_samples.csv and (with a
    corrupted mask) detection.csv in `directory`; returns the paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    p = d / "influence_by_window.csv"
    cols = ["train_id", "pattern"] + (["corrupted"] if cmp.corrupted is not None else [])
    cols += [f"{l} [{a},{b})" for l, (a, b) in zip(cmp.labels, cmp.windows)]
    cols += [WHOLE_RUN] if cmp.whole_run is not None else []
    with open(p, "w") as f:
        f.write(",".join(_csv(c) for c in cols) + "\n")
        for i, tid in enumerate(cmp.train_ids):
            vals = [str(int(tid)), cmp.patterns[i]]
            if cmp.corrupted is not None:
                vals.append(str(int(cmp.corrupted[i])))
            vals += [repr(float(v)) if cmp.present[i, w] else "" for w, v in enumerate(cmp.scores[i])]
            if cmp.whole_run is not None:
                vals.append(repr(float(cmp.whole_run[i])))
            f.write(",".join(vals) + "\n")
    paths.append(p)
    p = d / "correlation.csv"
    labels = list(cmp.labels) + ([WHOLE_RUN] if cmp.whole_run_correlation is not None else [])
    full = cmp.full_correlation()
    with open(p, "w") as f:
        f.write(",".join(["window", *map(_csv, labels)]) + "\n")
        for l, r in zip(labels, full):
            f.write(",".join([_csv(l), *(f"{v:.6f}" for v in r)]) + "\n")
    paths.append(p)
    p = d / "patterns.csv"
    with open(p, "w") as f:
        f.write("pattern,count,examples\n")
        for pat, c in cmp.counts().items():
            f.write(f"{pat},{c},{' '.join(str(int(i)) for i in cmp.examples(pat, 10))}\n")
    paths.append(p)
    p = d / "top_samples.csv"
    with open(p, "w") as f:
        f.write("window,kind,rank,train_id,influence\n")
        for l, t in zip(labels, cmp.top):
            for kind in ("proponents", "opponents"):
                for r, (i, v) in enumerate(zip(*t[kind])):
                    f.write(f"{_csv(l)},{kind},{r + 1},{int(i)},{float(v)!r}\n")
    paths.append(p)
    if cmp.detection:
        p = d / "detection.csv"
        with open(p, "w") as f:
            f.write("method,window,t1,t2,auroc,precision_at_k,k\n")
            for r in cmp.detection:
                f.write(f"{r['method']},{_csv(r['window'])},{r['t1']},{r['t2']},{r['auroc']:.6f},"
                        f"{r['precision_at_k']:.6f},{r['k']}\n")
        paths.append(p)
    return paths


def save_comparison(cmp: "WindowComparison", path: str | os.PathLike) -> None:
    """Everything (but the raw InfluenceScores) in one HDF5 file; `WindowComparison.load` reads it."""
    with h5py.File(path, "w") as f:
        f.attrs.update(format=COMPARISON_FORMAT, format_version=1, method=cmp.method,
                       description=cmp.description, query=cmp.query, run_path=cmp.run_path,
                       run_id=cmp.run_id, labels=json.dumps(cmp.labels),
                       rules=json.dumps(cmp.rules.__dict__), approximations=json.dumps(cmp.approximations),
                       detection=json.dumps(cmp.detection),
                       top=json.dumps([{k: [v[0].tolist(), v[1].tolist()] for k, v in t.items()}
                                       for t in cmp.top]))
        f["train_ids"] = cmp.train_ids
        f["windows"] = np.asarray(cmp.windows, np.int64).reshape(-1, 2)
        f["scores"] = cmp.scores
        f["present"] = cmp.present
        f["correlation"] = cmp.correlation
        f["z"] = cmp.z
        f.create_dataset("patterns", data=np.asarray(cmp.patterns, dtype=object),
                         dtype=h5py.string_dtype())
        for name in ("whole_run", "whole_run_present", "whole_run_correlation", "corrupted",
                     "per_query", "query_ids"):
            v = getattr(cmp, name)
            if v is not None:
                f[name] = v
        for m, v in cmp.corruption_scores.items():
            f[f"corruption_scores/{m}"] = v
            f[f"corruption_present/{m}"] = cmp.corruption_present[m]


def read_comparison(path: str | os.PathLike) -> dict:
    """The fields of a WindowComparison saved by save_comparison (WindowComparison.load builds it)."""
    with h5py.File(path, "r") as f:
        a = f.attrs
        if a.get("format") != COMPARISON_FORMAT:
            raise ConfigurationError(f"{path} is not a window comparison file.")
        get = lambda n: f[n][()] if n in f else None  # noqa: E731
        top = [{k: (np.asarray(v[0], np.int64), np.asarray(v[1], np.float64)) for k, v in t.items()}
               for t in json.loads(a["top"])]
        return dict(
            method=str(a["method"]), description=str(a["description"]), query=str(a["query"]),
            train_ids=f["train_ids"][()], windows=[tuple(map(int, w)) for w in f["windows"][()]],
            labels=json.loads(a["labels"]), scores=f["scores"][()], present=f["present"][()],
            whole_run=get("whole_run"), whole_run_present=get("whole_run_present"),
            correlation=f["correlation"][()], whole_run_correlation=get("whole_run_correlation"),
            rules=PatternRules(**json.loads(a["rules"])),
            patterns=np.asarray([p.decode() if isinstance(p, bytes) else p for p in f["patterns"][()]]),
            z=f["z"][()], top=top, corrupted=get("corrupted"), detection=json.loads(a["detection"]),
            corruption_scores={m: v[()] for m, v in f["corruption_scores"].items()} if "corruption_scores" in f else {},
            corruption_present={m: v[()] for m, v in f["corruption_present"].items()} if "corruption_present" in f else {},
            per_query=get("per_query"), query_ids=get("query_ids"),
            approximations=json.loads(a["approximations"]), run_path=str(a["run_path"]), run_id=str(a["run_id"]))


def _csv(s: str) -> str:
    return f'"{s}"' if ("," in s or '"' in s) else s
