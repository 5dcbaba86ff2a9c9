"""Async checkpointing benchmark: how long a save blocks the trainer, against the copy floor.

    python bench/bench_async.py [--runs 5] [--workloads large] [--dir DIR]

For each workload, in one fresh subprocess per mode, on the same bytes:
  * ``torch.clone``      cloning every tensor once: the floor for any copy off the training path
  * ``sync save``        ``cloudckpt.save`` to local disk (fsync'd), what async hides
  * ``async thread``     ``save()`` + ``stage_f.result()`` with the writer in a thread
  * ``async process``    the same with the writer in a persistent process (shared memory)
Blocked time is reported for the first save (it allocates the staging slab) and as the median of
the later ones (slab reused: the steady state of a training run). "total" is save() until the
write future resolves. "trainer" is how many small Python-driven torch steps the caller ran per
second while the write was in flight, relative to the same loop with nothing in flight (the GIL
and CPU contention the writer causes). Peak RSS is over the state itself; the writer process's
own peak is shown apart. With a GPU, an extra ``async process (cuda)`` row stages from device
memory (pinned staging is not shareable, so the process writer stages into shared memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import plots
from bench_local import (  # same bytes as the local bench
    WORKLOADS,
    child_result,
    make_state,
    rss_mib,
)

MODES = ["torch.clone", "sync save", "async thread", "async process"]


def trainer_rate(seconds: float | None, until: Any = None) -> float:
    """Small torch steps per second (Python-overhead bound), for ``seconds`` or until done."""
    import torch

    x = torch.ones(256)
    n, started = 0, time.perf_counter()
    while True:
        for _ in range(50):
            x = x * 1.0001 + 0.0001
        n += 50
        elapsed = time.perf_counter() - started
        if (seconds is not None and elapsed >= seconds) or (until is not None and until.done()):
            return n / max(elapsed, 1e-9)


def child(mode: str, workload: str, runs: int, workdir: str) -> dict[str, Any]:
    import torch

    import cloudckpt

    warnings.simplefilter("ignore", RuntimeWarning)  # "no accelerator" on CPU machines
    device = "cuda" if mode.endswith("(cuda)") else "cpu"
    sd = {k: v.to(device) for k, v in make_state(workload).items()}
    size = sum(t.numel() * t.element_size() for t in sd.values())
    base = rss_mib()
    result: dict[str, Any] = {"bytes": size, "base_mib": base}
    target = os.path.join(workdir, f"{mode.replace(' ', '-')}-{workload}")

    if mode == "torch.clone":
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            copies = {k: v.clone() for k, v in sd.items()}
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
            del copies
        result["blocked"] = times
    elif mode == "sync save":
        times = []
        for i in range(runs):
            started = time.perf_counter()
            cloudckpt.save(f"{target}/{i}", sd)
            times.append(time.perf_counter() - started)
            shutil.rmtree(f"{target}/{i}", ignore_errors=True)
        result["blocked"] = times
    else:
        cfg = cloudckpt.CheckpointerConfig()
        cfg.process_config.writer = "process" if "process" in mode else "thread"
        ckpt = cloudckpt.make_async_checkpointer(cfg)
        if cfg.process_config.writer == "process":
            ckpt._process.process_creation_future.result()  # type: ignore[attr-defined]
        idle_rate = trainer_rate(1.0)
        blocked, totals, rates = [], [], []
        for i in range(runs):
            started = time.perf_counter()
            stage_f, write_f = ckpt.save(f"{target}/{i}", sd)
            stage_f.result()
            blocked.append(time.perf_counter() - started)
            rates.append(trainer_rate(None, until=write_f) / idle_rate)
            write_f.result()
            totals.append(time.perf_counter() - started)
            shutil.rmtree(f"{target}/{i}", ignore_errors=True)
        ckpt.close()
        result.update(blocked=blocked, total=totals, trainer=rates)
        result["writer_peak_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run(mode: str, workload: str, runs: int, workdir: str) -> dict[str, Any]:
    return child_result(
        [sys.executable, __file__, "--child", mode, workload, str(runs), workdir], 1800
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--workloads", default="large")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        mode, workload, runs, workdir = a.child
        print(json.dumps(child(mode, workload, int(runs), workdir)))
        return
    import torch

    modes = MODES + (["async process (cuda)"] if torch.cuda.is_available() else [])
    workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-bench-async-")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"dir: {workdir}; runs: {a.runs}; medians (async later saves: runs 2..{a.runs}; "
        "clone and sync: all runs)\n"
    )
    print(
        "| workload | mode | blocked, first save s | blocked, later saves s | vs clone floor "
        "| vs sync save | total s | trainer while writing | peak RSS over state | writer peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in a.workloads.split(","):
        results = {m: run(m, workload, a.runs, workdir) for m in modes}
        # the references: medians over every run, as a trainer would meet them
        floor = statistics.median(results["torch.clone"].get("blocked", [float("nan")]))
        sync = statistics.median(results["sync save"].get("blocked", [float("nan")]))
        for mode, r in results.items():
            if "error" in r:
                print(f"| {WORKLOADS[workload]} | {mode} | {r['error']} |||||||")
                continue
            b = r["blocked"]
            later = statistics.median(b[1:]) if len(b) > 1 else b[0]
            if mode in ("torch.clone", "sync save"):
                later = statistics.median(b)  # every run is alike: no buffers kept
            total = f"{statistics.median(r['total']):.3f}" if "total" in r else ""
            trainer = f"{statistics.median(r['trainer']):.0%} of idle" if "trainer" in r else ""
            writer = f"{r['writer_peak_mib']:.0f} MiB" if "process" in mode else ""
            print(
                f"| {WORKLOADS[workload]} | {mode} | {b[0]:.3f} | {later:.3f} | "
                f"{later / floor:.2f}x | {sync / later:.1f}x shorter | {total} | {trainer} | "
                f"{r['peak_mib'] - r['base_mib']:.0f} MiB | {writer} |",
                flush=True,
            )
    if a.dir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    with plots.recorded("bench_async"):  # tables -> bar charts in bench/results/
        main()
