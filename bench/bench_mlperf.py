"""MLPerf Storage's checkpoint workload, scaled to one machine: cloudckpt against its peers.

    python bench/bench_mlperf.py [--model 8b|70b] [--size 1GiB] [--runs 3] [--dir DIR]
    python bench/bench_mlperf.py --moto [--runs 3]                   # S3: a moto server here
    python bench/bench_mlperf.py --uri s3://bucket/prefix --endpoint-url http://host:port

The state is what one tensor-parallel rank (``--tp``, 8 by default) of a Llama-3 8B or 70B job
checkpoints: token embedding and output head (split by vocabulary rows), per layer q/k/v/o and
the SwiGLU w1/w2/w3 (q/k/v/w1/w3 split by output rows, o/w2 by input columns) and two RMSNorm
weights, a final norm; the model in bf16 plus, per parameter, an fp32 master copy and Adam's
exp_avg and exp_avg_sq in fp32 (14 bytes per parameter). The model's shapes stay as they are;
only the number of layers and the vocabulary are cut so the state fits ``--size``.

Each round writes the state once per tool (fsync'd: every tool's files reach the disk before
its clock stops), then drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``, when this
runs as root) and reads it back once per tool, in a fresh process per write and per read, tools
shuffled each round. Reported as MLPerf does: mean GB/s (the ``GB/s`` column: the mean of the
runs' throughputs) and the duration of each write and read, plus medians and the peak RSS above
the state (sampled every 5 ms). The table is drawn by bench/plots.py when the run ends.

Local peers: torch.save (+ fsync), DCP's FileSystemWriter/Reader (its defaults: one thread,
fsync on), torch_checkpointing's CheckpointManager (see TC_CHANGES), and the device's own limit:
fio with O_DIRECT at queue depth 16 (or, without fio, the same from Python threads). S3 peers:
s3torchconnector's DCP writer/reader (see S3TC_CHANGES), DCP + fsspec (s3fs), boto3's
TransferManager on torch.save's bytes. Peers install with ``pip install -e ".[bench]"``.
``--before DIR`` adds ``cloudckpt-before``: the same child with ``PYTHONPATH`` on the source tree
DIR (a same-run A/B); ``cloudckpt-buffered`` writes and reads with ``direct_io = false``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench_remote import _PeakRSS, _rss_mib

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

BYTES_PER_PARAM = 14  # bf16 model (2) + fp32 master (4) + Adam exp_avg (4) + exp_avg_sq (4)

TC_CHANGES = (
    "torch_checkpointing: synchronous saver (its default async saver is the same writer in a "
    "background process; the clock would stop at the same point), use_direct_io=False (its "
    "O_DIRECT WriteStream fails with EINVAL on this ext4 disk: torch.save's zip writer hands it "
    "unaligned lengths), and an fsync of each file it wrote, inside the clock (it never fsyncs)"
)
S3TC_CHANGES = (
    "s3torchconnector: S3StorageWriter/Reader build their own S3 client with AWS's endpoint; "
    "the bench replaces that client with one for the local endpoint (S3Client(endpoint=..., "
    "force_path_style=True)) right after construction"
)


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int


MODELS = {
    "8b": LlamaShape(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=32),
    "70b": LlamaShape(hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256, layers=80),
}


@dataclass(frozen=True)
class Workload:
    """One rank's share of a Llama-3 checkpoint: ``layers`` layers and ``vocab`` rows kept."""

    model: str
    tp: int
    layers: int
    vocab: int

    def shapes(self) -> dict[str, tuple[int, ...]]:
        s = MODELS[self.model]
        h, tp = s.hidden, self.tp
        kv = s.kv_heads * (h // s.heads)
        out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (self.vocab // tp, h)}
        for i in range(self.layers):
            p = f"layers.{i}."
            out |= {
                p + "attention.wq.weight": (h // tp, h),
                p + "attention.wk.weight": (max(1, kv // tp), h),
                p + "attention.wv.weight": (max(1, kv // tp), h),
                p + "attention.wo.weight": (h, h // tp),
                p + "feed_forward.w1.weight": (s.ffn // tp, h),
                p + "feed_forward.w2.weight": (h, s.ffn // tp),
                p + "feed_forward.w3.weight": (s.ffn // tp, h),
                p + "attention_norm.weight": (h,),
                p + "ffn_norm.weight": (h,),
            }
        out |= {"norm.weight": (h,), "output.weight": (self.vocab // tp, h)}
        return out

    def params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def nbytes(self) -> int:
        return self.params() * BYTES_PER_PARAM

    def describe(self) -> str:
        s = MODELS[self.model]
        return (
            f"Llama-3 {self.model.upper()} rank shard at TP={self.tp}: {self.layers} of "
            f"{s.layers} layers, vocab {self.vocab:,} of {s.vocab:,}; {self.params() / 1e6:.1f} M "
            f"params x {BYTES_PER_PARAM} B = {self.nbytes() / 2**30:.2f} GiB"
        )


def fit(model: str, tp: int, size: int) -> Workload:
    """As many whole layers as fit ~80% of ``size``, the vocabulary filling the rest."""
    s = MODELS[model]
    one = Workload(model, tp, 1, 0)
    per_layer = one.params() - (Workload(model, tp, 0, 0).params())
    budget = size // BYTES_PER_PARAM
    layers = max(1, min(s.layers, int(0.8 * budget) // per_layer))
    rest = budget - Workload(model, tp, layers, 0).params()
    rows = max(64, rest // (2 * s.hidden))  # embedding + head, vocab // tp rows each
    return Workload(model, tp, layers, min(s.vocab, rows * tp))


def make_state(w: Workload, empty: bool = False) -> dict[str, Any]:
    """The checkpoint's state dict: model (bf16), optimizer state (fp32) and a step. Values
    are tiled from one random block (no tool compresses; building it stays cheap)."""
    import torch

    g = torch.Generator().manual_seed(0)
    block = torch.randn(1 << 22, generator=g)

    def filled(shape: tuple[int, ...], scale: float, offset: int) -> torch.Tensor:
        t = torch.empty(shape)
        if empty:
            return t
        flat, n = t.view(-1), t.numel()
        for start in range(0, n, block.numel()):
            k = min(block.numel(), n - start)
            src = block.roll(offset)[:k] if start == 0 else block[:k]
            flat[start : start + k].copy_(src).mul_(scale)
        return t

    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for i, (name, shape) in enumerate(w.shapes().items()):
        master = filled(shape, 0.02, i)
        model[name] = torch.empty(shape, dtype=torch.bfloat16) if empty else master.bfloat16()
        state[name] = {
            "fp32_master": master,
            "exp_avg": filled(shape, 1e-3, i + 1),
            "exp_avg_sq": filled(shape, 1e-6, i + 2).abs_(),
        }
    groups = [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
               "params": list(w.shapes())}]  # fmt: skip
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "step": 1000}


def tensor_bytes(sd: Any) -> int:
    import torch

    if isinstance(sd, torch.Tensor):
        return sd.numel() * sd.element_size()
    if isinstance(sd, dict):
        return sum(tensor_bytes(v) for v in sd.values())
    if isinstance(sd, (list, tuple)):
        return sum(tensor_bytes(v) for v in sd)
    return 0


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories (for tools that do not)."""
    for d, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def drop_caches() -> str:
    """Drop the page cache (root only); returns how it went."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "dropped"
    except OSError as e:
        return f"not dropped ({e.strerror}): reads may hit a warm page cache"


def pressure() -> str:
    """The load average and the IO pressure (PSI: share of time some task stalled on IO, over
    10 s and 60 s), to print beside every figure: a throttled disk shows here first."""
    try:
        with open("/proc/loadavg") as f:
            load = " ".join(f.read().split()[:3])
    except OSError:
        load = "?"
    try:
        with open("/proc/pressure/io") as f:
            some = dict(kv.split("=") for kv in f.readline().split()[1:3])
        io = f"PSI io some {some['avg10']}% (10 s) {some['avg60']}% (60 s)"
    except (OSError, ValueError, KeyError):
        io = "PSI io n/a"
    return f"load {load}; {io}"


# -- the device's limit ----------------------------------------------------------------------


def device_limit(op: str, path: str, size: int) -> float:
    """Seconds to move ``size`` bytes at the device's limit: fio, O_DIRECT, 4 MiB, depth 16."""
    if shutil.which("fio"):
        cmd = ["fio", "--name=limit", f"--filename={path}", f"--size={size}", "--bs=4M",
               "--direct=1", "--ioengine=libaio", "--iodepth=16", "--output-format=json",
               f"--rw={op}"] + (["--end_fsync=1"] if op == "write" else [])  # fmt: skip
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        job = out["jobs"][0][op]
        return float(job["io_bytes"]) / float(job["bw_bytes"])
    return _python_direct_probe(op, path, size)


def _python_direct_probe(op: str, path: str, size: int) -> float:
    """O_DIRECT at depth 16 from 16 threads: the probe where fio is not installed."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    block = 4 << 20
    bufs = [mmap.mmap(-1, block) for _ in range(16)]
    flags = (os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if op == "write" else os.O_RDONLY
    fd = os.open(path, flags | os.O_DIRECT, 0o644)
    io = os.pwrite if op == "write" else os.preadv
    started = time.perf_counter()
    offsets = range(0, size - size % block, block)
    with ThreadPoolExecutor(16) as pool:
        if op == "write":
            list(pool.map(lambda i: io(fd, bufs[i % 16], offsets[i]), range(len(offsets))))
            os.fsync(fd)
        else:
            list(pool.map(lambda i: io(fd, [bufs[i % 16]], offsets[i]), range(len(offsets))))
    took = time.perf_counter() - started
    os.close(fd)
    return took * size / max(1, len(offsets) * block)


# -- one write or read, in a child process ----------------------------------------------------

LOCAL_WRITE = ["limit", "cloudckpt", "cloudckpt-buffered", "torch.save", "dcp", "torch_ckpt"]
LOCAL_READ = ["limit", "cloudckpt", "cloudckpt-buffered", "torch.save", "dcp", "torch_ckpt"]
S3_WRITE = ["cloudckpt", "s3tc-dcp", "dcp-fsspec", "boto3"]
S3_READ = S3_WRITE


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


def _tc_manager() -> Any:
    import torch_checkpointing as tc
    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    cfg = tc.CheckpointManager.Config.with_sync_save()
    cfg.storage_config = LocalFileSystemStorageConfig(use_direct_io=False)
    return cfg.build()


def _s3tc_fix(obj: Any, endpoint: str) -> Any:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp.s3_file_system import S3FileSystem

    region = os.environ["AWS_DEFAULT_REGION"]
    client = S3Client(
        region, endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)
    )
    obj.fs = S3FileSystem(region, s3_client=client)
    return obj


def child(tool: str, op: str, w: Workload, target: str, endpoint: str) -> dict[str, Any]:
    import torch

    remote = target.startswith("s3://")
    size = w.nbytes()
    if tool == "limit":
        took = device_limit(op, target, size)
        return {"time": took, "bytes": size, "over_mib": 0.0}
    sd = make_state(w, empty=op == "read")
    # Import each client before the baseline, so RSS counts the transfer, not the imports.
    import torch.distributed.checkpoint as dcp

    import cloudckpt

    cloudckpt.save, cloudckpt.load  # noqa: B018 - lazy names: imported here, like DCP above
    opts = s3_options(endpoint) if remote else {}
    tc = _tc_manager() if tool == "torch_ckpt" else None
    if tool == "boto3" or tool.startswith("s3tc"):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=endpoint,
                          config=Config(request_checksum_calculation="when_required"))  # fmt: skip
        tcfg = TransferConfig(max_concurrency=8)
    bucket, _, key = target.removeprefix("s3://").partition("/")
    base = _rss_mib()
    sampler = _PeakRSS()
    started = time.perf_counter()
    if op == "write":
        if tool.startswith("cloudckpt"):
            extra = {"direct_io": False} if tool == "cloudckpt-buffered" else {}
            cloudckpt.save(target, sd, storage_options={**opts, **extra})
        elif tool == "torch.save":
            with open(target, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
        elif tool == "dcp":
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(target))
        elif tool == "torch_ckpt":
            tc.save(target, sd)
            fsync_tree(target)
        elif tool == "dcp-fsspec":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            dcp.save(sd, storage_writer=FsspecWriter(target, **opts))
        elif tool == "s3tc-dcp":
            from s3torchconnector.dcp import S3StorageWriter

            writer = S3StorageWriter(os.environ["AWS_DEFAULT_REGION"], target)
            dcp.save(sd, storage_writer=_s3tc_fix(writer, endpoint))
        elif tool == "boto3":
            import io

            buf = io.BytesIO()
            torch.save(sd, buf)
            buf.seek(0)
            s3.upload_fileobj(buf, bucket, key, Config=tcfg)
        else:
            raise SystemExit(f"unknown tool {tool!r}")
    else:
        if tool.startswith("cloudckpt"):
            extra = {"direct_io": False} if tool == "cloudckpt-buffered" else {}
            sd = cloudckpt.load(target, storage_options={**opts, **extra})
        elif tool == "torch.save":
            sd = torch.load(target, weights_only=True)
        elif tool == "dcp":
            dcp.load(sd, storage_reader=dcp.FileSystemReader(target))
        elif tool == "torch_ckpt":
            sd = dict(tc.load(target, sd))
        elif tool == "dcp-fsspec":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            dcp.load(sd, storage_reader=FsspecReader(target, **opts))
        elif tool == "s3tc-dcp":
            from s3torchconnector.dcp import S3StorageReader

            reader = S3StorageReader(os.environ["AWS_DEFAULT_REGION"], target)
            dcp.load(sd, storage_reader=_s3tc_fix(reader, endpoint))
        elif tool == "boto3":
            import io

            buf = io.BytesIO()
            s3.download_fileobj(bucket, key, buf, Config=tcfg)
            buf.seek(0)
            sd = torch.load(buf, weights_only=True)
        else:
            raise SystemExit(f"unknown tool {tool!r}")
    took = time.perf_counter() - started
    peak = sampler.stop()
    got = tensor_bytes(sd)
    if got != size:
        raise SystemExit(f"{tool} {op}: {got} tensor bytes, expected {size}")
    if tc is not None:
        tc.close()
    # A read ends holding the state it read: that is not overhead.
    over = peak - base - (size / 2**20 if op == "read" else 0)
    return {"time": took, "bytes": size, "over_mib": over}


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Row:
    tool: str
    op: str
    times: list[float]
    nbytes: int
    over_mib: float
    error: str = ""

    def mean_gbps(self) -> float:
        return statistics.mean(self.nbytes / t / 1e9 for t in self.times)

    def median_s(self) -> float:
        return statistics.median(self.times)


def _target(workdir: str, tool: str, remote: bool) -> str:
    if remote:
        return f"{workdir.rstrip('/')}/{tool}-{random.randrange(1 << 30):x}"
    return os.path.join(workdir, tool + (".pt" if tool == "torch.save" else ""))


def _run_child(args: list[str], cap: float, before: str = "") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(args)]
    env = None
    if args[0] == "cloudckpt-before":  # the same child, importing cloudckpt from tree DIR
        tree = os.path.abspath(before)
        parts = [tree, os.path.join(tree, "backends", "s3"), os.path.join(tree, "backends", "gcs")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(parts))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, check=True, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"capped at {cap:.0f} s"}
    except subprocess.CalledProcessError as e:
        return {"error": (e.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _remove(target: str) -> None:
    if os.path.isdir(target):
        shutil.rmtree(target)
    elif os.path.exists(target):
        os.unlink(target)


def table(rows: dict[tuple[str, str], Row], remote: bool) -> list[str]:
    out = ["| op | tool | GB/s | mean s | median s | runs | cloudckpt vs this | "
           "peak RSS over state |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for op in ("write", "read"):
        ours = rows.get(("cloudckpt", op))
        for (tool, o), r in rows.items():
            if o != op:
                continue
            if r.error or not r.times:
                out.append(f"| {op} | {tool} | {r.error} | | | | | |")
                continue
            ratio = (
                f"{ours.mean_gbps() / r.mean_gbps():.2f}x"
                if ours is not None and ours.times and tool != "cloudckpt"
                else ""
            )
            name = "device limit (fio, O_DIRECT, QD16)" if tool == "limit" else tool
            out.append(
                f"| {op} | {name} | {r.mean_gbps():.2f} | {statistics.mean(r.times):.2f} | "
                f"{r.median_s():.2f} | {len(r.times)} | {ratio} | "
                f"{'' if tool == 'limit' else f'{r.over_mib:.0f} MiB'} |"
            )
    return out


def verdict(rows: dict[tuple[str, str], Row]) -> list[str]:
    lines = []
    for op in ("write", "read"):
        ours = rows.get(("cloudckpt", op))
        if ours is None or not ours.times:
            continue
        peers = [r for (t, o), r in rows.items() if o == op and r.times
                 and not t.startswith("cloudckpt") and t != "limit"]  # fmt: skip
        if peers:
            best = max(peers, key=Row.mean_gbps)
            lines.append(f"- {op}: cloudckpt {ours.mean_gbps():.2f} GB/s = "
                         f"{ours.mean_gbps() / best.mean_gbps():.2f}x the best peer "
                         f"({best.tool}, {best.mean_gbps():.2f} GB/s)")  # fmt: skip
        limit = rows.get(("limit", op))
        if limit is not None and limit.times:
            lines.append(f"- {op}: cloudckpt = {ours.mean_gbps() / limit.mean_gbps():.2f}x "
                         f"the device limit ({limit.mean_gbps():.2f} GB/s)")  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="8b")
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel degree of the shard")
    p.add_argument("--size", default="1GiB", help="about how big the state is")
    p.add_argument("--runs", type=int, default=3, help="writes and reads per tool")
    p.add_argument("--dir", default=None, help="local directory (default: a temp dir)")
    p.add_argument("--uri", default=None, help="s3://bucket/prefix: run against S3")
    p.add_argument("--endpoint-url", default=None, help="the S3 endpoint for --uri")
    p.add_argument("--moto", action="store_true", help="start a moto server and use it")
    p.add_argument("--tools", default=None, help="comma-separated subset of the tools")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cap", type=float, default=600.0, help="seconds per write/read")
    p.add_argument("--before", default="", help="source tree measured as cloudckpt-before")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        tool, op, wd, target, endpoint = json.loads(a.child)
        print(json.dumps(child(tool, op, Workload(**wd), target, endpoint)))
        return
    from cloudckpt.units import parse_size

    w = fit(a.model, a.tp, parse_size(a.size))
    server = None
    remote = bool(a.uri or a.moto)
    endpoint = a.endpoint_url or ""
    if a.moto:
        from bench_remote import Server

        server = Server("s3")
        endpoint = server.endpoint
        workdir = f"s3://{server.bucket()}/mlperf"
    elif a.uri:
        if not a.uri.startswith("s3://") or not endpoint:
            raise SystemExit("--uri takes s3://bucket/prefix together with --endpoint-url")
        workdir = a.uri
    else:
        workdir = a.dir or tempfile.mkdtemp(prefix="cloudckpt-mlperf-")
        os.makedirs(workdir, exist_ok=True)
    writers, readers = (S3_WRITE, S3_READ) if remote else (LOCAL_WRITE, LOCAL_READ)
    if a.before:
        writers, readers = [*writers, "cloudckpt-before"], [*readers, "cloudckpt-before"]
    if a.tools:
        keep = set(a.tools.split(",")) | ({"cloudckpt-before"} if a.before else set())
        writers, readers = [t for t in writers if t in keep], [t for t in readers if t in keep]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"workload: {w.describe()}")
    print(f"where: {workdir}{' at ' + endpoint if endpoint else ''}; runs: {a.runs}")
    rows = {(t, "write"): Row(t, "write", [], w.nbytes(), 0.0) for t in writers}
    rows |= {(t, "read"): Row(t, "read", [], w.nbytes(), 0.0) for t in readers}
    cache = ""
    loads: list[str] = []
    try:
        for rnd in range(a.runs):
            loads.append(f"round {rnd + 1} start: {pressure()}")
            print(f"  {loads[-1]}", flush=True)
            targets = {t: _target(workdir, t, remote) for t in set(writers) | set(readers)}
            for op, tools in (("write", writers), ("read", readers)):
                for tool in random.sample(tools, len(tools)):
                    row = rows[(tool, op)]
                    if row.error or (op == "read" and rows.get((tool, "write"), row).error):
                        continue
                    if op == "read" and not remote:
                        cache = drop_caches()
                    args = [tool, op, asdict(w), targets[tool], endpoint]
                    one = _run_child(args, a.cap, a.before)
                    if "error" in one:
                        row.error = one["error"]
                        print(f"  round {rnd + 1} {op} {tool}: {row.error}", flush=True)
                        continue
                    row.times.append(one["time"])
                    row.over_mib = max(row.over_mib, one["over_mib"])
                    print(f"  round {rnd + 1} {op} {tool}: {one['time']:.2f} s", flush=True)
            if not remote:
                for t in targets.values():
                    _remove(t)
        loads.append(f"end: {pressure()}")
    finally:
        if server is not None:
            server.stop()
        if not remote and a.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n".join(loads))
    if not remote:
        print(f"page cache before each read: {cache or 'n/a'}")
        print(f"{TC_CHANGES}\n")
    else:
        print(f"{S3TC_CHANGES}\n")
    print("\n".join(table(rows, remote)))
    print()
    print("\n".join(verdict(rows)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workload": w.describe(), "remote": remote, "cache": cache, "load": loads,
                       "rows": [asdict(r) for r in rows.values()]}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    import plots

    with plots.recorded("bench_mlperf"):
        main()
