"""Memory over time during a save, a load and an async save, per tool, on the same bytes.

    python bench/bench_memory.py [--workload large] [--dir DIR] [--out bench/results]

Each measurement is one child process of bench_local.py / bench_async.py (the same children
their tables come from), its resident memory and its children's sampled every 20 ms from here.
The child builds the state dict first (the ramp at the start), then saves or loads it once. Draws
``memory-save.png``, ``memory-load.png`` and ``memory-async.png`` and prints the peaks.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import plots

HERE = Path(__file__).resolve().parent
LOCAL, ASYNC = str(HERE / "bench_local.py"), str(HERE / "bench_async.py")

PANELS: dict[str, list[tuple[str, list[str]]]] = {
    "save": [(t, [LOCAL, "--child", t, "save"]) for t in ("torch.save", "dcp-t4", "cloudckpt")],
    "load": [(t, [LOCAL, "--child", t, "load"]) for t in ("torch.save", "dcp-t4", "cloudckpt")],
    "async": [(m, [ASYNC, "--child", m]) for m in ("sync save", "async thread", "async process")],
}


def traced(cmd: list[str]) -> list[tuple[float, float]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trace = plots.MemoryTrace(proc.pid).start()
    _, err = proc.communicate(timeout=900)
    samples = trace.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1:]}")
    return samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workload", default="large", choices=["large", "small"])
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--out", type=Path, default=plots.RESULTS, help="where the PNGs go")
    a = p.parse_args()
    workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-bench-mem-")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"workload: {a.workload}; samples every 20 ms; RSS of the child and its children\n")
    print("| phase | tool | peak MiB | seconds |")
    print("|---|---|---|---|")
    for phase, runs in PANELS.items():
        traces = {}
        for label, cmd in runs:
            if phase == "load":  # the files to load, written by the same tool
                prep = [
                    sys.executable,
                    LOCAL,
                    "--child",
                    label,
                    "prepare",
                    a.workload,
                    "1",
                    workdir,
                ]
                subprocess.run(prep, check=True, capture_output=True)
            tail = [a.workload, "1", workdir]
            traces[label] = samples = traced([sys.executable, *cmd, *tail])
            peak = max((s[1] for s in samples), default=0.0)
            secs = samples[-1][0] if samples else 0.0
            print(f"| {phase} | {label} | {peak:.0f} | {secs:.1f} |", flush=True)
        path = plots.memory_chart(
            traces,
            a.out / f"memory-{phase}.png",
            f"Resident memory during {phase} ({a.workload} workload)",
            note=f"{platform.machine()}, {os.cpu_count()} cores; each line one child process",
        )
        print(f"plot: {path}")
    if a.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
