"""The command's hot paths on local disk: ``verify`` and ``cp`` against raw reads and copies.

    python bench/bench_cli.py [--runs 5] [--dir DIR]

Saves one checkpoint of the local bench's "large" workload (1 GiB in 64 tensors), then times,
each as a separate process exactly as a user runs it (so start-up counts; no command imports
torch):
  * verify: ``cloudckpt verify``, against ``cat data/* > /dev/null`` (raw read) and a Python
    read + CRC32C of every data file (the least a checksum check can do);
  * cp: ``cloudckpt cp`` to a new local directory (fsync'd, manifest last), against ``cp -r`` +
    ``sync`` of the copied files.
Medians of ``--runs``; the page cache is hot for every tool alike; peak RSS from the kernel.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import plots
from bench_local import WORKLOADS  # the same bytes as the local bench

CRC_FLOOR = (
    "import sys, crc32c\n"
    "for p in sys.argv[1:]:\n"
    "    with open(p, 'rb', buffering=0) as f:\n"
    "        c = 0\n"
    "        while (b := f.read(8 << 20)):\n"
    "            c = crc32c.crc32c(b, c)\n"
)


def timed(cmd: list[str] | str) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one command run to completion."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, shell=isinstance(cmd, str), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    a = p.parse_args()
    workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-bench-cli-")
    src = os.path.join(workdir, "src")
    # saved by a child: a forked command would otherwise count this process's pages as its RSS
    save = "import sys, cloudckpt; from bench_local import make_state; "
    save += "cloudckpt.save(sys.argv[1], make_state('large'))"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", save, src], check=True, cwd=here)
    data = sorted(os.path.join(src, "data", n) for n in os.listdir(os.path.join(src, "data")))
    size = sum(os.path.getsize(f) for f in data)
    dst = os.path.join(workdir, "dst")
    cli = [sys.executable, "-m", "cloudckpt"]
    # what any command that reads indexes pays before its own work: Python, the package, the
    # manifest and the indexes
    startup = statistics.median(timed([*cli, "info", src])[0] for _ in range(a.runs))
    bare = statistics.median(timed([*cli, "ls", workdir])[0] for _ in range(a.runs))
    cases = {
        "verify": {
            "cat > /dev/null": "cat " + " ".join(data) + " > /dev/null",
            "python read + CRC32C": [sys.executable, "-c", CRC_FLOOR, *data],
            "cloudckpt verify": [*cli, "verify", src],
        },
        "cp": {
            "cp -r + sync": f"cp -r {src} {dst} && sync {dst}/data/* {dst}/manifest.json",
            "cloudckpt cp": [*cli, "cp", src, dst],
        },
    }
    ref = {"verify": "python read + CRC32C", "cp": "cp -r + sync"}
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; {WORKLOADS['large']}: {size / 2**30:.2f} GiB in "
        f"{len(data)} data files; runs: {a.runs}; medians\n"
    )
    print(
        f"start-up: `cloudckpt ls` {bare:.2f} s; `cloudckpt info` (manifest, indexes) "
        f"{startup:.2f} s; 'work' is verify's or cp's time minus the latter\n"
    )
    print("| op | tool | median s | GB/s | vs ref | work s | work vs ref | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for op, tools in cases.items():
        results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        for _ in range(a.runs):
            for tool, cmd in tools.items():
                shutil.rmtree(dst, ignore_errors=True)
                results[tool].append(timed(cmd))
        ref_t = statistics.median(t for t, _ in results[ref[op]])
        for tool, runs in results.items():
            med = statistics.median(t for t, _ in runs)
            peak = max(m for _, m in runs)
            work = (
                f"{med - startup:.3f} | {ref_t / (med - startup):.2f}x"
                if "cloudckpt" in tool
                else " | "
            )
            print(
                f"| {op} | {tool} | {med:.3f} | {size / med / 1e9:.2f} | {ref_t / med:.2f}x | "
                f"{work} | {peak:.0f} MiB |",
                flush=True,
            )
    if a.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    with plots.recorded("bench_cli"):  # tables -> bar charts in bench/results/
        main()
