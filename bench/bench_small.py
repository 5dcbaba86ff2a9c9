"""Many small tensors: save and load time, CPU time and the garbage collector's share, per tree.

    python bench/bench_small.py [--trees DIR,DIR,...] [--rounds 2] [--runs 4] [--tensors 20000]

Each ``DIR`` is a checkout (``git worktree add DIR <commit>``; default: this tree). Per round,
every tree runs once in a fresh child process with ``PYTHONPATH`` at it, in random order; the
child builds ``--tensors`` tensors of 3,840 floats (15 KiB each, as bench_local.py's small
workload), then saves and loads them ``--runs`` times on local disk (durable saves) in one
process, timing each call's wall clock, its process CPU time (every thread) and the time spent
in collections (``gc.callbacks``, with how many collections ran). The table shows medians over
all rounds. CPU time is the steadier figure on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def child(n_tensors: int, runs: int, workdir: str) -> dict[str, Any]:
    import gc
    import shutil
    import time

    import torch

    import cloudckpt

    g = torch.Generator().manual_seed(0)
    sd = {f"p{i}": torch.randn(3840, generator=g) for i in range(n_tensors)}
    target = os.path.join(workdir, "ckpt")
    started = [0.0]
    spent = [0.0, 0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            spent[1] += 1

    gc.callbacks.append(on_gc)
    out: dict[str, list[list[float]]] = {"save": [], "load": []}
    for _ in range(runs):
        for op in ("save", "load"):
            if op == "save":
                shutil.rmtree(target, ignore_errors=True)
            spent[0], spent[1] = 0.0, 0
            wall, cpu = time.perf_counter(), time.process_time()
            if op == "save":
                cloudckpt.save(target, sd)
            else:
                loaded = cloudckpt.load(target)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            out[op].append([wall, cpu, spent[0], spent[1]])
            if op == "load":
                del loaded
    gc.callbacks.remove(on_gc)
    shutil.rmtree(target, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trees", default=os.path.dirname(HERE))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--tensors", type=int, default=20_000)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--child", nargs=3, metavar=("TENSORS", "RUNS", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(int(a.child[0]), int(a.child[1]), a.child[2])))
        return
    import tempfile

    trees = [os.path.abspath(t) for t in a.trees.split(",")]
    results: dict[str, dict[str, list[list[float]]]] = {t: {"save": [], "load": []} for t in trees}
    for _ in range(a.rounds):
        for tree in random.sample(trees, len(trees)):
            env = dict(os.environ, PYTHONPATH=tree)
            with tempfile.TemporaryDirectory(prefix="cloudckpt-small-", dir=a.dir) as workdir:
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", str(a.tensors), str(a.runs), workdir],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            for op in ("save", "load"):
                results[tree][op] += got[op]
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end; "
          f"{a.tensors} tensors of 15 KiB; {a.rounds} rounds x {a.runs} runs\n")  # fmt: skip
    print("| tree | op | wall s | CPU s | in collections s | collections |")
    print("|---|---|---|---|---|---|")
    for tree in trees:
        for op in ("save", "load"):
            rows = results[tree][op]
            wall, cpu, in_gc, n = (statistics.median(r[k] for r in rows) for k in range(4))
            print(f"| {tree} | {op} | {wall:.3f} | {cpu:.3f} | {in_gc:.3f} | {n:.0f} |")


if __name__ == "__main__":
    main()
