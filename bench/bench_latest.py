"""Latest lookup at scale: a root with many committed checkpoints on a moto S3 server.

    python bench/bench_latest.py [--checkpoints 1000] [--runs 5]

Saves one small checkpoint with cloudckpt, copies its objects server-side under ``step-N`` for
N up to ``--checkpoints`` (each a committed checkpoint: every name in it is relative), writes
the ``latest`` hint, then times ``CheckpointManager.latest_step()`` (the manager built outside
the clock), ``CheckpointManager.steps()`` (which opens every manifest, for contrast) and the
``cloudckpt latest`` command as a fresh process (start-up included). The requests each lookup
makes are counted on the way to the server (a pass-through proxy, tests/faults.py); the
command's CPU time (user + system) is shown apart from its wall time, which on a shared machine
is mostly waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_remote import Server
from faults import FaultProxy

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def populate(endpoint: str, bucket: str, count: int) -> str:
    """``count`` committed checkpoints under ``s3://bucket/run``; returns the root URI."""
    import boto3
    import torch

    import cloudckpt

    root = f"s3://{bucket}/run"
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    cloudckpt.save(f"{root}/step-0000000000", {"w": torch.ones(16), "step": 0},
                   storage_options=opts)  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/step-0000000000/")
            ["Contents"]]  # fmt: skip

    def copy(step: int) -> None:
        for key in keys:
            dst = key.replace("step-0000000000", f"step-{step:010d}", 1)
            s3.copy_object(Bucket=bucket, Key=dst, CopySource={"Bucket": bucket, "Key": key})

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(copy, range(1, count)))
    s3.put_object(Bucket=bucket, Key="run/latest", Body=str(count - 1).encode())
    return root


def requests(proxy: FaultProxy) -> str:
    kinds: Counter[str] = Counter()
    for seen in proxy.seen:
        path, _, query = seen.path.partition("?")
        if seen.method == "GET" and ("list-type" in query or "prefix=" in query):
            kinds["list"] += 1
        elif path.endswith("/manifest.json"):
            kinds[f"{seen.method} manifest"] += 1
        else:
            kinds[f"{seen.method} other"] += 1
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


def _merge_rows(rows: list[Any]) -> None:
    """One row per lookup name: the median of its interleaved single runs."""
    merged: dict[str, list[Any]] = {}
    for row in rows:
        merged.setdefault(row[0], []).append(row)
    rows[:] = [
        (
            name,
            statistics.median(r[1] for r in group),
            group[0][2]
            if len(group) == 1
            else f"{statistics.median(float(r[2]) for r in group):.2f}",
            group[-1][3],
            group[-1][4],
        )
        for name, group in merged.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoints", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--before",
        default="",
        help="source tree whose command is timed too (PYTHONPATH on it, interleaved runs)",
    )
    a = p.parse_args()
    server = Server("s3")
    try:
        bucket = server.bucket()
        started = time.perf_counter()
        root = populate(server.endpoint, bucket, a.checkpoints)
        print(f"{a.checkpoints} committed checkpoints under {root} "
              f"({time.perf_counter() - started:.0f} s to create); runs: {a.runs}, medians\n")  # fmt: skip
        host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
        with FaultProxy(host, int(port)) as proxy:
            endpoint = f"http://127.0.0.1:{proxy.port}"
            opts: dict[str, Any] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
            rows = []

            def timed(name: str, fn: Any, runs: int) -> None:
                times, cpu, result = [], [], None
                for _ in range(runs):
                    proxy.clear()
                    c = resource.getrusage(resource.RUSAGE_CHILDREN)
                    t = time.perf_counter()
                    result = fn()
                    times.append(time.perf_counter() - t)
                    d = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu.append(d.ru_utime + d.ru_stime - c.ru_utime - c.ru_stime)
                child_cpu = (
                    f"{statistics.median(cpu):.2f}" if "new process" in name else "(in process)"
                )
                rows.append((name, statistics.median(times), child_cpu, requests(proxy), result))

            from cloudckpt import CheckpointManager

            manager = CheckpointManager(root, storage_options=opts)
            timed("CheckpointManager.latest_step()", manager.latest_step, a.runs)
            cli = [sys.executable, "-m", "cloudckpt", "latest", root,
                   "--storage-option", f"endpoint_url={endpoint}"]  # fmt: skip
            here = str(Path(__file__).resolve().parent.parent)
            trees = {"": here, " before": a.before} if a.before else {"": here}

            def command(tree: str) -> str:
                env = dict(os.environ)  # the tree's own sources first, from a neutral cwd
                paths = [tree, f"{tree}/backends/s3", f"{tree}/backends/gcs"]
                env["PYTHONPATH"] = os.pathsep.join(paths)
                out = subprocess.run(
                    cli, capture_output=True, text=True, check=True, env=env, cwd="/"
                )
                return out.stdout.strip()

            for _ in range(a.runs):  # interleaved: one run of each tree per round
                for label, tree in trees.items():
                    timed(f"cloudckpt latest (new process{label})", lambda t=tree: command(t), 1)
            _merge_rows(rows)
            timed("CheckpointManager.steps() (opens every manifest)",
                  lambda: f"{len(manager.steps())} steps", 1)  # fmt: skip
            manager.close()
    finally:
        server.stop()
    print("| lookup | median s | process CPU s | requests per lookup | answer |")
    print("|---|---|---|---|---|")
    for name, med, cpu, reqs, result in rows:
        print(f"| {name} | {med:.3f} | {cpu} | {reqs} | {result} |")


if __name__ == "__main__":
    main()
