"""Run a scenario on N real ranks: one launcher process imports torch once, forks the ranks.

The test process never forks itself (it may hold server threads); it starts this file as a
subprocess, which forks ``world`` children. Each child runs ``SCENARIOS[name](rank, world, args)``
and writes its result (or its error) as JSON; the launcher prints every rank's result and exit
code as one JSON line. Ranks talk over gloo and real TCPStores on 127.0.0.1.

Under pytest one launcher per harness script serves the whole session (``--serve``: a request
per stdin line, a reply per stdout line), so torch is imported once, not once per call; each
rank still starts as a fresh fork of a launcher that has run nothing but imports.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import cloudckpt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_state(rank: int, step: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "model": {"w": torch.randn(256, 64, generator=g), "b": torch.randn(64, generator=g)},
        "shard": [torch.full((1000,), float(rank))],
        "rank": rank,
        "step": step,
    }


def _config(args: dict[str, Any], rank: int, world: int) -> cloudckpt.CheckpointerConfig:
    barrier = args.get("barrier", "tcp_store")
    barrier_args: dict[str, Any] = {}
    if barrier == "tcp_store":
        barrier_args = {
            "global_rank": rank,
            "global_world_size": world,
            "barrier_prefix": "test",
            "timeout_barrier_init_secs": 30,
            "use_checkpoint_barrier_tcpstore_libuv": True,
            "tcpstore_port": args["store_port"],
            "master_address": "127.0.0.1",
            "timeout_secs": args.get("timeout", 30),
        }
    return cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(
            write_barrier_timeout_secs=args.get("timeout", 30), file_size="64KiB"
        ),
        barrier_config=cloudckpt.BarrierConfig(barrier_type=barrier, barrier_args=barrier_args)
        if barrier != "auto"
        else cloudckpt.BarrierConfig(),
        storage=cloudckpt.StorageConfig(options=args.get("storage_options", {})),
    )


def _init_group(args: dict[str, Any], rank: int, world: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{args['pg_port']}",
        rank=rank,
        world_size=world,
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def scenario_save_load(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Every rank saves its own state several times with one checkpointer, then loads it back."""
    if args.get("barrier") in ("dist_barrier", "auto"):
        _init_group(args, rank, world)
    rank_info = None if args.get("barrier") == "auto" else cloudckpt.RankInfo(rank, world)
    ckpt = cloudckpt.make_sync_checkpointer(_config(args, rank, world), rank_info=rank_info)
    for step in range(args.get("saves", 2)):
        uri = f"{args['root']}/step-{step}"
        ckpt.save(uri, rank_state(rank, step))
        out = ckpt.load(uri)
        assert _same(out, rank_state(rank, step)), f"rank {rank} step {step} differs"
    other = ckpt.load(f"{args['root']}/step-0", rank=0)  # any rank's shard, explicitly
    assert _same(other, rank_state(0, 0))
    ckpt.close()
    return {"ok": True}


def scenario_one_rank_raises(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    ckpt = cloudckpt.make_sync_checkpointer(
        _config(args, rank, world), rank_info=cloudckpt.RankInfo(rank, world)
    )
    sd = rank_state(rank)
    if rank == args["bad_rank"]:
        sd["extra"] = {"fn": print}
    started = time.monotonic()
    try:
        ckpt.save(f"{args['root']}/bad", sd)
    except cloudckpt.CheckpointError as e:
        return {
            "ok": False,
            "type": type(e).__name__,
            "error": str(e),
            "secs": time.monotonic() - started,
        }
    return {"ok": True}


class _DieBeforeBarrier(cloudckpt.WriterHook):
    def __init__(self, victim: int, rank: int) -> None:
        self.victim, self.rank = victim, rank

    def pre_commit(self, path: str, **kwargs: Any) -> None:
        if self.rank == self.victim:
            os.kill(os.getpid(), signal.SIGKILL)

    def post_commit(self, path: str, **kwargs: Any) -> None:
        pass


def scenario_one_rank_killed(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    ckpt = cloudckpt.make_sync_checkpointer(
        _config(args, rank, world),
        rank_info=cloudckpt.RankInfo(rank, world),
        commit_hook=_DieBeforeBarrier(args["victim"], rank),
    )
    started = time.monotonic()
    try:
        ckpt.save(f"{args['root']}/killed", rank_state(rank))
    except cloudckpt.CheckpointError as e:
        return {
            "ok": False,
            "type": type(e).__name__,
            "error": str(e),
            "secs": time.monotonic() - started,
        }
    return {"ok": True}


def scenario_async_process(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Every rank saves through a writer *process*; the barrier and commit happen there."""
    if args.get("barrier") in ("dist_barrier", "auto"):
        _init_group(args, rank, world)
    cfg = _config(args, rank, world)
    cfg.process_config.writer = "process"
    rank_info = None if args.get("barrier") == "auto" else cloudckpt.RankInfo(rank, world)
    ckpt = cloudckpt.make_async_checkpointer(cfg, rank_info=rank_info)
    pids = set()
    for step in range(2):
        stage_f, write_f = ckpt.save(f"{args['root']}/step-{step}", rank_state(rank, step))
        stage_f.result()
        write_f.result()
        pids.add(ckpt._process.pid)  # type: ignore[attr-defined]
    for step in range(2):
        out = ckpt.load(f"{args['root']}/step-{step}")
        assert _same(out, rank_state(rank, step)), f"rank {rank} step {step} differs"
    ckpt.close()
    assert len(pids) == 1 and os.getpid() not in pids, pids
    return {"ok": True}


def scenario_save_per_call(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """``cloudckpt.save`` / ``load`` under a process group: a new checkpointer (and barrier on
    the group's long-lived store) per call."""
    _init_group(args, rank, world)
    for step in range(3):
        cloudckpt.save(f"{args['root']}/step-{step}", rank_state(rank, step))
    for step in range(3):
        assert _same(cloudckpt.load(f"{args['root']}/step-{step}"), rank_state(rank, step))
    return {"ok": True}


class UserWaitOnlyBarrier(cloudckpt.Barrier):
    """A user's own barrier in the upstream style: only ``execute_barrier()``, on the group."""

    def __init__(self, **kwargs: Any) -> None:
        self.calls = 0

    def execute_barrier(self) -> None:
        import torch.distributed as dist

        self.calls += 1
        dist.barrier()


def scenario_wait_only_barrier(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Saves through a user's wait-only barrier: rank 0 commits after the rendezvous. With
    ``rank0_pause``, rank 0 sleeps that long after each rendezvous before reading the outcomes,
    leaving the others time to run ahead into their next save if anything lets them."""
    import torch.distributed as dist

    _init_group(args, rank, world)
    info = cloudckpt.RankInfo(rank, world)
    barrier = UserWaitOnlyBarrier()
    writer = cloudckpt.CheckpointWriter(
        cloudckpt.CheckpointWriterConfig(file_size="64KiB"), info, barrier=barrier
    )
    pause = float(args.get("rank0_pause", 0.0))
    if rank == 0 and pause:
        read_outcome = writer._pending_outcome

        def slow_read(backend: Any, root: str, uri: str, r: int) -> Any:
            if r == 0:
                time.sleep(pause)
            return read_outcome(backend, root, uri, r)

        writer._pending_outcome = slow_read  # type: ignore[method-assign]
    reader = cloudckpt.CheckpointReader(info)
    ckpt = cloudckpt.SyncCheckpointer(writer, reader)
    calls = []
    for step in range(2):
        before = barrier.calls
        ckpt.save(f"{args['root']}/step-{step}", rank_state(rank, step), overwrite=False)
        calls.append(barrier.calls - before)
    before = barrier.calls
    ckpt.save(f"{args['root']}/step-1", rank_state(rank, 5), overwrite=True)
    calls.append(barrier.calls - before)
    for step, state_step in ((0, 0), (1, 5)):
        out = ckpt.load(f"{args['root']}/step-{step}")
        assert _same(out, rank_state(rank, state_step)), f"rank {rank} step {step} differs"
    ckpt.close()
    reader.close()
    writer.close()
    dist.destroy_process_group()
    return {"ok": True, "calls": calls}


def race_state(n: int) -> dict[str, Any]:
    """State number ``n`` of the racing first saves (tests/test_commit.py)."""
    return {"n": n, "t": torch.full((50_000,), float(n)), "u": torch.arange(n, n + 1000)}


def scenario_race_first_save(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Each rank is a job of one rank of its own saving state ``rank + 1`` to the same URI, all
    starting at one moment: 50 ms after the last rank is ready (a file each under
    ``args["sync"]``), every rank spinning until then."""
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size="64KiB", concurrency=2)
    )
    state = race_state(rank + 1)
    sync = Path(args["sync"])
    (sync / f"ready-{rank}").touch()
    while len(ready := list(sync.glob("ready-*"))) < world:
        time.sleep(0.001)
    go = max(p.stat().st_mtime for p in ready) + 0.05  # the same moment for every rank
    while time.time() < go:
        time.sleep(0.001)
    try:
        cloudckpt.save(args["uri"], state, config=cfg, storage_options=args["storage_options"])
    except cloudckpt.CheckpointExistsError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True}


def scenario_overwrite_killed(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 overwrites ``args["uri"]`` with state 2 (tests/test_commit.py), timing its save;
    rank 1, if there is one, SIGKILLs it ``args["delay"]`` seconds after it said it was ready
    (its pid in the file ``args["ready"]``). A rank 0 done before then waits to be killed, so
    the pid is still its own."""
    ready = Path(args["ready"])
    if rank == 1:
        while not ready.exists():
            time.sleep(0.001)
        pid = int(ready.read_text())
        time.sleep(args["delay"])
        os.kill(pid, signal.SIGKILL)
        return {"ok": True}
    cfg = cloudckpt.CheckpointerConfig(
        writer_config=cloudckpt.CheckpointWriterConfig(file_size="256KiB", concurrency=2)
    )
    state = {"n": 2, "t": torch.full((400_000,), 2.0), "u": torch.arange(2, 1002)}
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(ready)  # whole, at once
    started = time.monotonic()
    cloudckpt.save(
        args["uri"], state, config=cfg, storage_options=args["storage_options"], overwrite=True
    )
    secs = time.monotonic() - started
    while world > 1:
        time.sleep(0.01)
    return {"ok": True, "secs": secs}


def scenario_save_with_config_file(rank: int, world: int, args: dict[str, Any]) -> dict[str, Any]:
    """Each rank saves with its own config file (``args["configs"][rank]``) and nothing else."""
    state = {"w": torch.full((4,), float(rank)), "rank": rank}
    cloudckpt.save(args["uri"], state, config=args["configs"][rank])
    return {"ok": True}


SCENARIOS: dict[str, Callable[[int, int, dict[str, Any]], dict[str, Any]]] = {
    "save_load": scenario_save_load,
    "one_rank_raises": scenario_one_rank_raises,
    "one_rank_killed": scenario_one_rank_killed,
    "async_process": scenario_async_process,
    "save_per_call": scenario_save_per_call,
    "wait_only_barrier": scenario_wait_only_barrier,
    "save_with_config_file": scenario_save_with_config_file,
    "race_first_save": scenario_race_first_save,
    "overwrite_killed": scenario_overwrite_killed,
}


@dataclass
class RankRun:
    """One call of :func:`run_ranks` as sent to a serving launcher: the scenario, and the
    test process's environment and directory at the time, which the ranks take on."""

    name: str
    world: int
    args: dict[str, Any]
    timeout: float
    env: dict[str, str]
    cwd: str


def launch(
    name: str,
    world: int,
    args: dict[str, Any],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    stdout_to_stderr: bool = False,
) -> dict[str, Any]:
    """In the launcher: fork the ranks, wait, collect their results and exit codes. ``env`` and
    ``cwd``: what each rank sets before its scenario; ``stdout_to_stderr``: the ranks print to
    stderr (a serving launcher's stdout carries its replies)."""
    outdir = tempfile.mkdtemp(prefix="cloudckpt-ranks-")
    pids = {}
    sys.stdout.flush()
    for rank in range(world):
        pid = os.fork()
        if pid == 0:  # the rank
            if stdout_to_stderr:
                os.dup2(2, 1)
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            if cwd is not None:
                os.chdir(cwd)
            code = 0
            try:
                result = SCENARIOS[name](rank, world, args)
            except BaseException as e:
                result = {"ok": False, "type": type(e).__name__, "error": str(e),
                          "trace": traceback.format_exc()}  # fmt: skip
                code = 1
            with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
                json.dump(result, f)
            os._exit(code)
        pids[pid] = rank
    codes: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        codes[pids.pop(pid)] = os.waitstatus_to_exitcode(status)
    for pid, rank in pids.items():  # hung ranks: the test will say so
        os.kill(pid, signal.SIGKILL)
        codes[rank] = -999
    results = {}
    for rank in range(world):
        path = os.path.join(outdir, f"{rank}.json")
        results[rank] = json.loads(Path(path).read_text()) if os.path.exists(path) else None
    return {"codes": codes, "results": results}


def serve() -> None:
    """A launcher serving many calls: one :class:`RankRun` per stdin line, one reply line each;
    it exits when stdin closes."""
    for line in sys.stdin:
        req = RankRun(**json.loads(line))
        reply = launch(
            req.name, req.world, req.args, req.timeout, req.env, req.cwd, stdout_to_stderr=True
        )
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class RankLauncher:
    """A serving launcher of one harness script, as a subprocess of the test process."""

    def __init__(self, script: str) -> None:
        self.script = script
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the launcher
        self._proc = subprocess.Popen(
            [sys.executable, script, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def run(self, req: RankRun) -> dict[str, Any]:
        """Send ``req``; the reply, or RuntimeError with the launcher's stderr if none comes
        within the request's timeout plus a minute."""
        stdin, stdout = self._proc.stdin, self._proc.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(asdict(req)) + "\n")
            stdin.flush()
            ready, _, _ = select.select([stdout], [], [], req.timeout + 60)
            line = stdout.readline() if ready else ""
        except OSError:
            line = ""
        except BaseException:  # interrupted (a test timeout): its reply must not answer the next
            self._proc.kill()
            self.close()
            raise
        if not line:  # it died, or hangs past the request's own timeout
            self._proc.kill()
            self.close()
            self._log.seek(0)
            raise RuntimeError(f"launcher failed: {self._log.read()[-3000:]}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


class Launchers:
    """The test session's serving launchers, one per harness script, each started on first use
    (and again if one died)."""

    def __init__(self) -> None:
        self._by_script: dict[str, RankLauncher] = {}

    def get(self, script: str) -> RankLauncher:
        launcher = self._by_script.get(script)
        if launcher is None or not launcher.alive:
            launcher = self._by_script[script] = RankLauncher(script)
        return launcher

    def close(self) -> None:
        for launcher in self._by_script.values():
            launcher.close()
        self._by_script.clear()


#: Set by tests/conftest.py for the session; without it each call starts its own launcher.
LAUNCHERS: Launchers | None = None


def run_ranks(
    name: str, world: int, args: dict[str, Any], timeout: float = 120, script: str = __file__
) -> dict[int, Any]:
    """From a test: run scenario ``name`` of ``script`` (a harness whose ``__main__`` calls
    :func:`main`) on ``world`` forked ranks; per-rank results + codes."""
    args = {"store_port": free_port(), "pg_port": free_port(), **args}
    if LAUNCHERS is not None:
        req = RankRun(name, world, args, timeout, dict(os.environ), os.getcwd())
        out = LAUNCHERS.get(os.path.abspath(script)).run(req)
    else:
        proc = subprocess.run(
            [sys.executable, script, name, str(world), json.dumps(args), str(timeout)],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"launcher failed: {proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {int(r): {"code": out["codes"][r], "result": out["results"][r]} for r in out["results"]}


def main(argv: list[str]) -> None:
    """A harness script's entry: ``--serve``, or ``NAME WORLD ARGS_JSON TIMEOUT`` for one call."""
    if argv == ["--serve"]:
        serve()
        return
    name, world, raw_args, timeout = argv
    print(json.dumps(launch(name, int(world), json.loads(raw_args), float(timeout))))


if __name__ == "__main__":
    main(sys.argv[1:])
