"""Atomic JSON files: written to a temporary name, then renamed over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .format import TMP_SUFFIX


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
