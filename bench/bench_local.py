"""Local-disk benchmark: cloudckpt against dd, torch.save/load and DCP on the same bytes.

    python bench/bench_local.py [--runs 3] [--dir DIR] [--workloads large,small]

Each (workload, tool, operation) runs in a fresh subprocess that builds the state dict, then
saves (or loads) it ``--runs`` times; the table shows the median time, throughput, the ratio to
the reference tool, and the peak RSS above the state dict itself. Every save is durable
(fsync'd): torch.save gets an explicit fsync, DCP's FileSystemWriter fsyncs by default, dd runs
with conv=fsync. Loads read a hot page cache for every tool alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import plots

WORKLOADS = {
    "large": "1 GiB in 64 tensors of 16 MiB",
    "small": "300 MiB in 20,000 tensors of 15 KiB",
}


def make_state(workload: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    if workload == "large":
        return {f"layer{i}.weight": torch.randn(4 << 20, generator=g) for i in range(64)}
    if workload == "small":
        return {f"p{i}": torch.randn(3840, generator=g) for i in range(20_000)}
    raise SystemExit(f"unknown workload {workload!r}; choose from {sorted(WORKLOADS)}")


def nbytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# -- one measurement, in a child process ----------------------------------------------------


def child(tool: str, op: str, workload: str, runs: int, workdir: str) -> dict[str, Any]:
    import torch

    target = os.path.join(workdir, f"{tool}-{workload}")
    sd = make_state(workload) if op != "load" or tool.startswith("dcp") else None
    size = nbytes(sd) if sd is not None else 0
    times: list[float] = []

    def fresh() -> None:
        shutil.rmtree(target, ignore_errors=True)
        if os.path.exists(target + ".pt"):
            os.unlink(target + ".pt")

    def save_once() -> None:
        assert sd is not None
        if tool == "cloudckpt":
            import cloudckpt

            cloudckpt.save(target, sd)
        elif tool == "torch.save":
            with open(target + ".pt", "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        elif tool.startswith("dcp"):
            import torch.distributed.checkpoint as dcp

            threads = int(tool.rsplit("-t", 1)[1])
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(target, thread_count=threads))
        elif tool == "dd":
            os.makedirs(target, exist_ok=True)
            count = max(1, size // (16 << 20))
            subprocess.run(
                [
                    "dd",
                    "if=/dev/zero",
                    f"of={target}/blob",
                    "bs=16M",
                    f"count={count}",
                    "conv=fsync",
                    "status=none",
                ],
                check=True,
            )
        else:
            raise SystemExit(f"unknown tool {tool}")

    def load_once() -> int:
        if tool == "cloudckpt":
            import cloudckpt

            return nbytes(cloudckpt.load(target))
        if tool == "torch.save":
            return nbytes(torch.load(target + ".pt", weights_only=True))
        if tool.startswith("dcp"):
            import torch.distributed.checkpoint as dcp

            assert sd is not None
            dcp.load(sd, storage_reader=dcp.FileSystemReader(target))
            return nbytes(sd)
        subprocess.run(
            ["dd", f"if={target}/blob", "of=/dev/null", "bs=16M", "status=none"], check=True
        )
        return os.path.getsize(f"{target}/blob")

    if op == "prepare":
        fresh()
        save_once()
        return {"bytes": size}
    base = rss_mib()
    for _ in range(runs):
        if op == "save":
            fresh()
        started = time.perf_counter()
        if op == "save":
            save_once()
        else:
            size = load_once()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # a load allocates the state it returns (DCP loads into a state built before `base`)
    allocated = size / 2**20 if op == "load" and sd is None and tool != "dd" else 0
    if op == "save":
        fresh()
    return {"times": times, "bytes": size, "peak_mib": peak, "base_mib": base + allocated}


# -- the driver ------------------------------------------------------------------------------

SAVE_TOOLS = ["dd", "torch.save", "dcp-t1", "dcp-t4", "cloudckpt"]
LOAD_TOOLS = ["dd", "torch.save", "dcp-t4", "cloudckpt"]
REFERENCE = {"save": "dcp-t4", "load": "torch.save"}


def run(tool: str, op: str, workload: str, runs: int, workdir: str, cap_s: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        if op == "load":
            prep = [sys.executable, __file__, "--child", tool, "prepare", workload, "1", workdir]
            subprocess.run(prep, capture_output=True, text=True, timeout=cap_s, check=True)
    except subprocess.TimeoutExpired:
        return {"capped": cap_s}
    except subprocess.CalledProcessError as e:
        return {"error": e.stderr.strip().splitlines()[-1] if e.stderr else str(e)}
    cmd = [sys.executable, __file__, "--child", tool, op, workload, str(runs), workdir]
    result = child_result(cmd, max(1.0, cap_s - (time.monotonic() - started)))
    return {"capped": cap_s} if "capped" in result else result


def child_result(cmd: list[str], timeout: float) -> dict[str, Any]:
    """The JSON line a bench child prints last; ``{"capped": s}`` past ``timeout``, or
    ``{"error": ...}`` with its last stderr line."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"capped": timeout}
    except subprocess.CalledProcessError as e:
        return {"error": e.stderr.strip().splitlines()[-1] if e.stderr else str(e)}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--workloads", default="large,small")
    p.add_argument("--cap", type=float, default=300.0, help="seconds per tool before giving up")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        tool, op, workload, runs, workdir = a.child
        print(json.dumps(child(tool, op, workload, int(runs), workdir)))
        return
    workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-bench-")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"dir: {workdir}; runs: {a.runs}; medians; ratio = reference time / tool time\n")
    print("| workload | op | tool | median s | GB/s | vs ref | peak RSS over state |")
    print("|---|---|---|---|---|---|---|")
    for workload in a.workloads.split(","):
        for op, tools in (("save", SAVE_TOOLS), ("load", LOAD_TOOLS)):
            # Round robin, one run per child, tools shuffled each round: no tool always runs
            # first after another's writeback, which skews fsync timings on a shared disk.
            results: dict[str, dict[str, Any]] = {t: {"times": []} for t in tools}
            for _ in range(a.runs):
                for tool in random.sample(tools, len(tools)):
                    r = results[tool]
                    if "times" not in r:
                        continue  # capped or failed before: do not retry
                    one = run(tool, op, workload, 1, workdir, a.cap)
                    if "times" not in one:
                        results[tool] = one
                        continue
                    r["times"] += one["times"]
                    r["bytes"] = one["bytes"]
                    over = one["peak_mib"] - one["base_mib"]
                    if "peak_mib" not in r or over >= r["peak_mib"] - r["base_mib"]:
                        r["peak_mib"], r["base_mib"] = one["peak_mib"], one["base_mib"]
            ref = results.get(REFERENCE[op], {})
            ref_t = statistics.median(ref["times"]) if "times" in ref else None
            for tool, r in results.items():
                if "times" not in r:
                    why = f"capped at {r['capped']:.0f} s" if "capped" in r else r.get("error")
                    print(f"| {WORKLOADS[workload]} | {op} | {tool} | {why} | | | |")
                    continue
                med = statistics.median(r["times"])
                ratio = f"{ref_t / med:.2f}x" if ref_t else ""
                over = r["peak_mib"] - r["base_mib"]
                print(
                    f"| {WORKLOADS[workload]} | {op} | {tool} | {med:.3f} | "
                    f"{r['bytes'] / med / 1e9:.2f} | {ratio} | {over:.0f} MiB |",
                    flush=True,
                )
    if a.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    with plots.recorded("bench_local"):  # tables -> bar charts in bench/results/
        main()
