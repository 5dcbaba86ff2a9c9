"""What the disk allows: durable writes of the same bytes from several processes, no library.

    python bench/bench_durable.py [--procs 4] [--files 4] [--mib 16] [--runs 5] [--dir DIR]

Each of ``--procs`` forked processes writes ``--files`` files of ``--mib`` MiB from its own
memory, the files in parallel threads, then fsyncs each file and the directory; the clock runs
from a shared barrier to the last process done. Modes, interleaved run by run:

- ``buffered``: ``write`` in 8 MiB pieces, then ``fsync`` (what DCP's writer does);
- ``writebehind``: the same with ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` after each piece;
- ``direct``: ``O_DIRECT`` after ``fallocate``, 4 MiB ``pwrite`` s straight from the
  (page-aligned) memory, 8 in flight, then ``fsync``;
- ``direct-staged``: the same through a fresh page-aligned 4 MiB buffer per write, as the local
  backend's O_DIRECT path copies into its staging buffers (first-touch page faults included).

Prints the median wall time and CPU seconds per process of each mode.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MODES = ["buffered", "writebehind", "direct", "direct-staged"]
BLOCK = 4 << 20
PIECE = 8 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _write_file(mode: str, path: str, src: mmap.mmap, size: int, libc: Any) -> None:
    view = memoryview(src)[:size]
    if not mode.startswith("direct"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        off = 0
        while off < size:
            n = os.write(fd, view[off : off + PIECE])
            if mode == "writebehind":
                libc.sync_file_range(fd, ctypes.c_longlong(off), ctypes.c_longlong(n),
                                     _SYNC_FILE_RANGE_WRITE)  # fmt: skip
            off += n
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        os.posix_fallocate(fd, 0, size)

        def one(off: int) -> None:
            if mode == "direct-staged":
                buf = mmap.mmap(-1, BLOCK)
                buf[:] = view[off : off + BLOCK]
                os.pwrite(fd, memoryview(buf), off)
            else:
                os.pwrite(fd, view[off : off + BLOCK], off)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(0, size, BLOCK)))
    os.fsync(fd)
    os.close(fd)


def _proc(mode: str, rank: int, a: argparse.Namespace, d: str, barrier: Any, q: Any) -> None:
    size = a.mib << 20
    src = mmap.mmap(-1, size)
    src.write(bytes([rank + 1]) * size)
    libc = ctypes.CDLL(None, use_errno=True)
    barrier.wait()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(a.files) as pool:
            paths = [os.path.join(d, f"p{rank}-{i}") for i in range(a.files)]
            list(pool.map(lambda p: _write_file(mode, p, src, size, libc), paths))
        dfd = os.open(d, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        q.put((time.perf_counter() - t0, time.process_time() - c0))
    except BaseException:
        traceback.print_exc()
        q.put((float("nan"), 0.0))


def run(mode: str, a: argparse.Namespace, d: str) -> tuple[float, float]:
    """One measurement: (wall seconds, mean CPU seconds per process)."""
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(a.procs), ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(mode, r, a, d, barrier, q)) for r in range(a.procs)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    return max(r[0] for r in res), statistics.mean(r[1] for r in res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--files", type=int, default=4, help="files per process")
    p.add_argument("--mib", type=int, default=16, help="MiB per file")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dir", default=None)
    a = p.parse_args()
    d = tempfile.mkdtemp(prefix="cloudckpt-bench-durable-", dir=a.dir)
    modes = a.modes.split(",")
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    try:
        for r in range(a.runs):
            for m in modes if r % 2 == 0 else reversed(modes):
                out[m].append(run(m, a, d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    total = a.procs * a.files * a.mib
    print(f"{a.procs} processes x {a.files} files x {a.mib} MiB ({total} MiB), runs: {a.runs}")
    print("| mode | median s | GB/s | CPU s / process |\n|---|---|---|---|")
    for m, v in out.items():
        wall = statistics.median(x[0] for x in v)
        cpu = statistics.median(x[1] for x in v)
        print(f"| {m} | {wall:.3f} | {(total << 20) / wall / 1e9:.2f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
