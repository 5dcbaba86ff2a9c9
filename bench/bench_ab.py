"""Before/after: cloudckpt's save and load from two source trees, interleaved on the same bytes.

    python bench/bench_ab.py --before DIR [--after DIR] [--runs 3] [--workloads large,small]
                             [--scale 0.5] [--stores local,s3]

``DIR`` is a checkout of the version to compare against (``git worktree add DIR <commit>``).
Each measurement is one child of ``bench_local.py`` (local disk, durable saves) or
``bench_remote.py`` (S3 on a moto server this script starts), run with ``PYTHONPATH`` pointing
at DIR (before) or at this tree (after). The two versions alternate, in random order each
round, so a machine shared with other work slows both alike. Medians; ratio = before / after
(above 1: after is faster).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_local import WORKLOADS, child_result  # noqa: E402
from bench_remote import Server  # noqa: E402


def _env_path(tree: str) -> str:
    return os.pathsep.join(
        [tree, os.path.join(tree, "backends", "s3"), os.path.join(tree, "backends", "gcs")]
    )


def _run(tree: str, cmd: list[str], cap: float) -> dict[str, Any]:
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = _env_path(tree)
    try:
        return child_result(cmd, cap)
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", required=True, help="source tree of the version to compare with")
    p.add_argument("--after", default=None, help="source tree to measure (default: this one)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", default="large,small")
    p.add_argument("--scale", type=float, default=0.5, help="S3 workload scale (bench_remote)")
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--cap", type=float, default=600.0)
    a = p.parse_args()
    trees = {
        "before": os.path.abspath(a.before),
        "after": os.path.abspath(a.after or os.path.dirname(HERE)),
    }
    print(f"{os.cpu_count()} cores; runs {a.runs}; before = {trees['before']}; "
          f"after = {trees['after']}; S3 scale {a.scale}\n")  # fmt: skip
    print("| store | workload | op | before s | after s | before / after |")
    print("|---|---|---|---|---|---|")
    server = Server("s3") if "s3" in a.stores.split(",") else None
    for store in a.stores.split(","):
        for workload in a.workloads.split(","):
            where: dict[str, str] = {
                v: tempfile.mkdtemp(prefix=f"cloudckpt-ab-{v}-") for v in trees
            }
            buckets: dict[str, str] = (
                {v: server.bucket() for v in trees} if store == "s3" and server else {}
            )

            def cmd(
                v: str,
                op: str,
                store: str = store,
                workload: str = workload,
                where: dict[str, str] = where,
                buckets: dict[str, str] = buckets,
            ) -> list[str]:
                if store == "local":
                    script = os.path.join(HERE, "bench_local.py")
                    return [sys.executable, script, "--child", "cloudckpt", op, workload, "1",
                            where[v]]  # fmt: skip
                assert server is not None
                script = os.path.join(HERE, "bench_remote.py")
                return [sys.executable, script, "--child", "s3", "cloudckpt", op, workload,
                        str(a.scale), server.endpoint, buckets[v]]  # fmt: skip

            for op in ("save", "load"):
                times: dict[str, list[float]] = {v: [] for v in trees}
                if op == "load":
                    for v, tree in trees.items():
                        _run(tree, cmd(v, "prepare"), a.cap)
                for _ in range(a.runs):
                    for v in random.sample(list(trees), 2):
                        r = _run(trees[v], cmd(v, op), a.cap)
                        t = r.get("times", [r["time"]] if "time" in r else None)
                        if not t:
                            raise SystemExit(f"{store} {workload} {op} {v}: {r}")
                        times[v] += t
                b, f = (statistics.median(times[v]) for v in ("before", "after"))
                name = WORKLOADS[workload] if store == "local" else f"{workload} x{a.scale}"
                print(f"| {store} | {name} | {op} | {b:.3f} | {f:.3f} | {b / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
