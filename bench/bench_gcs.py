"""GCS benchmark against fake-gcs-server: the gcsfs comparison, then a sweep of the GCS knobs.

    python bench/bench_gcs.py [--runs 3] [--scale 1.0] [--skip-compare] [--skip-sweep]

1. ``bench_remote.py --store gcs``: cloudckpt save/load against gcsfs ``put_file`` /
   ``cat_file`` of the same bytes, same server, same run (ratios, medians, peak RSS).
2. A sweep of cloudckpt alone on the "large" workload (1 GiB in 64 tensors of 16 MiB at scale 1):
   the backend's ``part_size`` and the writer's ``file_size`` x ``concurrency``, the numbers the
   tuning advice in docs/backends/gcs.md rests on.

Both parts start their own emulator on 127.0.0.1 and run every measurement in a child process.
The emulator writes to local disk and is the slowest party: compare rows, not absolute speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

import plots

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_remote as remote  # the workloads, RSS sampler and server

MIB = 1 << 20
#: (part_size, file_size, concurrency) rows of the sweep; the first is the default.
SWEEP = [
    (16 * MIB, 256 * MIB, 8),
    (4 * MIB, 256 * MIB, 8),
    (64 * MIB, 256 * MIB, 8),
    (16 * MIB, 64 * MIB, 8),
    (16 * MIB, 64 * MIB, 16),
    (16 * MIB, 1024 * MIB, 8),
    (16 * MIB, 256 * MIB, 2),
]


def child(op: str, part: int, file_size: int, conc: int, scale: float, endpoint: str,
          bucket: str) -> dict[str, Any]:  # fmt: skip
    import time

    import cloudckpt
    from cloudckpt import CheckpointerConfig, CheckpointWriterConfig

    opts = {**remote.options("gcs", endpoint), "part_size": part, "read_part_size": part}
    config = CheckpointerConfig(
        writer_config=CheckpointWriterConfig(file_size=file_size, concurrency=conc)
    )
    uri = f"gs://{bucket}/sweep-{part}-{file_size}-{conc}"
    sd = remote.make_state("large", scale) if op == "save" else None
    base = remote._rss_mib()
    sampler = remote._PeakRSS()
    started = time.perf_counter()
    if op == "save":
        cloudckpt.save(uri, sd, storage_options=opts, config=config, overwrite=True)
        size = remote.nbytes(sd)  # type: ignore[arg-type]
    else:
        size = remote.nbytes(cloudckpt.load(uri, storage_options=opts, config=config))
    took = time.perf_counter() - started
    peak = sampler.stop()
    allocated = size / MIB if op == "load" else 0
    return {"time": took, "bytes": size, "over_mib": peak - base - allocated}


def sweep(runs: int, scale: float, cap: float) -> None:
    server = remote.Server("gcs")
    bucket = server.bucket()
    print(f"\nSweep: cloudckpt on fake-gcs-server at {server.endpoint}, workload large, scale "
          f"{scale}, medians of {runs}\n")  # fmt: skip
    print("| part_size | file_size | concurrency | save s | save GB/s | load s | load GB/s "
          "| peak RSS over state (save/load) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    try:
        for part, file_size, conc in SWEEP:
            row: dict[str, list[float]] = {"save": [], "load": []}
            over = {"save": 0.0, "load": 0.0}
            size = 0
            failed = ""
            for _ in range(runs):
                for op in ("save", "load"):
                    cmd = [sys.executable, __file__, "--child", op, str(part), str(file_size),
                           str(conc), str(scale), server.endpoint, bucket]  # fmt: skip
                    try:
                        out = subprocess.run(
                            cmd, capture_output=True, text=True, timeout=cap, check=True
                        )
                    except subprocess.TimeoutExpired:
                        failed = f"capped at {cap:.0f} s"
                        break
                    except subprocess.CalledProcessError as e:
                        failed = (e.stderr.strip().splitlines() or ["?"])[-1][:100]
                        break
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    row[op].append(r["time"])
                    over[op] = max(over[op], r["over_mib"])
                    size = r["bytes"]
                if failed:
                    break
            label = f"| {part // MIB} MiB | {file_size // MIB} MiB | {conc} |"
            if failed:
                print(f"{label} {failed} | | | | |", flush=True)
                continue
            s, ld = statistics.median(row["save"]), statistics.median(row["load"])
            print(f"{label} {s:.2f} | {size / s / 1e9:.3f} | {ld:.2f} | {size / ld / 1e9:.3f} | "
                  f"{over['save']:.0f} / {over['load']:.0f} MiB |", flush=True)  # fmt: skip
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--cap", type=float, default=240.0, help="seconds per run before giving up")
    p.add_argument("--skip-compare", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        op, part, file_size, conc, scale, endpoint, bucket = a.child
        r = child(op, int(part), int(file_size), int(conc), float(scale), endpoint, bucket)
        print(json.dumps(r))
        return
    if not a.skip_compare:
        compare = [sys.executable, remote.__file__, "--store", "gcs", "--runs", str(a.runs),
                   "--scale", str(a.scale), "--cap", str(a.cap)]  # fmt: skip
        subprocess.run(compare, check=True)
    if not a.skip_sweep:
        sweep(a.runs, a.scale, a.cap)


if __name__ == "__main__":
    with plots.recorded("bench_gcs"):  # tables -> bar charts in bench/results/
        main()
