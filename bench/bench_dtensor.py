"""Global tensors against torch.distributed.checkpoint (DCP), on the same DTensor state.

    python bench/bench_dtensor.py [--runs 3] [--mib 256] [--dir DIR] [--before TREE]

A global state of ``--mib`` MiB in 32 float32 tensors (half ``Shard(0)``, a quarter
``Shard(1)``, a quarter ``Replicate``) is saved by 4 ranks (gloo, one process each) and loaded
by 2 ranks into ``Shard(0)`` DTensors on a 1-D mesh of 2 (a resharding load). Per tool and run,
fresh processes; rank 0's time between two barriers around the call; medians over runs.
"bytes read / shard" is the ``rchar`` of ``/proc/self/io`` (bytes read by the process through
read syscalls, index and metadata included) during the load, over the bytes of the rank's own
shard: 1.00 means nothing beyond the shard was read. Saves are durable for both (cloudckpt
fsyncs; DCP's FileSystemWriter syncs files by default); loads read a hot page cache alike.

Outside the clock, for both tools: process start, ``import torch``, the process group and the
state; the tool's modules are imported first (DCP's ``torch.distributed.checkpoint``,
cloudckpt's lazily loaded URI calls). Inside it: everything a save or load call does, first-call
costs included (config, writer/reader objects, thread pools, backend, barrier or collectives).
``--before TREE`` adds a "cloudckpt-before" row: the same children with ``PYTHONPATH`` on the
source tree TREE (e.g. ``git worktree add TREE <commit>``), interleaved with the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

TOOLS = ["dcp", "cloudckpt"]
BEFORE = "cloudckpt-before"
N_TENSORS = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _shapes(mib: int) -> list[tuple[int, int]]:
    rows = max(4, (mib << 20) // N_TENSORS // 4 // 1024)
    return [(rows, 1024)] * N_TENSORS


def _state(mib: int, mesh: Any, save: bool) -> dict[str, Any]:
    """The global state as DTensors built from local chunks only (no scatter)."""
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from cloudckpt.format.chunks import LayoutSpec, ShardOn
    from cloudckpt.format.chunks import Replicate as Rep

    out = {}
    for i, shape in enumerate(_shapes(mib)):
        if not save:
            placement: Any = Shard(0)
        else:
            placement = (Shard(0), Shard(0), Shard(1), Replicate())[i % 4]
        ours = ShardOn(placement.dim) if isinstance(placement, Shard) else Rep()
        spec = LayoutSpec(shape, tuple(range(mesh.size())), (mesh.size(),), (ours,))
        box = spec.box_of(mesh.get_rank())
        local = torch.full(box.sizes, float(i + 1)) if save else torch.zeros(box.sizes)
        out[f"layer{i}.weight"] = DTensor.from_local(
            local, mesh, [placement], run_check=False, shape=torch.Size(shape),
            stride=(shape[1], 1),
        )  # fmt: skip
    return {"model": out}


def rank_main(tool: str, op: str, mib: int, path: str) -> dict[str, Any]:
    """One rank of one measurement (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT`` in the env)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import cloudckpt

    # cloudckpt loads the URI calls' modules on first use; DCP's are imported above
    cloudckpt.save, cloudckpt.load  # noqa: B018
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}", rank=rank,
        world_size=world,
    )  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    state = _state(mib, mesh, save=op == "save")
    shard = sum(t.to_local().numel() * 4 for t in state["model"].values())
    dist.barrier()
    started, before = time.perf_counter(), _rchar()
    if op == "save" and tool == "dcp":
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, thread_count=4))
    elif op == "save":
        cloudckpt.save(path, state)
    elif tool == "dcp":
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    else:
        cloudckpt.load(path, state)
    read = _rchar() - before
    dist.barrier()
    elapsed = time.perf_counter() - started
    if op == "load":
        for i in (0, 2, 3, N_TENSORS - 1):  # one of each saved placement, filled with i + 1
            local = state["model"][f"layer{i}.weight"].to_local()
            assert local.numel() > 0 and torch.all(local == float(i + 1)), (tool, i)
    dist.destroy_process_group()
    return {
        "rank": rank,
        "secs": elapsed,
        "read": read,
        "shard": shard,
        "module": cloudckpt.__file__,
    }


def measure(
    tool: str, op: str, world: int, mib: int, path: str, before: str = ""
) -> list[dict[str, Any]]:
    """Start ``world`` rank processes; their results. ``cloudckpt-before`` runs cloudckpt
    from the source tree ``before``."""
    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_PORT": str(_free_port())}
    child = tool
    if tool == BEFORE:
        env["PYTHONPATH"], child = os.path.abspath(before), "cloudckpt"
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", child, op, str(mib), path],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tempfile.gettempdir(),  # so the working directory never shadows PYTHONPATH
        )
        for r in range(world)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"{tool} {op} rank failed: {stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    if tool == BEFORE and not out[0]["module"].startswith(os.path.abspath(before)):
        raise RuntimeError(f"{BEFORE} imported {out[0]['module']}, not {before}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mib", type=int, default=256, help="global state size")
    p.add_argument("--dir", default=None)
    p.add_argument("--before", default="", help="source tree measured as cloudckpt-before")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        tool, op, mib, path = a.child
        print(json.dumps(rank_main(tool, op, int(mib), path)))
        return
    workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-bench-dtensor-")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"{a.mib} MiB global state, 32 tensors; save at 4 ranks, load at 2; runs: {a.runs}\n")
    tools = [*TOOLS, BEFORE] if a.before else TOOLS
    results: dict[tuple[str, str], list[float]] = {}
    reads: dict[str, list[float]] = {}
    for run in range(a.runs):
        for tool in tools if run % 2 == 0 else reversed(tools):
            path = os.path.join(workdir, f"{tool}-{run}")
            saves = measure(tool, "save", 4, a.mib, path, a.before)
            loads = measure(tool, "load", 2, a.mib, path, a.before)
            results.setdefault((tool, "save"), []).append(saves[0]["secs"])
            results.setdefault((tool, "load"), []).append(loads[0]["secs"])
            reads.setdefault(tool, []).extend(r["read"] / r["shard"] for r in loads)
            shutil.rmtree(path, ignore_errors=True)
    print("| op | tool | median s | GB/s (global state) | vs DCP | bytes read / shard (max rank) |")
    print("|---|---|---|---|---|---|")
    for op in ("save", "load"):
        ref = statistics.median(results[("dcp", op)])
        for tool in tools:
            med = statistics.median(results[(tool, op)])
            ratio = f"{max(reads[tool]):.2f}" if op == "load" else ""
            print(
                f"| {op} | {tool} | {med:.3f} | {(a.mib << 20) / med / 1e9:.2f} | "
                f"{ref / med:.2f}x | {ratio} |"
            )


if __name__ == "__main__":
    main()
