"""Flip single bytes of a run's first shard, one at a time, and read the run after each flip.

    python _flip_every_byte.py RUN_DIR N_FLIPS

Run by test_reliability.py. A worker process flips a byte, reads the run (open_run, tracin,
self_influence, verify), restores the byte and reports, flip after flip; if a flip crashes it (a
crash inside HDF5), that flip is counted as a crash and a new worker continues with the next one.
Prints one JSON line: how many flips were detected (a library error, or verify reported a
problem), left every result unchanged, changed results without either (the defect), or crashed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def worker(run_dir: Path, positions: list[int]) -> None:
    import warnings

    warnings.simplefilter("ignore")
    from influence_hooks import open_run, self_influence, tracin
    from influence_hooks.errors import InfluenceHooksError

    shard = sorted((run_dir / "shards").glob("grads-*.h5"))[0]
    data = shard.read_bytes()

    def read() -> dict:
        try:
            with open_run(run_dir) as run:
                t = tracin(run, progress=False).values.numpy()
                s = self_influence(run, progress=False).values.numpy()
                problems = run.verify()
            return {"values": np.concatenate([t.ravel(), s.ravel()]).tolist(), "problems": problems}
        except InfluenceHooksError as e:
            return {"error": type(e).__name__}

    reference = read()
    assert reference.get("problems") == [], reference
    for pos in positions:
        print(json.dumps({"start": pos}), flush=True)
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        shard.write_bytes(bytes(flipped))
        try:
            result = read()
        finally:
            shard.write_bytes(data)
        if "error" in result or result["problems"]:
            verdict = "detected"
        elif np.array_equal(result["values"], reference["values"], equal_nan=True):
            verdict = "unchanged"
        else:
            verdict = "silently_different"
        print(json.dumps({"pos": pos, "verdict": verdict}), flush=True)


def main() -> None:
    run_dir, n = Path(sys.argv[1]), int(sys.argv[2])
    shard = sorted((run_dir / "shards").glob("grads-*.h5"))[0]
    data = shard.read_bytes()
    todo = [int(p) for p in np.unique(np.linspace(0, len(data) - 1, n).astype(int))]
    summary = {"flips": len(todo), "detected": 0, "unchanged": 0, "silently_different": [], "crashed": []}
    try:
        while todo:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", str(run_dir), json.dumps(todo)],
                                    stdout=subprocess.PIPE, text=True)
            started = None
            for line in proc.stdout:
                msg = json.loads(line)
                if "start" in msg:
                    started = msg["start"]
                    continue
                todo.remove(msg["pos"])
                if msg["verdict"] == "silently_different":
                    summary["silently_different"].append(msg["pos"])
                else:
                    summary[msg["verdict"]] += 1
            rc = proc.wait()
            if rc != 0:
                if started is None or started not in todo:
                    raise SystemExit(f"the reader failed before any flip (return code {rc})")
                summary["crashed"].append([started, rc])
                todo.remove(started)
                shard.write_bytes(data)
    finally:
        shard.write_bytes(data)
    print(json.dumps(summary))


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        main()
