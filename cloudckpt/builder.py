"""Factories that build checkpointers from a :class:`CheckpointerConfig`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from .barriers import barrier_config_for_process, default_barrier
from .checkpoint_process import (
    WRITER_KINDS,
    BackgroundWriter,
    CheckpointProcess,
    WriterThread,
)
from .checkpoint_reader import CheckpointReader
from .checkpoint_writer import CheckpointWriter, WriterHook
from .checkpointer import AsyncCheckpointer, SyncCheckpointer
from .config import CheckpointerConfig, resolve_config
from .errors import ConfigError
from .staging import DefaultStager
from .types import RankInfo, default_rank_info


def writer_from_config(
    rank_info: RankInfo, config: CheckpointerConfig, commit_hook: WriterHook | None = None
) -> CheckpointWriter:
    """The default writer; also what a writer process builds (module-level, so it pickles)."""
    return CheckpointWriter(
        config=config.writer_config,
        rank_info=rank_info,
        barrier=default_barrier(config.barrier_config, rank_info.global_world_size),
        commit_hook=commit_hook,
        storage=config.storage,
    )


def make_checkpoint_reader(cfg: CheckpointerConfig, rank_info: RankInfo) -> CheckpointReader:
    """A reader alone: loading needs no writer and no barrier (no store traffic)."""
    return CheckpointReader(
        rank_info, storage=cfg.storage, concurrency=cfg.writer_config.concurrency
    )


def make_sync_checkpointer(
    config: CheckpointerConfig | str | os.PathLike[str] | None = None,
    rank_info: RankInfo | None = None,
    commit_hook: WriterHook | None = None,
) -> SyncCheckpointer:
    """A :class:`SyncCheckpointer`; rank and world size from the process group if not given."""
    cfg = resolve_config(config)
    rank_info = rank_info or default_rank_info()
    return SyncCheckpointer(
        writer=writer_from_config(rank_info, cfg, commit_hook),
        reader=make_checkpoint_reader(cfg, rank_info),
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
) -> AsyncCheckpointer:
    """An :class:`AsyncCheckpointer`: staging in the caller, writing and commit behind it.

    ``[process] writer`` picks where the writer runs. ``"thread"`` (default): a background
    thread of this process; ``subprocess_init_fn(*subprocess_init_args)`` runs once here.
    ``"process"``: a persistent writer process spawned now and fed through shared memory; the
    init function, the writer factory and ``commit_hook`` run in it and must pickle.
    ``checkpoint_writer_init_fn(rank_info=..., **checkpoint_writer_init_args)`` replaces the
    default writer in both.
    """
    cfg = resolve_config(config)
    rank_info = rank_info or default_rank_info()
    kind = cfg.process_config.writer
    if kind not in WRITER_KINDS:
        raise ConfigError(
            f"[process] writer = {kind!r} is not a writer kind; use one of {list(WRITER_KINDS)}"
        )
    background: BackgroundWriter
    if kind == "process":
        if not cfg.staging_config.use_shared_memory:
            raise ConfigError(
                '[staging] use_shared_memory = false cannot work with [process] writer = "process":'
                " the writer process reads the staged tensors from shared memory; set it to true"
                ' or use writer = "thread"'
            )
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
        )
    else:
        if subprocess_init_fn is not None:
            subprocess_init_fn(*subprocess_init_args)
        if checkpoint_writer_init_fn is not None:
            writer = checkpoint_writer_init_fn(
                rank_info=rank_info, **(checkpoint_writer_init_args or {})
            )
        else:
            writer = writer_from_config(rank_info, cfg, commit_hook)
        background = WriterThread(writer, cfg.process_config)
    return AsyncCheckpointer(
        checkpoint_stager=DefaultStager(cfg.staging_config, for_process=kind == "process"),
        checkpoint_process=background,
        reader=make_checkpoint_reader(cfg, rank_info),
        owns_components=True,
    )
