"""The on-disk format of a run directory: every file name, dataset name and version lives here.

A run directory holds
    manifest.json                      static metadata of the run (written by rank 0), MANIFEST_SCHEMA
    rank-000.json                      per-rank progress: segments (resumes), the finished shards with
                                       their step ranges, the finished parameter files, completion
    rank-000.lock                      the lock a rank's recording holds while it runs (empty otherwise)
    shards/grads-r000-000000.h5        finished gradient shards, one rank each, a contiguous step range
    params/snapshot-r000-s000000042.h5 parameter snapshots (selected layers) at w_t, before step t
    params/checkpoint-r000-s000000042.h5  whole model (and optimizer state) at w_t
Files are written under a temporary name and renamed when complete, so a crash leaves only whole
files under the final names. Nothing in a run directory is pickled.

Version 2 added, over version 1: fletcher32 checksums on every HDF5 dataset and the checksummed
v1.10 HDF5 file format; the segment (resume) of each shard in the shard itself (SHARD_SEGMENT,
SHARD_FROM_STEP); the list of finished shards and parameter files in the rank file (RANK_SHARDS,
RANK_PARAMS); the per-query non-finite flags (QUERY_NONFINITE).

Version 3 (this one) checks the gradient rows (ROWS_GRAD) with the library's own checksum instead
of fletcher32: unfiltered chunks of about ROW_CHUNK_BYTES, and per chunk two 64-bit sums in
ROWS_GRAD_SUMS (storage/checksum.py), which numpy verifies at memory speed where fletcher32 is a
serial loop; every other dataset keeps fletcher32. It also adds 'bfloat16' storage: numpy has no
bfloat16, so such datasets hold the raw 16 bits as uint16 and say so in their ATTR_DTYPE attribute.
Runs of versions 1 and 2 are still read: version 2 with fletcher32 on the gradient rows, version 1
without checksums and with supersession and gaps taken from the rank file alone. A run resumed by a
newer version holds shards of both; each shard is read as it was written.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

FORMAT_NAME = "influence_hooks.run"
FORMAT_VERSION = 3

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
PARAM_DIR = "params"
TMP_SUFFIX = ".tmp"

STORAGE_DTYPES = ("float16", "bfloat16", "float32", "float64")
# storage dtypes numpy lacks: their datasets hold the raw bits in this numpy dtype, and name the
# real dtype in the dataset attribute ATTR_DTYPE
RAW_BITS = {"bfloat16": "uint16"}
ATTR_DTYPE = "dtype"

# every HDF5 file the library writes: the v1.10 format checksums its superblock, object headers
# (attributes and compact datasets included) and chunk indexes
H5_LIBVER = ("v110", "latest")
# elements per chunk of a dataset (a chunk is the unit of the fletcher32 checksum and of reading)
CHUNK_ELEMENTS = 1 << 18

# attributes of a gradient shard
SHARD_SEGMENT = "segment"  # the recording segment: 0, then one more per resume of its rank
SHARD_FROM_STEP = "from_step"  # the step its segment started from (rows of an earlier segment
#                                at steps >= a later segment's from_step are superseded)

# datasets inside a gradient shard
ROWS_STEP = "rows/step"
ROWS_SAMPLE_ID = "rows/sample_id"
ROWS_GRAD = "rows/grad"
# format 3: ROWS_GRAD is chunked without filters, about ROW_CHUNK_BYTES per chunk, and carries the
# attribute ATTR_CHECKSUM naming the algorithm (storage.checksum.NAME); ROWS_GRAD_SUMS [chunks, 2]
# int64 holds each chunk's sums (itself under fletcher32)
ROWS_GRAD_SUMS = "rows/grad_sums"
ATTR_CHECKSUM = "checksum"
ROW_CHUNK_BYTES = 1 << 16
STEPS = "steps"  # group of per-step columns, see STEP_COLUMNS
STEP_COLUMNS = (
    "step", "epoch", "lr", "lr_groups", "batch_size", "update_weight", "micro_batches",
    "row_start", "row_count", "nonfinite", "skipped", "loss",
)
# per-step columns a shard holds only where they were recorded: layer_lr [steps, layers] float64 is
# the step size Adam/AdamW applied to each recorded layer's gradient (record.optim.adam_step_sizes;
# NaN where unknown), read by the estimators' Adam form (aggregate.stepsize)
OPTIONAL_STEP_COLUMNS = ("layer_lr",)
QUERY_STEP = "queries/step"
QUERY_GRAD = "queries/grad"
QUERY_NONFINITE = "queries/nonfinite"  # [query steps, Q] bool: u_q(step) holds NaN/inf

# groups inside a parameter file
PARAMS_GROUP = "params"
OPTIM_GROUP = "optim"
PARAM_KINDS = ("snapshot", "checkpoint")

# keys of a rank file (rank-NNN.json)
RANK_SHARDS = "shards"  # finished shards, one row each, columns RANK_SHARD_COLUMNS
RANK_SHARD_COLUMNS = ("index", "segment", "first_step", "last_step", "steps", "rows")  # steps: null if none
RANK_PARAMS = "params"  # names of finished parameter files

_SHARD_RE = re.compile(r"^grads-r(\d{3,})-(\d{6,})\.h5$")
_PARAM_RE = re.compile(r"^(snapshot|checkpoint)-r(\d{3,})-s(\d{9,})\.h5$")
_RANK_RE = re.compile(r"^rank-(\d{3,})\.json$")
_LOCK_RE = re.compile(r"^rank-(\d{3,})\.lock$")


def storage_itemsize(storage_dtype: str) -> int:
    """Bytes per stored value of a storage dtype (one of STORAGE_DTYPES)."""
    return np.dtype(RAW_BITS.get(storage_dtype, storage_dtype)).itemsize


def shard_name(rank: int, index: int) -> str:
    return f"grads-r{rank:03d}-{index:06d}.h5"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, index) of a finished shard's file name, None for anything else."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def param_file_name(kind: str, rank: int, step: int) -> str:
    return f"{kind}-r{rank:03d}-s{step:09d}.h5"


def parse_param_file_name(name: str) -> tuple[str, int, int] | None:
    """(kind, rank, step) of a finished parameter file's name, None otherwise."""
    m = _PARAM_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:03d}.json"


def parse_rank_file_name(name: str) -> int | None:
    m = _RANK_RE.match(name)
    return int(m.group(1)) if m else None


def lock_file_name(rank: int) -> str:
    return f"rank-{rank:03d}.lock"


def is_lock_file_name(name: str) -> bool:
    return _LOCK_RE.match(name) is not None


# ---------------------------------------------------------------------- the manifest's schema
_INT = (int,)
# key: (allowed JSON types, required)
MANIFEST_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "format": ((str,), True),
    "format_version": (_INT, True),
    "run_id": ((str,), True),
    "dim": (_INT, True),
    "storage_dtype": ((str,), True),
    "layers": ((list,), True),
    "projection_fingerprint": ((str,), False),
    "loss_reduction": ((str,), False),
    "queries": ((dict, type(None)), False),
    "optimizer": ((dict, type(None)), False),
    "precision": ((str,), False),
    "partial_model": ((bool,), False),
    "world_size": (_INT, False),
    "created": ((str,), False),
}
LAYER_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,), "rule": (str,), "module_type": (str,), "offset": _INT, "dim": _INT, "grad_dim": _INT,
    "param_shapes": (list, dict), "projection": (dict,),
}


def manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest against MANIFEST_SCHEMA and LAYER_SCHEMA, naming the key; None
    if nothing. Beyond types: the layers' [offset, offset + dim) tile [0, dim) in order, as the
    columns of every gradient row do."""
    if not isinstance(m, dict):
        return f"the manifest is a JSON {type(m).__name__}, not an object"

    def bad_type(where: str, v: Any, types: tuple[type, ...]) -> str:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        return f"{where} must be {names}, got {type(v).__name__} {v!r:.60}"

    for key, (types, required) in MANIFEST_SCHEMA.items():
        if key not in m:
            if required:
                return f"required key {key!r} is missing"
            continue
        v = m[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            return bad_type(f"key {key!r}", v, types)
    if m["format"] != FORMAT_NAME:
        return f"key 'format' is {m['format']!r}, not {FORMAT_NAME!r}"
    if m["storage_dtype"] not in STORAGE_DTYPES:
        return f"key 'storage_dtype' is {m['storage_dtype']!r}, not one of {STORAGE_DTYPES}"
    if m["dim"] < 0:
        return f"key 'dim' is negative ({m['dim']})"
    at = 0
    for i, layer in enumerate(m["layers"]):
        where = f"layers[{i}]"
        if not isinstance(layer, dict):
            return f"{where} must be an object, got {type(layer).__name__}"
        for key, types in LAYER_SCHEMA.items():
            if key not in layer:
                return f"{where} lacks the required key {key!r}"
            v = layer[key]
            if not isinstance(v, types) or isinstance(v, bool):
                return bad_type(f"{where}.{key}", v, types)
        if layer["offset"] != at or layer["dim"] < 0:
            return (f"{where}.offset/dim ({layer['offset']}, {layer['dim']}) do not continue the columns "
                    f"of the layers before it (offset {at} expected)")
        at += layer["dim"]
    if at != m["dim"]:
        return f"key 'dim' is {m['dim']}, but the layers' dims add up to {at}"
    q = m.get("queries")
    if isinstance(q, dict) and "ids" in q and not (
            isinstance(q["ids"], list) and all(isinstance(i, int) and not isinstance(i, bool) for i in q["ids"])):
        return f"queries.ids must be a list of integers, got {q['ids']!r:.60}"
    return None
