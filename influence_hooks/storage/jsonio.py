"""JSON in a run directory: atomic files (written to a temporary name, then renamed over the
target) and the conversion of metadata into JSON-safe values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .files import write_atomic


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Serialised first, then written as a whole (files.write_atomic): a full disk leaves the old
    file in place and no temporary file behind."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def to_jsonable(v: Any, max_elements: int | None = 64) -> Any:
    """Metadata as JSON-safe values: containers recursively, numpy and torch values as numbers and
    lists (arrays of more than max_elements as a short description), non-finite floats as
    strings, anything else as its repr."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x, max_elements) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x, max_elements) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if hasattr(v, "tolist") and hasattr(v, "shape"):  # numpy arrays and scalars, torch tensors
        size = 1
        for d in v.shape:
            size *= int(d)
        if max_elements is None or size < max_elements:
            return to_jsonable(v.tolist(), max_elements)
        return f"{type(v).__name__}{tuple(v.shape)}"
    return repr(v)
