"""Factories that build checkpointers from a :class:`CheckpointerConfig`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from .background import BackgroundWriter, WriterThread
from .barriers import barrier_config_for_process, default_barrier, rank_info_of
from .checkpoint_process import CheckpointProcess
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, WriterHook
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import CheckpointerConfig, resolve_config
from .errors import ConfigError
from .staging import DefaultStager
from .storage.registry import BackendSource
from .types import RankInfo, default_rank_info


def rank_info_for(cfg: CheckpointerConfig, rank_info: RankInfo | None) -> RankInfo:
    """The rank info of a checkpointer built from ``cfg``.

    ``global_rank`` and ``global_world_size`` in ``[barrier.barrier_args]`` are the rank info;
    a ``rank_info`` argument or an initialized process group that disagrees with them is a
    :class:`ConfigError` naming both. Otherwise ``rank_info``, else the process group's, else
    a single rank.
    """
    from_barrier = rank_info_of(cfg.barrier_config)
    if from_barrier is None:
        return rank_info or default_rank_info()
    barrier_ri = RankInfo(global_rank=from_barrier[0], global_world_size=from_barrier[1])
    others = []
    if rank_info is not None:
        others.append(("rank_info=", rank_info))
    if _group_initialized():
        others.append(("the process group", default_rank_info()))
    for what, ri in others:
        if (ri.global_rank, ri.global_world_size) != from_barrier:
            raise ConfigError(
                f"[barrier.barrier_args] says rank {barrier_ri.global_rank} of "
                f"{barrier_ri.global_world_size} (global_rank, global_world_size) but {what} says "
                f"rank {ri.global_rank} of {ri.global_world_size}; make them agree (or drop "
                f"one of them)"
            )
    return barrier_ri


def _group_initialized() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def writer_from_config(
    rank_info: RankInfo,
    config: CheckpointerConfig,
    commit_hook: WriterHook | None = None,
    backends: BackendSource | None = None,
) -> CheckpointWriter:
    """The default writer; also what a writer process builds (module-level, so it pickles)."""
    return CheckpointWriter(
        config=config.writer_config,
        rank_info=rank_info,
        barrier=default_barrier(
            config.barrier_config, rank_info.global_world_size, rank_info.global_rank
        ),
        commit_hook=commit_hook,
        storage=config.storage,
        backends=backends,
    )


def make_checkpoint_reader(
    cfg: CheckpointerConfig, rank_info: RankInfo, backends: BackendSource | None = None
) -> CheckpointReader:
    """A reader alone: loading needs no writer and no barrier (no store traffic)."""
    return CheckpointReader(
        rank_info,
        storage=cfg.storage,
        concurrency=cfg.writer_config.concurrency,
        backends=backends,
    )


def make_sync_checkpointer(
    config: CheckpointerConfig | str | os.PathLike[str] | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
    *,
    backends: BackendSource | None = None,
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer`; rank and world size from the process group if not given.

    It opens the backends it uses and closes them on ``close()``; ``backends`` (an
    :class:`~cloudckpt.storage.OwnedBackends` of yours, or the shared cache) is used instead
    and left open."""
    cfg = resolve_config(config)
    rank_info = rank_info_for(cfg, rank_info)
    return SyncCheckpointer(
        writer=writer_from_config(rank_info, cfg, commit_hook, backends),
        reader=make_checkpoint_reader(cfg, rank_info, backends),
        owns_components=True,
    )


def make_async_checkpointer(
    config: CheckpointerConfig | str | os.PathLike[str] | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] | None = None,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None = None,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
    commit_hook: WriterHook | None = None,
    *,
    backends: BackendSource | None = None,
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer`: staging in the caller, writing and commit behind it.

    ``[process] writer`` picks where the writer runs. ``"thread"`` (default): a background
    thread of this process; ``subprocess_init_fn(*subprocess_init_args)`` runs once here.
    ``"process"``: a persistent writer process spawned now and fed through shared memory; the
    init function, the writer factory and ``commit_hook`` run in it and must pickle.
    ``checkpoint_writer_init_fn(rank_info=..., **checkpoint_writer_init_args)`` replaces the
    default writer in both. Backends: as :func:`make_sync_checkpointer` (a writer process
    opens and closes its own).
    """
    cfg = resolve_config(config)  # validated: the writer kind and shared memory agree
    rank_info = rank_info_for(cfg, rank_info)
    kind = cfg.process_config.writer
    background: BackgroundWriter
    if kind == "process":
        if checkpoint_writer_init_fn is None:
            child_cfg = dataclasses.replace(
                cfg,
                barrier_config=barrier_config_for_process(
                    cfg.barrier_config, rank_info.global_world_size
                ),
            )
            writer_fn: Callable[..., CheckpointWriter] = writer_from_config
            writer_args = {"config": child_cfg, "commit_hook": commit_hook}
        else:
            writer_fn, writer_args = checkpoint_writer_init_fn, checkpoint_writer_init_args or {}
        background = CheckpointProcess(
            rank_info,
            cfg.process_config,
            subprocess_init_fn,
            subprocess_init_args,
            writer_fn,
            writer_args,
            storage=cfg.storage,
            backends=backends,
        )
    else:
        if subprocess_init_fn is not None:
            subprocess_init_fn(*subprocess_init_args)
        if checkpoint_writer_init_fn is not None:
            writer = checkpoint_writer_init_fn(
                rank_info=rank_info, **(checkpoint_writer_init_args or {})
            )
        else:
            writer = writer_from_config(rank_info, cfg, commit_hook, backends)
        background = WriterThread(writer, cfg.process_config)
    return AsyncCheckpointer(
        checkpoint_stager=DefaultStager(cfg.staging_config, for_process=kind == "process"),
        checkpoint_process=background,
        reader=make_checkpoint_reader(cfg, rank_info, backends),
        owns_components=True,
    )
