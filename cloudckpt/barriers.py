"""Rank agreement before the commit, on torch.distributed stores.

A wait-only barrier just waits. Ours also carry each rank's outcome (a
:class:`~cloudckpt.protocol.records.RankOutcome`), so a rank that failed is known to the others at
once instead of after a timeout, and rank 0 learns what every rank wrote; rank 0 answers with a
:class:`~cloudckpt.protocol.records.CommitResult`. Both barriers run the same store protocol (:class:`StoreExchange`):
``TCPStoreBarrier`` on its own TCPStore (no process group needed), ``DistBarrier`` on the
initialized process group's store, so it never touches the training's NCCL communicator.

Protocol for save number ``seq`` (every rank's barrier counts saves the same way):

1. each rank sets ``<prefix>/<seq>/out/<rank>`` to its outcome and adds 1 to ``arrived``
   (a failed rank adds 1 to ``failed`` first);
2. the last rank to arrive, or any rank that failed, sets ``released``; every rank blocks on
   that one key (no polling). A failure raises :class:`BarrierError` naming the failed ranks
   and their errors; all arrived: rank 0 reads every outcome; the deadline passes: raise naming
   the ranks that never arrived;
3. rank 0 commits and sets ``<prefix>/<seq>/commit`` to the result, which the others wait for.
"""

from __future__ import annotations

import abc
import inspect
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any

from .config_types import check_fields, masked, setting
from .errors import BarrierError, ConfigError
from .protocol.records import CommitResult, RankOutcome

logger = logging.getLogger(__name__)

_barriers: dict[str, type[Barrier]] = {}
#: Barrier classes by ``barrier_type`` (read-only: add with :func:`register_barrier`).
BARRIER_REGISTRY: Mapping[str, type[Barrier]] = MappingProxyType(_barriers)


def register_barrier(barrier_class: type[Barrier] | None = None, *, clobber: bool = False) -> Any:
    """Register a barrier class under its ``barrier_type`` (also as ``@register_barrier``).

    A type already taken by another class is refused with ``ConfigError`` unless
    ``clobber=True``.
    """

    def register(cls: type[Barrier]) -> type[Barrier]:
        taken = _barriers.get(cls.barrier_type)
        if taken is not None and taken is not cls and not clobber:
            raise ConfigError(
                f"cannot register {cls.__qualname__}: barrier_type {cls.barrier_type!r} is "
                f"already registered by {taken.__qualname__}. Pass clobber=True to replace it."
            )
        _barriers[cls.barrier_type] = cls
        return cls

    return register if barrier_class is None else register(barrier_class)


@dataclass
class BarrierConfig:
    """Which barrier to build (``None``: no barrier, one process) and its constructor arguments.

    Its repr masks the values of arguments that look like credentials."""

    barrier_type: str | None = setting(
        None,
        doc="`tcp_store` or `dist_barrier`; absent: none for one process, the process group's "
        "store when one is initialized.",
        types=(str, type(None)),
    )
    barrier_args: dict[str, Any] = setting(
        doc="Table `[barrier.barrier_args]`: constructor arguments of the barrier (e.g. "
        "`master_address`, `tcpstore_port`), checked against its signature. "
        "`global_rank` and `global_world_size` here are the rank info of the save.",
        types=(dict,),
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        check_fields(self, "barrier")

    def __repr__(self) -> str:
        return (
            f"BarrierConfig(barrier_type={self.barrier_type!r}, "
            f"barrier_args={masked(self.barrier_args)!r})"
        )


class _UnknownBarrierType(BarrierError, ValueError):
    pass


def barrier_parameters(cls: type[Barrier]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """The argument names ``cls``'s constructor takes (``None``: any, it has ``**kwargs``) and
    the ones it requires."""
    params = inspect.signature(cls.__init__).parameters.values()
    named = [p for p in params if p.name != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in named):
        return None, frozenset()
    kw = [p for p in named if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return (
        frozenset(p.name for p in kw),
        frozenset(p.name for p in kw if p.default is p.empty),
    )


def rank_info_of(barrier_config: BarrierConfig) -> tuple[int, int] | None:
    """``(global_rank, global_world_size)`` when the barrier arguments carry both."""
    args = barrier_config.barrier_args
    if "global_rank" in args and "global_world_size" in args:
        rank, world = args["global_rank"], args["global_world_size"]
        if type(rank) is not int or type(world) is not int or not 0 <= rank < world:
            raise ConfigError(
                f"[barrier.barrier_args] global_rank = {rank!r} and global_world_size = "
                f"{world!r}: expected integers with 0 <= global_rank < global_world_size"
            )
        return rank, world
    return None


def create_barrier_from_config(barrier_config: BarrierConfig) -> Barrier | None:
    """The barrier ``barrier_config`` names, or ``None``; an unknown type is a ``ValueError``,
    arguments its constructor does not take or lacks a :class:`ConfigError`."""
    if barrier_config.barrier_type is None:
        return None
    cls = BARRIER_REGISTRY.get(barrier_config.barrier_type)
    if cls is None:
        raise _UnknownBarrierType(
            f"Unknown barrier type: {barrier_config.barrier_type!r}. "
            f"Available types: {sorted(BARRIER_REGISTRY)} (or none for a single process)."
        )
    known, required = barrier_parameters(cls)
    args = barrier_config.barrier_args
    if known is not None:
        unknown = sorted(str(k) for k in args if k not in known)
        missing = sorted(required - set(args))
        if unknown or missing:
            what = []
            if unknown:
                what.append(f"does not take {', '.join(map(repr, unknown))}")
            if missing:
                what.append(f"needs {', '.join(map(repr, missing))}")
            raise ConfigError(
                f"[barrier.barrier_args]: {cls.__name__} (barrier_type = "
                f"{barrier_config.barrier_type!r}) {' and '.join(what)}; its arguments: "
                f"{', '.join(sorted(known))}"
            )
    return cls(**args)


def _with_rank(barrier_config: BarrierConfig, rank: int, world_size: int) -> BarrierConfig:
    """``barrier_config`` with ``global_rank``/``global_world_size`` filled in from this process
    when the barrier takes them and the config leaves them out (a config file is shared by every
    rank, so it cannot name one)."""
    cls = BARRIER_REGISTRY.get(barrier_config.barrier_type or "")
    if cls is None:
        return barrier_config
    params = inspect.signature(cls.__init__).parameters
    args = dict(barrier_config.barrier_args)
    for name, value in (("global_rank", rank), ("global_world_size", world_size)):
        if name in params and name not in args:
            args[name] = value
    return BarrierConfig(barrier_config.barrier_type, args)


def default_barrier(
    barrier_config: BarrierConfig, world_size: int, rank: int | None = None
) -> Barrier | None:
    """The configured barrier; with none configured, several ranks and an initialized process
    group, a :class:`DistBarrier` on that group's store (what a user of the group expects).
    With ``rank`` given, a barrier that takes ``global_rank``/``global_world_size`` gets them
    from this process unless the config names them."""
    if rank is not None:
        barrier_config = _with_rank(barrier_config, rank, world_size)
    barrier = create_barrier_from_config(barrier_config)
    if barrier is None and world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return DistBarrier()
    return barrier


class Barrier(abc.ABC):
    """Synchronizes the ranks of a job. Subclasses may also exchange outcomes.

    The writer uses only :meth:`exchange`, :meth:`publish_commit` and :meth:`await_commit`
    (the outcome exchange); a barrier that implements only :meth:`execute_barrier` gets
    their wait-only defaults.
    """

    barrier_type: str = ""

    @abc.abstractmethod
    def __init__(self, **kwargs: Any) -> None:
        """Build the barrier from its config arguments."""

    @abc.abstractmethod
    def execute_barrier(self) -> None:
        """Wait until every rank has arrived."""

    def exchange(self, outcome: RankOutcome, timeout_secs: float) -> list[RankOutcome] | None:
        """Report ``outcome``; return every rank's outcome on rank 0 (``None`` elsewhere).

        Raises :class:`BarrierError` if a rank failed or did not arrive in time. The default,
        for a barrier that can only wait, waits and returns ``None``.
        """
        self.execute_barrier()
        return None

    def publish_commit(self, result: CommitResult) -> None:  # noqa: B027 - optional
        """Rank 0: tell the others how the commit went (no-op for a wait-only barrier)."""

    def await_commit(self, timeout_secs: float) -> CommitResult:
        """Other ranks: the result rank 0 published (wait-only barriers: assume success)."""
        return CommitResult(ok=True)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the store or group."""

    @property
    def world_size(self) -> int | None:
        """How many ranks this barrier waits for (``None``: it does not say)."""
        return None


class StoreExchange:
    """The outcome protocol above, on any ``torch.distributed.Store``."""

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.prefix = prefix
        self.seq = 0

    def _key(self, seq: int, name: str) -> str:
        return f"{self.prefix}/{seq}/{name}"

    def _count(self, key: str) -> int:
        return int(self.store.add(key, 0))

    def exchange(self, outcome: RankOutcome, timeout_secs: float) -> list[RankOutcome] | None:
        try:
            return self._exchange(outcome, timeout_secs)
        except BarrierError:
            raise
        except Exception as e:  # the store itself is gone: its host (rank 0) died
            raise BarrierError(
                f"rank {self.rank} lost the checkpoint barrier's store ({type(e).__name__}: "
                f"{e}); its host, rank 0, probably died. Nothing was committed."
            ) from e

    def _exchange(self, outcome: RankOutcome, timeout_secs: float) -> list[RankOutcome] | None:
        seq = self.seq
        self.seq += 1
        key = self._key
        self.store.set(key(seq, f"out/{self.rank}"), outcome.to_json())
        if not outcome.ok:
            self.store.add(key(seq, "failed"), 1)
            self.store.set(key(seq, "released"), "failed")  # wake everyone now
        if int(self.store.add(key(seq, "arrived"), 1)) == self.world_size:
            self.store.set(key(seq, "released"), "all")  # the last to arrive wakes everyone
        started = time.monotonic()
        try:
            # One blocking wait per rank, no polling: O(1) store load per rank per save.
            self.store.wait([key(seq, "released")], timedelta(seconds=timeout_secs))
        except Exception:
            if time.monotonic() - started < timeout_secs * 0.99:
                raise  # not a timeout: the store is gone
            try:
                missing: Any = [
                    r
                    for r in range(self.world_size)
                    if not self.store.check([key(seq, f"out/{r}")])
                ]
                self.store.add(key(seq, "acked"), 1)
                if self.rank == 0:
                    self._linger(seq)
            except Exception:  # rank 0 timed out first and took the store with it
                missing = "(unknown: the store's host, rank 0, is gone too)"
            raise BarrierError(
                f"ranks {missing} did not reach the checkpoint barrier within "
                f"{timeout_secs:g} s (save #{seq}); they died or hang. Nothing was "
                "committed. Check those ranks' logs; raise write_barrier_timeout_secs if "
                "they are only slow."
            ) from None
        if self._count(key(seq, "failed")):
            error = self._failure(seq)
            self.store.add(key(seq, "acked"), 1)
            if self.rank == 0:
                self._linger(seq)
            raise error
        if self.rank != 0:
            return None
        raw = self.store.multi_get([key(seq, f"out/{r}") for r in range(self.world_size)])
        if seq > 0:
            self._forget(seq - 1)
        return [RankOutcome.from_json(bytes(v)) for v in raw]

    def _linger(self, seq: int, limit: float = 5.0) -> None:
        """Rank 0 hosts the store: after a failed save, give the others a moment to read the
        failure details before this process (and the store with it) may exit."""
        deadline = time.monotonic() + limit  # a dead rank never acks: bounded wait
        while (
            self._count(self._key(seq, "acked")) < self.world_size and time.monotonic() < deadline
        ):
            time.sleep(0.01)

    def _failure(self, seq: int) -> BarrierError:
        failed = []
        for r in range(self.world_size):
            k = self._key(seq, f"out/{r}")
            if self.store.check([k]):
                o = RankOutcome.from_json(bytes(self.store.get(k)))
                if not o.ok:
                    failed.append((r, o.error or "unknown error"))
        detail = "; ".join(f"rank {r}: {e}" for r, e in failed)
        return BarrierError(
            f"checkpoint save failed on rank(s) {[r for r, _ in failed]}: {detail}. "
            "Nothing was committed; fix the cause and save again."
        )

    def _forget(self, seq: int) -> None:
        names = ["arrived", "failed", "released", "acked", "commit", "commit_acked"] + [
            f"out/{r}" for r in range(self.world_size)
        ]
        for name in names:
            try:
                self.store.delete_key(self._key(seq, name))
            except Exception:  # pragma: no cover - stores without delete
                return

    def publish_commit(self, result: CommitResult, linger: float = 5.0) -> None:
        seq = self.seq - 1
        self.store.set(self._key(seq, "commit"), result.to_json())
        # Rank 0 hosts the store: wait (bounded) until every rank has read the result, so a
        # job that exits right after its last save does not take the answer away from them.
        deadline = time.monotonic() + linger
        while (
            self._count(self._key(seq, "commit_acked")) < self.world_size - 1
            and time.monotonic() < deadline
        ):
            time.sleep(0.002)

    def await_commit(self, timeout_secs: float) -> CommitResult:
        k = self._key(self.seq - 1, "commit")
        try:
            self.store.wait([k], timedelta(seconds=timeout_secs))
            result = CommitResult.from_json(bytes(self.store.get(k)))
            self.store.add(self._key(self.seq - 1, "commit_acked"), 1)
        except Exception as e:
            raise BarrierError(
                f"rank 0 did not report the commit within {timeout_secs:g} s ({e}); the "
                "checkpoint may be uncommitted. Check rank 0's log."
            ) from e
        return result


class _StoreBarrier(Barrier):
    """Shared behaviour of the store-backed barriers."""

    _exchange: StoreExchange
    _timeout_secs: float

    def execute_barrier(self) -> None:
        self._exchange.exchange(RankOutcome(self._exchange.rank), self._timeout_secs)

    def exchange(self, outcome: RankOutcome, timeout_secs: float) -> list[RankOutcome] | None:
        return self._exchange.exchange(outcome, timeout_secs)

    def publish_commit(self, result: CommitResult) -> None:
        self._exchange.publish_commit(result)

    def await_commit(self, timeout_secs: float) -> CommitResult:
        return self._exchange.await_commit(timeout_secs)

    @property
    def world_size(self) -> int | None:
        return self._exchange.world_size


_NO_PROCESS_GROUP = (
    "DistBarrier requires an initialized process group: call "
    "torch.distributed.init_process_group() first, or use barrier_type='tcp_store'."
)


@register_barrier
class DistBarrier(_StoreBarrier):
    """Runs on the initialized process group's store (never on its NCCL communicator).

    A writer process has no process group: there it is built with the group's TCPStore address
    (``store_host``, ``store_port``) and the rank's ``rank`` and ``world_size`` instead; see
    :func:`barrier_config_for_process`.
    """

    barrier_type = "dist_barrier"

    def __init__(
        self,
        barrier_prefix: str = "cloudckpt",
        timeout_secs: float = 600,
        store_host: str | None = None,
        store_port: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        import torch.distributed as dist

        self._timeout_secs = timeout_secs
        if store_host is not None and store_port is not None:
            if rank is None or world_size is None:
                raise BarrierError("DistBarrier with a store address needs rank and world_size")
            client = dist.TCPStore(
                store_host,
                store_port,
                is_master=False,
                timeout=timedelta(seconds=timeout_secs),
                wait_for_workers=False,
            )
            self._exchange = _fresh_exchange(client, rank, world_size, f"{barrier_prefix}/writer")
            return
        if not dist.is_initialized():
            raise BarrierError(_NO_PROCESS_GROUP)
        store = dist.distributed_c10d._get_default_store()
        self._exchange = _fresh_exchange(
            store, dist.get_rank(), dist.get_world_size(), f"{barrier_prefix}/dist"
        )


def _fresh_exchange(store: Any, rank: int, world_size: int, prefix: str) -> StoreExchange:
    """An exchange under a key prefix no earlier barrier on this long-lived store used.

    The process group's store outlives checkpointers (``cloudckpt.save`` builds one per call),
    and each exchange numbers its saves from 0. Every rank counts the barriers it built in the
    store itself; ranks build them in the same order, so the n-th barrier of every rank meets
    under ``prefix/n`` and never reads an earlier one's keys."""
    generation = int(store.add(f"{prefix}/built/{rank}", 1))
    return StoreExchange(store, rank, world_size, f"{prefix}/{generation}")


def barrier_config_for_process(barrier_config: BarrierConfig, world_size: int) -> BarrierConfig:
    """The barrier a writer *process* builds: a process-group barrier becomes one on the group's
    TCPStore address, since the writer process has no process group of its own."""
    wants_group = barrier_config.barrier_type == "dist_barrier" or (
        barrier_config.barrier_type is None and world_size > 1
    )
    if not wants_group:
        return barrier_config
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if barrier_config.barrier_type is None:
            return barrier_config  # the writer reports the missing barrier itself
        raise BarrierError(_NO_PROCESS_GROUP)
    store = dist.distributed_c10d._get_default_store()
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        raise BarrierError(
            f"the writer process reaches the other ranks through the process group's store, "
            f"but this group's store is a {type(store).__name__}, not a TCPStore; configure "
            '[barrier] barrier_type = "tcp_store" for the process writer'
        )
    args = dict(barrier_config.barrier_args)
    args.update(
        store_host=store.host,
        store_port=store.port,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
    )
    return BarrierConfig(barrier_type="dist_barrier", barrier_args=args)


@register_barrier
class TCPStoreBarrier(_StoreBarrier):
    """Runs on a TCPStore of its own (rank 0 hosts it); no process group needed."""

    barrier_type = "tcp_store"

    def __init__(
        self,
        global_rank: int,
        global_world_size: int,
        barrier_prefix: str = "cloudckpt",
        timeout_barrier_init_secs: int = 300,
        use_checkpoint_barrier_tcpstore_libuv: bool = True,
        tcpstore_port: int = 29511,
        master_address: str = "localhost",
        timeout_secs: int = 600,
    ) -> None:
        import torch.distributed as dist

        logger.info(
            "TCPStoreBarrier master=%s:%s rank=%s world_size=%s prefix=%s",
            master_address,
            tcpstore_port,
            global_rank,
            global_world_size,
            barrier_prefix,
        )
        self._timeout_secs = timeout_secs
        try:
            self._store = dist.TCPStore(
                master_address,
                int(tcpstore_port),
                world_size=global_world_size,
                is_master=(global_rank == 0),
                timeout=timedelta(seconds=timeout_barrier_init_secs),
                use_libuv=use_checkpoint_barrier_tcpstore_libuv,
            )
        except Exception as e:
            raise BarrierError(
                f"rank {global_rank} could not reach the checkpoint TCPStore at "
                f"{master_address}:{tcpstore_port} ({e}). Check master_address and "
                "tcpstore_port, and that rank 0 is running."
            ) from e
        self._exchange = StoreExchange(
            self._store, global_rank, global_world_size, f"{barrier_prefix}/tcp"
        )
