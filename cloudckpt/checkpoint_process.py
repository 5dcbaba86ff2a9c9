"""The writer process of an async checkpointer (the thread writer and the writer interface are
in :mod:`cloudckpt.background`).

``CheckpointProcess`` (name and signature as in ``torch.distributed.checkpoint._experimental``)
spawns one writer process, once, and feeds it staged state dicts through shared memory: each CPU
storage goes over the pipe once, as a handle, and every save after that sends only the tree of
key paths, offsets, shapes and dtypes. The writer process builds its own ``CheckpointWriter``
(barrier included), so uploads, CRCs and the commit never compete with training for the GIL. If
the process dies, the save in flight fails with :class:`WriterProcessError` instead of hanging.
"""

from __future__ import annotations

import logging
import logging.handlers
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from .background import BackgroundWriter, _resolved
from .config_types import WRITER_KINDS, CheckpointProcessConfig  # noqa: F401 - re-exported
from .errors import ConfigError, WriterProcessError, WriterProcessTimeoutError
from .format.chunks import LayoutSpec
from .gc_pause import own_process_gc
from .global_tensors import GlobalShard
from .storage.config import StorageConfig
from .storage.registry import BackendSource, OwnedBackends
from .tree import LeafMakers, Node, TensorLeaf, flatten, unflatten
from .types import STATE_DICT, RankInfo

logger = logging.getLogger(__name__)


# -- the wire format between the training process and its writer process -----------------------


@dataclass(frozen=True)
class _TensorRef:
    """A staged CPU tensor, as a place in a storage the writer process already holds."""

    storage: int
    byte_offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _ref(t: torch.Tensor, storages: dict[int, torch.UntypedStorage]) -> _TensorRef | torch.Tensor:
    """A CPU tensor as a place in its storage (recorded in ``storages``); other devices' tensors
    go as themselves (torch pickles those)."""
    if t.device.type != "cpu":
        return t
    st = t.untyped_storage()
    storages.setdefault(st.data_ptr(), st)
    offset = int(t.storage_offset()) * t.element_size()
    return _TensorRef(st.data_ptr(), offset, t.dtype, tuple(t.shape), tuple(t.stride()))


def _leaf(
    refs: list[_TensorRef | torch.Tensor],
    storages: dict[int, torch.UntypedStorage],
    i: int,
    key: str,
) -> torch.Tensor:
    """Tensor ``i`` of a received state dict, viewed in its storage (``unflatten``'s callback)."""
    ref = refs[i]
    if not isinstance(ref, _TensorRef):
        return ref
    out = torch.empty(0, dtype=ref.dtype)
    offset = ref.byte_offset // max(1, out.element_size())
    return out.set_(storages[ref.storage], offset, ref.shape, ref.stride)


def _makers(
    refs: list[_TensorRef | torch.Tensor],
    layouts: list[tuple[LayoutSpec, str] | None],
    storages: dict[int, torch.UntypedStorage],
) -> LeafMakers:
    """``unflatten``'s leaf makers for a received state dict: per-rank tensors and global
    leaves are numbered apart in the tree, ``refs`` holds both in visit order."""
    per_rank = [p for p, lay in enumerate(layouts) if lay is None]
    globals_ = [p for p, lay in enumerate(layouts) if lay is not None]

    def tensor(i: int, key: str) -> torch.Tensor:
        return _leaf(refs, storages, per_rank[i], key)

    def global_leaf(j: int, key: str) -> GlobalShard:
        layout = layouts[globals_[j]]
        assert layout is not None
        return GlobalShard(layout[0], _leaf(refs, storages, globals_[j], key), layout[1])

    return LeafMakers(tensor, global_leaf)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a :class:`WriterProcessError` with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return WriterProcessError(f"{type(error).__name__}: {error}")


class RequestType(Enum):
    """What a message on the writer process's pipe is about."""

    PING = "ping"
    WRITE_CHECKPOINT = "write_checkpoint"
    TERMINATE_PROCESS = "exit"
    LOG = "log"  # the writer process forwards a log record; never sent as a request


@dataclass(frozen=True)
class WritePayload:
    """A flattened state dict to write: its tree, and each tensor as a place in a storage."""

    path: str
    tree: Node
    refs: list[_TensorRef | torch.Tensor]
    layouts: list[tuple[LayoutSpec, str] | None]  # per ref: how a global leaf is laid out
    new_storages: dict[int, torch.UntypedStorage]  # storages the process does not hold yet
    keep: frozenset[int]  # every storage this write uses; the process drops the others
    kwargs: dict[str, Any]


@dataclass
class WorkerRequest:
    """A request to the writer process (``payload`` is a :class:`WritePayload` for a write)."""

    request_type: RequestType
    payload: WritePayload | dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerResponse:
    """The writer process's answer to a request (or a forwarded log record, ``RequestType.LOG``).

    ``error`` carries the failure itself when it pickles, so the caller re-raises its type.
    """

    request_type: RequestType
    success: bool
    error_msg: str | None = None
    payload: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Death:
    """The reader thread's note that the writer process is gone (never crosses the pipe)."""

    how: str


def _failure(request_type: RequestType, error: BaseException) -> WorkerResponse:
    return WorkerResponse(
        request_type, False, error_msg=f"{type(error).__name__}: {error}", error=_portable(error)
    )


class _PipeLogQueue:
    """Lets a ``QueueHandler`` send log records over the pipe, through ``send``."""

    def __init__(self, send: Callable[[WorkerResponse], None]) -> None:
        self._send = send

    def put_nowait(self, record: logging.LogRecord) -> None:
        self._send(WorkerResponse(RequestType.LOG, True, payload=record))


def writer_process_main(
    conn: Connection,
    log_level: int,
    rank_info: RankInfo,
    subprocess_init_fn: Callable[..., None] | None,
    subprocess_init_args: tuple[Any, ...],
    checkpoint_writer_init_fn: Callable[..., Any],
    checkpoint_writer_init_args: dict[str, Any],
) -> None:
    """The writer process: build the writer, answer the start-up ``PING``, then write what
    arrives until told to exit."""
    lock = threading.Lock()

    def send(message: WorkerResponse) -> None:
        with lock:
            conn.send(message)

    own_process_gc()  # nothing but the writer runs Python here
    package_logger = logging.getLogger("cloudckpt")
    package_logger.setLevel(log_level)
    package_logger.addHandler(logging.handlers.QueueHandler(_PipeLogQueue(send)))  # type: ignore[arg-type]
    package_logger.propagate = False  # the training process's handlers print it, once
    try:
        if subprocess_init_fn is not None:
            subprocess_init_fn(*subprocess_init_args)
        args = dict(checkpoint_writer_init_args)
        args.setdefault("rank_info", rank_info)
        writer = checkpoint_writer_init_fn(**args)
    except BaseException as e:
        send(_failure(RequestType.PING, e))
        return
    send(WorkerResponse(RequestType.PING, True))
    held: dict[int, torch.UntypedStorage] = {}
    while True:
        try:
            request: WorkerRequest = conn.recv()
        except EOFError:  # the training process is gone
            break
        kind = request.request_type
        if kind is RequestType.TERMINATE_PROCESS:
            break
        if kind is RequestType.PING:
            send(WorkerResponse(RequestType.PING, True))
            continue
        payload = request.payload
        if kind is not RequestType.WRITE_CHECKPOINT or not isinstance(payload, WritePayload):
            send(_failure(kind, WriterProcessError(f"the writer process cannot serve {request!r}")))
            continue
        held.update(payload.new_storages)
        for key in [k for k in held if k not in payload.keep]:
            del held[key]
        try:
            makers = _makers(payload.refs, payload.layouts, held)
            state_dict = unflatten(payload.tree, makers, payload.path)
            writer.write(path=payload.path, state_dict=state_dict, **payload.kwargs)
            send(WorkerResponse(RequestType.WRITE_CHECKPOINT, True))
        except BaseException as e:
            logger.debug("write of %s failed in the writer process", payload.path, exc_info=True)
            send(_failure(RequestType.WRITE_CHECKPOINT, e))
    try:
        writer.close()
    finally:
        send(WorkerResponse(RequestType.TERMINATE_PROCESS, True))


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode}"


class WriterProcessContext:
    """The writer process, shaped like what ``torch.multiprocessing.spawn(join=False)`` returns:
    ``processes[0]`` is the writer, ``join(timeout)`` says whether it has exited."""

    def __init__(self, process: BaseProcess) -> None:
        self.processes = [process]

    def pids(self) -> list[int | None]:
        return [p.pid for p in self.processes]

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds; ``True`` once every process has exited."""
        for p in self.processes:
            p.join(timeout)
        return not any(p.is_alive() for p in self.processes)


class _Worker:
    """One spawned writer process, its pipe and the thread that reads its answers."""

    def __init__(self, owner: CheckpointProcess) -> None:
        import torch.multiprocessing as mp  # registers torch's shared-memory reductions

        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self._answers: queue.Queue[WorkerResponse | _Death] = queue.Queue()
        self._sent: dict[int, torch.UntypedStorage] = {}  # storages the process holds
        self.process = ctx.Process(
            target=writer_process_main,
            args=(
                child_end,
                logging.getLogger("cloudckpt").getEffectiveLevel(),
                owner.rank_info,
                owner.subprocess_init_fn,
                owner.subprocess_init_args,
                owner.checkpoint_writer_init_fn,
                owner.checkpoint_writer_init_args,
            ),
            name=f"cloudckpt-writer-{owner.rank_info.global_rank}",
            daemon=True,
        )
        self.context = WriterProcessContext(self.process)
        self.process.start()
        child_end.close()  # recv here fails fast when the process dies
        self.dead: str | None = None
        self._reader = threading.Thread(
            target=self._read_answers, name="cloudckpt-writer-pipe", daemon=True
        )
        self._reader.start()
        timeout = owner.config.subprocess_init_timeout_secs
        try:
            answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WriterProcessTimeoutError(
                f"Timed out after {timeout} s waiting for the checkpoint writer process to start "
                "([process] subprocess_init_timeout_secs); raise it, or check "
                "subprocess_init_fn"
            ) from None
        if isinstance(answer, _Death):
            raise WriterProcessError(
                f"the checkpoint writer process {answer.how} while starting (its stderr says "
                "why); the process is spawned, so it imports your main module again: a script "
                'must keep its top level under `if __name__ == "__main__":`'
            )
        if not answer.success:
            self.process.join(5)
            why = answer.error if answer.error is not None else answer.error_msg
            raise WriterProcessError(
                f"the checkpoint writer process failed to start: {why}"
            ) from answer.error
        logger.info("checkpoint writer process started (pid %d)", self.process.pid)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _read_answers(self) -> None:
        """Route log records to logging and answers to the waiting write; notice a death."""
        while True:
            try:
                ready = wait([self._conn, self.process.sentinel])
                if self._conn in ready:
                    message: WorkerResponse = self._conn.recv()
                elif self.process.sentinel in ready:
                    raise EOFError
            except (EOFError, OSError):
                self.process.join(5)
                self.dead = _how_it_died(self.process.exitcode)
                self._answers.put(_Death(self.dead))
                return
            if message.request_type is RequestType.LOG:
                record: logging.LogRecord = message.payload
                target = logging.getLogger(record.name)
                if target.isEnabledFor(record.levelno):
                    target.handle(record)
                continue
            self._answers.put(message)
            if message.request_type is RequestType.TERMINATE_PROCESS or (
                message.request_type is RequestType.PING and not message.success
            ):
                return

    def write(
        self, path: str, tree: Node, leaves: list[TensorLeaf], kwargs: dict[str, Any]
    ) -> None:
        """Send a flattened state dict: its tree, and each tensor as a place in a storage."""
        storages: dict[int, torch.UntypedStorage] = {}
        refs = [_ref(leaf.tensor, storages) for leaf in leaves]
        layouts = [(lf.shard.layout, lf.shard.kind) if lf.shard else None for lf in leaves]
        new = {k: s for k, s in storages.items() if k not in self._sent}
        # hold what the process holds, so no address is reused by another storage meanwhile
        self._sent = storages
        payload = WritePayload(path, tree, refs, layouts, new, frozenset(storages), kwargs)
        try:
            self._conn.send(WorkerRequest(RequestType.WRITE_CHECKPOINT, payload))
        except (OSError, ValueError):
            pass  # the reader thread reports the death
        answer = self._answers.get()
        if isinstance(answer, WorkerResponse):
            if answer.success:
                return
            raise answer.error or WriterProcessError(str(answer.error_msg))
        raise WriterProcessError(
            f"the checkpoint writer process (pid {self.pid}) {answer.how} while saving {path}; "
            "the save did not finish (a checkpoint is committed only if its manifest was "
            f"written: `cloudckpt info {path}` tells)"
        )

    def stop(self, timeout: float) -> None:
        if self.dead is None:
            try:
                self._conn.send(WorkerRequest(RequestType.TERMINATE_PROCESS))
            except (OSError, ValueError):
                pass
            if not self.context.join(timeout):
                logger.warning(
                    "the checkpoint writer process (pid %s) did not stop within %s s "
                    "([process] subprocess_shutdown_timeout_secs); killing it",
                    self.pid,
                    timeout,
                )
                self.kill()
        self._reader.join(timeout)
        self._conn.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(5)


class CheckpointProcess(BackgroundWriter):
    """A persistent writer process (the signature of upstream's ``CheckpointProcess``), fed through
    shared memory.

    Spawned in the background at construction. The writer inside it comes from
    ``checkpoint_writer_init_fn(rank_info=..., **checkpoint_writer_init_args)`` after
    ``subprocess_init_fn(*subprocess_init_args)``; both must be picklable (module-level). If the
    process dies, the save in flight fails with :class:`WriterProcessError`; with one rank the
    next save starts a new process, with several every later save fails (the ranks' barrier
    cannot take back one rank's writer alone: make a new checkpointer on every rank).
    """

    def __init__(
        self,
        rank_info: RankInfo,
        config: CheckpointProcessConfig,
        subprocess_init_fn: Callable[..., None] | None,
        subprocess_init_args: tuple[Any, ...],
        checkpoint_writer_init_fn: Callable[..., Any],
        checkpoint_writer_init_args: dict[str, Any],
        storage: StorageConfig | None = None,
        *,
        backends: BackendSource | None = None,
    ) -> None:
        self.rank_info = rank_info
        self.storage = storage
        self.config = config
        # the parent's backends, only to read a destination's capabilities before a save
        self._own_backends = backends is None
        self._backends: BackendSource = OwnedBackends() if backends is None else backends
        self.subprocess_init_fn = subprocess_init_fn
        self.subprocess_init_args = tuple(subprocess_init_args)
        self.checkpoint_writer_init_fn = checkpoint_writer_init_fn
        self.checkpoint_writer_init_args = dict(checkpoint_writer_init_args)
        try:
            pickle.dumps(
                (
                    subprocess_init_fn,
                    self.subprocess_init_args,
                    checkpoint_writer_init_fn,
                    self.checkpoint_writer_init_args,
                )
            )
        except Exception as e:
            raise ConfigError(
                "the writer process gets subprocess_init_fn, checkpoint_writer_init_fn, their "
                f"arguments and the commit hook by pickling, and they do not pickle ({e}); define "
                'them at module level, or use [process] writer = "thread"'
            ) from e
        self._worker: _Worker | None = None
        self._context: WriterProcessContext | None = None
        self._death: str | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cloudckpt-writer")
        self.process_creation_future = self._executor.submit(self._ensure_worker)

    @property
    def pid(self) -> int | None:
        """The writer process's pid (``None`` before it started)."""
        return None if self._worker is None else self._worker.pid

    @property
    def process(self) -> WriterProcessContext | None:
        """The latest writer process (``processes[0]``), kept after ``close`` so its exit can be
        checked; ``None`` until one has started."""
        return self._context

    def _ensure_worker(self) -> _Worker:
        if self._worker is not None and self._worker.dead is None:
            return self._worker
        if self._worker is not None:  # it died, perhaps while idle
            self._death = self._worker.dead
            self._worker.stop(0)
            self._worker = None
        if self._death is not None and self.rank_info.global_world_size > 1:
            raise WriterProcessError(
                f"the checkpoint writer process of rank {self.rank_info.global_rank} "
                f"{self._death} earlier; with several ranks this checkpointer cannot start a new "
                "one alone (the barrier pairs the ranks' writers): close it and make a new one "
                "on every rank"
            )
        started = time.monotonic()
        self._worker = _Worker(self)
        self._context = self._worker.context
        logger.debug("writer process up in %.2f s", time.monotonic() - started)
        return self._worker

    def write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, **kwargs: Any
    ) -> Future[None]:
        return self._executor.submit(self._write, state_dict, path, kwargs)

    def _write(
        self, state_dict: STATE_DICT | Future[STATE_DICT], path: str, kwargs: dict[str, Any]
    ) -> None:
        self._check_shareable(path, kwargs.get("storage_options"))
        # one walk: refuses what cannot be saved, by key path, and is what the process receives
        tree, leaves = flatten(_resolved(state_dict))
        worker = self._ensure_worker()
        try:
            worker.write(path, tree, leaves, kwargs)
        finally:
            if worker.dead is not None:
                self._death = worker.dead

    def _check_shareable(self, path: str, overrides: dict[str, Any] | None) -> None:
        """Refuse a destination whose store the writer process cannot see (``memory://``)."""
        storage = self.storage or StorageConfig()
        uri = storage.resolve_uri(path)
        backend, _ = self._backends.resolve(
            uri, backend=storage.backend, storage_options=storage.options_with(overrides)
        )
        if not backend.capabilities.process_shareable:
            shown = path if uri == path else f"{path} (under the root, {uri})"
            raise ConfigError(
                f"{shown}: the {backend.name} store lives inside this process, so the writer "
                'process would save into its own memory; use [process] writer = "thread" for it'
            )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._own_backends:
            self._backends.close()
        if self._worker is not None:
            self._worker.stop(self.config.subprocess_shutdown_timeout_secs)
            self._worker = None
