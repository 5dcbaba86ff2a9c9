"""Factories that build checkpointers from a :class:`CheckpointerConfig`."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .barriers import default_barrier
from .checkpoint_process import CheckpointProcess
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, WriterHook
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import CheckpointerConfig, resolve_config
from .staging import DefaultStager
from .types import RankInfo, default_rank_info


def _writer(
    cfg: CheckpointerConfig, rank_info: RankInfo, hook: WriterHook | None
) -> CheckpointWriter:
    return CheckpointWriter(
        config=cfg.writer_config,
        rank_info=rank_info,
        barrier=default_barrier(cfg.barrier_config, rank_info.global_world_size),
        commit_hook=hook,
        storage=cfg.storage,
    )


def make_sync_checkpointer(
    config: CheckpointerConfig | str | os.PathLike[str] | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer`; rank and world size from the process group if not given."""
    cfg = resolve_config(config)
    rank_info = rank_info or default_rank_info()
    reader = CheckpointReader(
        rank_info, storage=cfg.storage, concurrency=cfg.writer_config.concurrency
    )
    return SyncCheckpointer(writer=_writer(cfg, rank_info, commit_hook), reader=reader)


def make_async_checkpointer(
    config: CheckpointerConfig | str | os.PathLike[str] | None = None,
    rank_info: RankInfo | None = None,
    subprocess_init_fn: Callable[..., None] | None = None,
    subprocess_init_args: tuple[Any, ...] = (),
    checkpoint_writer_init_fn: Callable[..., CheckpointWriter] | None = None,
    checkpoint_writer_init_args: dict[str, Any] | None = None,
    commit_hook: WriterHook | None = None,
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer`: staging in the caller, writing and commit behind it.

    The seed's parameters are accepted by name and position. The writer runs in a background
    thread of this process, so ``subprocess_init_fn(*subprocess_init_args)`` runs once here
    before the first write; ``checkpoint_writer_init_fn(rank_info=..., **args)`` replaces the
    default writer when given.
    """
    cfg = resolve_config(config)
    rank_info = rank_info or default_rank_info()
    reader = CheckpointReader(
        rank_info, storage=cfg.storage, concurrency=cfg.writer_config.concurrency
    )
    if subprocess_init_fn is not None:
        subprocess_init_fn(*subprocess_init_args)
    if checkpoint_writer_init_fn is not None:
        writer = checkpoint_writer_init_fn(
            rank_info=rank_info, **(checkpoint_writer_init_args or {})
        )
    else:
        writer = _writer(cfg, rank_info, commit_hook)
    return AsyncCheckpointer(
        checkpoint_stager=DefaultStager(cfg.staging_config),
        checkpoint_process=CheckpointProcess(writer, cfg.process_config),
        reader=reader,
    )
