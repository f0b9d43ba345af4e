"""Alternated runs of one benchmark in two trees (a copy of the code before a change, and this tree),
for the benchmarks that take `--baseline DIR`: the machines here are shared and noisy, so before and
after are measured in turns, and each tree's min / median / max printed.

A run is the benchmark script itself with `--one ARGS...`, in a fresh process whose imports come from
the tree measured (PYTHONPATH; run from a checkout, `python benchmarks/x.py` alone would import the
editable install's tree), printing a JSON object on its last line of output.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

THIS_TREE = Path(__file__).resolve().parent.parent


def run_in_tree(tree: Path, script: str, args: Sequence[object], figure: str) -> float:
    """`figure` from the JSON line printed by `script --one ARGS` run on `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with tempfile.TemporaryFile() as logs:
        done = subprocess.run(
            [sys.executable, script, "--one", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=logs,
            env=env,
            cwd=tree,
        )
        if done.returncode != 0:
            logs.seek(0)
            sys.stderr.write(logs.read().decode(errors="replace")[-5000:])
            raise RuntimeError(f"the run on {tree} failed")
    return float(json.loads(done.stdout.decode().splitlines()[-1])[figure])


def compare(
    script: str,
    args: Sequence[object],
    figure: str,
    *,
    runs: int,
    baseline: Path | None,
    unit: str,
    scale: float,
) -> None:
    """Runs `script` `runs` times in this tree, and as often in `baseline` when given (the order of the
    two alternating from run to run), printing each figure times `scale` in `unit`, then per tree."""
    trees = {"this tree": THIS_TREE}
    if baseline is not None:
        trees = {"baseline": baseline.resolve(), "this tree": THIS_TREE}
    results: dict[str, list[float]] = {name: [] for name in trees}
    for run in range(runs):
        order = list(trees.items()) if run % 2 == 0 else list(reversed(trees.items()))
        for name, tree in order:
            value = run_in_tree(tree, script, args, figure) * scale
            results[name].append(value)
            print(f"run {run + 1} {name}: {value:.1f} {unit}", flush=True)
    for name, values in results.items():
        low, middle, high = min(values), statistics.median(values), max(values)
        print(f"{name}: {low:.1f} / {middle:.1f} / {high:.1f} {unit} (min/median/max)")
