"""Commit at scale: N simulated ranks (threads), each saving a small shard, one real TCPStore.

    python bench/bench_commit.py [--ranks 8,64,256] [--target memory|local] [--runs 3]

Every rank is a thread with its own CheckpointWriter and its own TCPStoreBarrier client (rank 0
hosts the store), so the barrier protocol, rank 0's index checks and the manifest run exactly as
in a job. Reports the median whole-save time, rank 0's commit time (barrier release to manifest
written), the storage requests rank 0 makes while committing, and the manifest's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import plots
import torch

import cloudckpt
from cloudckpt.checkpoint_writer import CheckpointWriter
from cloudckpt.storage import Backend, FsspecBackend, LocalBackend

COUNTS: Counter[str] = Counter()
COUNTING = threading.Event()


def _counting(cls: type[Backend]) -> None:
    """Count every backend call made while COUNTING is set (rank 0's commit window)."""
    for name in ("write_object", "read_into", "read_bytes", "put_create_only", "exists", "size",
                 "list_dir", "delete"):  # fmt: skip
        original = getattr(cls, name)

        def wrapped(
            self: Backend, *a: Any, __orig: Any = original, __n: str = name, **k: Any
        ) -> Any:
            if COUNTING.is_set():
                COUNTS[__n] += 1
            return __orig(self, *a, **k)

        setattr(cls, name, wrapped)


COMMIT_TIMES: list[float] = []
_original_commit = CheckpointWriter._commit


def _timed_commit(self: CheckpointWriter, *a: Any, **k: Any) -> None:
    COUNTING.set()
    started = time.perf_counter()
    try:
        _original_commit(self, *a, **k)
    finally:
        COMMIT_TIMES.append(time.perf_counter() - started)
        COUNTING.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_save(ranks: int, root: str, port: int, writers: list[CheckpointWriter]) -> float:
    errors: list[BaseException] = []
    shard = {"w": torch.randn(256), "step": 1}

    def rank_main(rank: int) -> None:
        try:
            writers[rank].write(root, {**shard, "rank": rank})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    if errors:
        raise errors[0]
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ranks", default="8,64,256")
    p.add_argument("--target", choices=["memory", "local"], default="local")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    _counting(LocalBackend)
    _counting(FsspecBackend)
    CheckpointWriter._commit = _timed_commit  # type: ignore[method-assign]
    base = (
        tempfile.mkdtemp(prefix="cloudckpt-commit-") if a.target == "local" else "memory://commit"
    )
    print(
        f"{os.cpu_count()} cores, python {sys.version.split()[0]}, target {a.target}; medians of {a.runs}\n"
    )
    print("| ranks | whole save s | rank 0 commit s | rank 0 requests in commit | manifest bytes |")
    print("|---|---|---|---|---|")
    for ranks in [int(x) for x in a.ranks.split(",")]:
        port = free_port()
        writers: list[CheckpointWriter] = [None] * ranks  # type: ignore[list-item]

        def build(
            rank: int, port: int = port, ranks: int = ranks, writers: list[Any] = writers
        ) -> None:
            barrier = cloudckpt.TCPStoreBarrier(
                global_rank=rank,
                global_world_size=ranks,
                barrier_prefix="bench",
                timeout_barrier_init_secs=60,
                use_checkpoint_barrier_tcpstore_libuv=True,
                tcpstore_port=port,
                master_address="127.0.0.1",
                timeout_secs=120,
            )
            writers[rank] = CheckpointWriter(
                cloudckpt.CheckpointWriterConfig(concurrency=1, write_barrier_timeout_secs=120),
                cloudckpt.RankInfo(rank, ranks),
                barrier,
            )

        builders = [threading.Thread(target=build, args=(r,)) for r in range(ranks)]
        for t in builders:
            t.start()
        for t in builders:
            t.join()
        totals, COMMIT_TIMES[:] = [], []
        for run in range(a.runs):
            COUNTS.clear()
            totals.append(one_save(ranks, f"{base}/r{ranks}-{run}", port, writers))
        ckpt = cloudckpt.checkpoint_reader.open_checkpoint(f"{base}/r{ranks}-0")
        manifest_bytes = len(ckpt.manifest.to_json())
        reqs = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        print(
            f"| {ranks} | {statistics.median(totals):.3f} | {statistics.median(COMMIT_TIMES):.4f} "
            f"| {sum(COUNTS.values())} ({reqs}) | {manifest_bytes} |",
            flush=True,
        )
        for w in writers:
            w._pool.shutdown(wait=False)
    if a.target == "local":
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    with plots.recorded("bench_commit"):  # tables -> bar charts in bench/results/
        main()
