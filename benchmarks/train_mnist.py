"""Wall time and test accuracy of the default `convnet train` (bundled digits).

Target: at least 98% accuracy on the 1,000 held-out digits in at most 20 s on
an idle 2-core machine. Each run is the real command in a fresh process, timed from launch
to exit (imports, data loading, training, evaluation and saving included).

Usage::

    .venv/bin/python benchmarks/train_mnist.py              # 3 runs of `convnet train`
    .venv/bin/python benchmarks/train_mnist.py --runs 1 -- --epochs 4   # extra train options

Prints one line per run and the median; exits with status 1 if the median misses a
target. ``--json PATH`` also writes the measurements. The machine's load average is
printed first: other CPU-heavy work on a 2-core machine slows the numbers down a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 20.0
TARGET_ACCURACY = 98.0
ACCURACY_LINE = re.compile(r"^test accuracy: ([0-9.]+)% \((\d+)/(\d+)\)", re.MULTILINE)


def command() -> list[str]:
    script = Path(sys.executable).parent / "convnet"
    return [str(script)] if script.exists() else [sys.executable, "-m", "convnet"]


def one_run(extra: list[str], workdir: str) -> dict:
    out = os.path.join(workdir, "model.npz")
    cmd = command() + ["train", "--quiet", "--out", out] + extra
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed with status {proc.returncode}:\n{proc.stderr}")
    match = ACCURACY_LINE.search(proc.stdout)
    if match is None:
        raise SystemExit(f"no 'test accuracy' line in the output:\n{proc.stdout}")
    return {"wall_seconds": wall, "accuracy_percent": float(match.group(1)),
            "correct": int(match.group(2)), "total": int(match.group(3))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="number of runs (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("extra", nargs="*", help="extra `convnet train` options, after --")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"convnet train {' '.join(args.extra) or '(defaults)'}: {args.runs} run(s) on "
          f"{os.cpu_count()} CPU(s), {platform.python_implementation()} {platform.python_version()}"
          + (f", load average {load[0]:.2f}" if load else ""), flush=True)
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for i in range(args.runs):
            r = one_run(args.extra, workdir)
            runs.append(r)
            print(f"run {i + 1}: {r['wall_seconds']:.1f} s, test accuracy {r['accuracy_percent']:.2f}% "
                  f"({r['correct']}/{r['total']})", flush=True)
    wall = statistics.median(r["wall_seconds"] for r in runs)
    acc = statistics.median(r["accuracy_percent"] for r in runs)
    ok_time, ok_acc = wall <= TARGET_SECONDS, acc >= TARGET_ACCURACY
    print(f"median: {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s: {'ok' if ok_time else 'MISSED'}), "
          f"accuracy {acc:.2f}% (target >= {TARGET_ACCURACY:.0f}%: {'ok' if ok_acc else 'MISSED'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "command": "convnet train " + " ".join(args.extra), "runs": runs, "median_wall_seconds": wall,
            "median_accuracy_percent": acc, "cpus": os.cpu_count(), "load_average": load,
        }, indent=2) + "\n")
    return 0 if ok_time and ok_acc else 1


if __name__ == "__main__":
    raise SystemExit(main())
